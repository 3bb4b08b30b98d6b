"""Compute costs timed on this machine: :class:`MeasuredCosts`, a
:class:`~onetrick.perf.predict.compute.CostProvider` that runs every block forward and
backward here (the planner's ``this-cpu`` profile, ``simulate --profile this-cpu``, the
bench's model check). It runs the model, so it lives with the measurements, not in the
pure cost model of :mod:`onetrick.perf.predict`.
"""
from __future__ import annotations

import time
from collections.abc import Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from onetrick.perf.predict.blocks import TIMED_CLASSES, Block
from onetrick.perf.predict.compute import FLOAT

__all__ = ["MeasuredCosts"]

#: the classifier width :meth:`MeasuredCosts.overhead` times a whole step at (at most): the
#: width :func:`~onetrick.perf.predict.blocks.model_blocks` builds a real model at
OVERHEAD_CLASSES = TIMED_CLASSES
#: the widest head Linear :meth:`MeasuredCosts.head` times as it is (hidden FC layers of
#: 4096, classifiers to 16k classes); a wider one is timed this wide and scaled
HEAD_WIDTH = 16384
#: bytes :meth:`MeasuredCosts.copy` times a copy of (a bucket's size, under the mmap threshold)
COPY_BYTES = 8 * 2**20
#: elements of an fp32 tensor at glibc's largest dynamic mmap threshold (32 MiB)
MMAP_ELEMENTS = 32 * 2**20 // FLOAT


class MeasuredCosts:
    """Compute timed on this machine: each block forward and backward, the fastest of
    ``reps`` runs after one warm-up (the machine is shared: other load only adds time).
    ``max_rows``: the trunk is timed on at most this many examples, more scaled from it
    (the planner: what a larger batch would hold, :func:`~onetrick.perf.planner.measured_costs`)."""

    def __init__(self, blocks: list[Block], threads: int = 1, reps: int = 3, model: nn.Module | None = None,
                 device: str = "cpu", precision: str = "fp32", overhead_rows: int | None = None,
                 max_rows: int | None = None) -> None:
        self.blocks, self.threads, self.reps, self.model = blocks, threads, reps, model
        self.overhead_rows, self.max_rows = overhead_rows, max_rows
        self.device, self.precision = torch.device(device), precision
        self._cache: dict = {}
        self._upd: tuple[float, float] | None = None   # seconds per parameter: small, large tensors
        self._copy: float | None = None   # seconds per byte copied

    @contextmanager
    def _own_threads(self):
        """This provider's thread count for the duration (the workers' ``--threads``)."""
        old = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            yield
        finally:
            torch.set_num_threads(old)

    def _sync(self) -> None:
        if self.device.type == "cuda":   # a GPU kernel's time is when it finishes, not when it is queued
            torch.cuda.synchronize()

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16")

    def _time(self, module: nn.Module, shape: tuple[int, ...], input_grad: bool) -> tuple[float, float]:
        with self._own_threads():
            module.to(self.device)
            x0 = torch.randn(shape, device=self.device)
            fw, bw = [], []
            for r in range(self.reps + 1):
                x = x0.clone().requires_grad_(input_grad)
                self._sync()
                t0 = time.perf_counter()
                with self._autocast():
                    out = module(x)
                self._sync()
                t1 = time.perf_counter()
                out.backward(torch.ones_like(out))
                self._sync()
                t2 = time.perf_counter()
                for p in module.parameters():
                    p.grad = None
                if r:
                    fw.append(t1 - t0)
                    bw.append(t2 - t1)
            return min(fw), min(bw)   # contention only ever adds time: the minimum is the cost

    def trunk(self, i: int, rows: int) -> tuple[float, float]:
        """Block ``i``'s forward and backward: its own timing, scaled so that the trunk's
        blocks add up to the whole trunk timed at once (with the model): timed one by one,
        a ResNet's 11 blocks added up to 0.8-1.4x its trunk here, from one timing to the next
        (each call's own autograd and allocation overheads, caches); the blocks give the
        shares, the trunk the total. Over ``max_rows`` examples, timed at ``max_rows`` and
        scaled by the rows: a convolution's work is linear in them."""
        key = ("trunk", i, rows)
        if key not in self._cache:
            timed = min(rows, self.max_rows or rows)
            fwd, bwd = self._block(i, timed)
            scale_fwd, scale_bwd = self._trunk_scale(timed)
            more = rows / timed
            self._cache[key] = (fwd * scale_fwd * more, bwd * scale_bwd * more)
        return self._cache[key]

    def _block(self, i: int, rows: int) -> tuple[float, float]:
        key = ("block", i, rows)
        if key not in self._cache:
            b = self.blocks[i]
            self._cache[key] = self._time(b.modules, (rows,) + b.in_shape, input_grad=i > 0)
        return self._cache[key]

    def _trunk_scale(self, rows: int) -> tuple[float, float]:
        """The whole trunk's forward and backward over its blocks' sums (1.0 without the
        model, or with a one-block trunk)."""
        key = ("trunk_scale", rows)
        if key not in self._cache:
            trunk = [i for i, b in enumerate(self.blocks) if b.part == "trunk"]
            if self.model is None or len(trunk) < 2:
                self._cache[key] = (1.0, 1.0)
            else:
                whole = self._time(self.model.trunk, (rows,) + self.blocks[0].in_shape, input_grad=False)
                parts = [sum(self._block(i, rows)[d] for i in trunk) for d in (0, 1)]
                self._cache[key] = tuple(w / p if p > 0 else 1.0 for w, p in zip(whole, parts))
        return self._cache[key]

    def head(self, j: int, rows: int, width: int) -> tuple[float, float]:
        """Head block ``j``'s Linear at ``width`` outputs and the layers after it, forward
        and backward on ``rows`` examples. Wider than :data:`HEAD_WIDTH` (a classifier of
        10^5-10^7 classes, or a shard of one), it is timed at that width and scaled by the
        width: a Linear's forward and backward are matrix products, and the layers after it
        elementwise, all linear in the outputs. Timed whole, resnet50's 10^6-class classifier
        held 8 GB of weights and 8 of gradients: the planner needed more memory than the
        plans it judged."""
        timed = min(width, HEAD_WIDTH)
        fwd, bwd = self._head(j, rows, timed)
        scale = width / timed
        return fwd * scale, bwd * scale

    def _head(self, j: int, rows: int, width: int) -> tuple[float, float]:
        b = self.blocks[j]
        key = ("head", b.linear[0], width, rows, tuple(type(m).__name__ for m in b.tail))
        if key not in self._cache:
            torch.manual_seed(0)
            tail = [type(m)(**({"inplace": True} if isinstance(m, nn.ReLU) else {"p": m.p} if isinstance(m, nn.Dropout) else {}))
                    if isinstance(m, (nn.ReLU, nn.Dropout)) else m for m in b.tail]
            module = nn.Sequential(nn.Linear(b.linear[0], width), *tail).train()
            self._cache[key] = self._time(module, (rows, b.linear[0]), input_grad=True)
        return self._cache[key]

    def overhead(self, rows: int) -> float:
        """What one whole training step costs beyond its blocks and its update: the
        loss, autograd and optimizer bookkeeping, Python between layers. Measured: a plain
        PyTorch step of the whole network (fastest of ``reps``) minus the sum of the parts.
        A classifier wider than :data:`OVERHEAD_CLASSES` is narrowed to that many classes
        for it: what grows with the classes (the logits, their loss, the classifier's
        gradient and update) is in the head block and update terms, which a sharded head
        pays on its own classes only; left in the remainder, it charged every plan one
        dense classifier (4.1 s a step of resnet18 at 10^6 classes here).

        With ``overhead_rows`` (the planner's batch) it is measured at that batch only and
        charged to every batch: it is per-layer Python and autograd work, not per example,
        and as the difference of two timings, each +-10% on this shared machine, timed
        at B and at K*B it moved model parallelism (K*B rows) against the plans at B by
        up to 30% from one planning to the next (smallnet: 0-30 ms either way)."""
        rows = self.overhead_rows or rows
        key = ("overhead", rows)
        if key not in self._cache:
            if self.model is None:
                self._cache[key] = 0.0
                return 0.0
            with _narrowed_classifier(self.model, OVERHEAD_CLASSES) as narrowed:
                classes = narrowed or self.blocks[-1].out_shape[0]
                whole = self._plain_step(rows, classes)
                linears = [j for j, b in enumerate(self.blocks) if b.linear]
                width = {j: self.blocks[j].linear[1] for j in linears}
                width[linears[-1]] = classes
                parts = sum(sum(self.trunk(i, rows)) for i, b in enumerate(self.blocks) if b.part == "trunk")
                parts += sum(sum(self.head(j, rows, width[j])) for j in linears)
                parts += self.update([p.numel() for p in self.model.parameters()])
            self._cache[key] = max(0.0, whole - parts)
        return self._cache[key]

    def _plain_step(self, rows: int, classes: int) -> float:
        """Seconds of one plain PyTorch training step of the model (fastest of ``reps``)."""
        model = self.model
        with self._own_threads():
            model.to(self.device).train()
            opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=5e-4)
            x = torch.randn((rows,) + self.blocks[0].in_shape, device=self.device)
            y = torch.randint(0, classes, (rows,), device=self.device)
            times = []
            for _ in range(self.reps + 1):
                self._sync()
                t0 = time.perf_counter()
                opt.zero_grad(set_to_none=True)
                with self._autocast():
                    loss = F.cross_entropy(model(x).float(), y)
                loss.backward()
                opt.step()
                self._sync()
                times.append(time.perf_counter() - t0)
            return min(times[1:])

    def update(self, sizes: Sequence[int]) -> float:
        """SGD with momentum and weight decay on tensors of ``sizes`` elements. Two rates,
        each the fastest of ``reps``: tensors under glibc's mmap threshold (their weight-decay
        temporary comes from the heap), and larger ones, whose temporary is a fresh mapping
        every step and whose gradient is new (``zero_grad(set_to_none=True)``): 2-3x slower
        per parameter here (1.9 vs 3.7-6.7 ns)."""
        if self._upd is None:
            self._upd = (self._update_rate(4_000_000, fresh_grad=False),
                         self._update_rate(2 * MMAP_ELEMENTS, fresh_grad=True))
        small, large = self._upd
        return sum(n * (large if n > MMAP_ELEMENTS else small) for n in sizes)

    def copy(self, nbytes: int) -> float:
        """Copying ``nbytes`` of gradients into or out of a flat communication bucket
        (DDP's buckets, ShardedDataParallel's): the rate of one 8 MiB copy, fastest of ``reps``."""
        if self._copy is None:
            with self._own_threads():
                src = torch.randn(COPY_BYTES // FLOAT, device=self.device)
                dst = torch.empty_like(src)
                times = []
                for _ in range(self.reps + 2):
                    self._sync()
                    t0 = time.perf_counter()
                    dst.copy_(src)
                    self._sync()
                    times.append(time.perf_counter() - t0)
            self._copy = min(times[1:]) / COPY_BYTES
        return nbytes * self._copy

    def _update_rate(self, n: int, fresh_grad: bool) -> float:
        """Seconds per parameter of one SGD step on one tensor of ``n`` elements."""
        with self._own_threads():
            p = nn.Parameter(torch.randn(n, device=self.device))
            p.grad = torch.randn(n, device=self.device)
            opt = torch.optim.SGD([p], lr=0.01, momentum=0.9, weight_decay=5e-4)
            times = []
            for _ in range(self.reps + 2):
                if fresh_grad:
                    p.grad = None
                    p.grad = torch.ones(n, device=self.device)
                self._sync()
                t0 = time.perf_counter()
                opt.step()
                self._sync()
                times.append(time.perf_counter() - t0)
            return min(times[1:]) / n


@contextmanager
def _narrowed_classifier(model: nn.Module, classes: int):
    """``model`` with its last Linear (a TrunkHeadNet's classifier) replaced by one of
    ``classes`` outputs for the duration, where it has more; yields the classifier's width
    for the duration (narrowed, or as built: a model that :func:`~onetrick.perf.predict.blocks.model_blocks`
    built narrow, whose blocks say the full width), or None without a classifier."""
    head = getattr(model, "head", None)
    linears = [i for i, m in enumerate(head) if isinstance(m, nn.Linear)] if isinstance(head, nn.Sequential) else []
    if not linears or head[linears[-1]].out_features <= classes:
        yield head[linears[-1]].out_features if linears else None
        return
    i = linears[-1]
    wide = head[i]
    head[i] = nn.Linear(wide.in_features, classes, bias=wide.bias is not None)
    try:
        yield classes
    finally:
        head[i] = wide
