#!/usr/bin/env python3
"""SIGKILL trials: how often does a killed hybrid worker, restarted by torch elastic,
end with the same weights as an uninterrupted run? (Issue #17's 20-of-20 target.)

    .venv/bin/python scripts/sigkill_trials.py --trials 20

One uninterrupted run, then TRIALS runs whose worker (rank alternating 0/1) is SIGKILLed
after a step drawn from 5..11 (checkpoints every 4 steps), each with ``--max-restarts 2``;
each final state is compared bit for bit with the uninterrupted one. Prints one line per
trial and ``N of TRIALS bit-identical``; exits 1 unless all are.
"""
from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

RUN = ["--workers", "2", "--strategy", "hybrid", "--scheme", "b", "--steps", "14", "--batch", "16",
       "--ckpt-every", "4", "--log-every", "2", "--eval-every", "100", "--dropout", "0", "--no-progress",
       "--threads", "1", "--timeout", "60"]


def train(out: Path, crash: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **({"ONETRICK_CRASH_AT": crash} if crash else {})}
    args = [sys.executable, "-m", "onetrick.cli", "train", *RUN, "--out", str(out)]
    if crash:
        args += ["--max-restarts", "2"]
    return subprocess.run(args, capture_output=True, text=True, timeout=600, env=env)


def weights(run: Path) -> dict[str, torch.Tensor]:
    from onetrick.run.export import full_state

    return full_state(run)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0, help="draws the crash steps")
    args = parser.parse_args()
    draw = random.Random(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        whole = Path(tmp) / "whole"
        if train(whole).returncode:
            print("the uninterrupted run failed", file=sys.stderr)
            return 2
        want = weights(whole)
        same = 0
        for trial in range(args.trials):
            crash = f"{draw.randint(5, 11)}:{trial % 2}"
            out = Path(tmp) / f"trial{trial}"
            result = train(out, crash)
            ok = result.returncode == 0 and all(torch.equal(weights(out)[k], v) for k, v in want.items())
            same += ok
            reason = "" if ok else f" ({result.stderr.strip().splitlines()[-1] if result.stderr.strip() else 'weights differ'})"
            print(f"trial {trial + 1}: crash at {crash}: {'bit-identical' if ok else 'DIFFERENT'}{reason}", flush=True)
    print(f"{same} of {args.trials} bit-identical")
    return 0 if same == args.trials else 1


if __name__ == "__main__":
    sys.exit(main())
