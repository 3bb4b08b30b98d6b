"""Asynchronous runs resume (issue 17): Hogwild and the parameter server checkpoint their
momentum, the servers' state and every worker's position, a worker SIGKILLed mid-run
loses at most the steps since the last checkpoint, and ``--resume`` finishes the run.

Small runs (the small network on digits, 2 workers, tens of steps), hard timeouts.
Hogwild's interleaving is not deterministic: what is tested exactly is what was saved
and restored, the step counts and the records, not the weights a resumed run reaches.
"""
import json
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from onetrick.config import TrainConfig
from onetrick.distributed.hogwild import Board
from onetrick.distributed.runtime import WorkerFailure
from onetrick.models import build_model
from onetrick.run import checkpoint
from onetrick.run.checkpoint import CheckpointError
from onetrick.run.hogwild import _resume
from onetrick.run.train import train


def config(out, **changes) -> TrainConfig:
    cfg = TrainConfig(threads=1, timeout_s=60, progress=False, out=out, eval_every=10_000, log_every=1,
                      workers=2, batch=8, momentum=0.5, dropout=0.0)
    return cfg.replace(**changes)


def saved(path: Path) -> dict:
    """A checkpoint's DCP state, unsharded, as nested dicts."""
    with tempfile.TemporaryDirectory() as tmp:
        flat = Path(tmp) / "state.pt"
        dcp_to_torch_save(path, flat)
        return torch.load(flat, weights_only=True)


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def assert_each_step_once(run: Path, total: int) -> None:
    train_steps = [r["step"] for r in records(run) if r["kind"] == "train"]
    assert train_steps == list(range(1, total + 1))


@pytest.mark.timeout(240)
def test_hogwild_worker_killed_then_resumed(tmp_path, monkeypatch):
    """Worker 1 SIGKILLed after its step 5 (checkpoints every 4 of worker 0's steps):
    worker 0 finishes its 12, the final checkpoint keeps worker 1 at step 5 with its
    momentum; --resume to 20 steps continues both, each from its own step."""
    monkeypatch.setenv("ONETRICK_CRASH_AT", "5:1")
    cfg = config(tmp_path, strategy="hogwild", steps=12, ckpt_every=4)
    with pytest.raises(WorkerFailure, match=r"worker 1: killed by signal 9"):
        train(cfg)
    monkeypatch.delenv("ONETRICK_CRASH_AT")
    path = checkpoint.candidates(tmp_path)[0]
    meta = checkpoint.read_meta(path)
    assert meta["step"] == 12 and [r["steps"] for r in meta["ranks"]] == [12, 5]
    assert [r["images"] for r in meta["ranks"]] == [12 * 8, 5 * 8]
    state = saved(path)
    momentum1 = state["momentum"]["worker1"]
    assert momentum1 and all(m.abs().sum() > 0 for m in momentum1.values())  # five steps of momentum, not zeros

    # what --resume loads is what was saved: weights, each worker's momentum, counters
    model = build_model("smallnet", num_classes=10, in_channels=1, dropout=0.0)
    board = Board(model, 2)
    step, _ = _resume(config(tmp_path, strategy="hogwild", steps=20, resume=True), model, board)
    assert step == 12 and board.ranks() == meta["ranks"]
    for name, want in state["model"].items():
        assert torch.equal(model.state_dict()[name], want), name
    for i in range(2):
        for name, want in state["momentum"][f"worker{i}"].items():
            assert torch.equal(board.momentum[i][name], want), (i, name)

    summary = train(config(tmp_path, strategy="hogwild", steps=20, ckpt_every=4, resume=True))
    assert summary["resumed_from_step"] == 12 and summary["attempts"] == 2
    assert summary["worker_steps"] == [20, 20] and summary["steps"] == 20 and summary["failed_workers"] == []
    assert summary["images_per_s"] > 0 and summary["top1_error"] is not None
    assert_each_step_once(tmp_path, 20)  # worker 0 writes the train lines: 1..12, then 13..20
    assert [r["step"] for r in records(tmp_path) if r["kind"] == "test"] == [12, 20]
    final = checkpoint.read_meta(checkpoint.candidates(tmp_path)[0])
    assert final["step"] == 20 and [r["steps"] for r in final["ranks"]] == [20, 20]
    assert final["totals"]["attempts"] == 2


@pytest.mark.timeout(120)
def test_hogwild_periodic_checkpoint_is_a_consistent_cut(tmp_path):
    """Worker 0 asks at its step 4: every worker pauses at a step boundary, so the
    counters saved are whole steps and worker 0's is the checkpoint's step. Resuming
    from it (the launcher died before the end: the newer checkpoint is gone) continues."""
    train(config(tmp_path, strategy="hogwild", steps=8, ckpt_every=4))
    names = [p.name for p in checkpoint.candidates(tmp_path)]
    assert names == ["step_00000008", "step_00000004"]
    meta = checkpoint.read_meta(tmp_path / "checkpoints" / "step_00000004")
    # worker 1 may not have started yet when worker 0 reaches step 4 (Hogwild does not wait)
    assert meta["ranks"][0]["steps"] == 4 and 0 <= meta["ranks"][1]["steps"] <= 8
    assert all(r["images"] == r["steps"] * 8 for r in meta["ranks"])
    shutil.rmtree(tmp_path / "checkpoints" / "step_00000008")
    (tmp_path / "checkpoints" / "LATEST").write_text("step_00000004")
    summary = train(config(tmp_path, strategy="hogwild", steps=10, ckpt_every=4, resume=True))
    assert summary["resumed_from_step"] == 4 and summary["worker_steps"] == [10, 10]
    assert_each_step_once(tmp_path, 10)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("strategy, change, said", [
    ("hogwild", {"workers": 3}, "--strategy hogwild --workers 2"),
    ("data", {}, "--strategy hogwild --workers 2"),
])
def test_resume_with_another_layout_is_refused_in_one_line(tmp_path, strategy, change, said):
    (tmp_path / "checkpoints" / "step_00000004").mkdir(parents=True)
    (tmp_path / "checkpoints" / "step_00000004" / "meta.json").write_text(json.dumps(
        {"model": "smallnet", "strategy": "hogwild", "workers": 2, "servers": 1, "step": 4, "ranks": []}))
    with pytest.raises(CheckpointError, match=f"written by {said}; an asynchronous run resumes only with the same"):
        train(config(tmp_path, strategy=strategy, steps=8, resume=True, **change))


@pytest.mark.timeout(300)
def test_parameter_server_resumed_after_a_kill_equals_an_uninterrupted_run(tmp_path, monkeypatch):
    """K=1, S=2, fetch and push every step: deterministic, so the resumed run must end on
    the uninterrupted run's weights exactly (servers' shards and momentum, the worker's
    copy, versions and RNG all restored). The worker is SIGKILLed after step 6; the last
    checkpoint is step 4."""
    whole = config(tmp_path / "whole", strategy="paramserver", workers=1, servers=2, steps=10, ckpt_every=4)
    train(whole)
    monkeypatch.setenv("ONETRICK_CRASH_AT", "6:0")
    with pytest.raises(WorkerFailure, match=r"Signal 9 \(SIGKILL\)"):
        train(whole.replace(out=tmp_path / "cut", steps=8))
    monkeypatch.delenv("ONETRICK_CRASH_AT")
    at = checkpoint.read_meta(checkpoint.candidates(tmp_path / "cut")[0])
    assert at["step"] == 4 and at["ranks"][0]["steps"] == 4 and at["ranks"][1]["version"] == 4
    assert saved(checkpoint.candidates(tmp_path / "cut")[0])["server1"]["momentum"].abs().sum() > 0
    summary = train(whole.replace(out=tmp_path / "cut", resume=True))
    assert summary["resumed_from_step"] == 4 and summary["attempts"] == 2 and summary["worker_steps"] == [10]
    assert summary["gradients_pushed"] == summary["gradients_applied"] == 10 * 2
    got, want = saved(checkpoint.candidates(tmp_path / "cut")[0]), saved(checkpoint.candidates(tmp_path / "whole")[0])
    for name in want["model"]:
        assert torch.equal(got["model"][name], want["model"][name]), name
    for s in ("server0", "server1"):
        assert torch.equal(got[s]["momentum"], want[s]["momentum"]), s
    assert_each_step_once(tmp_path / "cut", 10)


@pytest.mark.slow   # minutes of the default suite; what it checks is covered by a faster test
@pytest.mark.timeout(300)
def test_parameter_server_worker_killed_then_resumed_continues_staleness(tmp_path, monkeypatch):
    """K=2, S=1, push every 2 steps: worker 1 SIGKILLed after step 6 stops the job;
    --resume continues from step 4 with every worker's and server's counters."""
    cfg = config(tmp_path, strategy="paramserver", steps=10, ckpt_every=4, fetch_every=2, push_every=2)
    monkeypatch.setenv("ONETRICK_CRASH_AT", "6:1")
    with pytest.raises(WorkerFailure, match=r"Signal 9 \(SIGKILL\)"):
        train(cfg)
    monkeypatch.delenv("ONETRICK_CRASH_AT")
    meta = checkpoint.read_meta(checkpoint.candidates(tmp_path)[0])
    assert meta["step"] == 4 and [r["steps"] for r in meta["ranks"][:2]] == [4, 4]
    assert sum(r["pushed"] for r in meta["ranks"][:2]) == meta["ranks"][2]["version"] == 4  # a consistent cut
    summary = train(cfg.replace(steps=14, resume=True))
    assert summary["resumed_from_step"] == 4 and summary["attempts"] == 2
    assert summary["worker_steps"] == [14, 14] and summary["steps"] == 14
    assert summary["gradients_pushed"] == summary["gradients_applied"] == 2 * 7  # the whole run's pushes
    assert summary["staleness_max"] >= meta["ranks"][2]["staleness_max"]
    assert_each_step_once(tmp_path, 14)
    assert [r["step"] for r in records(tmp_path) if r["kind"] == "test"] == [14]
