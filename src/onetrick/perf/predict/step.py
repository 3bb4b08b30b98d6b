"""A cost model of one training step of every synchronous strategy: no printing, no argparse.

The entry point is :func:`predict`::

    predict(blocks, costs, Variant("hybrid", scheme="b"), k=8, batch=128,
            link=Link(gbps=48, latency_us=10)) -> StepResult

``blocks`` come from :func:`~onetrick.perf.predict.blocks.describe`, ``costs`` from
:mod:`onetrick.perf.predict.compute`; the :class:`StepResult` holds the predicted step seconds
(compute, communication, the exposed part), the bytes one worker sends by tag (exactly
as :class:`~onetrick.distributed.comm.Comm` counts them) and the collectives per step by op.

How: the step is walked in program order, issuing the collectives the strategy issues
(same sizes, same async/sync, same order). Each worker has one full-duplex link: a
collective occupies it for ``collective_us + latency x messages + bytes / bandwidth``
(the bandwidth times ``Link.op_factor[op]`` where measured: gloo's reduce-scatter and
all-gather move bytes slower than its all-reduce; ``Link.large_op_factor[op]`` for a
tensor over glibc's 32 MiB mmap threshold, whose temporaries are fresh mappings)
(bytes per worker as comm.py documents; messages K-1 for one ring pass, 2(K-1) for an
all-reduce), in issue order. An asynchronous collective runs while the worker computes;
waiting for one, or running a synchronous one, is *exposed* time. That is how scheme
(b)'s overlap appears (round j+1's broadcast travels during round j's compute), and DDP's
(gradient buckets all-reduced during the rest of backward). ``slow`` multiplies every
compute time (K workers sharing cores or memory bandwidth).

Every rendezvous (a synchronous collective, or a wait on one still in flight) costs
``Link.sync_us`` more where K workers time-share fewer cores than they have threads: a
peer may be descheduled behind another worker's compute, and the collective completes
only when it has taken its turn (measured, not derived: :mod:`~onetrick.perf.measure.shared_host`).
An asynchronous collective lengthens the compute it overlaps by ``Link.overlap_us_per_mb``
per MB sent (gloo's copies and sums on the same cores). The bucketed strategies also
copy gradients on the worker (``CostProvider.copy``): DDP each gradient into its bucket
and the reduced bucket back, the sharded update into its flat buckets. All workers are
otherwise assumed identical (the slowest shard, ``ceil(n/K)`` neurons, is simulated);
Python overheads between layers are not modelled.
"""
from __future__ import annotations

import dataclasses
import statistics
from dataclasses import dataclass, field
from typing import NamedTuple

from onetrick.perf.predict.blocks import Block
from onetrick.perf.predict.compute import CostProvider, ZeroCosts
from onetrick.perf.predict.schedule import ACT_TAG, HEAD_TAG, Schedule, WorkerClock, walk_step

__all__ = ["ACT_TAG", "HEAD_TAG", "STRATEGY_VARIANTS", "Link", "StepResult", "Variant", "collective_s",
           "images_per_step", "predict", "step_bytes", "sweep", "variant_label"]


def variant_label(strategy: str, sync: str | None = None, scheme: str | None = None, fc_batch: str = "full",
                  cut: int = 0) -> str:
    """The row label bench and simulate print: ``data/ddp``, ``hybrid/b/fc-B``, ``hybrid/a/cut2``, ``model``..."""
    if strategy == "data":
        return f"data/{sync or 'ddp'}"
    if strategy == "hybrid":
        return f"hybrid/{scheme or 'b'}" + ("/fc-B" if fc_batch == "worker" else "") + (f"/cut{cut}" if cut else "")
    return strategy


class Variant(NamedTuple):
    """One way to run a step: strategy, data-parallel sync, hybrid scheme, FC batch
    (``full`` = K*B, ``worker`` = B per round) and, for the hybrid, the cut: how many
    head Linear layers run data-parallel with the trunk (0: the paper's cut before fc6).
    A tuple, so it unpacks as one."""

    strategy: str
    sync: str | None = None
    scheme: str | None = None
    fc_batch: str = "full"
    cut: int = 0

    @property
    def label(self) -> str:
        return variant_label(self.strategy, self.sync, self.scheme, self.fc_batch, self.cut)


#: strategy variants the simulator knows
STRATEGY_VARIANTS = [
    Variant("single"),
    Variant("data", "ddp"),
    Variant("data", "sharded"),
    Variant("model"),
    Variant("hybrid", None, "a"),
    Variant("hybrid", None, "b"),
    Variant("hybrid", None, "b", "worker"),
    Variant("hybrid", None, "c"),
    Variant("hybrid", None, "c", "worker"),
]


@dataclass(frozen=True)
class Link:
    """One worker's full-duplex link: bandwidth (None: unlimited), latency per message,
    and the fixed software cost every collective pays whatever its size."""

    gbps: float | None = None
    latency_us: float = 0.0
    collective_us: float = 0.0
    sync_us: float = 0.0   # extra wait at each rendezvous when K workers time-share fewer cores (shared_host.busy_sync_us)
    overlap_us_per_mb: float = 0.0   # compute an overlapped collective steals per MB sent (shared_host.overlap_us_per_mb)
    op_factor: dict[str, float] = field(default_factory=dict)   # an op's share of the bandwidth (1.0 if absent)
    large_op_factor: dict[str, float] = field(default_factory=dict)   # the same on tensors over the mmap threshold

    @classmethod
    def from_measured(cls, link: dict) -> Link:
        """From a bench result's ``link`` (the probe's ``measured_mbps``, ``latency_us``
        and ``collective_us`` per op). The timed tiny collective already includes the
        latency, so where it was measured it replaces latency x messages. ``sync_us``,
        ``overlap_us_per_mb``, ``op_factor`` and ``large_op_factor``, where the probe measured them
        (:func:`~onetrick.perf.measure.shared_host.measured_link`), are kept."""
        gbps = (link.get("measured_mbps") or 0) / 1e3 or None
        coll = link.get("collective_us")
        busy = {"sync_us": link.get("sync_us") or 0.0, "overlap_us_per_mb": link.get("overlap_us_per_mb") or 0.0,
                "op_factor": dict(link.get("op_factor") or {}), "large_op_factor": dict(link.get("large_op_factor") or {})}
        if coll:
            return cls(gbps, 0.0, statistics.mean(coll.values()), **busy)
        return cls(gbps, link.get("latency_us") or 0.0, 0.0, **busy)

    def slower(self, factor: float) -> Link:
        """This link between processes of a machine ``factor`` times slower: loopback gloo is
        CPU work (copies, sums, system calls), so every time term is ``factor`` times longer
        and the bandwidth ``factor`` times lower."""
        return dataclasses.replace(self, gbps=self.gbps / factor if self.gbps else self.gbps,
                                   latency_us=self.latency_us * factor, collective_us=self.collective_us * factor,
                                   sync_us=self.sync_us * factor, overlap_us_per_mb=self.overlap_us_per_mb * factor)

    def idle(self) -> Link:
        """This link without what the probe measured of busy workers and of gloo's ops
        (``sync_us``, ``overlap_us_per_mb``, the op factors): bandwidth, latency and fixed
        cost only."""
        return dataclasses.replace(self, sync_us=0.0, overlap_us_per_mb=0.0, op_factor={}, large_op_factor={})


@dataclass
class StepResult:
    """One predicted step of one worker. Seconds: ``step_s`` (wall), ``compute_s``,
    ``comm_s`` (link busy), ``exposed_s`` (waited for); ``hidden`` = the share of
    ``comm_s`` not exposed (None without communication); ``bytes`` sent by tag;
    ``collectives`` issued by op; ``blocking``: how many of them the worker waited on
    at once (synchronous ones, each paying its fixed cost in the open); ``rendezvous``:
    the points where the worker blocked (those, and the waits for asynchronous ones still
    in flight), each paying ``Link.sync_us``."""

    step_s: float
    compute_s: float
    comm_s: float
    exposed_s: float
    hidden: float | None
    bytes: dict[str, int]
    collectives: dict[str, int] = field(default_factory=dict)
    blocking: int = 0
    rendezvous: int = 0

    @property
    def bytes_total(self) -> int:
        return sum(self.bytes.values())

    def as_dict(self) -> dict:
        """The timing and byte fields, as the simulator's JSON rows hold them."""
        return {"step_s": self.step_s, "compute_s": self.compute_s, "comm_s": self.comm_s, "exposed_s": self.exposed_s,
                "hidden": self.hidden, "bytes": dict(self.bytes), "bytes_total": self.bytes_total}


def predict(blocks: list[Block], costs: CostProvider, variant: Variant, k: int, batch: int, link: Link = Link(),
            slow: float = 1.0, contention_s: float = 0.0) -> StepResult:
    """One step of one worker of ``variant`` at ``k`` workers and ``batch`` examples per
    worker, over ``link``; ``slow`` multiplies every compute time; ``contention_s`` is
    added to every step (what K workers lose to each other beyond time-sharing the cores,
    where measured). Raises ValueError for what is not modelled (tower-parallel model
    parallelism, an unknown strategy, a cut outside the head)."""
    plan = Schedule(blocks, costs, k, variant.cut if variant.strategy == "hybrid" else 0)
    w = _clock(link, k, slow)
    w.compute(costs.overhead(batch))
    w.elapse(contention_s)
    walk_step(plan, w, variant.strategy, batch, variant.sync or "ddp", variant.scheme, variant.fc_batch)
    comm = w.comm_s
    return StepResult(w.t, w.compute_s, comm, w.exposed_s, (1.0 - min(1.0, w.exposed_s / comm)) if comm > 0 else None,
                      dict(w.bytes), dict(w.collectives), w.blocking, w.rendezvous)


def _clock(link: Link, k: int, slow: float = 1.0) -> WorkerClock:
    """A worker's clock over ``link`` (seconds and bytes, as WorkerClock takes them)."""
    bw = (link.gbps * 1e9 / 8) if link.gbps else 0.0
    return WorkerClock(k, bw, link.latency_us * 1e-6, slow, link.collective_us * 1e-6, link.sync_us * 1e-6,
                       link.overlap_us_per_mb * 1e-12, link.op_factor, link.large_op_factor)


def collective_s(link: Link, k: int, op: str, nbytes: int) -> float:
    """Seconds one synchronous ``op`` on a tensor of ``nbytes`` costs a worker over ``link``
    when nothing else is on it, as :func:`predict` charges it."""
    return _clock(link, k).coll("probe", op, nbytes)


def step_bytes(blocks: list[Block], variant: Variant, k: int, batch: int) -> dict[str, int]:
    """Bytes one worker sends per step, by tag, as the strategy's Comm counts them."""
    return predict(blocks, ZeroCosts(), variant, k, batch).bytes


def images_per_step(strategy: str, k: int, batch: int) -> int:
    """Images one step consumes: B for single and model parallelism (every worker sees
    the same B), K*B for data parallelism and the hybrid."""
    return batch if strategy in ("single", "model") else k * batch


def sweep(blocks: list[Block], costs: CostProvider, workers: list[int], batch: int, variants: list[Variant],
          link: Link = Link(), cores: int | None = None, threads: int = 1) -> list[dict]:
    """Every variant at every K (``single`` at K=1 only): one row per prediction, with
    images/s, the speedup over one worker and the efficiency. With ``cores``, K workers
    of ``threads`` threads time-share that many cores. Unmodelled cases are left out."""
    base = predict(blocks, costs, Variant("single"), 1, batch)
    rows = []
    for k in workers:
        for v in variants:
            if (v.strategy == "single") != (k == 1):
                continue
            slow = max(1.0, k * threads / cores) if cores else 1.0
            try:
                r = predict(blocks, costs, v, k, batch, link, slow)
            except ValueError:   # e.g. more workers than neurons in a layer
                continue
            ips = images_per_step(v.strategy, k, batch) / r.step_s
            speedup = ips / (batch / base.step_s)
            rows.append({"label": v.label, "strategy": v.strategy, "sync": v.sync, "scheme": v.scheme,
                         "fc_batch": v.fc_batch, "workers": k, **r.as_dict(), "images_per_s": ips,
                         "speedup": speedup, "efficiency": speedup / k})
    return rows
