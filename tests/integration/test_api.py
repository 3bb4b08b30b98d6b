"""The Python API: onetrick.fit with one's own model and data, parallelize under torchrun,
load, and the one-line refusals before any worker starts."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import onetrick
from onetrick.config import ConfigError

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}


class BiasFreeHeadNet(nn.Module):
    """The issue's failing case: torchvision-style children, a Linear without bias in the head."""

    def __init__(self, norm: bool = False) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        layers = [nn.Linear(4 * 4 * 4, 12, bias=False)] + ([nn.BatchNorm1d(12)] if norm else []) + [nn.ReLU(),
                                                                                                  nn.Linear(12, 3)]
        self.classifier = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


def tiny_data(n: int = 64) -> tuple[TensorDataset, TensorDataset]:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 3, (n,), generator=g)
    return TensorDataset(x, y), TensorDataset(x[:16], y[:16])


def fit_tiny(tmp: Path, **kw) -> tuple[nn.Module, dict]:
    torch.manual_seed(0)
    model = BiasFreeHeadNet()
    train_set, test_set = tiny_data()
    options = dict(batch=8, steps=3, lr=0.05, dropout=0.0, eval_every=100, progress=False, threads=1, timeout_s=60)
    summary = onetrick.fit(model, train_set, test_set, out=tmp, **{**options, **kw})
    return model, summary


@pytest.mark.timeout(300)
def test_fit_hybrid_on_two_workers_equals_one_worker_at_twice_the_batch(tmp_path):
    one, _ = fit_tiny(tmp_path / "one", workers=1, batch=16)
    two, summary = fit_tiny(tmp_path / "two", workers=2, strategy="hybrid")
    assert summary["steps"] == 3 and summary["test_examples"] == 16
    assert (tmp_path / "two" / "metrics.jsonl").read_text().count('"kind": "test"') == 1
    for (name, want), got in zip(one.state_dict().items(), two.state_dict().values()):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=2e-5, msg=lambda m: f"{name}: {m}")
    assert not torch.equal(two.classifier[0].weight, BiasFreeHeadNet().classifier[0].weight)  # it trained


BAD = [
    (lambda: BiasFreeHeadNet(norm=True), dict(workers=2, strategy="hybrid"),
     r"strategy hybrid: head layer head\.1 \(BatchNorm1d\) cannot be sharded by neurons"),
    (lambda: nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(144, 3)), dict(),
     "cannot tell where the trunk of Sequential ends"),
    (lambda: nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(144, 3)), dict(head="5"),
     "Sequential has no child module '5'"),
    (BiasFreeHeadNet, dict(bogus=1), "unknown option 'bogus'"),
    (BiasFreeHeadNet, dict(eval_views=10), "eval_views must be 1 with your own test set"),
    (BiasFreeHeadNet, dict(workers=2, strategy="single"), "--strategy single runs one worker"),
]


@pytest.mark.parametrize("make, kw, message", BAD)
def test_fit_refuses_bad_input_in_one_line_before_launch(tmp_path, make, kw, message):
    train_set, test_set = tiny_data()
    with pytest.raises(ConfigError, match=message) as err:
        onetrick.fit(make(), train_set, test_set, out=tmp_path, **kw)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "metrics.jsonl").exists()


def test_fit_refuses_data_the_workers_cannot_unpickle(tmp_path):
    class LocalSet(TensorDataset):  # defined in a function: spawned workers cannot import it
        pass

    train_set, test_set = tiny_data()
    with pytest.raises(ConfigError, match="must be picklable to reach the worker processes") as err:
        onetrick.fit(BiasFreeHeadNet(), LocalSet(*train_set.tensors), test_set, workers=2, out=tmp_path)
    assert "\n" not in str(err.value)


def test_fit_refuses_a_forward_that_is_not_trunk_then_head(tmp_path):
    class Residual(BiasFreeHeadNet):
        def forward(self, x):
            return super().forward(x) * 2

    train_set, test_set = tiny_data()
    with pytest.raises(ConfigError, match="Residual.forward is not trunk -> flatten -> head"):
        onetrick.fit(Residual(), train_set, test_set, out=tmp_path)


@pytest.mark.timeout(300)
def test_the_readme_example_trains_exports_and_reloads(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "examples" / "fit_own_model.py"), "--workers", "2",
                             "--epochs", "1", "--out", str(tmp_path / "run")], capture_output=True, text=True,
                            env=ENV, timeout=280)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "on 2 workers" in result.stdout
    assert "reloaded model agrees with the trained one: True" in result.stdout
    record = torch.load(tmp_path / "run" / "model.pt", weights_only=True)
    assert (record["model"], record["num_classes"], record["in_channels"], record["image_size"]) == \
        ("custom:DigitsNet", 10, 1, 8)
    with pytest.raises(ConfigError, match="pass an instance, load"):
        onetrick.load(tmp_path / "run" / "model.pt")


@pytest.mark.timeout(300)
def test_own_loop_under_torchrun_equals_one_worker(tmp_path):
    script = str(ROOT / "examples" / "own_loop.py")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", script]
    two = subprocess.run(torchrun + ["--steps", "3", "--batch", "8", "--save", str(tmp_path / "two.pt")],
                         capture_output=True, text=True, env=ENV, timeout=280)
    assert two.returncode == 0, two.stderr[-2000:]
    one = subprocess.run([sys.executable, script, "--steps", "3", "--batch", "16", "--save", str(tmp_path / "one.pt")],
                         capture_output=True, text=True, env=ENV, timeout=280)
    assert one.returncode == 0, one.stderr[-2000:]
    want, got = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    assert got.keys() == want.keys() and "head.4.weight" in want
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=2e-5)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("strategy, extra", [("hogwild", {}), ("paramserver", {"servers": 1})])
def test_fit_runs_the_asynchronous_strategies_on_a_model_of_ones_own(tmp_path, strategy, extra):
    model, summary = fit_tiny(tmp_path, workers=2, strategy=strategy, **extra)
    assert summary["top1_error"] is not None and not summary["failed_workers"]
    assert not torch.equal(model.classifier[0].weight, BiasFreeHeadNet().classifier[0].weight)
