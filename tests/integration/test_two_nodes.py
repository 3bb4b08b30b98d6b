"""Two machines, as docs/gpus-and-clusters.md runs them: two torchrun agents (here on one
machine, one process each, joined by c10d rendezvous, node ranks assigned by it) train the
hybrid into one shared run directory and get the weights of ``--workers 2``."""
from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import torch

from cli_helpers import FAST, exported_weights, onetrick

JOB = ["--strategy", "hybrid", "--scheme", "b", "--steps", "6", "--batch", "16", "--ckpt-every", "3",
       "--eval-every", "100", *FAST]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _agent(port: int, out) -> list[str]:
    """One node's command: torchrun's multi-node form, the same on every node."""
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
            "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "onetrick-two-nodes",
            "-m", "onetrick.cli", "train", *JOB, "--out", str(out)]


@pytest.mark.timeout(240)
def test_two_nodes_train_the_hybrid_into_one_run_directory_like_two_local_workers(tmp_path):
    own = onetrick("train", "--workers", "2", *JOB, "--out", tmp_path / "own", timeout=200)
    assert own.returncode == 0, own.stderr[-2000:]
    shared, env = tmp_path / "shared", {**os.environ, "OMP_NUM_THREADS": "1"}
    command = _agent(_free_port(), shared)
    logs = [(tmp_path / f"node{i}.out", tmp_path / f"node{i}.err") for i in range(2)]
    nodes = []
    try:
        for out, err in logs:   # files, not pipes: a node blocked on a full pipe would hold the other
            with open(out, "w") as stdout, open(err, "w") as stderr:
                nodes.append(subprocess.Popen(command, stdout=stdout, stderr=stderr, env=env))
        codes = [node.wait(timeout=200) for node in nodes]
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()
                node.wait()
    errors = [err.read_text()[-2000:] for _, err in logs]
    assert codes == [0, 0], errors
    assert sum(out.read_text().count("test top-1 error") for out, _ in logs) == 1, errors   # worker 0's node only
    want, got = exported_weights(tmp_path / "own"), exported_weights(shared)
    assert want.keys() == got.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], msg=name)
