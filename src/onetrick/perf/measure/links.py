"""gloo between K local workers, measured in a few seconds from the launcher: the idle link,
and the worker processes every probe of the workers runs in.

Each probe runs ``k`` gloo process groups over loopback TCP (the transport K local
workers use) in ``k`` fresh interpreters (:func:`_in_processes`; forking the launcher,
which by then has run threads, hung a child). The link is measured between processes
because threads of one process move large tensors slower than processes do: their
temporaries' page faults queue on the one address space (an all-gather of 24 MiB in 2
threads here reached 0.1-0.5 of the all-reduce's bandwidth, in 2 processes 0.6-0.75, as
the sharded update's all-gathers did in training).

:func:`loopback_link`: the idle link: a one-float all-reduce and all-gather (the fixed
cost of a collective), a 24 MiB all-reduce (bandwidth: the size of a gradient bucket),
and how much slower gloo's reduce-scatter and all-gather move the same bytes, at that
size and above glibc's 32 MiB mmap threshold (``large_op_factor``), where every
temporary is a fresh mapping (an all-gather falls to 0.3-0.4 of the all-reduce's
bandwidth here; a class-sharded classifier's gradient bucket is that large).

What busy workers time-sharing this machine's cores pay on top of the idle link, and
:func:`~onetrick.perf.measure.shared_host.measured_link` (the idle link plus that), are
in :mod:`~onetrick.perf.measure.shared_host`.
"""
from __future__ import annotations

import functools
import os
import pickle
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

__all__ = ["loopback_link"]

LINK_BYTES = 24 * 2**20    # a gradient bucket (data_parallel.BUCKET_BYTES is 25 MiB), under the mmap threshold
LARGE_BYTES = 48 * 2**20   # over glibc's 32 MiB mmap threshold (predict.activations.MMAP_MAX)


_CHILD = "import sys; from onetrick.perf.measure.links import _probe_worker; _probe_worker(*sys.argv[1:])"


def _probe_worker(job: str, rank: str, k: str, store_path: str, out: str) -> None:
    """One probe worker in a fresh interpreter: the pickled ``fn`` in ``job`` run as
    ``fn(rank, group)`` with a gloo group over a file store; its result, or its error,
    pickled to ``out``."""
    import torch.distributed as dist

    with open(job, "rb") as f:
        fn = pickle.load(f)
    try:
        pg = dist.ProcessGroupGloo(dist.FileStore(store_path, int(k)), int(rank), int(k), timedelta(seconds=60))
        result: Any = fn(int(rank), pg)
    except Exception as err:   # surfaced in the parent
        result = RuntimeError(f"{type(err).__name__}: {err}")
    with open(out + ".tmp", "wb") as f:
        pickle.dump(result, f)
    os.replace(out + ".tmp", out)


def _in_processes(k: int, fn: Callable[[int, Any], Any], timeout_s: float = 120.0) -> dict[int, Any]:
    """``fn(rank, group)`` (picklable: a module-level function or a partial of one) in ``k``
    fresh interpreters, each with a gloo group of its own; rank -> result. Each pays
    torch's start-up (1-2 s here, the K of them together); forking the launcher instead
    took milliseconds but hung a child in CI: a lock held at the fork by one of the
    launcher's threads (an earlier probe's gloo group) stays locked in the child."""
    from onetrick.distributed.runtime import package_pythonpath

    with tempfile.TemporaryDirectory() as tmp:
        job, store = os.path.join(tmp, "job"), os.path.join(tmp, "store")
        with open(job, "wb") as f:
            pickle.dump(fn, f)
        env = {**os.environ, "PYTHONPATH": package_pythonpath()}
        outs = [os.path.join(tmp, f"out{r}") for r in range(k)]
        procs = [subprocess.Popen([sys.executable, "-c", _CHILD, job, str(r), str(k), store, outs[r]], env=env,
                                  stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                 for r in range(k)]
        deadline = time.monotonic() + timeout_s
        errors: list[str] = []
        for p in procs:
            try:
                _, err = p.communicate(timeout=max(0.1, deadline - time.monotonic()))
                if p.returncode:
                    errors.append((err.decode(errors="replace").strip().splitlines() or [f"exit {p.returncode}"])[-1])
            except subprocess.TimeoutExpired:
                p.kill()
                p.communicate()
                errors.append(f"timed out after {timeout_s:.0f} s")
        found = {r: pickle.loads(Path(out).read_bytes()) for r, out in enumerate(outs) if os.path.exists(out)}
    errors += [str(r) for r in found.values() if isinstance(r, BaseException)]
    if errors or len(found) < k:
        raise RuntimeError(f"loopback link probe failed: {errors[0] if errors else 'a worker left no result'}")
    return found


def _bandwidths(pg, k: int, nbytes: int, reps: int, fixed: float) -> dict[str, float]:
    """Bytes per second one worker sends (comm.py's count) in an all-reduce, a
    reduce-scatter and an all-gather of ``nbytes``: the median of ``reps`` after one
    warm-up, each started together, less the fixed cost of a collective."""
    big = torch.ones(max(k, nbytes // 4 // k * k))
    shard, full = torch.zeros(big.numel() // k), torch.zeros(big.numel())
    frac, size = (k - 1) / k, big.numel() * 4
    ops = {"all_reduce": (lambda: pg.allreduce([big]).wait(), 2 * frac * size),
           "reduce_scatter": (lambda: pg._reduce_scatter_base(shard, big).wait(), frac * size),
           "all_gather": (lambda: pg._allgather_base(full, shard).wait(), frac * size)}
    one = torch.zeros(1)
    bw = {}
    for op, (run, sent) in ops.items():
        run()
        times = []
        for _ in range(reps):
            pg.allreduce([one]).wait()   # start together: a peer still finishing the last run is not this one's time
            t0 = time.perf_counter()
            run()
            times.append(time.perf_counter() - t0)
        bw[op] = sent / max(1e-9, statistics.median(times) - fixed)
    return bw


def _measure_link(rank: int, pg, k: int, nbytes: int, large: int, reps: int) -> dict:
    """:func:`loopback_link`'s measurement in one of its ``k`` processes."""
    torch.set_num_threads(1)   # as a one-thread worker: gloo's sums run on its own threads
    one = torch.zeros(1)
    outs = [torch.zeros(1) for _ in range(k)]
    ar, ag = [], []
    for _ in range(11):
        t0 = time.perf_counter()
        pg.allreduce([one]).wait()
        t1 = time.perf_counter()
        pg.allgather([outs], [one]).wait()
        ar.append(t1 - t0)
        ag.append(time.perf_counter() - t1)
    fixed = statistics.median(ar[1:])
    bw = _bandwidths(pg, k, nbytes, reps, fixed)
    big = _bandwidths(pg, k, large, max(1, reps - 2), fixed)
    return {"measured_mbps": bw["all_reduce"] * 8 / 1e6, "latency_us": fixed / 2 / (k - 1) * 1e6,
            "collective_us": {"all_reduce": fixed * 1e6, "all_gather": statistics.median(ag[1:]) * 1e6},
            "op_factor": {op: bw[op] / bw["all_reduce"] for op in ("reduce_scatter", "all_gather")},
            "large_op_factor": {op: big[op] / bw["all_reduce"] for op in big},
            "kind": f"loopback probe: {k} gloo processes started by the launcher"}


def loopback_link(k: int, nbytes: int = LINK_BYTES, large: int = LARGE_BYTES, reps: int = 5) -> dict:
    """The idle link between ``k`` local worker processes, in 1-4 s: the median time of a
    one-float all-reduce and all-gather (the fixed cost of a collective), the bandwidth of
    an ``nbytes`` all-reduce, and ``op_factor``: the bandwidth a reduce-scatter and an
    all-gather of the same size reach per byte comm.py counts, as a fraction of the
    all-reduce's (gloo's are slower: 0.3 and 0.6-0.75 of it here); ``large_op_factor``: the
    same three ops on ``large`` bytes (over the mmap threshold), as fractions of that
    all-reduce's bandwidth."""
    return _in_processes(k, functools.partial(_measure_link, k=k, nbytes=nbytes, large=large, reps=reps))[0]
