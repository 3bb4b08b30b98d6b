"""What ``onetrick bench`` runs: :class:`BenchSpec` (its options, as the runner reads them),
:class:`Job` (one configuration to time) and :func:`expand_jobs` (the options into jobs).

The spec is a plain dataclass so that the runner needs no argparse: ``onetrick bench``
(:mod:`onetrick.cli.bench`) builds it from the parsed command line, a script from anything.
"""
from __future__ import annotations

import dataclasses

from onetrick.config import ConfigError
from onetrick.perf.predict.step import variant_label

__all__ = ["BenchSpec", "Job", "expand_jobs"]


@dataclasses.dataclass
class BenchSpec:
    """A bench run: ``onetrick bench``'s options, by the names its parser gives them."""

    model: str
    data: str
    image_size: int | None   # None: the model's own
    strategies: list[str]
    workers: list[int]
    sync: list[str]
    scheme: list[str]
    fc_batch: list[str]
    batch: int               # examples per worker per step
    threads: int             # CPU threads per worker
    steps: int               # measured steps per configuration
    warmup: int              # steps before measuring
    rounds: int              # every configuration this many times, interleaved
    seed: int
    dropout: float
    timeout: float           # seconds before a stuck collective fails
    link_mbps: str | None    # a number, "paper", or None: unshaped (loopback)
    quiet_wait: float        # seconds to wait before each configuration for a quiet machine (0: none)
    no_baseline: bool        # skip the plain PyTorch loop in the one-worker job
    precision: list[str] = dataclasses.field(default_factory=lambda: ["fp32"])
    comm_dtype: list[str] = dataclasses.field(default_factory=lambda: ["fp32"])
    all_at_one: bool = False             # at K=1 time every strategy too
    validate_plan: bool = False          # model parallelism at K*B examples, as the planner compares it
    device: str = "cpu"
    memory_per_worker: float | None = None   # GB; None: detected


@dataclasses.dataclass
class Job:
    """One configuration to time: a strategy (or ``independent``) at K workers."""

    strategy: str
    workers: int
    sync: str | None = None
    scheme: str | None = None
    fc_batch: str = "full"
    baseline: bool = False
    batch: int | None = None     # per-worker batch, when not bench's --batch (model parallelism at K*B)
    precision: str = "fp32"
    comm_dtype: str = "fp32"

    @property
    def label(self) -> str:
        if self.strategy == "independent":
            base = "independent (no comm)"
        else:
            base = variant_label(self.strategy, self.sync, self.scheme, self.fc_batch)
        return base + ("/bf16" if self.precision == "bf16" else "") + ("/bf16-wire" if self.comm_dtype == "bf16" else "")


def expand_jobs(strategies: list[str], workers: list[int], syncs: list[str], schemes: list[str],
                fc_batches: list[str], baseline: bool = True, precisions: tuple[str, ...] = ("fp32",),
                comm_dtypes: tuple[str, ...] = ("fp32",), all_at_one: bool = False) -> list[Job]:
    """The jobs of a bench run: ``single`` at K=1 (with the plain PyTorch ``baseline``),
    every strategy x variant at every other K (``all_at_one``: at K=1 too), each at every
    precision x wire dtype (the first of each is the reference row's)."""
    jobs = _expand(strategies, workers, syncs, schemes, fc_batches, baseline, all_at_one)
    out = []
    for p in precisions:
        for c in comm_dtypes:
            out += [dataclasses.replace(j, precision=p, comm_dtype=c) for j in jobs
                    if not (c != comm_dtypes[0] and j.workers == 1)]  # one worker: no wire to halve
    return out


def _expand(strategies: list[str], workers: list[int], syncs: list[str], schemes: list[str],
            fc_batches: list[str], baseline: bool, all_at_one: bool) -> list[Job]:
    for s in strategies:
        if s not in ("single", "independent", "data", "model", "hybrid"):
            raise ConfigError(f"bench times single, independent, data, model and hybrid (got {s!r}); "
                              "hogwild and paramserver have no synchronous step to time")
    jobs = []
    for k in workers:
        if k < 1:
            raise ConfigError(f"--workers must be at least 1 (got {k})")
        if k == 1:
            jobs.append(Job("single", 1, baseline=baseline))
            if not all_at_one:
                continue
        for s in strategies:
            if k == 1 and s in ("single", "independent"):
                continue
            if s == "independent":
                jobs.append(Job("independent", k))
            elif s == "data":
                jobs += [Job("data", k, sync=sy) for sy in syncs]
            elif s == "model":
                jobs.append(Job("model", k))
            elif s == "hybrid":
                jobs += [Job("hybrid", k, scheme=sc, fc_batch=fb) for sc in schemes for fb in fc_batches
                         if not (sc == "a" and fb == "worker")]
    return jobs

