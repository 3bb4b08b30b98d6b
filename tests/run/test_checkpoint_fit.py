"""A checkpoint that does not fit the run is refused and left alone; one that cannot be
read is skipped for the previous one, named, and left as it is; eval and export read any
run onetrick wrote, and say which step they read (issue 36)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from cli_helpers import FAST, onetrick

BASE = ["--steps", "4", "--ckpt-every", "2", "--eval-every", "1000", "--batch", "16", *FAST]


@pytest.fixture(scope="module")
def base_run(tmp_path_factory) -> Path:
    """smallnet on digits (10 classes, 1 channel), 4 steps: checkpoints at steps 2 and 4."""
    run = tmp_path_factory.mktemp("base") / "run"
    result = onetrick("train", "--out", run, *BASE)
    assert result.returncode == 0, result.stderr[-2000:]
    return run


@pytest.fixture
def run(base_run, tmp_path) -> Path:
    """A copy of the base run this test may damage."""
    return Path(shutil.copytree(base_run, tmp_path / "run"))


def snapshot(run: Path) -> dict[str, bytes]:
    """Every file under checkpoints/ (LATEST included), byte for byte."""
    root = run / "checkpoints"
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def step_dir(run: Path, step: int) -> Path:
    return run / "checkpoints" / f"step_{step:08d}"


def cut_tensors(path: Path) -> None:
    for f in path.glob("*.distcp"):
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def cut_meta(path: Path) -> None:
    meta = path / "meta.json"
    meta.write_text(meta.read_text()[:10])


def one_error_line(code: int, err: str) -> str:
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err[-2000:]
    return lines[0]


def cli_main(args: list, capsys) -> tuple[int, str, str]:
    from onetrick.cli import main as cli

    code = cli.main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


# -- does not fit: refused before any worker starts, touching nothing ----------------------
@pytest.mark.timeout(200)
@pytest.mark.parametrize("args, says", [
    (["--data", "synthetic"], "is of 10 classes, this run of 1000; resume with the --data and --classes"),
    (["--data", "synthetic:10"], "does not fit this run: model.trunk.conv1.weight is ["),   # 3 channels, not 1
    (["--data", "synthetic", "--workers", "2", "--strategy", "data"], "is of 10 classes, this run of 1000"),
], ids=["classes", "channels", "two-workers"])
def test_resume_into_a_configuration_the_checkpoint_does_not_fit_is_refused(run, args, says, capsys, monkeypatch):
    """It used to load in the workers, call the good checkpoint unreadable, rename it
    step_N.corrupt and delete LATEST."""
    from onetrick.distributed import runtime
    from onetrick.run import train

    def no_launch(*a, **k):
        pytest.fail("a worker was launched")

    monkeypatch.setattr(runtime, "launch", no_launch)
    monkeypatch.setattr(train, "launch", no_launch)
    before = snapshot(run)
    code, _, err = cli_main(["train", "--resume", "--out", run, "--steps", "8", *args, *FAST], capsys)
    line = one_error_line(code, err)
    assert line.startswith("onetrick: error: --resume: ") and says in line, line
    assert snapshot(run) == before


def test_a_checkpoint_that_does_not_fit_at_load_time_is_refused_in_one_line(run):
    """In the workers (no record to compare before): a shape mismatch is no reason to fall
    back, and no reason to touch the checkpoint."""
    from onetrick.models import build_model
    from onetrick.run import checkpoint

    before = snapshot(run)
    state = {"model": build_model("smallnet", num_classes=7, in_channels=1).state_dict()}
    with pytest.raises(checkpoint.CheckpointError) as info:
        checkpoint.load(run, state)
    message = str(info.value)
    assert "\n" not in message and "checkpoint step 4" in message and "does not fit this run" in message
    assert "[10, " in message and "[7, " in message   # the classifier: 10 rows there, 7 here
    assert snapshot(run) == before


# -- unreadable: skipped for the previous one, named, left as it is --------------------------
def test_load_skips_an_unreadable_checkpoint_and_leaves_it_as_it_is(run, capsys):
    from onetrick.models import build_model
    from onetrick.run import checkpoint

    cut_tensors(step_dir(run, 4))
    before = snapshot(run)
    state = {"model": build_model("smallnet", num_classes=10, in_channels=1).state_dict()}
    step, path = checkpoint.load(run, state)
    assert (step, path) == (2, step_dir(run, 2))
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("onetrick: warning: checkpoint step 4 is unreadable (")
    assert err[0].endswith("); resumed from step 2") and "cut short" in err[0]
    assert snapshot(run) == before


def test_with_every_checkpoint_unreadable_resume_is_refused_touching_nothing(run, capsys):
    for step in (2, 4):
        cut_tensors(step_dir(run, step))
    before = snapshot(run)
    code, _, err = cli_main(["train", "--resume", "--out", run, "--steps", "8", *FAST], capsys)
    line = one_error_line(code, err)
    assert "--resume: no readable checkpoint in" in line and "step 4: " in line and "step 2: " in line
    assert snapshot(run) == before


@pytest.mark.timeout(200)
def test_resume_after_a_truncated_checkpoint_continues_from_the_one_before(run):
    cut_tensors(step_dir(run, 4))
    damaged = snapshot(run)
    result = onetrick("train", "--resume", "--out", run, "--steps", "7", "--ckpt-every", "3", "--eval-every", "1000",
                      "--batch", "16", *FAST)
    assert result.returncode == 0, result.stderr[-2000:]
    notes = [ln for ln in result.stderr.splitlines() if "unreadable" in ln]
    assert len(notes) == 1 and notes[0].startswith("onetrick: warning: checkpoint step 4 is unreadable (")
    assert notes[0].endswith("resumed from step 2")
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == ["LATEST", "step_00000004", "step_00000006", "step_00000007"]   # rotation never counts step 4
    assert {k: v for k, v in snapshot(run).items() if k.startswith("step_00000004")} == {
        k: v for k, v in damaged.items() if k.startswith("step_00000004")}
    assert (run / "checkpoints" / "LATEST").read_text() == "step_00000007"


# -- eval and export read any run they wrote ----------------------------------------------
@pytest.mark.parametrize("damage", [cut_tensors, cut_meta], ids=["tensors", "meta.json"])
def test_eval_and_export_skip_an_unreadable_newest_checkpoint_and_say_so(run, damage, capsys):
    damage(step_dir(run, 4))
    before = snapshot(run)
    code, out, err = cli_main(["eval", run], capsys)
    assert code == 0, err
    assert json.loads(out)["step"] == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("onetrick: warning: checkpoint step 4 is unreadable (")
    assert lines[0].endswith("); scored step 2")
    code, out, err = cli_main(["export", run, "-o", run / "model.pt"], capsys)
    assert code == 0 and err.strip().endswith("); exported step 2"), err
    assert torch.load(run / "model.pt", weights_only=True)["step"] == 2
    assert snapshot(run) == before


@pytest.mark.timeout(300)
@pytest.mark.parametrize("job", [[], ["--strategy", "model", "--workers", "2"]], ids=["single", "model-2-workers"])
def test_eval_rebuilds_a_classes_run_whatever_wrote_it(tmp_path, job, capsys):
    """``--classes 7`` on synthetic data: eval used to build --data's 1000-class model."""
    run = tmp_path / "run"
    result = onetrick("train", "--data", "synthetic", "--classes", "7", "--steps", "2", "--batch", "8",
                      "--eval-every", "1000", "--out", run, *job, *FAST)
    assert result.returncode == 0, result.stderr[-2000:]
    code, out, err = cli_main(["eval", run], capsys)
    assert code == 0 and err == "", err
    assert json.loads(out)["step"] == 2
    (run / "summary.json").unlink()   # a run stopped before its summary: run.json holds its configuration
    code, out, err = cli_main(["eval", run], capsys)
    assert code == 0 and json.loads(out)["step"] == 2, err
