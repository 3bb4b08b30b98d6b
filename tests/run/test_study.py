"""``onetrick study``: real training runs per row, a table of their final test errors,
reuse of finished runs, and bad input rejected before anything trains."""
import json
import math

import pytest

from cli_helpers import onetrick


@pytest.mark.slow   # minutes of the default suite; what it checks is covered by a faster test
@pytest.mark.timeout(300)
def test_study_trains_every_row_then_reuses_the_finished_runs(tmp_path):
    out = tmp_path / "study"
    args = ["study", "--workers", "1,2", "--variants", "data,hybrid-worker", "--batch", "16", "--epochs", "0.5",
            "--eval-every", "10", "--threads", "1", "--out", out]
    first = onetrick(*args)
    assert first.returncode == 0, first.stderr[-2000:]
    table = json.loads((tmp_path / "study.json").read_text())["lines"]
    assert [(r["workers"], r["variant"], r["batches"]) for r in table] == [
        (1, "single", "(16, 16)"), (2, "data", "(32, 32)"), (2, "hybrid-worker", "(32, 16)")]
    for row in table:
        summary = json.loads((out / "runs" / row["runs"][0] / "summary.json").read_text())
        assert row["top1_error"] == summary["top1_error"] < 0.9   # each row is a real run, better than chance
    single, data, worker = table
    assert data["conv_lr"] == data["fc_lr"] == 2 * single["conv_lr"]          # --lr-scale linear
    assert worker["conv_lr"] == 2 * single["conv_lr"] and worker["fc_lr"] == single["fc_lr"]  # FC batch B
    assert abs(2 * data["steps"] - single["steps"]) <= 2                       # same epochs, twice the batch
    assert (tmp_path / "study.md").read_text().count("\n| ") == 4              # header + 3 rows
    assert (tmp_path / "study.png").stat().st_size > 10_000

    again = onetrick(*args)
    assert again.returncode == 0, again.stderr[-2000:]
    assert again.stdout.count("reusing the finished run") == 3


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("args", "message"), [
    (["--variants", "hybrid"], "unknown variant 'hybrid'"),
    (["--workers", "0,2"], "must be positive"),
    (["--data", "imagefolder:/nonexistent"], "data path not found: /nonexistent"),
    (["--workers", "3", "--scheme", "c", "--batch", "16"], "--scheme c needs --batch divisible by --workers"),
])
def test_study_rejects_bad_input_before_training(tmp_path, args, message):
    result = onetrick("study", "--out", tmp_path / "s", *args, timeout=50)
    assert result.returncode == 2
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not (tmp_path / "s" / "runs").exists()


@pytest.mark.timeout(300)
def test_interrupted_row_resumes_from_its_checkpoint_and_unfinished_rows_are_marked(tmp_path):
    out = tmp_path / "study"
    args = ["study", "--workers", "1,2", "--variants", "data", "--batch", "16", "--epochs", "0.5",
            "--eval-every", "10", "--threads", "1", "--out", out]
    killed = onetrick(*args, env={"ONETRICK_CRASH_AT": "25"})   # a power cut at step 25 of the first row
    assert killed.returncode != 0
    partial = onetrick(*args, "--table-only")
    assert partial.returncode == 0, partial.stderr[-2000:]
    table = (tmp_path / "study.md").read_text()
    assert table.count("not finished (0 of 1 seeds)") == 2 and "Measured: not yet" in table
    again = onetrick(*args)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "k1-single-seed0: resuming the interrupted run" in again.stdout
    summary = json.loads((out / "runs" / "k1-single-seed0" / "summary.json").read_text())
    assert summary["steps"] == math.ceil(0.5 * (1437 // 16))   # 0.5 epochs of the 1,437 digits at batch 16
    metrics = [json.loads(line) for line in (out / "runs" / "k1-single-seed0" / "metrics.jsonl").open()]
    assert min(m["step"] for m in metrics if m["kind"] == "train" and m["step"] > 20) == 30  # resumed at step 20
    lines = json.loads((tmp_path / "study.json").read_text())["lines"]
    assert [r["seeds"] for r in lines] == [1, 1]
