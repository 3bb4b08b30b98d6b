"""The planner: every way to run one step of a model at K workers, predicted by the cost
model; the fastest is chosen and explained in one line.

The paper's rule, applied by the numbers instead of by hand: data parallelism where
computation per weight is high, model parallelism where computation per neuron is high.
The candidates (:func:`candidate_variants`) are data parallelism (DDP, sharded), model
parallelism, and the hybrid with schemes a/b/c and its cut at each FC layer boundary
(``cut`` = how many head Linear layers run data-parallel with the trunk; the paper's cut
is 0, a cut before the classifier alone is ``layers - 1``; ``layers`` would be data
parallelism). Every candidate computes the same SGD step on K*B examples, so they are
compared at equal maths: model parallelism, whose workers all see the same examples,
is planned at K*B examples per worker (and left out under ``--lr-scale``, which scales
only with data-parallel workers). ``fc_batch`` is the user's: ``worker`` changes the
maths, so it keeps only the hybrid's schemes b and c.

:func:`make_plan` takes compute costs and a link from anywhere (tests use FLOP costs);
:func:`measured_costs` times this machine's layers (cached per model, batch, image size
and threads; :mod:`~onetrick.perf.measure.block_times`); :mod:`~onetrick.perf.measure.links`
measures gloo between K local workers, :mod:`~onetrick.perf.measure.shared_host` what
they pay for time-sharing this machine's cores.
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass

from onetrick.config import TrainConfig
from onetrick.perf.measure.block_times import MeasuredCosts
from onetrick.perf.predict.activations import NetMemory
from onetrick.perf.predict.blocks import Block, model_blocks
from onetrick.perf.predict.compute import CostProvider
from onetrick.perf.predict.step import Link, StepResult, Variant, images_per_step, predict

__all__ = ["Candidate", "Plan", "candidate_variants", "explain", "make_plan", "measured_costs"]


@dataclass
class Candidate:
    """One plan, predicted: its variant, the per-worker batch it runs at, the step."""

    variant: Variant
    batch: int
    result: StepResult
    speedup: float
    memory: object | None = None     # perf.predict.memory.MemoryPrediction: the peak per worker, by part
    fits: bool = True                # the peak fits in the memory each worker has

    @property
    def memory_bytes(self) -> int | None:
        return self.memory.total if self.memory is not None else None

    @property
    def runnable(self) -> bool:
        """Whether ``onetrick train`` can run it: every candidate, the hybrid's cut plans
        included (the field stays in the rows their readers know)."""
        return True

    @property
    def label(self) -> str:
        return self.variant.label

    def row(self) -> dict:
        """The JSON row ``plan --json`` prints and summary.json records."""
        v, r = self.variant, self.result
        return {"label": self.label, "strategy": v.strategy, "sync": v.sync, "scheme": v.scheme,
                "fc_batch": v.fc_batch, "cut": v.cut, "batch": self.batch, "predicted_step_ms": r.step_s * 1e3,
                "speedup": self.speedup, "bytes": dict(r.bytes), "bytes_total": r.bytes_total,
                "exposed_ms": r.exposed_s * 1e3, "compute_ms": r.compute_s * 1e3, "runnable": self.runnable,
                "memory_bytes": self.memory_bytes, "fits": self.fits, "comm_ms": r.comm_s * 1e3,
                "memory": self.memory.as_dict() if self.memory is not None else None}


@dataclass
class Plan:
    """Every candidate (fastest first), the choice and its one-line reason."""

    k: int
    batch: int
    link: Link
    candidates: list[Candidate]
    choice: Candidate
    reason: str
    available: int | None = None     # bytes of memory per worker the candidates were checked against
    available_from: str = ""         # where that figure comes from

    @property
    def dropped(self) -> list[Candidate]:
        """The candidates whose peak memory per worker does not fit."""
        return [c for c in self.candidates if not c.fits]

    def as_dict(self) -> dict:
        return {"workers": self.k, "batch": self.batch,
                "link": dataclasses.asdict(self.link),
                "choice": self.choice.row(), "reason": self.reason,
                "memory_per_worker_available": self.available, "memory_available_from": self.available_from,
                "candidates": [c.row() for c in self.candidates]}


def head_layers(blocks: list[Block]) -> int:
    """How many Linear layers the head has (cuts run 0 .. this - 1)."""
    return sum(1 for b in blocks if b.part == "head" and b.linear)


def candidate_variants(blocks: list[Block], k: int, batch: int, fc_batch: str = "full", only: str | None = None,
                       cut: int | None = None, lr_scale: str = "none") -> list[tuple[Variant, int]]:
    """``(variant, per-worker batch)`` for every plan of the same maths. ``only="hybrid"``
    keeps the hybrid's schemes (``--scheme auto``); ``cut`` fixes the hybrid's cut."""
    if k == 1:
        return [(Variant("single"), batch)]
    out: list[tuple[Variant, int]] = []
    if only is None and fc_batch == "full":
        out += [(Variant("data", "ddp"), batch), (Variant("data", "sharded"), batch)]
        if lr_scale == "none":
            out.append((Variant("model"), k * batch))
    cuts = range(head_layers(blocks)) if cut is None else [cut]
    for scheme in ("a", "b", "c"):
        if scheme == "a" and fc_batch == "worker" or scheme == "c" and batch % k:
            continue
        out += [(Variant("hybrid", None, scheme, fc_batch, c), batch) for c in cuts]
    return out


def make_plan(blocks: list[Block], costs: CostProvider, k: int, batch: int, link: Link = Link(), slow: float = 1.0,
              fc_batch: str = "full", only: str | None = None, cut: int | None = None, lr_scale: str = "none",
              runnable_only: bool = False, memory: Callable | None = None, available: int | None = None,
              available_from: str = "", contention_s: float = 0.0) -> Plan:
    """Predict every candidate; choose the fastest (``runnable_only``: of those ``train``
    can run). ``slow`` multiplies compute (K workers sharing cores); ``contention_s`` is added
    to every candidate's step (it cannot change the choice). ``memory(variant, k,
    batch)`` (a :class:`~onetrick.perf.predict.memory.MemoryPrediction` per candidate) and
    ``available`` (bytes per worker, from ``available_from``): a candidate whose peak does
    not fit is kept in the table, marked, and never chosen; ValueError (one line) if none fits."""
    one = predict(blocks, costs, Variant("single"), 1, batch)
    base_ips = batch / one.step_s if one.step_s else 0.0
    found = []
    for variant, b in candidate_variants(blocks, k, batch, fc_batch, only, cut, lr_scale):
        try:
            r = predict(blocks, costs, variant, k, b, link, slow, contention_s)
        except ValueError:   # not modelled here (two towers at K=2, more workers than neurons)
            continue
        ips = images_per_step(variant.strategy, k, b) / r.step_s if r.step_s else 0.0
        mem = memory(variant, k, b) if memory is not None else None
        fits = mem is None or available is None or mem.total <= available
        found.append(Candidate(variant, b, r, ips / base_ips if base_ips else 0.0, mem, fits))
    if not found:
        raise ValueError(f"no plan of this model is modelled at {k} workers")
    found.sort(key=lambda c: (c.result.step_s, c.result.bytes_total))
    pool = [c for c in found if c.runnable and c.fits] if runnable_only else [c for c in found if c.fits]
    if not pool:
        from onetrick.perf.measure.memory import gb

        least = min(found, key=lambda c: c.memory_bytes)
        raise ValueError(f"no plan fits in the {gb(available)} of memory per worker ({available_from}): the smallest, "
                         f"{least.label}, needs {gb(least.memory_bytes)} per worker; use more workers, a smaller "
                         f"--batch, or more memory (--memory-per-worker GB)")
    choice = pool[0]
    reason = explain(choice, [c for c in found if c.fits], blocks) + _dropped(found, available, available_from)
    return Plan(k, batch, link, found, choice, reason, available, available_from)


def _dropped(candidates: list[Candidate], available: int | None, available_from: str) -> str:
    """The clause of the choice line naming the candidates left out for memory, and why."""
    out = [c for c in candidates if not c.fits]
    if not out:
        return ""
    from onetrick.perf.measure.memory import gb

    named = ", ".join(f"{c.label} needs {gb(c.memory_bytes)}" for c in sorted(out, key=lambda c: c.memory_bytes))
    return f"; dropped, do not fit in memory: {named} per worker, {gb(available)} available ({available_from})"


def explain(choice: Candidate, candidates: list[Candidate], blocks: list[Block]) -> str:
    """One line: the choice, its predicted step and speedup, the runner-up, and why, in
    the paper's terms (weights synchronised against activations moved)."""
    runner = (next((c for c in candidates if c.variant.strategy != choice.variant.strategy), None)
              or next((c for c in candidates if c is not choice), None))
    r = choice.result
    line = f"{choice.label}: {r.step_s * 1e3:.1f} ms/step predicted, {choice.speedup:.2f}x one worker"
    if runner:
        ahead = runner.result.step_s / r.step_s - 1
        line += f", {ahead:.0%} ahead of {runner.label} ({runner.result.step_s * 1e3:.1f} ms)"
    weights = sum(b.numel for b in blocks)
    fc = sum(b.numel for b in blocks if b.part == "head")
    mb = r.bytes_total / 1e6
    if choice.variant.strategy in ("data", "single"):
        why = f"the FC layers hold {fc / weights:.0%} of the weights: synchronising all weights ({mb:.1f} MB) is cheapest"
    else:
        sharded = sum(b.numel for i, b in enumerate(blocks) if b.part == "head" and b.linear and
                      _linear_index(blocks, i) >= choice.variant.cut)
        why = (f"the model-parallel layers hold {sharded / weights:.0%} of the weights; moving activations instead "
               f"costs {mb:.1f} MB per worker")
    return f"{line}; {why}"


def _linear_index(blocks: list[Block], i: int) -> int:
    return sum(1 for b in blocks[:i] if b.part == "head" and b.linear)


_COSTS: dict[tuple, tuple[list[Block], MeasuredCosts]] = {}
#: what the trunk's saved activations may take while it is timed beyond the batch (:func:`timed_rows`)
TIMED_BYTES = 2 * 2**30


def measured_costs(model_name: str, classes: int, channels: int, image: int, batch: int, threads: int,
                   reps: int = 2) -> tuple[list[Block], MeasuredCosts]:
    """Blocks and this machine's layer costs, cached per (model, classes, channels, image
    size, batch, threads): every plan asks for its own shapes, each timed once. Timed in
    bounded memory: the model is real but its classifier narrow, the blocks' at full width
    (:func:`~onetrick.perf.predict.blocks.model_blocks`), and the trunk is timed on at most
    :func:`timed_rows` examples (model parallelism's K*B scaled from fewer)."""
    key = (model_name, classes, channels, image, batch, threads)
    if key not in _COSTS:
        blocks, model = model_blocks(model_name, classes, image, with_model=True, channels=channels)
        _COSTS[key] = (blocks, MeasuredCosts(blocks, threads=threads, reps=reps, model=model, overhead_rows=batch,
                                             max_rows=timed_rows(model, image, channels, batch)))
    return _COSTS[key]


def timed_rows(model, image: int, channels: int, batch: int) -> int | None:
    """The most examples the trunk is timed on: the batch, or more while what its forward
    saves (:class:`~onetrick.perf.predict.activations.NetMemory`, on the meta device) stays
    under :data:`TIMED_BYTES`. Model parallelism runs the trunk at K*B: timed there,
    resnet50 at 224 px, K=4, B=32 saved 10 GiB, a plan the planner then found too big for
    this machine. None (no limit) where the meta device cannot tell. Measured at two
    examples: batch norm refuses one on a 1x1 map."""
    try:
        per_row = NetMemory.from_model(model, image, channels).trunk_saved(2).total // 2
    except (ValueError, RuntimeError, NotImplementedError, TypeError, AttributeError, StopIteration):
        return None
    return max(batch, TIMED_BYTES // max(1, per_row))


def plan_memory(model: str, classes: int, channels: int, image: int, k: int, given_gb: float | None, device: str,
                cfg: TrainConfig | None = None, run: str = "train", here: bool = False, net: NetMemory | None = None):
    """The planner's memory check: ``(predict(variant, k, batch), bytes per worker, where
    that figure comes from)``. Each candidate is predicted as ``train`` would hold it (the
    model on the meta device, :mod:`onetrick.perf.predict.memory`). The memory per worker is
    ``--memory-per-worker`` when given, else detected (CPU: available memory / K; a GPU
    profile planned on this machine has no detected limit). ``run="bench"``: as the bench's
    steps alone hold it. ``here``: the workers run on this machine (``train --strategy
    auto``, a bench's validation): a given figure is capped at their share of it. ``net``:
    the network already described (``train``'s launch describes it once); else it is
    built here on the meta device."""
    from onetrick.perf.measure.memory import available_memory
    from onetrick.perf.predict.activations import net_memory
    from onetrick.perf.predict.memory import predict_memory

    net = net or net_memory(model, classes, channels, image, cfg.dropout if cfg else 0.5)
    extra = ({"precision": cfg.precision, "on_nan": cfg.on_nan, "weight_decay": cfg.weight_decay > 0}
             if cfg is not None else {})

    def predict(variant, workers, batch):
        return predict_memory(net, variant, workers, batch, device=device, run=run, **extra)

    if given_gb is None and device != "cpu" and cfg is None:
        return predict, None, "no limit given"
    available, source = available_memory(device, k, given_gb=given_gb, here=here)
    return predict, available, source


def default_threads(k: int) -> int:
    return max(1, (os.cpu_count() or 1) // max(1, k))
