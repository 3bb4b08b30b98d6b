"""The collective schedule of every synchronous strategy, walked in program order.

:class:`WorkerClock` is one worker: a compute cursor and a FIFO full-duplex link (the
link model); :func:`walk_step` issues, for a :class:`~onetrick.perf.predict.step.Variant`,
the compute and the collectives the strategy issues, with the same sizes, order and
async/sync as the code in :mod:`onetrick.distributed`. :func:`~onetrick.perf.predict.step.predict`
is the public entry point; this module is its inside.
"""
from __future__ import annotations

from collections import defaultdict

from onetrick.distributed import tensor_parallel as _tp
from onetrick.distributed.data_parallel import BUCKET_BYTES
from onetrick.perf.predict.activations import MMAP_MAX
from onetrick.perf.predict.blocks import Block, numel, param_sizes
from onetrick.perf.predict.compute import FLOAT, CostProvider

__all__ = ["ACT_TAG", "HEAD_TAG", "Schedule", "WorkerClock", "walk_step"]

ACT_TAG = _tp.TAG                               # last-conv activations between workers
HEAD_TAG = getattr(_tp, "HEAD_TAG", _tp.TAG)    # exchanges inside the sharded FC head and its loss

LABEL = 8          # int64 bytes
DDP_FIRST_BUCKET = 2**20   # DistributedDataParallel's first bucket (1 MiB), then 25 MiB
DDP_BUCKET = 25 * 2**20


def _sent(op: str, k: int, nbytes: int) -> int:
    """Bytes one worker sends for a collective on a tensor of ``nbytes`` (comm.py's table)."""
    frac = (k - 1) / k
    return int((2 * frac if op == "all_reduce" else 1.0 if op == "send" else frac) * nbytes)


def _messages(op: str, k: int) -> int:
    return 2 * (k - 1) if op == "all_reduce" else 1 if op == "send" else k - 1


class WorkerClock:
    """One worker's step: a compute cursor and a FIFO link."""

    def __init__(self, k: int, bw_bytes: float, latency_s: float, slow: float, per_coll_s: float = 0.0,
                 sync_s: float = 0.0, overlap_s_per_byte: float = 0.0, op_factor: dict[str, float] | None = None,
                 large_op_factor: dict[str, float] | None = None) -> None:
        self.k, self.bw, self.lat, self.slow, self.per_coll = k, bw_bytes, latency_s, slow, per_coll_s
        self.sync_s, self.overlap_s_per_byte = sync_s, overlap_s_per_byte
        self.op_factor, self.large_op_factor = op_factor or {}, large_op_factor or {}
        self.t = 0.0
        self.link_free = 0.0
        self.bytes: dict[str, int] = defaultdict(int)
        self.collectives: dict[str, int] = defaultdict(int)
        self.blocking = 0
        self.rendezvous = 0
        self.comm_s = 0.0
        self.exposed_s = 0.0
        self.compute_s = 0.0

    def compute(self, seconds: float) -> None:
        """``seconds`` of one worker's compute, ``slow`` times longer here."""
        self.elapse(seconds * self.slow)

    def elapse(self, seconds: float) -> None:
        """``seconds`` of wall time on the worker's cores, measured as such (not scaled by ``slow``)."""
        self.t += seconds
        self.compute_s += seconds

    def coll(self, tag: str, op: str, nbytes: int, async_op: bool = False) -> float:
        sent = _sent(op, self.k, nbytes)
        self.bytes[tag] += sent
        self.collectives[op] += 1
        factors = self.large_op_factor if nbytes > MMAP_MAX and self.large_op_factor else self.op_factor
        bw = self.bw * factors.get(op, 1.0)
        duration = self.per_coll + self.lat * _messages(op, self.k) + (sent / bw if bw else 0.0)
        start = max(self.t, self.link_free)
        self.link_free = start + duration
        self.comm_s += duration
        done = self.link_free
        if not async_op:
            self.blocking += 1
            self.wait(done)
        elif self.overlap_s_per_byte:   # gloo's copies and sums take the cores the compute runs on
            self.elapse(sent * self.overlap_s_per_byte)   # measured as wall time beside busy workers
        return done

    def wait(self, done: float) -> None:
        """Block until ``done``: a rendezvous with every peer, which costs ``sync_s`` more
        where the workers time-share cores (a collective already complete costs nothing)."""
        if done > self.t:
            self.rendezvous += 1
            self.exposed_s += done - self.t + self.sync_s
            self.t = done + self.sync_s


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


class Schedule:
    """The network as the simulator walks it: trunk and head block indices, the shard
    widths at K workers, and the compute pieces every strategy is made of.

    ``cut`` moves the first ``cut`` head Linear blocks to the data-parallel side: they
    run with the trunk (each worker on its own B examples), their weights are
    synchronised with the trunk's, and the activations that cross to the model-parallel
    side are the cut layer's output, not the last convolution's."""

    def __init__(self, blocks: list[Block], costs: CostProvider, k: int, cut: int = 0) -> None:
        self.blocks, self.costs, self.k = blocks, costs, k
        linear = [i for i, b in enumerate(blocks) if b.part == "head" and b.linear]
        if not 0 <= cut < len(linear):
            raise ValueError(f"cut {cut} is outside 0..{len(linear) - 1} (the head has {len(linear)} Linear layers)")
        self.trunk = [i for i, b in enumerate(blocks) if b.part == "trunk"] + linear[:cut]
        self.head = linear[cut:]
        self.features = numel(blocks[self.trunk[-1]].out_shape)
        self.params = [(i, n) for i, b in enumerate(blocks) for _, n in b.params]   # (block, numel)

    def param_sizes(self, indices: list[int] | None = None, k: int = 1) -> list[int]:
        """:func:`~onetrick.perf.predict.blocks.param_sizes` of the blocks at ``indices`` (all by default)."""
        return param_sizes(self.blocks if indices is None else [self.blocks[i] for i in indices], k)

    def width(self, j: int, sharded: bool) -> int:
        out = self.blocks[j].linear[1]
        return -(-out // self.k) if sharded else out

    # -- compute pieces --------------------------------------------------------------
    def trunk_forward(self, w: WorkerClock, rows: int) -> None:
        for i in self.trunk:
            w.compute(self.costs.trunk(i, rows)[0])

    def head_dense(self, w: WorkerClock, rows: int, on_grad_ready=None) -> None:
        for j in self.head:
            w.compute(self.costs.head(j, rows, self.width(j, False))[0])
        for j in reversed(self.head):
            w.compute(self.costs.head(j, rows, self.width(j, False))[1])
            if on_grad_ready:
                on_grad_ready(j)

    def trunk_backward(self, w: WorkerClock, rows: int, on_grad_ready=None) -> None:
        for i in reversed(self.trunk):
            w.compute(self.costs.trunk(i, rows)[1])
            if on_grad_ready:
                on_grad_ready(i)

    @property
    def row_wise(self) -> bool:
        """Whether ShardedHead splits the classifier by inputs (at most as many classes as
        inputs, and a hidden layer before it on the model-parallel side)."""
        fin, classes = self.blocks[self.head[-1]].linear
        return len(self.head) > 1 and classes <= fin

    def head_sharded(self, w: WorkerClock, rows: int) -> None:
        """ShardedHead forward and backward on ``rows`` full-input rows, with its loss and
        error count, every collective synchronous: an all-gather (forward) and a
        reduce-scatter (backward) between hidden layers; then either the row-wise
        classifier's one all-reduce of the partial logits (loss local), or a class-sharded
        classifier and the sharded loss's one all-gather of four floats per row and worker."""
        k, row, last = self.k, self.row_wise, len(self.head) - 1
        for n, j in enumerate(self.head):
            gathered = n and not (row and n == last)   # the row-wise classifier takes its own slice
            if gathered:
                w.coll(HEAD_TAG, "all_gather", k * rows * self.width(self.head[n - 1], True) * FLOAT)
            # the row-wise classifier's ceil(in/K) x out multiply-adds are costed as in x ceil(out/K)
            w.compute(self.costs.head(j, rows, self.width(j, True))[0])
        if row:
            w.coll(HEAD_TAG, "all_reduce", rows * self.width(self.head[-1], False) * FLOAT)
        else:
            w.coll(HEAD_TAG, "all_gather", k * rows * 4 * FLOAT)
        for n in reversed(range(len(self.head))):
            j = self.head[n]
            w.compute(self.costs.head(j, rows, self.width(j, True))[1])
            if n and not (row and n == last):
                w.coll(HEAD_TAG, "reduce_scatter", k * rows * self.width(self.head[n - 1], True) * FLOAT)


def _trunk_sync_sharded(plan: Schedule, w: WorkerClock, rows: int, module_params: list[tuple[int, int]],
                        after_backward) -> None:
    """Backward of the trunk (or whole model) with ShardedDataParallel: reduce-scatter
    each bucket once its gradients are ready, update the owned 1/K, all-gather."""
    k = plan.k
    sizes = [n for _, n in module_params]
    buckets = _sharded_buckets(sizes)
    owner_block = [b for b, _ in module_params]
    shards = [-(-sum(sizes[i] for i in bk) // k) for bk in buckets]   # each flat bucket's owned 1/K, padded
    pending = [{owner_block[i] for i in bk} for bk in buckets]
    works: list[float] = []

    def ready(block: int) -> None:
        for bi, blocks_left in enumerate(pending):
            if block in blocks_left:
                blocks_left.discard(block)
                if not blocks_left:   # the gradients are copied into the flat bucket, then sent
                    w.compute(plan.costs.copy(shards[bi] * k * FLOAT))
                    works.append(w.coll("weights", "reduce_scatter", shards[bi] * k * FLOAT, async_op=True))

    after_backward(ready)
    w.wait(max(works, default=0.0))
    w.compute(plan.costs.update(shards))
    for shard in shards:
        w.coll("weights", "all_gather", shard * k * FLOAT, async_op=True)
    w.wait(w.link_free)


def _single(plan: Schedule, w: WorkerClock, B: int) -> None:
    plan.trunk_forward(w, B)
    plan.head_dense(w, B)
    plan.trunk_backward(w, B)
    w.compute(plan.costs.update(plan.param_sizes()))


def _data_ddp(plan: Schedule, w: WorkerClock, B: int) -> None:
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
            nbytes = sum(sizes[i] for i in buckets[bi]) * FLOAT
            w.compute(plan.costs.copy(nbytes))   # DDP copies each gradient into its bucket (scaled by 1/K)
            works.append(w.coll("weights", "all_reduce", nbytes, async_op=True))

    plan.trunk_forward(w, B)
    plan.head_dense(w, B, ready)
    plan.trunk_backward(w, B, ready)
    w.wait(max(works, default=0.0))
    w.compute(plan.costs.copy(sum(sizes) * FLOAT))   # and the reduced buckets back into the gradients
    w.coll("metrics", "all_reduce", 3 * FLOAT)
    w.compute(plan.costs.update(plan.param_sizes()))


def _data_sharded(plan: Schedule, w: WorkerClock, B: int) -> None:
    plan.trunk_forward(w, B)

    def backward(ready):
        plan.head_dense(w, B, ready)
        plan.trunk_backward(w, B, ready)
        w.coll("metrics", "all_reduce", 3 * FLOAT)

    _trunk_sync_sharded(plan, w, B, plan.params, backward)


def _model(plan: Schedule, w: WorkerClock, B: int) -> None:
    k = plan.k
    if plan.blocks[0].towers == k:
        raise ValueError("tower-parallel model parallelism (alexnet2012 at K=2) is not modelled")
    plan.trunk_forward(w, B)
    plan.head_sharded(w, B)
    w.coll(ACT_TAG, "all_reduce", B * plan.features * FLOAT)     # replicated input: sum the partial gradients
    plan.trunk_backward(w, B)
    w.compute(plan.costs.update(plan.param_sizes(plan.trunk) + plan.param_sizes(plan.head, k)))


def _hybrid(plan: Schedule, w: WorkerClock, B: int, scheme: str, per_round: bool) -> None:
    """Data-parallel trunk, model-parallel head: scheme (a) gathers every worker's
    activations at once, (b) broadcasts them one worker per round (the next round's
    broadcast in flight during this round), (c) first exchanges them all-to-all."""
    k, Fdim, costs = plan.k, plan.features, plan.costs
    trunk_side = set(plan.trunk)
    trunk_params = [(b, n) for b, n in plan.params if b in trunk_side]
    head_share = plan.param_sizes(plan.head, k)
    plan.trunk_forward(w, B)
    if scheme == "a":
        w.coll("labels", "all_gather", k * B * LABEL)
        w.coll(ACT_TAG, "all_gather", k * B * Fdim * FLOAT)
        plan.head_sharded(w, k * B)
        w.coll(ACT_TAG, "reduce_scatter", k * B * Fdim * FLOAT)
    else:
        if scheme == "c":
            w.coll(ACT_TAG, "all_to_all", B * Fdim * FLOAT)
        w.coll("labels", "all_gather", k * B * LABEL)
        inflight = {0: w.coll(ACT_TAG, "broadcast", B * Fdim * FLOAT, async_op=True)}
        for j in range(k):
            if j + 1 < k:
                inflight[j + 1] = w.coll(ACT_TAG, "broadcast", B * Fdim * FLOAT, async_op=True)
            w.wait(inflight.pop(j))
            plan.head_sharded(w, B)
            if per_round:
                w.compute(costs.update(head_share))
        w.coll(ACT_TAG, "reduce_scatter", k * B * Fdim * FLOAT)   # every round's activation gradients at once
        if scheme == "c":
            w.coll(ACT_TAG, "all_to_all", B * Fdim * FLOAT)
    _trunk_sync_sharded(plan, w, B, trunk_params, lambda ready: plan.trunk_backward(w, B, ready))
    if not per_round:
        w.compute(costs.update(head_share))


def walk_step(plan: Schedule, w: WorkerClock, strategy: str, batch: int, sync: str = "ddp",
              scheme: str | None = None, fc_batch: str = "full") -> None:
    """Advance ``w`` through one step of ``strategy`` (after the step's overhead)."""
    if strategy == "single" or plan.k == 1 and strategy in ("data",):
        _single(plan, w, batch)
    elif strategy == "data" and sync == "ddp":
        _data_ddp(plan, w, batch)
    elif strategy == "data":   # sharded
        _data_sharded(plan, w, batch)
    elif strategy == "model":
        _model(plan, w, batch)
    elif strategy == "hybrid":
        _hybrid(plan, w, batch, scheme or "b", fc_batch == "worker")
    else:
        raise ValueError(f"the simulator does not model strategy {strategy!r}")
