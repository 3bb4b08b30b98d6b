"""Failures at run time, as a user meets them: one line naming the worker at fault,
the traceback kept in the run directory, no hang, no orphaned worker."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cli_helpers import FAST, onetrick

TWO = ["--workers", "2", "--strategy", "data", "--batch", "8", *FAST]


def _errors(stderr: str) -> list[str]:
    """stderr lines other than Python warnings (which are not ours to silence)."""
    return [ln for ln in stderr.splitlines() if ln.strip() and "Warning" not in ln and not ln.startswith("  warnings.warn")]


@pytest.mark.timeout(180)
def test_an_error_inside_a_worker_is_one_line_and_the_traceback_is_kept(tmp_path):
    result = onetrick("train", *TWO, "--lr", "1e6", "--steps", "40", "--out", tmp_path)
    assert result.returncode == 2
    lines = _errors(result.stderr)
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("onetrick: error: worker ") and "non-finite loss" in lines[0], lines
    assert f"traceback: {tmp_path / 'error.log'}" in lines[0]
    assert "Traceback (most recent call last)" in (tmp_path / "error.log").read_text()


@pytest.mark.timeout(180)
def test_debug_prints_the_traceback(tmp_path):
    result = onetrick("train", *TWO, "--lr", "1e6", "--steps", "40", "--out", tmp_path, "--debug")
    assert result.returncode == 2
    assert "Traceback (most recent call last)" in result.stderr
    assert not (tmp_path / "error.log").exists()


@pytest.mark.timeout(180)
def test_a_frozen_worker_is_named_and_fails_the_job_soon_after_the_timeout(tmp_path):
    """Worker 1 is SIGSTOPped (alive but silent, as a hung machine): worker 0 times out in
    a collective; the message must name worker 1, not worker 0, within timeout + a few s."""
    timeout, freeze_at = 8, 12
    start = time.monotonic()
    result = onetrick("train", *TWO, "--steps", "100000", "--timeout", timeout, "--out", tmp_path,
                      env={"ONETRICK_FREEZE_AT": f"{freeze_at}:1"})
    elapsed = time.monotonic() - start
    assert result.returncode == 2
    lines = _errors(result.stderr)
    assert len(lines) == 1 and "worker 1 stopped answering" in lines[0], result.stderr
    # start-up (~5-10 s on a loaded 2-core machine) + freeze + timeout + naming and teardown (~5 s)
    assert elapsed < freeze_at + timeout + 40, elapsed


@pytest.mark.timeout(240)
def test_no_worker_outlives_a_killed_launcher(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launcher = subprocess.Popen([sys.executable, "-m", "onetrick.cli", "train", *TWO, "--steps", "100000",
                                 "--out", str(tmp_path)], env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
    try:
        workers = _wait_for_workers(launcher.pid, tmp_path / "metrics.jsonl")
        launcher.send_signal(signal.SIGKILL)
        launcher.wait()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(_alive(p) for p in workers):
            time.sleep(0.2)
        assert not [p for p in workers if _alive(p)], "workers outlived their launcher"
    finally:
        launcher.kill()


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


def _wait_for_workers(pid: int, metrics: Path, wait: float = 180) -> list[int]:
    """The launcher's spawned workers, once training has logged a step."""
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        if metrics.exists() and metrics.read_text().strip():
            spawned = [c for c in _children(pid) if b"spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes()]
            if len(spawned) == 2:
                return spawned
        time.sleep(0.2)
    pytest.fail("training did not start")


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


@pytest.mark.timeout(60)
def test_a_stopped_heartbeat_has_left_the_store_before_the_worker_exits():
    """The heartbeat's thread is gone once stop() returns: a daemon thread still inside a
    store call at interpreter exit aborts the worker (torchrun's workers exit that way)."""
    from datetime import timedelta

    import torch.distributed as dist

    from onetrick.distributed.runtime import HEARTBEAT_EVERY_S, Heartbeat

    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=10))
    beat = Heartbeat(store, rank=0, world=2)
    beat._thread.start()
    time.sleep(2.5 * HEARTBEAT_EVERY_S)
    beat.stop()
    assert not beat._thread.is_alive()
    assert int(store.get("0")) >= 1   # it did beat while running


RESTARTED = [*TWO, "--steps", "12", "--ckpt-every", "4", "--eval-every", "100"]


@pytest.mark.timeout(300)
def test_a_restart_says_which_worker_died_and_the_step_it_resumes_from(tmp_path):
    """Worker 1 is SIGKILLed after step 6 (checkpoint at 4): one line says so, the job goes on."""
    result = onetrick("train", *RESTARTED, "--max-restarts", "2", "--out", tmp_path, timeout=280,
                      env={"ONETRICK_CRASH_AT": "6:1"})
    assert result.returncode == 0, result.stderr[-3000:]
    lines = _errors(result.stderr)
    assert len(lines) == 1, result.stderr[-3000:]
    assert re.fullmatch(r"onetrick: worker 1 failed: Signal 9 \(SIGKILL\) received by PID \d+; restart 1 of 2 from step 4",
                        lines[0]), lines


@pytest.mark.timeout(300)
def test_running_out_of_restarts_says_so(tmp_path):
    """A failure that every attempt meets: the restart is said, then the error says that
    --max-restarts ran out."""
    result = onetrick("train", *TWO, "--lr", "1e6", "--steps", "40", "--max-restarts", "1", "--out", tmp_path,
                      timeout=280)
    assert result.returncode == 2, result.stderr[-3000:]
    lines = _errors(result.stderr)
    assert len(lines) == 2, result.stderr[-3000:]
    assert lines[0].startswith("onetrick: worker ") and "; restart 1 of 1 from step 0" in lines[0], lines
    assert lines[1].startswith("onetrick: error: worker ") and "non-finite loss" in lines[1], lines
    assert "after 1 restart (--max-restarts 1)" in lines[1], lines
