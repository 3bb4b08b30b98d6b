"""Ctrl-C inside a checkpoint write, as a user meets it: the one "interrupted" line that
every other moment gives (DCP catches the KeyboardInterrupt raised inside its save and
wraps it in its own exception), the previous checkpoint kept, and ``--resume`` goes on."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cli_helpers import FAST, onetrick

RUN = ["--steps", "8", "--ckpt-every", "4", "--eval-every", "100", "--batch", "16", *FAST]
SLOW_SAVE = {"ONETRICK_SLOW_SAVE_AT": "8:120"}   # step 8's checkpoint lingers inside DCP's save


def _our_lines(stderr: str) -> list[str]:
    """stderr lines other than Python warnings (which are not ours to silence)."""
    return [ln for ln in stderr.splitlines() if ln.strip() and "Warning" not in ln and not ln.startswith("  warnings.warn")]


def _wait_for_files(folder: Path, pattern: str, proc: subprocess.Popen, wait: float = 180) -> None:
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline and proc.poll() is None:
        if list(folder.glob(pattern)):
            return
        time.sleep(0.1)
    pytest.fail(f"no {folder / pattern} (exit code {proc.poll()})")


@pytest.mark.timeout(300)
@pytest.mark.parametrize("workers", ["1", "2"])
def test_ctrl_c_during_a_checkpoint_write_is_the_one_interrupted_line(tmp_path, workers):
    """SIGINT to the whole process group (as Ctrl-C in a terminal: the launcher and its
    workers) once step 8's DCP files are written: rc 130, one line, step 4 kept, resumable."""
    run = tmp_path / "run"
    args = [sys.executable, "-m", "onetrick.cli", "train", "--workers", workers, "--out", str(run), *RUN]
    proc = subprocess.Popen(args, env={**os.environ, "OMP_NUM_THREADS": "1", **SLOW_SAVE}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _wait_for_files(run / "checkpoints" / "step_00000008.tmp", "*.distcp", proc)
        time.sleep(1.0)   # every worker's files written: each is in the hook's sleep, inside DCP's save
        os.killpg(proc.pid, signal.SIGINT)
        _, stderr = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 130, stderr[-3000:]
    assert _our_lines(stderr) == [f"onetrick: interrupted; resume with --resume --out {run}"], stderr[-3000:]
    assert (run / "checkpoints" / "step_00000004" / "meta.json").exists()
    assert not (run / "checkpoints" / "step_00000008").exists()
    resumed = onetrick("train", "--workers", workers, "--out", run, "--resume", *RUN)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads((run / "summary.json").read_text())["steps"] == 8
