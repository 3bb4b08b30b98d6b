"""Bad input: one line naming the problem, exit code 2, and no worker started.

Every row goes through the command's own entry point in this process, with the launcher
replaced by a failure, so a row passes only if the input is refused before launch.
"""
from __future__ import annotations

from pathlib import Path

import pytest

ONE_CLASS = "imagefolder:{tmp}/oneclass"
TINY = "imagefolder:{tmp}/tiny"
EMPTY_TRAIN_CLASS = "imagefolder:{tmp}/emptytrain"
EMPTY_VAL_CLASS = "imagefolder:{tmp}/emptyval"

BAD_TRAIN_INPUT = [
    # what to train
    (["--model", "vgg"], "unknown model 'vgg'"),
    (["--data", "cifar"], "unknown --data 'cifar'"),
    (["--data", "imagefolder:/no/such/dir"], "data path not found: /no/such/dir"),
    (["--data", "imagefolder:"], "names no path; use imagefolder:PATH"),
    (["--data", "synthetic:x"], "synthetic:CLASSES needs an integer"),
    (["--data", "synthetic:1"], "synthetic:CLASSES needs an integer >= 2"),
    (["--data", "synthetic:-5"], "synthetic:CLASSES needs an integer"),
    (["--data", "synthetic:100000000"], "GB per worker (predicted peak, at"),
    (["--data", ONE_CLASS], "has 1 class; a classifier needs at least 2"),
    (["--data", TINY, "--batch", "16"], "a step needs 16 training examples but"),
    (["--data", EMPTY_TRAIN_CLASS], "no images in class folder {tmp}/emptytrain/train/dog: add some"),
    (["--data", EMPTY_VAL_CLASS], "no images in class folder {tmp}/emptyval/val/dog: add some"),
    (["--image-size", "4"], "--image-size must be in [8, 4096]"),
    (["--image-size", "100000"], "--image-size must be in [8, 4096]"),
    (["--image-size", "8"], "--image-size 8 does not fit model 'smallnet'"),
    (["--model", "alexnet", "--data", "synthetic:10", "--image-size", "32"], "--image-size 32 does not fit model 'alexnet'"),
    (["--image-size", "x"], "invalid int value: 'x'"),
    (["--dropout", "1.5"], "--dropout must be in [0, 1)"),
    (["--dropout", "-0.1"], "--dropout must be in [0, 1)"),
    (["--dropout", "nan"], "--dropout must be in [0, 1)"),
    # how long
    (["--batch", "0"], "--batch must be at least 1"),
    (["--batch", "-3"], "--batch must be at least 1"),
    (["--batch", "5000"], "a step needs 5000 training examples but digits has 1437"),
    (["--workers", "2", "--strategy", "data", "--batch", "800"], "a step needs 1600 training examples (2 workers x --batch 800)"),
    (["--batch", "1e3"], "invalid int value: '1e3'"),
    (["--steps", "0"], "--steps must be at least 1"),
    (["--steps", "-1"], "--steps must be at least 1"),
    (["--epochs", "0"], "--epochs must be positive"),
    (["--epochs", "-2"], "--epochs must be positive"),
    (["--epochs", "inf"], "--epochs must be finite"),
    (["--epochs", "nan"], "--epochs must be positive"),
    # recipe
    (["--lr", "-1"], "--lr must be a positive number"),
    (["--lr", "0"], "--lr must be a positive number"),
    (["--lr", "inf"], "--lr must be a positive number"),
    (["--lr", "nan"], "--lr must be a positive number"),
    (["--momentum", "-0.1"], "--momentum must be in [0, 1)"),
    (["--momentum", "1.5"], "--momentum must be in [0, 1)"),
    (["--momentum", "1"], "--momentum must be in [0, 1)"),
    (["--weight-decay=-1e-4"], "--weight-decay must be in [0, 1)"),
    (["--weight-decay", "2"], "--weight-decay must be in [0, 1)"),
    (["--bias-lr-mult", "-2"], "--bias-lr-mult must be in [0, 1000]"),
    (["--lr-mult", "head.*"], "--lr-mult expects GLOB=NUMBER"),
    (["--lr-mult", "=2"], "--lr-mult expects GLOB=NUMBER"),
    (["--lr-mult", "head.*=-1"], "--lr-mult needs a multiplier >= 0"),
    (["--lr-mult", "head.*=inf"], "--lr-mult needs a multiplier >= 0"),
    (["--lr-mult", "fc9.*=2"], "--lr-mult 'fc9.*=2' matches no parameter"),
    (["--lr-drops", "0.5,1.5"], "--lr-drops must be fractions of training in (0, 1)"),
    (["--lr-drops", "0"], "--lr-drops must be fractions of training in (0, 1)"),
    (["--lr-drops", "0.8,0.3"], "--lr-drops must be increasing"),
    (["--lr-drops", "a,b"], "--lr-drops"),
    (["--lr-drop-factor", "0"], "--lr-drop-factor must be in (0, 1]"),
    (["--lr-drop-factor", "-0.1"], "--lr-drop-factor must be in (0, 1]"),
    (["--lr-drop-factor", "3"], "--lr-drop-factor must be in (0, 1]"),
    (["--schedule", "cosine"], "invalid choice: 'cosine'"),
    (["--lr-scale", "cube"], "invalid choice: 'cube'"),
    (["--seed", "-1"], "--seed must be in [0, 2**32)"),
    (["--seed", str(2**63)], "--seed must be in [0, 2**32)"),
    # parallelism
    (["--workers", "0"], "--workers must be at least 1"),
    (["--workers", "-2"], "--workers must be at least 1"),
    (["--workers", "64", "--strategy", "data"], "--workers 64 is far beyond this machine's"),
    (["--workers", "2", "--strategy", "single"], "--strategy single runs one worker"),
    (["--strategy", "nope"], "invalid choice: 'nope'"),
    (["--workers", "2", "--scheme", "b"], "--scheme b needs --strategy hybrid"),
    (["--fc-batch", "worker"], "--fc-batch worker needs --strategy hybrid"),
    (["--workers", "3", "--strategy", "hybrid", "--scheme", "c", "--batch", "16"], "--scheme c needs --batch divisible by --workers"),
    (["--workers", "2", "--strategy", "hybrid", "--scheme", "a", "--fc-batch", "worker"], "--fc-batch worker needs --scheme b or c"),
    (["--workers", "2", "--strategy", "hybrid", "--scheme", "z"], "invalid choice: 'z'"),
    (["--sync", "allreduce"], "invalid choice: 'allreduce'"),
    (["--servers", "0", "--strategy", "paramserver", "--workers", "2"], "--servers must be at least 1"),
    (["--servers", "-1"], "--servers must be at least 1"),
    (["--fetch-every", "0"], "--fetch-every must be at least 1"),
    (["--push-every", "0", "--strategy", "paramserver", "--workers", "2"], "--push-every must be at least 1"),
    (["--device", "cuda"], "no CUDA device is available"),
    (["--device", "tpu"], "invalid choice: 'tpu'"),
    (["--threads", "0"], "--threads must be at least 1"),
    (["--threads", "-4"], "--threads must be at least 1"),
    (["--threads", "100000"], "--threads 100000 is far beyond this machine's"),
    (["--timeout", "0"], "--timeout must be a positive number of seconds"),
    (["--timeout", "-5"], "--timeout must be a positive number of seconds"),
    (["--timeout", "nan"], "--timeout must be a positive number of seconds"),
    (["--timeout", "inf"], "--timeout must be a positive number of seconds"),
    (["--max-restarts", "-1"], "--max-restarts must be at least 0"),
    # run directory
    (["--resume", "--out", "/no/such/run"], "does not exist"),
    (["--resume", "--overwrite", "--out", "{tmp}"], "--resume continues the run in --out, --overwrite removes it: give one"),
    (["--out", "{tmp}/a_file"], "is a file; give a directory"),
    (["--out", "{tmp}/a_file/run"], "lies under the file"),
    (["--eval-every", "0"], "--eval-every must be at least 1"),
    (["--log-every", "0"], "--log-every must be at least 1"),
    (["--ckpt-every", "0"], "--ckpt-every must be at least 1"),
    (["--ckpt-every", "-5"], "--ckpt-every must be at least 1"),
    (["--eval-views", "5"], "invalid choice: 5"),
    (["--on-nan", "ignore"], "invalid choice: 'ignore'"),
    (["--no-such-option"], "unrecognized arguments: --no-such-option"),
]


@pytest.fixture
def files(tmp_path: Path) -> Path:
    """A file where a directory is expected, an image folder with one class, one with
    two classes of one image each, and two where the class dog has no image in train/
    (a file that is not an image instead) or in val/."""
    from PIL import Image

    (tmp_path / "a_file").write_text("not a directory")
    for root in ("oneclass", "tiny", "emptytrain", "emptyval"):
        for split in ("train", "val"):
            for c in ["cat"] if root == "oneclass" else ["cat", "dog"]:
                folder = tmp_path / root / split / c
                folder.mkdir(parents=True)
                Image.new("RGB", (40, 40), color=(len(c) * 40, 0, 0)).save(folder / "0.png")
    (tmp_path / "emptytrain" / "train" / "dog" / "0.png").rename(tmp_path / "emptytrain" / "train" / "dog" / "notes.txt")
    (tmp_path / "emptyval" / "val" / "dog" / "0.png").unlink()
    return tmp_path


def test_the_table_is_long_enough():
    assert len(BAD_TRAIN_INPUT) >= 60


@pytest.mark.parametrize("args,message", BAD_TRAIN_INPUT, ids=[" ".join(a) for a, _ in BAD_TRAIN_INPUT])
def test_bad_train_input_is_one_line_before_any_worker(args, message, files, capsys, monkeypatch):
    from onetrick.cli import main as cli
    from onetrick.distributed import runtime
    from onetrick.run import train

    def no_launch(*a, **k):
        pytest.fail("a worker was launched")

    monkeypatch.setattr(runtime, "launch", no_launch)
    monkeypatch.setattr(train, "launch", no_launch)
    monkeypatch.chdir(files)
    args = [a.format(tmp=files) for a in args]
    try:
        code = cli.main(["train", "--steps", "1", *args] if "--steps" not in args else ["train", *args])
    except SystemExit as exit_:  # argparse's own errors
        code = exit_.code
    assert code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and message.format(tmp=files) in lines[0], lines


# -- reading a run back: eval, export, plot ------------------------------------------
BAD_READ_INPUT = [
    (["eval", "{tmp}/nowhere"], "no checkpoint in"),
    (["eval", "{run}", "--data", "synthetic:7"], "does not fit 'smallnet' on synthetic:7"),
    (["eval", "{run}", "--views", "3"], "invalid choice: 3"),
    (["eval", "{garbage_meta}"], "meta.json (JSONDecodeError)"),
    (["eval", "{meta_without_model}"], "lacks model: not a onetrick checkpoint"),
    (["eval", "{garbage_summary}"], "not a onetrick summary"),
    (["export", "{run}", "-o", "{tmp}/missing/model.pt"], "folder {tmp}/missing does not exist"),
    (["export", "{run}", "-o", "{tmp}"], "is a directory; give a file name"),
    (["export", "{tmp}/nowhere"], "no checkpoint in"),
    (["plot", "{run}", "-o", "{tmp}/a_file"], "is a file; plot writes PNG files into a folder"),
    (["plot", "{tmp}/nowhere", "-o", "{tmp}/plots"], "no metrics.jsonl in run directory"),
]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """One real two-step run, and copies of it with a damaged meta.json or summary.json."""
    import json
    import shutil

    from cli_helpers import FAST, onetrick

    tmp = tmp_path_factory.mktemp("runs")
    run = tmp / "run"
    result = onetrick("train", "--steps", "2", "--out", run, *FAST)
    assert result.returncode == 0, result.stderr
    (tmp / "a_file").write_text("not a directory")
    out = {"tmp": tmp, "run": run}
    for name, damage in (("garbage_meta", lambda p: _meta(p).write_text("{not json")),
                         ("meta_without_model", lambda p: _meta(p).write_text(json.dumps({"step": 2}))),
                         ("garbage_summary", lambda p: (p / "summary.json").write_text("[1, 2"))):
        shutil.copytree(run, tmp / name)
        damage(tmp / name)
        out[name] = tmp / name
    return out


def _meta(run: Path) -> Path:
    return sorted((run / "checkpoints").glob("step_*"))[-1] / "meta.json"


@pytest.mark.timeout(300)
@pytest.mark.parametrize("args,message", BAD_READ_INPUT, ids=[" ".join(a) for a, _ in BAD_READ_INPUT])
def test_bad_read_input_is_one_line(args, message, runs, capsys):
    from onetrick.cli import main as cli

    args = [a.format(**runs) for a in args]
    try:
        code = cli.main(args)
    except SystemExit as exit_:
        code = exit_.code
    assert code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and message.format(**runs) in lines[0], lines
