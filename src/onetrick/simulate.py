"""A cost model of one training step for every synchronous strategy (``onetrick simulate``).

What it predicts, per strategy and worker count K: the step time of one worker, the
speedup over one worker, the bytes each worker sends per step (by tag, exactly as
:class:`~onetrick.distributed.comm.Comm` counts them) and the fraction of the
communication hidden behind computation.

How:

* **The network** is cut into blocks: every layer with weights plus the weightless layers
  that follow it (``conv2 -> relu2 -> norm2 -> pool2`` is one block). A dry run on one
  example gives each block's shapes and multiply-adds.
* **Compute** per block, forward and backward: either *measured* on this machine (profile
  ``this-cpu``: every trunk block timed at batch B, every fully-connected layer timed at
  the exact shard shape a strategy gives it, e.g. ``Linear(9216, 4096/K)`` on B rows, and
  SGD's update timed per parameter), or *counted* (a named GPU profile: 2 x multiply-adds
  FLOP forward, twice that backward, at the profile's peak FLOP/s times an achieved
  efficiency; updates at its memory bandwidth).
* **Communication** walks the strategy's step in program order and issues the same
  collectives the strategy issues (same sizes, same async/sync, same order). Each worker
  has one full-duplex link: a collective occupies it for ``latency x messages + bytes /
  bandwidth`` (bytes per worker as comm.py documents; messages K-1 for one ring pass,
  2(K-1) for an all-reduce), in issue order. An asynchronous collective runs while the
  worker computes; waiting for one, or running a synchronous one, is *exposed* time.
  That is how scheme (b)'s overlap appears (round j+1's broadcast travels during round
  j's compute), and DDP's (gradient buckets all-reduced during the rest of backward).
* **Time-sharing**: with ``--cores C``, K workers of T threads on C cores compute
  ``max(1, K*T/C)`` times slower (for validating runs with more workers than cores).

All workers are assumed identical (the slowest shard, ``ceil(n/K)`` neurons, is
simulated), so stragglers, the CPU time communication itself costs, and Python overheads
between layers are not modelled; the validation table reports how much that matters.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .argtypes import comma_ints
from .distributed import tensor_parallel as _tp
from .distributed.data_parallel import BUCKET_BYTES

ACT_TAG = _tp.TAG                               # last-conv activations between workers
HEAD_TAG = getattr(_tp, "HEAD_TAG", _tp.TAG)    # exchanges inside the sharded FC head and its loss

__all__ = [
    "PAPER_SPEEDUPS",
    "PROFILES",
    "STRATEGY_VARIANTS",
    "Block",
    "FlopCosts",
    "MeasuredCosts",
    "add_parser",
    "cmd_simulate",
    "describe",
    "simulate_step",
    "step_bytes",
]

FLOAT = 4          # fp32 bytes
LABEL = 8          # int64 bytes
DDP_FIRST_BUCKET = 2**20   # DistributedDataParallel's first bucket (1 MiB), then 25 MiB
DDP_BUCKET = 25 * 2**20

#: the paper's measured speedups (docs/PAPER.md) for K GPUs, hybrid scheme (b)
PAPER_SPEEDUPS = {"full": {1: 1.0, 2: 1.95, 4: 3.74, 8: 6.25}, "worker": {1: 1.0, 2: 1.93, 4: 3.66, 8: 6.16}}

#: named hardware profiles: peak fp32 FLOP/s, default achieved efficiency, memory
#: bandwidth (for SGD updates), default link (Gbit/s) and latency (us)
PROFILES = {
    "gtx-titan": {"peak_flops": 4.5e12, "efficiency": 0.4, "mem_gbs": 288.0, "link_gbps": 48.0, "latency_us": 10.0,
                      "note": "GTX Titan (Kepler, 2013): 4.5 TFLOP/s fp32 peak, 288 GB/s; PCIe 3 x16 ~6 GB/s"},
    "k20": {"peak_flops": 3.5e12, "efficiency": 0.4, "mem_gbs": 208.0, "link_gbps": 48.0, "latency_us": 10.0,
                "note": "Tesla K20x: 3.9 TFLOP/s fp32 peak (3.5 sustained clocks), 250 GB/s; PCIe 3"},
    "a100-pcie": {"peak_flops": 19.5e12, "efficiency": 0.5, "mem_gbs": 1555.0, "link_gbps": 200.0, "latency_us": 5.0,
                      "note": "A100 fp32 (no TF32): 19.5 TFLOP/s, 1.5 TB/s; PCIe 4 x16 ~25 GB/s"},
    "this-cpu": {"peak_flops": None, "efficiency": None, "mem_gbs": None, "link_gbps": None, "latency_us": 50.0,
                     "note": "this machine, every block timed (one thread per worker by default)"},
}

#: strategy variants the simulator knows: (strategy, sync, scheme, fc_batch)
STRATEGY_VARIANTS = [
    ("single", None, None, "full"),
    ("data", "ddp", None, "full"),
    ("data", "sharded", None, "full"),
    ("model", None, None, "full"),
    ("hybrid", None, "a", "full"),
    ("hybrid", None, "b", "full"),
    ("hybrid", None, "b", "worker"),
    ("hybrid", None, "c", "full"),
    ("hybrid", None, "c", "worker"),
]


def variant_label(strategy: str, sync: str | None = None, scheme: str | None = None, fc_batch: str = "full") -> str:
    if strategy == "data":
        return f"data/{sync or 'ddp'}"
    if strategy == "hybrid":
        return f"hybrid/{scheme or 'b'}" + ("/fc-B" if fc_batch == "worker" else "")
    return strategy


# ----------------------------------------------------------------------------- the network
@dataclass
class Block:
    """A layer with weights and the weightless layers after it."""

    name: str
    part: str                                   # "trunk" | "head"
    modules: nn.Module
    params: list[tuple[str, int]]               # (qualified name, numel), registration order
    macs: int                                   # multiply-adds per example, forward
    in_shape: tuple[int, ...]                   # per example
    out_shape: tuple[int, ...]
    linear: tuple[int, int] | None = None       # (in_features, out_features) of a head Linear
    towers: int = 0                              # a multi-tower trunk (alexnet2012): its tower count
    tail: list[nn.Module] = field(default_factory=list)   # head: the layers after the Linear

    @property
    def numel(self) -> int:
        return sum(n for _, n in self.params)


def _group(seq: nn.Sequential, prefix: str) -> list[tuple[str, list[tuple[str, nn.Module]]]]:
    groups: list[tuple[str, list[tuple[str, nn.Module]]]] = []
    for name, mod in seq.named_children():
        has_params = any(True for _ in mod.parameters(recurse=True))
        if has_params or not groups:
            groups.append((f"{prefix}.{name}", []))
        groups[-1][1].append((name, mod))
    return groups


def _macs(module: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Run ``module`` on ``x`` (batch 1) counting the multiply-adds of conv and linear layers."""
    total = [0]

    def hook(mod, inp, out):
        if isinstance(mod, nn.Conv2d):
            total[0] += out.numel() * (mod.in_channels // mod.groups) * mod.kernel_size[0] * mod.kernel_size[1]
        elif isinstance(mod, nn.Linear):
            total[0] += out.numel() // out.shape[-1] * mod.in_features * mod.out_features

    handles = [m.register_forward_hook(hook) for m in module.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        with torch.no_grad():
            out = module(x)
    finally:
        for h in handles:
            h.remove()
    return out, total[0]


def describe(model: nn.Module, image_size: int, in_channels: int = 3) -> list[Block]:
    """Blocks of a :class:`~onetrick.models.TrunkHeadNet`, trunk then head."""
    was_training = model.training
    model.eval()
    blocks: list[Block] = []
    x = torch.zeros(1, in_channels, image_size, image_size)
    trunk_groups = (_group(model.trunk, "trunk") if isinstance(model.trunk, nn.Sequential)
                    else [("trunk", [("", model.trunk)])])
    for name, mods in trunk_groups:
        seq = nn.Sequential(*[m for _, m in mods])
        params = [(f"trunk.{n}.{p}" if n else f"trunk.{p}", q.numel()) for n, m in mods for p, q in m.named_parameters()]
        out, macs = _macs(seq, x)
        blocks.append(Block(name.split(".", 1)[-1], "trunk", seq, params, macs, tuple(x.shape[1:]), tuple(out.shape[1:]),
                            towers=len(getattr(model.trunk, "towers", ()))))
        x = out
    x = torch.flatten(x, 1)
    for name, mods in _group(model.head, "head"):
        seq = nn.Sequential(*[m for _, m in mods])
        params = [(f"head.{n}.{p}", q.numel()) for n, m in mods for p, q in m.named_parameters()]
        out, macs = _macs(seq, x)
        lin = mods[0][1]
        linear = (lin.in_features, lin.out_features) if isinstance(lin, nn.Linear) else None
        blocks.append(Block(name, "head", seq, params, macs, tuple(x.shape[1:]), tuple(out.shape[1:]), linear,
                            [m for _, m in mods[1:]]))
        x = out
    model.train(was_training)
    return blocks


def activation_bytes(sent: dict) -> float:
    """Bytes of every activation tag (last-conv activations and the FC head's exchanges)."""
    return sum(v for t, v in sent.items() if "activations" in t)


def _numel(shape: tuple[int, ...]) -> int:
    return math.prod(shape)


# ----------------------------------------------------------------------------- compute costs
class FlopCosts:
    """Compute from multiply-add counts at ``peak * efficiency`` FLOP/s (a GPU profile)."""

    def __init__(self, blocks: list[Block], peak_flops: float, efficiency: float, mem_gbs: float) -> None:
        self.blocks, self.rate, self.mem = blocks, peak_flops * efficiency, mem_gbs * 1e9

    def trunk(self, i: int, rows: int) -> tuple[float, float]:
        fwd = 2 * self.blocks[i].macs * rows / self.rate
        return fwd, fwd * (1 if i == 0 else 2)   # the first layer needs no input gradient

    def head(self, j: int, rows: int, width: int) -> tuple[float, float]:
        fin = self.blocks[j].linear[0]
        fwd = 2 * fin * width * rows / self.rate
        return fwd, 2 * fwd

    def update(self, numel: int) -> float:
        return numel * 5 * FLOAT / self.mem       # read w, g, m; write w, m

    def overhead(self, rows: int) -> float:
        return 0.0


class MeasuredCosts:
    """Compute timed on this machine: each block forward and backward, the fastest of
    ``reps`` runs after one warm-up (the machine is shared: other load only adds time)."""

    def __init__(self, blocks: list[Block], threads: int = 1, reps: int = 3, model: nn.Module | None = None) -> None:
        self.blocks, self.threads, self.reps, self.model = blocks, threads, reps, model
        self._cache: dict = {}
        self._upd: float | None = None

    def _time(self, module: nn.Module, shape: tuple[int, ...], input_grad: bool) -> tuple[float, float]:
        old = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            x0 = torch.randn(shape)
            fw, bw = [], []
            for r in range(self.reps + 1):
                x = x0.clone().requires_grad_(input_grad)
                t0 = time.perf_counter()
                out = module(x)
                t1 = time.perf_counter()
                out.backward(torch.ones_like(out))
                t2 = time.perf_counter()
                for p in module.parameters():
                    p.grad = None
                if r:
                    fw.append(t1 - t0)
                    bw.append(t2 - t1)
            return min(fw), min(bw)   # contention only ever adds time: the minimum is the cost
        finally:
            torch.set_num_threads(old)

    def trunk(self, i: int, rows: int) -> tuple[float, float]:
        key = ("trunk", i, rows)
        if key not in self._cache:
            b = self.blocks[i]
            self._cache[key] = self._time(b.modules, (rows,) + b.in_shape, input_grad=i > 0)
        return self._cache[key]

    def head(self, j: int, rows: int, width: int) -> tuple[float, float]:
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
        PyTorch step of the whole network (fastest of ``reps``) minus the sum of the parts."""
        key = ("overhead", rows)
        if key not in self._cache:
            model = self.model
            if model is None:
                self._cache[key] = 0.0
                return 0.0
            old = torch.get_num_threads()
            torch.set_num_threads(self.threads)
            try:
                model.train()
                opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=5e-4)
                x = torch.randn((rows,) + self.blocks[0].in_shape)
                classes = self.blocks[-1].out_shape[0]
                y = torch.randint(0, classes, (rows,))
                times = []
                for _ in range(self.reps + 1):
                    t0 = time.perf_counter()
                    opt.zero_grad(set_to_none=True)
                    F.cross_entropy(model(x), y).backward()
                    opt.step()
                    times.append(time.perf_counter() - t0)
                whole = min(times[1:])
            finally:
                torch.set_num_threads(old)
            parts = sum(sum(self.trunk(i, rows)) for i, b in enumerate(self.blocks) if b.part == "trunk")
            parts += sum(sum(self.head(j, rows, b.linear[1])) for j, b in enumerate(self.blocks) if b.linear)
            parts += self.update(sum(b.numel for b in self.blocks))
            self._cache[key] = max(0.0, whole - parts)
        return self._cache[key]

    def update(self, numel: int) -> float:
        if self._upd is None:   # seconds per parameter of SGD with momentum and weight decay
            old = torch.get_num_threads()
            torch.set_num_threads(self.threads)
            try:
                n = 4_000_000
                p = nn.Parameter(torch.randn(n))
                p.grad = torch.randn(n)
                opt = torch.optim.SGD([p], lr=0.01, momentum=0.9, weight_decay=5e-4)
                times = []
                for _ in range(self.reps + 2):
                    t0 = time.perf_counter()
                    opt.step()
                    times.append(time.perf_counter() - t0)
                self._upd = min(times[1:]) / n
            finally:
                torch.set_num_threads(old)
        return numel * self._upd


# ----------------------------------------------------------------------------- one step
def _sent(op: str, k: int, nbytes: int) -> int:
    """Bytes one worker sends for a collective on a tensor of ``nbytes`` (comm.py's table)."""
    frac = (k - 1) / k
    return int((2 * frac if op == "all_reduce" else 1.0 if op == "send" else frac) * nbytes)


def _messages(op: str, k: int) -> int:
    return 2 * (k - 1) if op == "all_reduce" else 1 if op == "send" else k - 1


class _Worker:
    """One worker's step: a compute cursor and a FIFO link."""

    def __init__(self, k: int, bw_bytes: float, latency_s: float, slow: float, per_coll_s: float = 0.0) -> None:
        self.k, self.bw, self.lat, self.slow, self.per_coll = k, bw_bytes, latency_s, slow, per_coll_s
        self.t = 0.0
        self.link_free = 0.0
        self.bytes: dict[str, int] = defaultdict(int)
        self.comm_s = 0.0
        self.exposed_s = 0.0
        self.compute_s = 0.0

    def compute(self, seconds: float) -> None:
        self.t += seconds * self.slow
        self.compute_s += seconds * self.slow

    def coll(self, tag: str, op: str, nbytes: int, async_op: bool = False) -> float:
        sent = _sent(op, self.k, nbytes)
        self.bytes[tag] += sent
        duration = self.per_coll + self.lat * _messages(op, self.k) + (sent / self.bw if self.bw else 0.0)
        start = max(self.t, self.link_free)
        self.link_free = start + duration
        self.comm_s += duration
        done = self.link_free
        if not async_op:
            self.wait(done)
        return done

    def wait(self, done: float) -> None:
        if done > self.t:
            self.exposed_s += done - self.t
            self.t = done


def _ddp_buckets(param_sizes: list[int], first: int = DDP_FIRST_BUCKET, cap: int = DDP_BUCKET) -> list[list[int]]:
    """DDP's buckets over parameter indices, reverse registration order (fp32)."""
    buckets: list[list[int]] = [[]]
    size, limit = 0, first
    for idx in reversed(range(len(param_sizes))):
        buckets[-1].append(idx)
        size += param_sizes[idx] * FLOAT
        if size >= limit:
            buckets.append([])
            size, limit = 0, cap
    return [b for b in buckets if b]


def _sharded_buckets(param_sizes: list[int]) -> list[list[int]]:
    """ShardedDataParallel's buckets: reverse order, a new bucket once one reaches BUCKET_BYTES."""
    groups: list[list[int]] = [[]]
    size = 0
    for idx in reversed(range(len(param_sizes))):
        if size >= BUCKET_BYTES:
            groups.append([])
            size = 0
        groups[-1].append(idx)
        size += param_sizes[idx] * FLOAT
    return [g for g in groups if g]


class _Plan:
    """The network as the simulator walks it."""

    def __init__(self, blocks: list[Block], costs, k: int) -> None:
        self.blocks, self.costs, self.k = blocks, costs, k
        self.trunk = [i for i, b in enumerate(blocks) if b.part == "trunk"]
        self.head = [i for i, b in enumerate(blocks) if b.part == "head" and b.linear]
        self.features = _numel(blocks[self.trunk[-1]].out_shape)
        self.params = [(i, n) for i, b in enumerate(blocks) for _, n in b.params]   # (block, numel)
        self.trunk_numel = sum(blocks[i].numel for i in self.trunk)
        self.head_numel = sum(blocks[j].numel for j in self.head)

    def width(self, j: int, sharded: bool) -> int:
        out = self.blocks[j].linear[1]
        return -(-out // self.k) if sharded else out

    # -- compute pieces --------------------------------------------------------------
    def trunk_forward(self, w: _Worker, rows: int) -> None:
        for i in self.trunk:
            w.compute(self.costs.trunk(i, rows)[0])

    def head_dense(self, w: _Worker, rows: int, on_grad_ready=None) -> None:
        for j in self.head:
            w.compute(self.costs.head(j, rows, self.width(j, False))[0])
        for j in reversed(self.head):
            w.compute(self.costs.head(j, rows, self.width(j, False))[1])
            if on_grad_ready:
                on_grad_ready(j)

    def trunk_backward(self, w: _Worker, rows: int, on_grad_ready=None) -> None:
        for i in reversed(self.trunk):
            w.compute(self.costs.trunk(i, rows)[1])
            if on_grad_ready:
                on_grad_ready(i)

    def head_sharded(self, w: _Worker, rows: int) -> None:
        """ShardedHead forward and backward on ``rows`` full-input rows, with the
        sharded cross-entropy and error count, every collective synchronous."""
        k = self.k
        for n, j in enumerate(self.head):
            if n:
                w.coll(HEAD_TAG, "all_gather", k * rows * self.width(self.head[n - 1], True) * FLOAT)
            w.compute(self.costs.head(j, rows, self.width(j, True))[0])
        w.coll(HEAD_TAG, "all_reduce", rows * FLOAT)           # row max
        w.coll(HEAD_TAG, "all_reduce", 2 * rows * FLOAT)       # row sum, target logit
        w.coll("metrics", "all_gather", k * rows * 2 * FLOAT)       # top-1 errors
        for n in reversed(range(len(self.head))):
            j = self.head[n]
            w.compute(self.costs.head(j, rows, self.width(j, True))[1])
            if n:
                w.coll(HEAD_TAG, "reduce_scatter", k * rows * self.width(self.head[n - 1], True) * FLOAT)


def _trunk_sync_sharded(plan: _Plan, w: _Worker, rows: int, module_params: list[tuple[int, int]],
                        after_backward, average_update: float) -> None:
    """Backward of the trunk (or whole model) with ShardedDataParallel: reduce-scatter
    each bucket once its gradients are ready, update the owned 1/K, all-gather."""
    k = plan.k
    sizes = [n for _, n in module_params]
    buckets = _sharded_buckets(sizes)
    owner_block = [b for b, _ in module_params]
    pending = [{owner_block[i] for i in bk} for bk in buckets]
    works: list[float] = []

    def ready(block: int) -> None:
        for bi, blocks_left in enumerate(pending):
            if block in blocks_left:
                blocks_left.discard(block)
                if not blocks_left:
                    padded = -(-sum(sizes[i] for i in buckets[bi]) // k) * k
                    works.append(w.coll("weights", "reduce_scatter", padded * FLOAT, async_op=True))

    after_backward(ready)
    for done in works:
        w.wait(done)
    w.compute(plan.costs.update(average_update))
    for bk in buckets:
        padded = -(-sum(sizes[i] for i in bk) // k) * k
        w.coll("weights", "all_gather", padded * FLOAT, async_op=True)
    w.wait(w.link_free)


def simulate_step(blocks: list[Block], costs, strategy: str, k: int, batch: int, *, sync: str = "ddp",
                  scheme: str | None = None, fc_batch: str = "full", link_gbps: float | None = None,
                  latency_us: float = 0.0, collective_us: float = 0.0, slow: float = 1.0) -> dict:
    """One step of one worker. Returns step_s, compute_s, comm_s, exposed_s, hidden, bytes.

    A collective costs ``collective_us + latency_us x messages + bytes / bandwidth``;
    ``slow`` multiplies every compute time (workers sharing cores or memory bandwidth)."""
    plan = _Plan(blocks, costs, k)
    bw = (link_gbps * 1e9 / 8) if link_gbps else 0.0
    w = _Worker(k, bw, latency_us * 1e-6, slow, collective_us * 1e-6)
    w.compute(costs.overhead(batch))
    B, Fdim = batch, plan.features
    if strategy == "single" or k == 1 and strategy in ("data",):
        plan.trunk_forward(w, B)
        plan.head_dense(w, B)
        plan.trunk_backward(w, B)
        w.compute(costs.update(plan.trunk_numel + plan.head_numel))
    elif strategy == "data" and sync == "ddp":
        sizes = [n for _, n in plan.params]
        owner = [b for b, _ in plan.params]
        buckets = _ddp_buckets(sizes)
        pending = [{owner[i] for i in bk} for bk in buckets]
        works: list[float] = []
        launched = [False] * len(buckets)

        def ready(block: int) -> None:
            for left in pending:
                left.discard(block)
            for bi in range(len(buckets)):       # DDP launches buckets in order
                if launched[bi]:
                    continue
                if pending[bi]:
                    break
                launched[bi] = True
                works.append(w.coll("weights", "all_reduce", sum(sizes[i] for i in buckets[bi]) * FLOAT, async_op=True))

        plan.trunk_forward(w, B)
        plan.head_dense(w, B, ready)
        plan.trunk_backward(w, B, ready)
        for done in works:
            w.wait(done)
        w.coll("metrics", "all_reduce", 3 * FLOAT)
        w.compute(costs.update(plan.trunk_numel + plan.head_numel))
    elif strategy == "data":   # sharded
        plan.trunk_forward(w, B)

        def backward(ready):
            plan.head_dense(w, B, ready)
            plan.trunk_backward(w, B, ready)
            w.coll("metrics", "all_reduce", 3 * FLOAT)

        _trunk_sync_sharded(plan, w, B, plan.params, backward, -(-(plan.trunk_numel + plan.head_numel) // k))
    elif strategy == "model":
        if blocks[0].towers == k:
            raise ValueError("tower-parallel model parallelism (alexnet2012 at K=2) is not modelled")
        plan.trunk_forward(w, B)
        plan.head_sharded(w, B)
        w.coll(ACT_TAG, "all_reduce", B * Fdim * FLOAT)     # replicated input: sum the partial gradients
        plan.trunk_backward(w, B)
        w.compute(costs.update(plan.trunk_numel + -(-plan.head_numel // k)))
    elif strategy == "hybrid":
        scheme = scheme or "b"
        per_round = fc_batch == "worker"
        trunk_params = [(b, n) for b, n in plan.params if blocks[b].part == "trunk"]
        head_share = -(-plan.head_numel // k)
        plan.trunk_forward(w, B)
        if scheme == "a":
            w.coll("labels", "all_gather", k * B * LABEL)
            w.coll(ACT_TAG, "all_gather", k * B * Fdim * FLOAT)
            plan.head_sharded(w, k * B)
            w.coll(ACT_TAG, "reduce_scatter", k * B * Fdim * FLOAT)
        else:
            if scheme == "c":
                w.coll(ACT_TAG, "all_to_all", B * Fdim * FLOAT)
                w.coll("labels", "all_to_all", B * LABEL)
            w.coll("labels", "all_gather", k * B * LABEL)
            inflight = {0: w.coll(ACT_TAG, "broadcast", B * Fdim * FLOAT, async_op=True)}
            reductions = []
            for j in range(k):
                if j + 1 < k:
                    inflight[j + 1] = w.coll(ACT_TAG, "broadcast", B * Fdim * FLOAT, async_op=True)
                w.wait(inflight.pop(j))
                plan.head_sharded(w, B)
                reductions.append(w.coll(ACT_TAG, "reduce", B * Fdim * FLOAT, async_op=True))
                if per_round:
                    w.compute(costs.update(head_share))
            for done in reductions:
                w.wait(done)
            if scheme == "c":
                w.coll(ACT_TAG, "all_to_all", B * Fdim * FLOAT)
        _trunk_sync_sharded(plan, w, B, trunk_params, lambda ready: plan.trunk_backward(w, B, ready),
                            -(-plan.trunk_numel // k))
        if not per_round:
            w.compute(costs.update(head_share))
    else:
        raise ValueError(f"the simulator does not model strategy {strategy!r}")
    comm = w.comm_s
    return {"step_s": w.t, "compute_s": w.compute_s, "comm_s": comm, "exposed_s": w.exposed_s,
            "hidden": (1.0 - min(1.0, w.exposed_s / comm)) if comm > 0 else None,
            "bytes": dict(w.bytes), "bytes_total": sum(w.bytes.values())}


def step_bytes(blocks: list[Block], strategy: str, k: int, batch: int, **kw) -> dict[str, int]:
    """Bytes one worker sends per step, by tag, as the strategy's Comm counts them."""
    return simulate_step(blocks, _ZeroCosts(), strategy, k, batch, **kw)["bytes"]


class _ZeroCosts:
    def overhead(self, rows):
        return 0.0

    def trunk(self, i, rows):
        return 0.0, 0.0

    def head(self, j, rows, width):
        return 0.0, 0.0

    def update(self, numel):
        return 0.0


# ----------------------------------------------------------------------------- the command
def _images_per_step(strategy: str, k: int, batch: int) -> int:
    return batch if strategy in ("single", "model") else k * batch


def sweep(blocks, costs, workers: list[int], batch: int, variants, link_gbps, latency_us, cores=None, threads=1,
          collective_us: float = 0.0) -> list[dict]:
    base = simulate_step(blocks, costs, "single", 1, batch)
    rows = []
    for k in workers:
        for strategy, sync, scheme, fcb in variants:
            if (strategy == "single") != (k == 1):
                continue
            slow = max(1.0, k * threads / cores) if cores else 1.0
            try:
                r = simulate_step(blocks, costs, strategy, k, batch, sync=sync or "ddp", scheme=scheme, fc_batch=fcb,
                                  link_gbps=link_gbps, latency_us=latency_us, collective_us=collective_us, slow=slow)
            except ValueError:   # e.g. more workers than neurons in a layer
                continue
            ips = _images_per_step(strategy, k, batch) / r["step_s"]
            speedup = ips / (batch / base["step_s"])
            rows.append({"label": variant_label(strategy, sync, scheme, fcb), "strategy": strategy, "sync": sync,
                         "scheme": scheme, "fc_batch": fcb, "workers": k, **r, "images_per_s": ips,
                         "speedup": speedup, "efficiency": speedup / k})
    return rows


def _fmt(x, spec=".2f", none="-"):
    return none if x is None else format(x, spec)


def sweep_table(rows: list[dict]) -> str:
    lines = ["| strategy | K | step ms | images/s | speedup | efficiency | MB/step weights | MB/step activations | comm ms | exposed ms | hidden |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['label']} | {r['workers']} | {r['step_s'] * 1e3:.1f} | {r['images_per_s']:.1f} | "
                     f"{r['speedup']:.2f}x | {r['efficiency']:.0%} | {r['bytes'].get('weights', 0) / 1e6:.2f} | "
                     f"{activation_bytes(r['bytes']) / 1e6:.2f} | {r['comm_s'] * 1e3:.1f} | {r['exposed_s'] * 1e3:.1f} | "
                     f"{_fmt(r['hidden'], '.0%')} |")
    return "\n".join(lines)


def _model_blocks(model_name: str, classes: int, image_size: int, with_model: bool = False):
    from .models import build_model

    torch.manual_seed(0)
    model = build_model(model_name, classes, 3)
    blocks = describe(model, image_size, 3)
    return (blocks, model) if with_model else blocks


def _classes(data: str) -> int:
    from .data import SYNTHETIC_CLASSES

    kind, _, arg = data.partition(":")
    if kind == "synthetic":
        return int(arg) if arg else SYNTHETIC_CLASSES
    return 10 if kind == "digits" else 1000


def validate(bench_json: Path, reps: int = 5, bytes_only: bool = False) -> dict:
    """Predict every row of a bench result on this machine's measured costs and the
    bench's measured link; return rows with prediction errors. ``bytes_only``: compare
    the bytes alone (no layer is timed)."""
    bench = json.loads(Path(bench_json).read_text())
    blocks, model = _model_blocks(bench["model"], _classes(bench["data"]), bench["image_size"], with_model=True)
    threads = bench.get("threads", 1)
    costs = _ZeroCosts() if bytes_only else MeasuredCosts(blocks, threads=threads, reps=reps, model=model)
    link = bench.get("link", {})
    gbps = (link.get("measured_mbps") or 0) / 1e3 or None
    coll = link.get("collective_us")
    # a collective's fixed cost: the measured time of a tiny one (it includes the latency)
    per_coll, lat = (statistics.mean(coll.values()), 0.0) if coll else (0.0, link.get("latency_us") or 0.0)
    cores = bench.get("machine", {}).get("cores")
    batch = bench["batch"]
    measured_base = next((r for r in bench["rows"] if r["strategy"] == "single"), None)

    def share(k: int, row: dict | None) -> tuple[float, str]:
        """How much slower K workers compute than one alone. Measured where the bench has
        an ``independent`` row at K (K processes that never communicate): its step time
        over the single step. Else time-sharing: K workers of T threads plus the other
        processes' measured load on C cores each get C / (K*T + other) of a core."""
        ind = next((r for r in bench["rows"] if r["strategy"] == "independent" and r["workers"] == k), None)
        if k > 1 and ind and measured_base:
            return max(1.0, ind["step_ms"] / measured_base["step_ms"]), "independent row"
        other = (row or {}).get("foreign_cores") or 0.0
        return (max(1.0, (k * threads + other) / cores) if cores else 1.0), "time-sharing"

    base = simulate_step(blocks, costs, "single", 1, batch, slow=share(1, measured_base)[0])
    out = []
    for row in bench["rows"]:
        k = row["workers"]
        slow, why = share(k, row)
        strategy = "single" if row["strategy"] == "independent" else row["strategy"]
        pred = simulate_step(blocks, costs, strategy, 1 if strategy == "single" else k, batch,
                             sync=row.get("sync") or "ddp", scheme=row.get("scheme"),
                             fc_batch=row.get("fc_batch") or "full", link_gbps=gbps, latency_us=lat,
                             collective_us=per_coll, slow=slow)
        images = k * batch if row["strategy"] == "independent" else _images_per_step(row["strategy"], k, batch)
        p_speed = images / pred["step_s"] / (batch / base["step_s"]) if not bytes_only else None
        m_speed = row.get("speedup")
        out.append({"label": row["label"], "workers": k, "foreign_cores": row.get("foreign_cores"), "share": slow,
                    "share_from": why,
                    "measured_step_ms": row["step_ms"],
                    "predicted_step_ms": pred["step_s"] * 1e3,
                    "step_error": None if bytes_only else pred["step_s"] * 1e3 / row["step_ms"] - 1,
                    "measured_speedup": m_speed, "predicted_speedup": p_speed,
                    "speedup_error": (p_speed / m_speed - 1) if m_speed and p_speed else None,
                    "measured_bytes": row.get("bytes", {}), "predicted_bytes": pred["bytes"],
                    "measured_hidden": row.get("hidden"), "predicted_hidden": pred["hidden"]})
    return {"bench": str(bench_json), "bytes_only": bytes_only, "model": bench["model"],
            "image_size": bench["image_size"], "batch": batch,
            "link_gbps": gbps, "latency_us": lat, "collective_us": per_coll, "cores": cores, "threads": threads,
            "overhead_ms": costs.overhead(batch) * 1e3,
            "single_measured_ms": measured_base["step_ms"] if measured_base else None,
            "single_predicted_ms": base["step_s"] * 1e3, "rows": out}


def validation_table(v: dict) -> str:
    if v.get("bytes_only"):
        lines = [(f"Bytes per worker per step, predicted vs measured by `{v['bench']}` ({v['model']} at "
                 f"{v['image_size']}px, B={v['batch']}):"), "",
                 "| strategy | K | tag | measured bytes | predicted bytes | equal |", "|---|---:|---|---:|---:|---|"]
        for r in v["rows"]:
            mb, pb = r["measured_bytes"], r["predicted_bytes"]
            for t in sorted(set(mb) | set(pb)):
                m, p = int(mb.get(t, 0)), int(pb.get(t, 0))
                lines.append(f"| {r['label']} | {r['workers']} | {t} | {m:,} | {p:,} | {'yes' if m == p else 'NO'} |")
        return "\n".join(lines)
    bw = f"{v['link_gbps'] * 1e3:.0f} Mbit/s" if v["link_gbps"] else "unlimited"
    lines = [(f"Validation against `{v['bench']}` ({v['model']} at {v['image_size']}px, B={v['batch']}, link {bw}, "
             f"{v['collective_us']:.0f} us per collective, {v['cores']} cores; per-step overhead measured "
             f"{v['overhead_ms']:.1f} ms):"), "",
             "| strategy | K | other procs (cores) | compute slowdown x | measured step ms | predicted step ms | error | measured speedup | predicted speedup | error | bytes match |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in v["rows"]:
        mb, pb = r["measured_bytes"], r["predicted_bytes"]
        same = all(int(mb.get(t, 0)) == int(pb.get(t, 0)) for t in set(mb) | set(pb))
        if r["share_from"] == "independent row" and r["label"].startswith("independent"):
            lines.append(f"| {r['label']} | {r['workers']} | {_fmt(r['foreign_cores'])} | {r['share']:.2f} | "
                         f"{r['measured_step_ms']:.1f} | (input) | - | {_fmt(r['measured_speedup'])}x | (input) | - | - |")
            continue
        lines.append(f"| {r['label']} | {r['workers']} | {_fmt(r['foreign_cores'])} | {r['share']:.2f} | "
                     f"{r['measured_step_ms']:.1f} | {r['predicted_step_ms']:.1f} | "
                     f"{r['step_error']:+.0%} | {_fmt(r['measured_speedup'])}x | {r['predicted_speedup']:.2f}x | "
                     f"{_fmt(r['speedup_error'], '+.0%')} | {'yes' if same else 'no'} |")
    return "\n".join(lines)


def bytes_table(rows: list[dict], max_k: int = 8) -> str:
    """Bytes per worker per step by kind, and the ratio to data parallelism (DDP) at the same K."""
    lines = [("| strategy | K | weights MB | last-conv activations MB | FC-head exchanges MB | labels+metrics MB | "
             "total MB | vs data/ddp |"), "|---|---:|---:|---:|---:|---:|---:|---:|"]
    ddp = {r["workers"]: r["bytes_total"] for r in rows if r["label"] == "data/ddp"}
    for r in rows:
        if r["workers"] < 2 or r["workers"] > max_k:
            continue
        b = r["bytes"]
        other = sum(v for t, v in b.items() if t not in ("weights", ACT_TAG, HEAD_TAG))
        ratio = r["bytes_total"] / ddp[r["workers"]] if ddp.get(r["workers"]) else None
        lines.append(f"| {r['label']} | {r['workers']} | {b.get('weights', 0) / 1e6:.2f} | {b.get(ACT_TAG, 0) / 1e6:.2f} | "
                     f"{b.get(HEAD_TAG, 0) / 1e6:.2f} | {other / 1e6:.4f} | {r['bytes_total'] / 1e6:.2f} | "
                     f"{_fmt(ratio, '.3f')} |")
    return "\n".join(lines)


def paper_table(rows: list[dict]) -> str:
    lines = ["| GPUs | paper (K*B, K*B) | predicted hybrid/b | paper (K*B, B) | predicted hybrid/b/fc-B | predicted data/ddp |",
             "|---:|---:|---:|---:|---:|---:|"]
    by = {(r["label"], r["workers"]): r for r in rows}
    for k in (1, 2, 4, 8):
        if k == 1:
            s = by.get(("single", 1))
            pb = pw = pd = s["speedup"] if s else None
        else:
            pb = by.get(("hybrid/b", k), {}).get("speedup")
            pw = by.get(("hybrid/b/fc-B", k), {}).get("speedup")
            pd = by.get(("data/ddp", k), {}).get("speedup")
        lines.append(f"| {k} | {PAPER_SPEEDUPS['full'][k]:.2f}x | {_fmt(pb)}x | {PAPER_SPEEDUPS['worker'][k]:.2f}x | "
                     f"{_fmt(pw)}x | {_fmt(pd)}x |")
    return "\n".join(lines)


def plot_sweep(rows: list[dict], path: Path, title: str, validation: list[dict] | None = None,
               paper: bool = False) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = []
    for r in rows:
        if r["label"] not in labels and r["label"] != "single":
            labels.append(r["label"])
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5))
    ks = sorted({r["workers"] for r in rows})
    ax1.plot(ks, ks, "k:", label="ideal")
    for i, label in enumerate(labels):
        pts = sorted((r["workers"], r["speedup"]) for r in rows if r["label"] == label or (r["label"] == "single"))
        color = f"C{i}"
        ax1.plot([p[0] for p in pts], [p[1] for p in pts], "-o", ms=3, color=color, label=label)
        mb = sorted((r["workers"], r["bytes_total"] / 1e6) for r in rows if r["label"] == label)
        ax2.plot([p[0] for p in mb], [p[1] for p in mb], "-o", ms=3, color=color, label=label)
        if validation:
            meas = [(v["workers"], v["measured_speedup"]) for v in validation if v["label"] == label and v["measured_speedup"]]
            if meas:
                ax1.plot([m[0] for m in meas], [m[1] for m in meas], "x", ms=9, mew=2, color=color)
    if validation:
        ax1.plot([], [], "kx", ms=9, mew=2, label="measured (bench)")
    if paper:
        for fcb, marker in (("full", "*"), ("worker", "P")):
            pts = sorted(PAPER_SPEEDUPS[fcb].items())
            ax1.plot([p[0] for p in pts], [p[1] for p in pts], marker, color="k", ms=9, ls="none",
                     label=f"paper, measured ({'K*B, K*B' if fcb == 'full' else 'K*B, B'})")
    for ax in (ax1, ax2):
        ax.set_xscale("log", base=2)
        ax.set_xticks(ks)
        ax.set_xticklabels([str(k) for k in ks])
        ax.set_xlabel("workers K")
        ax.grid(alpha=0.3)
    ax1.set_yscale("log", base=2)
    ax1.set_ylabel("speedup over one worker (images/s)")
    ax1.set_title("predicted speedup")
    ax1.legend(fontsize=7)
    ax2.set_yscale("log")
    ax2.set_ylabel("MB sent per worker per step")
    ax2.set_title("bytes per step (all tags)")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


def add_parser(sub) -> None:
    p = sub.add_parser("simulate", help="cost model: predicted step time, speedup and bytes per strategy at K = 1..64",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="alexnet", help="smallnet | alexnet | alexnet2012")
    p.add_argument("--image-size", type=int, default=None, help="default: the model's")
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--batch", type=int, default=128, help="per worker (B)")
    p.add_argument("--workers", type=comma_ints, default=[1, 2, 4, 8, 16, 32, 64], help="comma-separated K")
    p.add_argument("--strategies", default="single,data,model,hybrid",
                   help="comma-separated: single, data, model, hybrid (hybrid: every scheme and FC batch)")
    p.add_argument("--profile", choices=sorted(PROFILES), default="this-cpu")
    p.add_argument("--efficiency", type=float, default=None, help="achieved fraction of the profile's peak FLOP/s")
    p.add_argument("--link-gbps", type=float, default=None, help="per-worker link, Gbit/s (default: the profile's)")
    p.add_argument("--latency-us", type=float, default=None, help="per message (default: the profile's)")
    p.add_argument("--collective-us", type=float, default=0.0,
                   help="fixed cost of every collective (software; bench measures it on a tiny all-reduce)")
    p.add_argument("--cores", type=int, default=None, help="this-cpu: model K workers time-sharing this many cores")
    p.add_argument("--threads", type=int, default=1, help="this-cpu: threads per worker while timing layers")
    p.add_argument("--reps", type=int, default=5, help="this-cpu: timed repetitions per layer (fastest kept)")
    p.add_argument("--validate", type=Path, action="append", default=[], metavar="BENCH.json",
                   help="also predict every row of a bench result and report the errors (repeatable)")
    p.add_argument("--validate-bytes", type=Path, action="append", default=[], metavar="BENCH.json",
                   help="compare only the bytes of a bench result with the formulas (repeatable; times nothing)")
    p.add_argument("--out", type=Path, default=None, help="write OUT.md, OUT.json and OUT.png")
    p.set_defaults(func=cmd_simulate)


def cmd_simulate(args: argparse.Namespace) -> int:
    import sys

    from .models import input_size

    prof = PROFILES[args.profile]
    image = args.image_size or input_size(args.model)
    blocks, model = _model_blocks(args.model, args.classes, image, with_model=True)
    if args.profile == "this-cpu":
        costs = MeasuredCosts(blocks, threads=args.threads, reps=args.reps, model=model)
        rate = "measured per layer on this machine"
    else:
        eff = args.efficiency or prof["efficiency"]
        costs = FlopCosts(blocks, prof["peak_flops"], eff, prof["mem_gbs"])
        rate = f"{prof['peak_flops'] / 1e12:.1f} TFLOP/s peak x {eff:.0%} achieved"
    link = args.link_gbps if args.link_gbps is not None else prof["link_gbps"]
    lat = args.latency_us if args.latency_us is not None else prof["latency_us"]
    wanted = set(args.strategies.split(","))
    variants = [v for v in STRATEGY_VARIANTS if v[0] in wanted or v[0] == "single"]
    rows = sweep(blocks, costs, args.workers, args.batch, variants, link, lat, args.cores, args.threads,
                 args.collective_us)
    title = (f"{args.model} {image}px, B={args.batch} per worker, profile {args.profile} ({rate}), "
             f"link {link if link else 'unlimited'} Gbit/s, latency {lat:g} us"
             + (f" + {args.collective_us:g} us per collective" if args.collective_us else ""))
    text = [f"## Simulated: {title}", "", sweep_table(rows), "", "Bytes per worker per step by kind (K <= 8):", "",
            bytes_table(rows)]
    if args.model.startswith("alexnet") and set(args.workers) >= {1, 2, 4, 8}:
        text += ["", "Against the paper's measured speedups (docs/PAPER.md):", "", paper_table(rows)]
    validations = ([validate(v, reps=args.reps) for v in args.validate]
                   + [validate(v, bytes_only=True) for v in args.validate_bytes])
    for v in validations:
        text += ["", validation_table(v)]
    report = "\n".join(text)
    print(report)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        command = "onetrick " + " ".join(sys.argv[1:]) if sys.argv and sys.argv[0].endswith(("onetrick", "cli.py", "__main__.py")) else None
        out.with_suffix(".md").write_text(f"{report}\n")
        out.with_suffix(".json").write_text(json.dumps(
            {"command": command, "model": args.model, "image_size": image, "batch": args.batch, "profile": args.profile,
             "rate": rate, "link_gbps": link, "latency_us": lat, "rows": rows, "validation": validations}, indent=1, default=str))
        same_model = [r for v in validations if v["model"] == args.model and v["batch"] == args.batch
                      and v["image_size"] == image and not v.get("bytes_only") for r in v["rows"]]
        plot_sweep(rows, out.with_suffix(".png"), title, same_model or None,
                   paper=args.model.startswith("alexnet") and args.profile != "this-cpu" and image == 224)
        print(f"wrote {out.with_suffix('.md')}, {out.with_suffix('.json')}, {out.with_suffix('.png')}")
    return 0
