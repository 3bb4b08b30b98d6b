"""Plots of training runs, like cuda-convnet2's ``shownet.py``: error curves and the
first layer's filters, written as PNG files (matplotlib's Agg renderer, no display).

A run directory holds ``metrics.jsonl``: one JSON object per line, ``"kind": "train"``
(``step``, ``epoch``, ``loss``, ``lr``, ``images_per_s``, ``train_error``) or
``"kind": "test"`` (``step``, ``epoch``, ``top1_error``, ``top5_error``); errors are
fractions. A line cut mid-write (a run killed then) is left out; any other line that
is not a record, or a file without one, is refused in one line
(:class:`MetricsError`) rather than drawn as an empty plot. When a resumed run logged a
step twice, the last record of that step wins.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from onetrick.run.records import read_records

__all__ = ["MetricsError", "new_figure", "plot_curves", "plot_filters", "read_metrics"]


class MetricsError(ValueError):
    """A metrics.jsonl that cannot be plotted; one line naming the file and the line."""


def read_metrics(run_dir: Path) -> tuple[list[dict], list[dict]]:
    """``(train_records, test_records)`` of a run, each sorted by step, one per step."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"no metrics.jsonl in run directory {run_dir}")
    found = read_records(path)
    problem = found.damage() or (None if found.records else f"{path} holds no metrics record")
    if problem:
        raise MetricsError(f"{problem}; nothing plotted")
    by_kind: dict[str, dict[int, dict]] = {"train": {}, "test": {}}
    for record in found.records:
        if record["kind"] in by_kind:
            by_kind[record["kind"]][record["step"]] = record
    return ([by_kind["train"][s] for s in sorted(by_kind["train"])],
            [by_kind["test"][s] for s in sorted(by_kind["test"])])


def _smooth(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing moving average (shorter window at the start)."""
    if window <= 1 or len(values) == 0:
        return values
    csum = np.cumsum(np.insert(values, 0, 0.0))
    idx = np.arange(1, len(values) + 1)
    lo = np.maximum(idx - window, 0)
    return (csum[idx] - csum[lo]) / (idx - lo)


def _series(records: list[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    pairs = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
    if not pairs:
        return np.zeros(0), np.zeros(0)
    steps, values = zip(*pairs)
    return np.asarray(steps, dtype=float), np.asarray(values, dtype=float)


def _labels(run_dirs: list[Path]) -> list[str]:
    """Run directory names; parent/name where two runs share a name."""
    names = [Path(r).resolve().name or str(r) for r in run_dirs]
    return [f"{Path(r).resolve().parent.name}/{n}" if names.count(n) > 1 else n for r, n in zip(run_dirs, names)]


def new_figure(width: float, height: float):
    """A matplotlib Figure on the Agg canvas (no display, no pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def plot_curves(run_dirs: list[Path], out: Path) -> Path:
    """Error (top panel) and loss (bottom panel) against step for each run, one colour
    per run: smoothed training error as a solid line, test top-1 error as dashed line
    with markers; raw loss faint, smoothed loss solid. Returns ``out`` (a PNG)."""
    run_dirs = [Path(r) for r in run_dirs]
    if not run_dirs:
        raise ValueError("plot_curves needs at least one run directory")
    runs = [read_metrics(r) for r in run_dirs]  # raises FileNotFoundError/MetricsError first, before drawing
    fig = new_figure(9, 7)
    ax_err, ax_loss = fig.subplots(2, 1, sharex=True)
    colours = [f"C{i % 10}" for i in range(len(runs))]
    for (train, test), label, colour in zip(runs, _labels(run_dirs), colours):
        window = max(1, min(100, len(train) // 20))
        steps, err = _series(train, "train_error")
        if len(steps):
            ax_err.plot(steps, 100 * _smooth(err, window), color=colour, lw=1.2, label=f"{label} train")
        steps, top1 = _series(test, "top1_error")
        if len(steps):
            ax_err.plot(steps, 100 * top1, color=colour, lw=1.5, ls="--", marker="o", ms=3, label=f"{label} test top-1")
        steps, loss = _series(train, "loss")
        if len(steps):
            ax_loss.plot(steps, loss, color=colour, lw=0.5, alpha=0.25)
            ax_loss.plot(steps, _smooth(loss, window), color=colour, lw=1.2, label=label)
    ax_err.set_ylabel("error (%)")
    ax_err.set_title("training error (smoothed, solid) and test top-1 error (dashed)")
    ax_err.grid(alpha=0.3)
    ax_loss.set_ylabel("training loss")
    ax_loss.set_xlabel("step")
    ax_loss.grid(alpha=0.3)
    for ax in (ax_err, ax_loss):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    return out


def filter_grid(weight: torch.Tensor, pad: int = 1) -> np.ndarray:
    """First-layer filters ``(out, in, kh, kw)`` tiled into one image, each tile min-max
    normalised to [0, 1], separated by ``pad`` white pixels. Returns ``(H, W, 3)`` for
    ``in == 3`` (RGB), else ``(H, W)`` greyscale, where every input channel of a filter is
    its own tile (a row per filter when ``in <= 16``)."""
    if weight.ndim != 4:
        raise ValueError(f"expected convolution weights (out, in, kh, kw), got shape {tuple(weight.shape)}")
    w = weight.detach().to("cpu", torch.float32)
    out_ch, in_ch, kh, kw = w.shape
    rgb = in_ch == 3
    tiles = w if rgb else w.reshape(out_ch * in_ch, 1, kh, kw)
    flat = tiles.flatten(1)
    lo, hi = flat.min(1, keepdim=True).values, flat.max(1, keepdim=True).values
    tiles = ((flat - lo) / (hi - lo).clamp_min(1e-12)).view_as(tiles)
    n = tiles.shape[0]
    cols = in_ch if (not rgb and 1 < in_ch <= 16) else max(1, math.ceil(math.sqrt(n)))
    rows = math.ceil(n / cols)
    channels = 3 if rgb else 1
    grid = np.ones((rows * (kh + pad) + pad, cols * (kw + pad) + pad, channels), dtype=np.float32)
    for i, tile in enumerate(tiles.permute(0, 2, 3, 1).numpy()):
        r, c = divmod(i, cols)
        y, x = pad + r * (kh + pad), pad + c * (kw + pad)
        grid[y:y + kh, x:x + kw] = tile
    return grid if rgb else grid[..., 0]


def plot_filters(weight: torch.Tensor, out: Path) -> Path:
    """The first convolution's filters as an image grid (RGB if 3 input channels, else
    greyscale), each filter min-max normalised, like cuda-convnet2's shownet. Returns
    ``out`` (a PNG)."""
    grid = filter_grid(weight)
    height, width = grid.shape[:2]
    scale = max(1.0, 600 / max(height, width))  # small kernels: enlarge, pixels stay square
    fig = new_figure(width * scale / 100 + 0.4, height * scale / 100 + 0.7)
    ax = fig.add_axes((0.02, 0.02, 0.96, 0.96 - 0.5 / (height * scale / 100 + 0.7)))
    ax.imshow(grid, cmap=None if grid.ndim == 3 else "gray", vmin=0, vmax=1, interpolation="nearest")
    ax.set_axis_off()
    out_ch, in_ch, kh, kw = weight.shape
    fig.suptitle(f"first-layer filters: {out_ch} x {in_ch} x {kh} x {kw}", fontsize=10)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    return out
