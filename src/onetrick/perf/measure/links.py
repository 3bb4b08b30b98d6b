"""gloo between K local workers, measured in a few seconds from the launcher.

Each probe runs ``k`` gloo process groups over loopback TCP (the transport K local
workers use): the rendezvous probe in ``k`` threads of this process, the link itself and
the overlap probe in ``k`` fresh interpreters (forking the launcher, which by then has
run threads, hung a child). The link is measured between processes because threads of
one process move large tensors slower than processes do: their temporaries' page faults
queue on the one address space (an all-gather of 24 MiB in 2 threads here reached
0.1-0.5 of the all-reduce's bandwidth, in 2 processes 0.6-0.75, as the sharded update's
all-gathers did in training).

* :func:`loopback_link`: the idle link: a one-float all-reduce and all-gather (the fixed
  cost of a collective), a 24 MiB all-reduce (bandwidth: the size of a gradient bucket),
  and how much slower gloo's reduce-scatter and all-gather move the same bytes, at that
  size and above glibc's 32 MiB mmap threshold (``large_op_factor``), where every
  temporary is a fresh mapping (an all-gather falls to 0.3-0.4 of the all-reduce's
  bandwidth here; a class-sharded classifier's gradient bucket is that large).
* :func:`overlap_us_per_mb`: what an *asynchronous* collective (DDP's buckets, the
  sharded update's reduce-scatters) adds to the compute it overlaps, per MB sent: gloo's
  copies and sums run on the workers' cores (0.7-1.3 ms per MB here); measured in
  processes, as the workers run.
* :func:`busy_sync_us`: what a *blocking* collective costs on top of that while the
  workers are busy computing. A worker that waits gives up its core; the collective
  completes only when every peer, and gloo's threads in each, has had a core to take its
  turn in the ring. On two cores that is about 2 ms per blocking collective at K=2 and
  5-7 ms at K=4 (four workers time-sharing two cores), against 0.3-0.4 ms idle; it is
  why scheme (b), with a dozen rendezvous per step, ran 30-40% slower than the idle link
  predicted.

:func:`measured_link` runs all three and returns what
:meth:`~onetrick.perf.predict.step.Link.from_measured` reads.
"""
from __future__ import annotations

import functools
import os
import pickle
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

__all__ = ["busy_sync_us", "loopback_link", "measured_link", "overlap_us_per_mb"]

BUSY_BYTES = 256 * 2**10   # a blocking exchange of activations: 32 rows x 2048 floats
LINK_BYTES = 24 * 2**20    # a gradient bucket (data_parallel.BUCKET_BYTES is 25 MiB), under the mmap threshold
LARGE_BYTES = 48 * 2**20   # over glibc's 32 MiB mmap threshold (netmemory.MMAP_MAX)


def _in_threads(k: int, fn: Callable[[int, Any], dict], name: str) -> dict[int, dict]:
    """``fn(rank, group)`` in ``k`` threads, each with a gloo group of its own; rank -> result."""
    import torch.distributed as dist

    store = dist.HashStore()
    found: dict[int, dict] = {}
    errors: list[BaseException] = []

    def worker(rank: int) -> None:
        try:
            found[rank] = fn(rank, dist.ProcessGroupGloo(dist.PrefixStore(name, store), rank, k, timedelta(seconds=60)))
        except BaseException as err:   # surfaced in the caller's thread
            errors.append(err)

    threads = [threading.Thread(target=worker, args=(r,), daemon=True) for r in range(k)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    if errors or len(found) < k:
        raise RuntimeError(f"loopback link probe failed: {errors[0] if errors else 'timed out'}")
    return found


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


class _Busy:
    """K threads of ``threads`` torch threads each, computing chunks of about ``chunk_s``
    (matrix multiplies) as a worker computes between collectives."""

    def __init__(self, threads: int, chunk_s: float = 0.002) -> None:
        self.threads = threads
        self.a = torch.randn(256, 256)
        with self:
            t0 = time.perf_counter()
            for _ in range(10):
                self.a @ self.a
            self.per = max(1, round(chunk_s / ((time.perf_counter() - t0) / 10)))

    def __enter__(self) -> _Busy:
        self.old = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        return self

    def __exit__(self, *exc) -> None:
        torch.set_num_threads(self.old)

    def chunk(self, x: torch.Tensor) -> None:
        for _ in range(self.per):
            x @ x


def busy_sync_us(k: int, threads: int = 1, idle_us: float = 0.0, count: int = 24, repeats: int = 5) -> float:
    """Microseconds a blocking collective costs beyond ``idle_us`` (what the idle link
    model charges for it) when ``k`` workers of ``threads`` threads compute between
    collectives on this machine's cores. Each of ``k`` threads runs ``count`` compute chunks,
    alone and then each followed by a blocking all-reduce of ``BUSY_BYTES``: the slowest
    thread's extra time per collective, median of ``repeats``."""
    busy = _Busy(threads)

    def measure(rank: int, pg) -> dict:
        x, msg = busy.a.clone(), torch.zeros(BUSY_BYTES // 4)

        def run(sync: bool) -> float:
            pg.allreduce([msg]).wait()   # start together
            t = time.perf_counter()
            for _ in range(count):
                busy.chunk(x)
                if sync:
                    pg.allreduce([msg]).wait()
            return time.perf_counter() - t

        run(True)   # warm up the connections and the buffers
        return {"alone": run(False), "synced": run(True)}

    extra = []
    with busy:
        for r in range(repeats):
            found = _in_threads(k, measure, f"busy{r}").values()
            extra.append((max(f["synced"] for f in found) - max(f["alone"] for f in found)) / count)
    return max(0.0, statistics.median(extra) * 1e6 - idle_us)


def _measure_overlap(rank: int, pg, busy: _Busy, nbytes: int, count: int, repeats: int) -> list[dict]:
    """:func:`overlap_us_per_mb`'s measurement in one of its workers, ``repeats`` times: the
    time of ``count`` chunks alone and with an ``nbytes`` all-reduce in flight."""
    x, msg, one = busy.a.clone(), torch.ones(nbytes // 4), torch.zeros(1)

    def run(comm: bool) -> float:
        pg.allreduce([one]).wait()   # start together
        t = time.perf_counter()
        work = pg.allreduce([msg]) if comm else None
        for _ in range(count):
            busy.chunk(x)
        spent = time.perf_counter() - t
        if work is not None:
            work.wait()
        return spent

    with busy:
        run(True)   # warm up the connections and the buffers
        return [{"alone": run(False), "overlap": run(True)} for _ in range(repeats)]


def overlap_us_per_mb(k: int, threads: int = 1, nbytes: int = 8 * 2**20, count: int = 20, repeats: int = 5) -> float:
    """Wall microseconds an asynchronous collective adds to the compute running beside it,
    per MB one worker sends: gloo's copies and sums take CPU from the same cores. Each of
    ``k`` workers of ``threads`` threads computes ``count`` chunks (long enough to outlast
    the collective), alone and then with an ``nbytes`` all-reduce in flight; the mean extra
    compute time over the bytes sent, median of ``repeats``. The workers are processes, as
    the link probe's are: in threads of one process the cost came out 10-30% lower here
    (590-820 us per MB against 670-940), short of what DistributedDataParallel's
    overlapped buckets cost resnet18's backward."""
    busy = _Busy(threads)
    sent_mb = 2 * (k - 1) / k * nbytes / 1e6
    found = _in_processes(k, functools.partial(_measure_overlap, busy=busy, nbytes=nbytes, count=count, repeats=repeats))
    extra = [statistics.mean(f[r]["overlap"] - f[r]["alone"] for f in found.values()) / sent_mb for r in range(repeats)]
    return max(0.0, statistics.median(extra) * 1e6)


def measured_link(k: int, threads: int = 1) -> dict:
    """The idle link (:func:`loopback_link`) plus what busy workers pay on top of it:
    ``sync_us`` per blocking collective (:func:`busy_sync_us`) and
    ``overlap_us_per_mb`` of compute per MB an overlapped collective sends
    (:func:`overlap_us_per_mb`)."""
    from onetrick.perf.predict.step import Link, collective_s

    link = loopback_link(k)
    idle_us = collective_s(Link.from_measured(link).idle(), k, "all_reduce", BUSY_BYTES) * 1e6
    return {**link, "sync_us": busy_sync_us(k, threads, idle_us), "overlap_us_per_mb": overlap_us_per_mb(k, threads),
            "threads": threads}
