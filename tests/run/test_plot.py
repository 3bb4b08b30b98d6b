"""Plots: error curves from metrics.jsonl and first-layer filter grids (PNG files)."""
from __future__ import annotations

import json
import math

import pytest
import torch

from onetrick.run.plots import filter_grid, plot_curves, plot_filters, read_metrics

torch.set_num_threads(1)

PNG_HEADER = b"\x89PNG\r\n\x1a\n"


def _fake_run(run_dir, steps=200, test_every=50, scale=1.0, resumed=False):
    run_dir.mkdir(parents=True)
    lines = []
    for step in range(1, steps + 1):
        err = scale * (0.9 * math.exp(-step / 60) + 0.05 * ((step * 7919) % 13) / 13)
        lines.append({"kind": "train", "step": step, "epoch": step // 100, "loss": 2.3 * err + 0.1,
                      "lr": 0.01, "images_per_s": 500.0, "train_error": err})
        if step % test_every == 0:
            lines.append({"kind": "test", "step": step, "epoch": step // 100,
                          "top1_error": scale * 0.8 * math.exp(-step / 80), "top5_error": 0.1})
    text = "".join(json.dumps(r) + "\n" for r in lines)
    if resumed:  # a resumed run logs steps 151.. again; a crash left half a line
        text += '{"kind": "train", "step": 15'
        text += "\n" + "".join(json.dumps(r) + "\n" for r in lines if r["step"] > 150)
    (run_dir / "metrics.jsonl").write_text(text)
    (run_dir / "summary.json").write_text(json.dumps({"top1_error": 0.1}))
    return run_dir


def _check_png(path):
    data = path.read_bytes()
    assert data[:8] == PNG_HEADER
    assert len(data) > 1024


def test_read_metrics_dedups_and_skips_broken_lines(tmp_path):
    run = _fake_run(tmp_path / "run", resumed=True)
    train, test = read_metrics(run)
    assert [r["step"] for r in train] == list(range(1, 201))
    assert [r["step"] for r in test] == [50, 100, 150, 200]


def test_plot_curves_writes_png(tmp_path):
    runs = [_fake_run(tmp_path / "single", resumed=True), _fake_run(tmp_path / "hybrid-4", scale=0.8)]
    out = plot_curves(runs, tmp_path / "plots" / "curves.png")
    assert out == tmp_path / "plots" / "curves.png"
    _check_png(out)


def test_plot_curves_tolerates_run_without_test_lines(tmp_path):
    run = tmp_path / "early"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"kind": "train", "step": 1, "epoch": 0, "loss": 2.3,
                                                   "lr": 0.01, "images_per_s": 1.0, "train_error": 0.9}) + "\n")
    _check_png(plot_curves([run], tmp_path / "c.png"))


def test_plot_curves_missing_metrics(tmp_path):
    good = _fake_run(tmp_path / "good")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError) as info:
        plot_curves([good, tmp_path / "empty"], tmp_path / "c.png")
    assert "metrics.jsonl" in str(info.value) and str(tmp_path / "empty") in str(info.value)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "c.png").exists()


@pytest.mark.parametrize("shape", [(64, 3, 11, 11), (16, 1, 5, 5), (8, 2, 3, 3)])
def test_plot_filters_writes_png(tmp_path, shape):
    weight = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    out = plot_filters(weight, tmp_path / "filters.png")
    _check_png(out)


def test_filter_grid_normalises_each_filter():
    weight = torch.randn(10, 3, 5, 5)
    weight[3] *= 100  # one large filter must not wash out the others
    grid = filter_grid(weight)
    assert grid.ndim == 3 and grid.shape[2] == 3
    assert grid.min() == 0.0 and grid.max() == 1.0
    tile = grid[1:6, 1:6]  # filter 0, at the top left after 1 px padding
    assert tile.min() == 0.0 and tile.max() == 1.0
    grey = filter_grid(torch.randn(16, 1, 5, 5))
    assert grey.ndim == 2 and grey.shape == (4 * 6 + 1, 4 * 6 + 1)
    with pytest.raises(ValueError):
        filter_grid(torch.randn(3, 3))
