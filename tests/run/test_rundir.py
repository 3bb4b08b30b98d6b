"""Run directories never mix runs, and run records stay true across resumes and fallbacks
(issue 17): run as a user would, through the command line."""
import json

import pytest

from cli_helpers import FAST, onetrick

QUICK = ["--eval-every", "1000", "--batch", "16", *FAST]


def strict_json(text: str):
    """json.loads that refuses NaN/Infinity, which are not JSON."""
    return json.loads(text, parse_constant=lambda c: pytest.fail(f"not JSON: {c}"))


def metrics(run) -> list[dict]:
    return [strict_json(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def steps_of(run, kind: str = "train") -> list[int]:
    return [r["step"] for r in metrics(run) if r["kind"] == kind]


def checkpoints(run) -> list[str]:
    return sorted(p.name for p in (run / "checkpoints").glob("step_*"))


def error_line(result) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr[-2000:]
    return lines[0]


@pytest.mark.timeout(300)
def test_a_new_run_into_a_run_directory_is_refused_and_overwrite_starts_afresh(tmp_path):
    """Issue 17's reproduction: the second run used to keep the first one's checkpoints."""
    run = tmp_path / "x"
    assert onetrick("train", "--steps", "30", "--ckpt-every", "10", "--out", run, *QUICK).returncode == 0
    old_id = json.loads((run / "run.json").read_text())["run_id"]
    assert error_line(onetrick("train", "--steps", "5", "--out", run, *QUICK)) == (
        f"onetrick: error: --out {run} already holds a run (smallnet, step 30); continue it with --resume, "
        "or start afresh with --overwrite (removes that run's files)")
    assert "holds a run (smallnet, step 30)" in error_line(
        onetrick("train", "--strategy", "hogwild", "--workers", "2", "--steps", "5", "--out", run, *QUICK))
    assert error_line(onetrick("train", "--steps", "10", "--resume", "--out", run, *QUICK)) == (
        f"onetrick: error: --resume: the run in {run} is at step 30 and this one would stop at step 10; "
        "ask for more --steps or --epochs")
    assert checkpoints(run) == ["step_00000020", "step_00000030"]   # nothing touched
    (run / "notes.txt").write_text("mine")
    fresh = onetrick("train", "--steps", "5", "--ckpt-every", "10", "--log-every", "1", "--out", run, "--overwrite", *QUICK)
    assert fresh.returncode == 0, fresh.stderr[-2000:]
    assert (run / "notes.txt").read_text() == "mine"
    assert checkpoints(run) == ["step_00000005"]
    assert (run / "checkpoints" / "LATEST").read_text() == "step_00000005"
    new_id = json.loads((run / "run.json").read_text())["run_id"]
    assert new_id != old_id
    assert json.loads((run / "checkpoints" / "step_00000005" / "meta.json").read_text())["run_id"] == new_id
    assert steps_of(run) == [1, 2, 3, 4, 5]
    assert strict_json((run / "summary.json").read_text())["steps"] == 5


@pytest.mark.slow   # minutes of the default suite; what it checks is covered by a faster test
@pytest.mark.timeout(300)
def test_without_out_each_run_gets_a_fresh_directory_and_runs_latest_follows(tmp_path):
    for _ in range(2):
        assert onetrick("train", "--steps", "2", *QUICK, cwd=tmp_path).returncode == 0
    runs = sorted(p for p in (tmp_path / "runs").iterdir() if p.name != "latest")
    assert len(runs) == 2 and all(checkpoints(r) == ["step_00000002"] for r in runs)
    latest = tmp_path / "runs" / "latest"
    assert latest.is_symlink() and latest.resolve() == runs[-1].resolve()   # -2 sorts after its stamp
    assert onetrick("eval", "runs/latest", cwd=tmp_path).returncode == 0
    resumed = onetrick("train", "--steps", "4", "--resume", *QUICK, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert checkpoints(runs[-1]) == ["step_00000002", "step_00000004"] and checkpoints(runs[0]) == ["step_00000002"]
    assert len(list((tmp_path / "runs").iterdir())) == 3   # the resume made no new directory


@pytest.mark.timeout(300)
def test_truncated_checkpoint_is_skipped_and_the_records_stay_true(tmp_path):
    """Resume after the newest checkpoint was cut short: the run says so in one line and
    continues from the one before (nothing renamed: the run writes step 12 anew on its
    way), metrics.jsonl holds each step once, summary.json counts the whole run."""
    args = ["--ckpt-every", "4", "--log-every", "2", "--out", tmp_path, *QUICK]
    assert onetrick("train", "--steps", "12", *args).returncode == 0
    for f in (tmp_path / "checkpoints" / "step_00000012").glob("*.distcp"):
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    resumed = onetrick("train", "--steps", "16", "--resume", *args)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    notes = [line for line in resumed.stderr.splitlines() if "unreadable" in line]
    assert len(notes) == 1 and notes[0].startswith("onetrick: warning: checkpoint step 12 is unreadable (")
    assert notes[0].endswith("); resumed from step 8")
    assert checkpoints(tmp_path) == ["step_00000012", "step_00000016"]
    assert (tmp_path / "checkpoints" / "LATEST").read_text() == "step_00000016"
    assert steps_of(tmp_path) == [2, 4, 6, 8, 10, 12, 14, 16]
    assert steps_of(tmp_path, "test") == [16]   # the first run's test line at step 12 was dropped with it
    summary = strict_json((tmp_path / "summary.json").read_text())
    assert summary["steps"] == 16 and summary["attempts"] == 2
    assert summary["images_per_s"] * summary["train_s"] == pytest.approx(16 * 16)   # training time alone
    assert summary["train_s"] + summary["eval_s"] + summary["checkpoint_s"] == pytest.approx(summary["wall_s"])


@pytest.mark.timeout(200)
def test_skipped_non_finite_steps_are_counted_and_written_as_json_null(tmp_path):
    result = onetrick("train", "--lr", "1e6", "--steps", "8", "--on-nan", "skip", "--log-every", "1",
                      "--out", tmp_path, *QUICK)
    assert result.returncode == 0, result.stderr[-2000:]
    train = [r for r in metrics(tmp_path) if r["kind"] == "train"]   # strict: no NaN literal anywhere
    skipped = sum(r["loss"] is None for r in train)
    assert skipped > 0
    assert [r["skipped_steps"] for r in train] == [sum(x["loss"] is None for x in train[:i + 1]) for i in range(8)]
    assert strict_json((tmp_path / "summary.json").read_text())["skipped_steps"] == skipped


def test_a_restarted_job_resumes_only_checkpoints_of_its_own_run(tmp_path):
    from onetrick.run import checkpoint

    for step, run_id in ((30, "old"), (10, "mine"), (20, "mine")):
        path = tmp_path / "checkpoints" / f"step_{step:08d}"
        path.mkdir(parents=True)
        (path / "meta.json").write_text(json.dumps({"model": "smallnet", "step": step, "run_id": run_id}))
    assert [p.name for p in checkpoint.candidates(tmp_path, "mine")] == ["step_00000020", "step_00000010"]
    assert [p.name for p in checkpoint.candidates(tmp_path)][0] == "step_00000030"


def test_ctrl_c_offers_resume_only_when_a_checkpoint_exists(tmp_path):
    from onetrick.cli.main import _interrupted

    assert _interrupted(tmp_path) == f"interrupted before the first checkpoint: nothing to resume in {tmp_path}"
    (tmp_path / "checkpoints" / "step_00000004").mkdir(parents=True)
    (tmp_path / "checkpoints" / "step_00000004" / "meta.json").write_text("{}")
    assert _interrupted(tmp_path) == f"interrupted; resume with --resume --out {tmp_path}"
