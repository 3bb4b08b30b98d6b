"""Corrections for K workers time-sharing one small machine: what the idle link and the
layer timings leave out when the workers, and other processes, share its cores.

* :func:`busy_sync_us`: what a *blocking* collective costs on top of the idle link while
  the workers are busy computing. A worker that waits gives up its core; the collective
  completes only when every peer, and gloo's threads in each, has had a core to take its
  turn in the ring. On two cores that is about 2 ms per blocking collective at K=2 and
  5-7 ms at K=4 (four workers time-sharing two cores), against 0.3-0.4 ms idle; it is
  why scheme (b), with a dozen rendezvous per step, ran 30-40% slower than the idle link
  predicted. Measured in ``k`` threads of this process.
* :func:`overlap_us_per_mb`: what an *asynchronous* collective (DDP's buckets, the
  sharded update's reduce-scatters) adds to the compute it overlaps, per MB sent: gloo's
  copies and sums run on the workers' cores (0.7-1.3 ms per MB here); measured in
  processes, as the workers run (:mod:`~onetrick.perf.measure.links`' process machinery).
* :func:`measured_link`: the idle link (:func:`~onetrick.perf.measure.links.loopback_link`)
  plus both, as :meth:`~onetrick.perf.predict.step.Link.from_measured` reads it.
* :func:`time_share`: K workers of T threads on C cores: every compute ``max(1, K*T/C)``
  times longer.
* :func:`machine_busy_s`, :func:`foreign_load`, :func:`wait_quiet`: the cores *other*
  processes keep busy (``/proc/stat``), and a wait until they leave the machine quiet.
* :func:`calibration`: a bench's own rows turned into the machine's drift, the
  time-sharing factor and what K workers lose to each other per step.
"""
from __future__ import annotations

import functools
import os
import statistics
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch

from onetrick.perf.measure.links import _in_processes, loopback_link

__all__ = ["busy_sync_us", "calibration", "foreign_load", "machine_busy_s", "measured_link", "overlap_us_per_mb",
           "time_share", "wait_quiet"]

BUSY_BYTES = 256 * 2**10   # a blocking exchange of activations: 32 rows x 2048 floats


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
    """The idle link (:func:`~onetrick.perf.measure.links.loopback_link`) plus what busy
    workers pay on top of it: ``sync_us`` per blocking collective (:func:`busy_sync_us`)
    and ``overlap_us_per_mb`` of compute per MB an overlapped collective sends
    (:func:`overlap_us_per_mb`); what ``train --strategy auto`` and ``onetrick plan``
    measure at start-up."""
    from onetrick.perf.predict.step import Link, collective_s

    link = loopback_link(k)
    idle_us = collective_s(Link.from_measured(link).idle(), k, "all_reduce", BUSY_BYTES) * 1e6
    return {**link, "sync_us": busy_sync_us(k, threads, idle_us), "overlap_us_per_mb": overlap_us_per_mb(k, threads),
            "threads": threads}


def machine_busy_s() -> float:
    """CPU seconds all cores of this machine have been busy since boot (/proc/stat);
    0.0 where /proc/stat is missing."""
    try:
        with open("/proc/stat") as fh:
            fields = fh.readline().split()[1:]
    except OSError:
        return 0.0
    v = [int(x) for x in fields]
    busy = v[0] + v[1] + v[2] + sum(v[5:8])      # user nice system irq softirq steal (guest is in user)
    return busy / os.sysconf("SC_CLK_TCK")


def foreign_load(seconds: float = 1.0) -> float:
    """Cores kept busy by *other* processes over ``seconds`` (this process sleeping)."""
    b0, c0, t0 = machine_busy_s(), time.process_time(), time.perf_counter()
    time.sleep(seconds)
    return max(0.0, (machine_busy_s() - b0 - (time.process_time() - c0)) / (time.perf_counter() - t0))


def wait_quiet(max_wait: float, threshold: float = 0.3, log=print) -> float:
    """Wait (up to ``max_wait`` s) until other processes use under ``threshold`` cores."""
    deadline = time.monotonic() + max_wait
    load = foreign_load()
    while load >= threshold and time.monotonic() < deadline:
        log(f"  waiting for a quiet machine: other processes use {load:.1f} cores")
        time.sleep(4.0)
        load = foreign_load()
    return load



def time_share(k: int, threads: int, cores: int | None = None) -> float:
    """K workers of T threads on ``cores`` (default: this machine's): each gets ``cores / (K*T)`` of a core."""
    return max(1.0, k * threads / (cores or os.cpu_count() or 1))


def calibration(single_ms: float | None, independent_ms: float | None, k: int, threads: int, cores: int | None,
                predicted_single_ms: float) -> tuple[float, float, float]:
    """``(drift, share, contention_ms)`` for K workers, from a bench's own rows: its
    one-worker step ``single_ms`` and its ``independent`` step at K, ``independent_ms``
    (None where the bench has no such row):

    * ``drift``: how much faster this machine ran the bench's one-worker step than the
      layer timings taken now predict it (``predicted_single_ms``: a validation recomputed
      later, or in another minute of this shared VM, whose speed moved by up to 50%
      between two rounds of one bench). Compute and the probe's wall times are scaled by
      it to the bench's speed; 1 without a one-worker row.
    * ``share``: K workers of ``threads`` threads time-sharing the cores, as the live
      planner charges it (:func:`time_share`): every compute ``max(1, K*T/cores)`` times longer.
    * ``contention_ms``: what K workers lose to each other beyond that, per step: the
      ``independent`` row (K workers, no communication) less ``share`` one-worker steps.
      Charged to every candidate alike, it leaves the pick the live planner's: two
      resnet18 workers lost 13 ms a step to each other at B=16 and 10 at 32, a loss per
      step, which as a factor on compute over-charged model parallelism's K*B rows.
    """
    drift = single_ms / predicted_single_ms if single_ms is not None else 1.0
    share = time_share(k, threads, cores) if cores else 1.0
    contention_ms = independent_ms - share * single_ms if independent_ms is not None and single_ms is not None else 0.0
    return drift, share, contention_ms
