"""Crash recovery, resharding across worker counts and strategies, numerical faults."""
import json

import pytest
import torch

from cli_helpers import FAST, exported_weights, onetrick

HYBRID = ["--workers", "2", "--strategy", "hybrid", "--scheme", "b"]
RUN = ["--steps", "12", "--ckpt-every", "4", "--eval-every", "100", "--batch", "16", "--timeout", "30", *FAST]


@pytest.mark.timeout(400)
def test_sigkill_of_a_worker_restarts_and_matches_an_uninterrupted_run(tmp_path):
    """Worker 1 of a hybrid K=2 run is SIGKILLed after step 6 (checkpoint at 4); torch
    elastic restarts the job, which resumes from step 4: final weights are identical."""
    whole, crashed = tmp_path / "whole", tmp_path / "crashed"
    assert onetrick("train", *HYBRID, "--out", whole, *RUN, timeout=300).returncode == 0
    result = onetrick("train", *HYBRID, "--out", crashed, "--max-restarts", "1", *RUN, timeout=300,
                      env={"ONETRICK_CRASH_AT": "6:1"})
    assert result.returncode == 0, result.stderr[-3000:]
    want, got = exported_weights(whole), exported_weights(crashed)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=0, msg=name)


def _losses(run) -> dict[int, float]:
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in lines if r["kind"] == "train"}


RESHARD = ["--data", "synthetic:10", "--dropout", "0", "--steps", "6", "--ckpt-every", "4", "--log-every", "1",
           "--eval-every", "100", "--timeout", "30", *FAST]


@pytest.mark.timeout(500)
def test_hybrid_checkpoint_at_k4_resumes_at_k2_and_k1_with_the_same_next_loss(tmp_path):
    """Same global batch (K*B = 16) before and after: the step after the checkpoint must
    have the loss the K=4 run had, whatever the worker count and strategy resuming."""
    k4 = tmp_path / "k4"
    assert onetrick("train", "--workers", "4", "--strategy", "hybrid", "--scheme", "b", "--batch", "4",
                    "--out", k4, *RESHARD, timeout=300).returncode == 0
    want = _losses(k4)[5]
    resumes = {"k2-hybrid": ["--workers", "2", "--strategy", "hybrid", "--scheme", "a", "--batch", "8"],
               "k1-single": ["--batch", "16"],
               "k2-data-sharded": ["--workers", "2", "--strategy", "data", "--sync", "sharded", "--batch", "8"]}
    for name, args in resumes.items():
        run = tmp_path / name
        (run / "checkpoints").mkdir(parents=True)
        src = k4 / "checkpoints" / "step_00000004"
        import shutil

        shutil.copytree(src, run / "checkpoints" / src.name)
        result = onetrick("train", *args, "--out", run, "--resume", *RESHARD, timeout=300)
        assert result.returncode == 0, f"{name}: {result.stderr[-2000:]}"
        assert _losses(run)[5] == pytest.approx(want, rel=1e-5), name
    # the K=4 hybrid checkpoint was written by all four workers: one file each
    assert len(list((k4 / "checkpoints" / "step_00000004").glob("*.distcp"))) == 4


@pytest.mark.slow   # minutes of the default suite; what it checks is covered by a faster test
@pytest.mark.timeout(500)
def test_hybrid_checkpoint_at_cut1_reshards_to_cut0_and_single_with_the_same_next_loss(tmp_path):
    """A checkpoint written with fc6 data-parallel (--cut 1) holds the plain model's names:
    the paper's cut (fc6 sharded by neurons) and one process resume it exactly."""
    import shutil

    cut1 = tmp_path / "cut1"
    first = onetrick("train", "--workers", "2", "--strategy", "hybrid", "--scheme", "b", "--cut", "1", "--batch", "8",
                     "--out", cut1, *RESHARD, timeout=300)
    assert first.returncode == 0, first.stderr[-2000:]
    want = _losses(cut1)[5]
    resumes = {"cut0-hybrid": ["--workers", "2", "--strategy", "hybrid", "--scheme", "c", "--batch", "8"],
               "k1-single": ["--batch", "16"]}
    for name, args in resumes.items():
        run = tmp_path / name
        src = cut1 / "checkpoints" / "step_00000004"
        shutil.copytree(src, run / "checkpoints" / src.name)
        result = onetrick("train", *args, "--out", run, "--resume", *RESHARD, timeout=300)
        assert result.returncode == 0, f"{name}: {result.stderr[-2000:]}"
        assert _losses(run)[5] == pytest.approx(want, rel=1e-5), name
    assert set(exported_weights(cut1)) == set(exported_weights(tmp_path / "k1-single"))   # the plain model's names


@pytest.mark.timeout(200)
def test_non_finite_loss_stops_with_a_message_and_keeps_the_last_checkpoint(tmp_path):
    result = onetrick("train", "--lr", "1e6", "--steps", "30", "--ckpt-every", "1", "--out", tmp_path, *FAST)
    assert result.returncode == 2
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("onetrick: error: non-finite loss at step"), result.stderr
    state = exported_weights(tmp_path)
    assert all(torch.isfinite(t).all() for t in state.values())


@pytest.mark.timeout(200)
def test_non_finite_steps_can_be_skipped(tmp_path):
    result = onetrick("train", "--lr", "1e6", "--steps", "8", "--on-nan", "skip", "--out", tmp_path, *FAST)
    assert result.returncode == 0, result.stderr
    state = exported_weights(tmp_path)
    assert all(torch.isfinite(t).all() for t in state.values())
