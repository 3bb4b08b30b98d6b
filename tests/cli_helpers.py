"""Run the ``onetrick`` command as a user would: a separate process, with a timeout."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

FAST = ["--no-progress", "--threads", "1"]


def onetrick(*args: str, timeout: float = 240, env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "onetrick.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=full_env, cwd=cwd)


def exported_weights(run: Path) -> dict[str, torch.Tensor]:
    from onetrick.run.export import full_state

    return full_state(run)
