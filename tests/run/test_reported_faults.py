"""Faults a run meets after its options were accepted: each is reported in one line, and
nothing the user had is lost (issue 36, third wave).

Damaged metrics.jsonl (``plot`` refuses it; ``--resume`` drops a cut last line and says
so), ``export`` into a folder that refuses files or onto a full disk, a full disk during
a checkpoint, ``--skip-corrupt``'s warnings (one line per bad image, once), an
asynchronous run's summary of failed workers, and ``--threads`` beyond the cores.
"""
from __future__ import annotations

import contextlib
import json
import os
import resource
import shutil
from pathlib import Path

import pytest

from cli_helpers import FAST, onetrick


def _main(*args) -> int:
    """``onetrick ARGS`` in this process (faults can be injected): its exit code."""
    from onetrick.cli import main as cli

    try:
        return cli.main([str(a) for a in args])
    except SystemExit as exit_:
        return exit_.code


def _stderr_lines(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A finished two-step run (a checkpoint at step 2, metrics.jsonl, summary.json)."""
    out = tmp_path_factory.mktemp("faults") / "run"
    result = onetrick("train", "--steps", "2", "--out", out, *FAST)
    assert result.returncode == 0, result.stderr
    return out


# -- metrics.jsonl --------------------------------------------------------------------
GOOD = json.dumps({"kind": "train", "step": 1, "epoch": 0.1, "loss": 2.3, "train_error": 0.9}) + "\n"
GARBAGE = {
    "text": (GOOD + "this is not json\n" + GOOD, 2),
    "bytes": (b"\x89PNG\r\n\x1a\n\x00\xff\xfe binary\n", 1),
    "json that is no record": (GOOD + GOOD + '{"a": 1}\n', 3),
}


@pytest.mark.parametrize("name", list(GARBAGE))
def test_plot_refuses_garbage_metrics_naming_the_file_and_line(name, tmp_path, capsys):
    content, line = GARBAGE[name]
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    metrics = run_dir / "metrics.jsonl"
    (metrics.write_bytes if isinstance(content, bytes) else metrics.write_text)(content)
    code = _main("plot", run_dir, "-o", tmp_path / "plots", "--no-filters")
    lines = _stderr_lines(capsys)
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith(f"onetrick: error: {metrics} line {line}") and "not a metrics record" in lines[0]
    assert not (tmp_path / "plots" / "curves.png").exists()


def test_plot_refuses_metrics_without_a_record(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text("")
    code = _main("plot", tmp_path / "run", "-o", tmp_path / "plots", "--no-filters")
    lines = _stderr_lines(capsys)
    assert code == 2 and lines == [f"onetrick: error: {tmp_path / 'run' / 'metrics.jsonl'} holds no metrics record; "
                                   "nothing plotted"]


@pytest.mark.timeout(300)
def test_resume_reports_a_cut_last_line_of_metrics_and_goes_on(run, tmp_path):
    resumed = tmp_path / "run"
    shutil.copytree(run, resumed)
    metrics = resumed / "metrics.jsonl"
    with metrics.open("a") as fh:
        fh.write('{"kind": "train", "step": 3, "epoch": 0.0, "lo')   # a crash mid-write
    result = onetrick("train", "--steps", "4", "--resume", "--out", resumed, *FAST)
    assert result.returncode == 0, result.stderr
    said = [line for line in result.stderr.splitlines() if "cut" in line]
    assert said == [f"onetrick: warning: {metrics}: its last line was cut (a crash mid-write); dropped"]
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert max(r["step"] for r in records) == 4


# -- export -----------------------------------------------------------------------------
def _sysfs_refuses_files() -> bool:
    """sysfs lets no one, root included, create a file in it: a folder that refuses writes."""
    try:
        open("/sys/onetrick-probe.pt", "wb").close()
    except OSError:
        return True
    os.unlink("/sys/onetrick-probe.pt")
    return False


@pytest.mark.timeout(300)
@pytest.mark.skipif(not os.path.isdir("/sys") or not _sysfs_refuses_files(), reason="needs Linux's sysfs")
def test_export_into_a_folder_that_refuses_files_is_one_line(run, capsys):
    code = _main("export", run, "-o", "/sys/model.pt")
    lines = _stderr_lines(capsys)
    assert code == 2 and lines == ["onetrick: error: cannot write /sys/model.pt: Permission denied"], lines


@contextlib.contextmanager
def _disk_full_beyond(size: int):
    """Writes past ``size`` bytes of a file fail (RLIMIT_FSIZE: EFBIG, "File too large"),
    as on a disk that fills up part-way through a file; root obeys it too. Python
    ignores SIGXFSZ, so the write fails instead of killing the process."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (size, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


@pytest.mark.timeout(300)
def test_export_onto_a_full_disk_leaves_the_existing_file_whole(run, tmp_path, capsys, monkeypatch):
    from onetrick.run import export

    record = export.export_record(run)   # read before the disk fills
    monkeypatch.setattr(export, "export_record", lambda *args, **kwargs: record)
    target = tmp_path / "model.pt"
    target.write_bytes(b"the model exported yesterday")
    with _disk_full_beyond(4096):
        code = _main("export", run, "-o", target)
    lines = _stderr_lines(capsys)
    assert code == 2 and lines == [f"onetrick: error: cannot write {target}: File too large; "
                                   "the existing file is unchanged"], lines
    assert target.read_bytes() == b"the model exported yesterday"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]   # no partial file left


# -- a full disk during a checkpoint ----------------------------------------------------
@pytest.mark.timeout(300)
def test_disk_full_during_a_checkpoint_is_one_line_and_the_previous_one_survives(tmp_path, capsys, monkeypatch):
    """The disk fills up after the checkpoint of step 2: the one of step 4 cannot be written."""
    from onetrick.run import checkpoint
    from onetrick.run.export import full_state

    real_save = checkpoint.save
    full = contextlib.ExitStack()

    def save_then_fill_the_disk(*args, **kwargs):
        path = real_save(*args, **kwargs)
        full.enter_context(_disk_full_beyond(32 * 1024))   # metrics lines still fit; a checkpoint does not
        return path

    monkeypatch.setattr(checkpoint, "save", save_then_fill_the_disk)
    out = tmp_path / "run"
    with full:
        code = _main("train", "--steps", "4", "--ckpt-every", "2", "--eval-every", "1000", "--out", out, *FAST)
    lines = _stderr_lines(capsys)
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith("onetrick: error: a checkpoint could not be written (") and lines[0].endswith(
        f"; is the disk full?); step_00000002 is the newest left: resume with --resume --out {out}"), lines
    assert [p.name for p in checkpoint.candidates(out)] == ["step_00000002"]
    assert full_state(out)   # readable: the run can be exported, or resumed from step 2


# -- --skip-corrupt ----------------------------------------------------------------------
def _folder(root: Path, corrupt: set[str]) -> list[Path]:
    """An image folder, 2 classes x (4 train + 2 val) images; the names in ``corrupt``
    (``split/class/i.png``) hold text, not an image. Returns the corrupt paths."""
    from PIL import Image

    bad = []
    for split, count in (("train", 4), ("val", 2)):
        for label, name in enumerate(("cat", "dog")):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                path = folder / f"{i}.png"
                if f"{split}/{name}/{i}.png" in corrupt:
                    path.write_text("not an image")
                    bad.append(path)
                else:
                    Image.new("RGB", (36, 36), color=(200 * label, 40 * i, 0)).save(path)
    return bad


@pytest.mark.timeout(300)
def test_skip_corrupt_warns_once_per_image_in_one_line(tmp_path):
    """Two epochs, two evaluations, two DataLoader workers each time: still one line per
    bad image."""
    bad = _folder(tmp_path / "images", {"train/cat/1.png", "train/dog/3.png", "val/dog/0.png"})
    result = onetrick("train", "--data", f"imagefolder:{tmp_path / 'images'}", "--skip-corrupt", "--epochs", "2",
                      "--batch", "2", "--eval-every", "4", "--out", tmp_path / "run", *FAST)
    assert result.returncode == 0, result.stderr
    lines = result.stderr.splitlines()
    warned = [line for line in lines if "skipping corrupt image" in line]
    assert sorted(warned) == sorted(f"onetrick: warning: skipping corrupt image: {p} "
                                    f"(cannot identify image file '{p}')" for p in bad), lines
    assert "onetrick: warning: --skip-corrupt skipped 2 unreadable training image(s) in all" in lines, lines
    assert not any("warnings.warn" in line for line in lines)


@pytest.mark.timeout(300)
def test_skip_corrupt_with_every_image_corrupt_is_one_line_per_image_then_the_error(tmp_path):
    every = {f"{s}/{c}/{i}.png" for s, n in (("train", 4), ("val", 2)) for c in ("cat", "dog") for i in range(n)}
    bad = _folder(tmp_path / "images", every)
    result = onetrick("train", "--data", f"imagefolder:{tmp_path / 'images'}", "--skip-corrupt", "--steps", "2",
                      "--batch", "2", "--out", tmp_path / "run", *FAST)
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    train_bad = [p for p in bad if "train" in p.parts]
    assert lines[-1] == "onetrick: error: no readable image among the 8 files of this split", lines
    assert sorted(lines[:-1]) == sorted(f"onetrick: warning: skipping corrupt image: {p} "
                                        f"(cannot identify image file '{p}')" for p in train_bad), lines


# -- an asynchronous run's failed workers ----------------------------------------------
@pytest.mark.parametrize("failed,workers,ending", [
    (["worker 0: InjectedFailure: boom"], 3, "; 2 of 3 workers finished, summary in "),
    (["worker 0: killed by signal 9", "worker 1: killed by signal 9"], 2, " (and 1 more); no worker finished, summary in "),
    (["worker 0: InjectedFailure: boom"], 1, "; no worker finished, summary in "),
])
def test_a_failed_worker_is_never_said_to_have_finished(failed, workers, ending, tmp_path):
    from onetrick.config import TrainConfig
    from onetrick.distributed.runtime import WorkerFailure
    from onetrick.run.async_loop import raise_if_failed

    cfg = TrainConfig(strategy="hogwild", workers=workers, out=tmp_path)
    with pytest.raises(WorkerFailure) as info:
        raise_if_failed({"failed_workers": failed}, cfg)
    assert str(info.value) == f"{failed[0]}{ending}{tmp_path}"


# -- --threads beyond the cores ----------------------------------------------------------
def test_threads_in_all_beyond_the_cores_are_refused(monkeypatch):
    """The bound counts every worker's threads: 2 cores take 16 in all."""
    from onetrick.config import ConfigError, TrainConfig
    from onetrick.run import preflight

    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    for name in ("RANK", "WORLD_SIZE", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(name, raising=False)
    preflight.check_cores(TrainConfig(strategy="data", workers=2, threads=8))
    with pytest.raises(ConfigError, match=r"^--threads 9 x 2 workers is far beyond this machine's 2 CPU cores "
                                          r"\(at most 16 threads in all here\)$"):
        preflight.check_cores(TrainConfig(strategy="data", workers=2, threads=9))
