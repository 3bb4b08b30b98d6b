"""The training loop as a user runs it: accuracy, run directory, resume, bad input."""
import json
import os
import subprocess
import sys

import pytest
import torch

from cli_helpers import FAST, exported_weights, onetrick

SHORT = ["--steps", "12", "--ckpt-every", "4", "--eval-every", "6", "--log-every", "2", "--batch", "16", *FAST]


@pytest.mark.timeout(300)
def test_default_network_reaches_real_accuracy(tmp_path):
    """smallnet on the bundled digits, 3 epochs: far above the 10% of chance."""
    result = onetrick("train", "--epochs", "3", "--out", tmp_path, *FAST)
    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["top1_error"] < 0.10, summary
    assert "accuracy" in result.stdout
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    assert {"step", "epoch", "loss", "lr", "images_per_s", "layers"} <= train[0].keys()
    assert train[-1]["loss"] < train[0]["loss"]
    assert any(r["kind"] == "test" for r in records)
    assert "trunk.conv1.weight" in train[0]["layers"]


@pytest.mark.timeout(300)
def test_resume_after_a_crash_gives_the_same_weights(tmp_path):
    """SIGKILL after step 6 (last checkpoint at 4), resume: identical to an uninterrupted run."""
    whole, crashed = tmp_path / "whole", tmp_path / "crashed"
    assert onetrick("train", "--out", whole, *SHORT).returncode == 0
    died = onetrick("train", "--out", crashed, *SHORT, env={"ONETRICK_CRASH_AT": "6"})
    assert died.returncode != 0
    assert json.loads((crashed / "checkpoints" / "step_00000004" / "meta.json").read_text())["step"] == 4
    resumed = onetrick("train", "--out", crashed, "--resume", *SHORT)
    assert resumed.returncode == 0, resumed.stderr
    want, got = exported_weights(whole), exported_weights(crashed)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=0, msg=name)


@pytest.mark.timeout(300)
def test_truncated_checkpoint_falls_back_to_the_previous_one(tmp_path):
    assert onetrick("train", "--out", tmp_path, *SHORT).returncode == 0
    newest = sorted((tmp_path / "checkpoints").glob("step_*"))[-1]
    for f in newest.glob("*.distcp"):
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    result = onetrick("eval", tmp_path)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["step"] == 8 and "unreadable" in result.stderr and "scored step 8" in result.stderr
    resumed = onetrick("train", "--out", tmp_path, "--resume", *SHORT[:1], "16", *SHORT[2:])
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from step 8" in resumed.stderr


@pytest.mark.timeout(300)
def test_eval_export_and_plot_read_a_run(tmp_path):
    run = tmp_path / "run"
    assert onetrick("train", "--out", run, *SHORT).returncode == 0
    result = onetrick("eval", run, "--views", "10")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["test_examples"] == 360
    assert onetrick("export", run, "-o", tmp_path / "model.pt").returncode == 0
    from onetrick.models import build_model

    record = torch.load(tmp_path / "model.pt", weights_only=True)
    assert (record["model"], record["num_classes"], record["in_channels"], record["image_size"]) == ("smallnet", 10, 1, 32)
    model = build_model("smallnet", num_classes=10, in_channels=1)
    model.load_state_dict(record["state_dict"])
    from onetrick.api import load

    rebuilt = load(tmp_path / "model.pt")
    x = torch.rand(2, 1, 32, 32)
    assert torch.equal(rebuilt(x), model.eval()(x))
    assert onetrick("plot", run, "-o", tmp_path / "plots").returncode == 0
    assert (tmp_path / "plots" / "curves.png").stat().st_size > 1000
    assert (tmp_path / "plots" / "filters.png").stat().st_size > 1000


# Bad input: the table of every refused option is tests/cli/test_bad_input.py.


@pytest.mark.timeout(300)
def test_resume_with_another_model_is_rejected(tmp_path):
    assert onetrick("train", "--out", tmp_path, *SHORT).returncode == 0
    result = onetrick("train", "--out", tmp_path, "--resume", "--model", "alexnet")
    assert result.returncode == 2
    assert result.stderr.strip() == f"onetrick: error: --resume: checkpoint in {tmp_path} is of model 'smallnet', not 'alexnet'"


@pytest.mark.timeout(400)
@pytest.mark.parametrize("strategy", [  # their steps equal the reference's (test_equivalence); minutes each
    pytest.param(["--strategy", "data"], marks=pytest.mark.slow, id="data"),
    pytest.param(["--strategy", "model"], marks=pytest.mark.slow, id="model"),
    pytest.param(["--strategy", "hybrid", "--scheme", "b", "--fc-batch", "worker"], marks=pytest.mark.slow,
                 id="hybrid-b-worker")])
def test_two_workers_train_the_default_network(tmp_path, strategy):
    """K=2 from the command line, 3 epochs of the bundled digits: real accuracy."""
    batch = "32" if strategy[1] == "model" else "16"   # model parallel: both workers see the batch
    result = onetrick("train", "--workers", "2", *strategy, "--epochs", "3", "--batch", batch,
                      "--out", tmp_path, *FAST, timeout=380)
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["top1_error"] < 0.10, summary["top1_error"]
    assert summary["test_examples"] == 360  # the whole test set, each example once
    assert summary["bytes_per_step_total"] > 0
    if strategy[1] == "hybrid":  # 2 rounds of (broadcast, fc6->fc7 gather and scatter, logits all-reduce),
        # labels, activation-gradient reduce-scatter, trunk reduce-scatter and all-gather
        assert summary["collectives_per_step_total"] == 12, summary["collectives_per_step"]
        train = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
        assert all(r["calls_total"] == 12 for r in train if r["kind"] == "train")


@pytest.mark.timeout(300)
def test_torchrun_runs_the_same_job_as_the_built_in_launcher(tmp_path):
    """``torchrun -m onetrick.cli train`` (no --workers: torchrun's process count) gives
    the same weights as ``onetrick train --workers 2``; a mismatched --workers is refused."""
    job = ["--strategy", "hybrid", "--scheme", "b", "--steps", "6", "--batch", "16", "--ckpt-every", "6", *FAST]
    own = onetrick("train", "--workers", "2", *job, "--out", tmp_path / "own", timeout=200)
    assert own.returncode == 0, own.stderr[-2000:]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                "-m", "onetrick.cli", "train"]
    ran = subprocess.run([*torchrun, *job, "--out", str(tmp_path / "torchrun")], capture_output=True, text=True,
                         timeout=200, env=env)
    assert ran.returncode == 0, ran.stderr[-2000:]
    assert ran.stdout.count("test top-1 error") == 1   # printed by rank 0 only
    want, got = exported_weights(tmp_path / "own"), exported_weights(tmp_path / "torchrun")
    assert want.keys() == got.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=0, msg=name)
    # 2 rounds of (broadcast, fc6->fc7 gather and scatter, logits all-reduce), labels, the
    # activation gradients' reduce-scatter, the trunk's reduce-scatter and all-gather
    counts = [json.loads((tmp_path / run / "summary.json").read_text())["collectives_per_step_total"]
              for run in ("own", "torchrun")]
    assert counts == [12, 12], counts
    wrong = subprocess.run([*torchrun, "--workers", "3", *job, "--out", str(tmp_path / "wrong")], capture_output=True,
                           text=True, timeout=200, env=env)
    assert wrong.returncode != 0
    assert "--workers 3 does not match the 2 processes torchrun started" in wrong.stderr


@pytest.mark.slow   # minutes of the default suite; what it checks is covered by a faster test
@pytest.mark.timeout(400)
def test_hybrid_with_a_cut_trains_the_default_network(tmp_path):
    """--cut 1: fc6 data-parallel with the trunk, fc7 and the classifier sharded; real accuracy."""
    result = onetrick("train", "--workers", "2", "--strategy", "hybrid", "--scheme", "a", "--cut", "1", "--epochs", "3",
                      "--batch", "16",
                      "--out", tmp_path, *FAST, timeout=380)
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["top1_error"] < 0.10, summary["top1_error"]
    assert summary["config"]["cut"] == 1
