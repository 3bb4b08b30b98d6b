"""Memory per worker, predicted: :func:`predict_memory` of a plan (single, data ddp|sharded,
model, hybrid a|b|c) by part (base, parameters, gradients, optimizer, activations,
communication buffers, transient copies) at the phase that sets the peak; the figure of a
``TrainConfig`` (:func:`predict_for_config`). Activations come from
:mod:`onetrick.perf.predict.activations`; the measured peak, to compare, from :mod:`onetrick.perf.measure.memory`."""
from __future__ import annotations

from dataclasses import dataclass, field

from onetrick.perf.predict.activations import MMAP_MAX, NetMemory, net_memory

__all__ = ["CPU_BASE_BYTES", "MemoryPrediction", "async_memory", "predict_for_config", "predict_memory",
           "predicted_for_run", "variant_of"]

MIB = 2**20
#: What one CPU training worker holds before its model, in private memory (the measured
#: figure, :func:`onetrick.perf.measure.memory.peak_bytes`, leaves out the shared libraries' file
#: pages): the interpreter, torch (its CUDA build initialises about 380 MiB of its own at
#: import), torchvision, onetrick, the gloo process group, the data loader. Measured on this
#: 2-core machine: the peak of ``onetrick train --model torchvision:shufflenet_v2_x0_5
#: --image-size 32 --data synthetic:10 --steps 2 --batch 2 --strategy data --workers K``
#: (a model of 0.35M parameters, so a few MiB are not base) was 399 MiB at K=1 and
#: 390-395 MiB for every worker at K=2 and K=4. On CUDA the base is the CUDA context, which
#: ``max_memory_allocated`` does not count: 0 there.
CPU_BASE_BYTES = 395 * MIB
#: DDP's construction broadcasts the parameters and buffers in coalesced buckets of this size
#: (``_DEFAULT_BROADCAST_BUCKET_SIZE``); a bucket of more than one tensor is a flat copy.
DDP_BROADCAST_BYTES = 250 * MIB
PARAM_BYTES = 4     # parameters, gradients and momentum are fp32 whatever --precision
PARTS = ("base", "parameters", "gradients", "optimizer", "activations", "comm", "transient")


@dataclass
class MemoryPrediction:
    """One worker's predicted peak memory: bytes by part at the phase that sets the peak
    (``parts``, summing to ``total``), and the total at every phase's own peak."""

    parts: dict[str, int]
    phases: dict[str, int]
    peak_phase: str
    device: str = "cpu"
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    def as_dict(self) -> dict:
        return {"total_bytes": self.total, "peak_phase": self.peak_phase, "device": self.device,
                "parts": dict(self.parts), "phases": dict(self.phases), "notes": list(self.notes)}


def _buckets(params: list[tuple[str, int]], cap_bytes: int) -> list[int]:
    """Element counts of the sharded update's flat buckets: reverse registration order,
    a new bucket once one holds ``cap_bytes`` (``data_parallel._group_params``)."""
    groups, size = [[]], 0
    for _, n in reversed(params):
        if size >= cap_bytes:
            groups.append([])
            size = 0
        groups[-1].append(n)
        size += n * PARAM_BYTES
    return [sum(g) for g in groups if g]


def _broadcast_copy(params: list[int], buffers: list[int]) -> int:
    """The largest flat copy DDP's construction-time broadcast makes (buckets of more than
    one tensor, filled in order until they hold DDP_BROADCAST_BYTES)."""
    largest, size, count = 0, 0, 0
    for nbytes in [n * PARAM_BYTES for n in params] + buffers:
        size, count = size + nbytes, count + 1
        if size >= DDP_BROADCAST_BYTES:
            largest = max(largest, size if count > 1 else 0)
            size, count = 0, 0
    return max(largest, size if count > 1 else 0)


def _weights(params: list[tuple[str, int]]) -> list[int]:
    return [n for name, n in params if not name.endswith("bias")]


def predict_memory(net: NetMemory, variant, k: int, batch: int, *, precision: str = "fp32", device: str = "cpu",
                   run: str = "train", eval_batch: int | None = None, baseline: bool = False,
                   on_nan: str = "stop", weight_decay: bool = True, base: int | None = None) -> MemoryPrediction:
    """Peak memory of worker 0 (the largest shard; the worker that logs) of ``variant``
    (a :class:`~onetrick.perf.predict.step.Variant`: single, data ddp|sharded, model, hybrid
    a|b|c with its cut) at ``k`` workers and ``batch`` examples per worker (the batch each
    worker's forward sees: model parallelism's workers all see the same ``batch``).

    ``run``: ``"train"`` (``onetrick train``: the steps, worker 0's per-layer log of every
    logged step, the test evaluation at ``eval_batch``, the checkpoint) or ``"bench"`` (the
    steps alone; ``baseline``: bench's plain PyTorch model beside the one-worker strategy).
    ``device`` ``"cuda"``: no process base, no freed memory kept by the allocator, NCCL's
    collectives work in place. The prediction is the peak over phases (``build``: the model
    built and parallelised; ``step``: forward, backward and SGD; ``log``; ``eval``;
    ``checkpoint``), each the sum of what is alive then."""
    if variant.strategy in ("hogwild", "paramserver"):
        raise ValueError(f"{variant.strategy} has its own memory layout: see async_memory")
    cpu = device == "cpu"
    e = PARAM_BYTES
    strategy, cut = variant.strategy, (variant.cut if variant.strategy == "hybrid" else 0)
    sharded_head = strategy in ("model", "hybrid") and k > 1
    sync_sharded = strategy == "hybrid" or strategy == "data" and variant.sync == "sharded"
    dense_all = sum(n for _, n in net.params) * e
    notes = []
    # -- what this worker holds -------------------------------------------------------
    if sharded_head or strategy in ("model", "hybrid"):
        side, rest = net.split(cut) if strategy == "hybrid" else (net.trunk_params, net.head)
        head = net.sharded(cut, k) if k > 1 else rest
        head_params = [(n, p.numel()) for n, p in head.named_parameters()]
    else:
        side, rest, head, head_params = net.params, None, None, []
    side_b = sum(n for _, n in side) * e
    head_b = sum(n for _, n in head_params) * e
    local = side + head_params
    weights_b = side_b + head_b
    wd = _weights(local) if weight_decay else []
    sgd_temp = max(wd, default=0) * e              # single-tensor SGD: grad + wd * param, one tensor at a time
    if sync_sharded:
        buckets = _buckets(side, 25 * MIB)
        shards = [-(-n // k) for n in buckets]
        side_opt = 2 * sum(shards) * e             # the owned shard's momentum and master copy
        comm = (sum(s * k for s in shards) + sum(shards)) * e   # flat gradient buckets and the reduced shard
        built_comm = comm
        side_grads = side_b                          # autograd's .grad, copied into the buckets, dropped after the step
        big_bucket = max(buckets, default=0) * e
        sgd_temp = max(sgd_temp if head_params else 0, max(shards, default=0) * e if weight_decay else 0,
                       max(_weights(head_params), default=0) * e if weight_decay else 0)
        gloo = big_bucket if cpu and k > 1 else 0  # gloo's reduce-scatter/all-gather copy their input/output
        if cpu and k > 1:   # ... in gloo's own threads, whose heaps keep the copies of the buckets under MMAP_MAX
            comm += 2 * sum(n * e for n in buckets if n * e < MMAP_MAX)   # (measured: +90-150 MiB for resnet18's trunk)
    else:
        side_opt, side_grads, big_bucket, gloo = side_b, side_b, 0, 0
        comm = side_b if strategy == "data" else 0     # DDP's buckets: a copy of every gradient
        built_comm = 0                                 # (not touched before the first backward)
    params = weights_b
    grads = side_grads + head_b
    optimizer = side_opt + head_b
    # -- activations of one step -----------------------------------------------------------
    rows = k * batch if strategy == "hybrid" and variant.scheme == "a" else batch
    if strategy in ("model", "hybrid"):
        acts = net.trunk_saved(batch, cut) + net.head_saved(rows, k, cut)
    else:
        acts = net.trunk_saved(batch) + net.head_saved(batch)
    act_b, act_heap = acts.total, acts.heap
    if precision == "bf16":   # autocast: bf16 activations, and its cache of bf16 weight copies for the step
        act_b, act_heap = act_b // 2, act_heap // 2
        notes.append("bf16: activations halved and a bf16 copy of the weights added (not measured)")
    backward = 2 * acts.largest                        # an activation's gradient and its input's, at once
    exchange = 0
    if strategy == "hybrid" and k > 1:
        feat_b = net.features(cut) * 4
        if variant.scheme == "a":   # gathered rows (saved by the head), their gradient, its reduce-scatter
            exchange = (k * batch * feat_b) * (2 if cpu else 1) + batch * feat_b
        else:                       # every round's activations and gradients, their concatenation, my gradient
            exchange = 3 * k * batch * feat_b + batch * feat_b + (k * batch * feat_b if cpu else 0)
            if variant.scheme == "c":
                exchange += batch * feat_b
    elif strategy == "model" and k > 1:
        exchange = batch * net.features(0) * 4
    comm += exchange
    retained = act_heap if cpu else 0       # freed activations stay in glibc's heaps
    cast = weights_b // 2 if precision == "bf16" else 0
    skip = (weights_b + optimizer) if on_nan == "skip" else 0    # --on-nan skip keeps the step's old values
    base_b = (CPU_BASE_BYTES if cpu else 0) if base is None else base
    fixed = {"base": base_b, "parameters": params, "optimizer": optimizer}
    plain = 3 * dense_all if baseline else 0   # bench's plain PyTorch model: weights, gradients, momentum
    if plain:
        notes.append("bench's plain PyTorch loop beside it: its weights, gradients and momentum")
    phases: dict[str, dict[str, int]] = {}

    def phase(name, gradients=0, activations=0, comm_b=0, transient=0):
        phases[name] = {**fixed, "gradients": gradients, "activations": activations, "comm": comm_b,
                        "transient": transient + plain}

    # build: the dense model first; the sharded head copies its shard before the dense one is dropped
    build = dense_all - weights_b + head_b if strategy in ("model", "hybrid") and k > 1 else 0
    if strategy == "data" and variant.sync != "sharded" and k > 1:
        build = max(build, _broadcast_copy([n for _, n in net.params], net.buffers))
    if sync_sharded:
        build += big_bucket                          # a bucket's flat copy beside the parameters it replaces
    phases["build"] = {**fixed, "optimizer": side_opt if sync_sharded else 0, "gradients": 0, "activations": 0,
                       "comm": built_comm, "transient": build + plain}   # momentum is born at the first step
    step_temp = max(backward, sgd_temp, gloo) + cast + skip
    phase("step", grads, act_b, comm, step_temp)
    if run == "train":
        log_copy = sum(_weights(local)) * e          # worker 0's copy of the weights for |dw| (records.layer_stats)
        after_grads = head_b + (0 if sync_sharded else side_grads)
        phase("logged step", grads, act_b, comm, log_copy + step_temp)
        phases["logged step"]["transient"] -= plain
        eval_n = eval_batch or max(batch, 64)
        phase("evaluation", after_grads, retained, comm - exchange, _eval_bytes(net, strategy, k, eval_n, cut, cpu))
        if sync_sharded:
            ckpt = _momentum_gather(buckets, k, cpu) * e
        elif strategy == "model":
            ckpt = 2 * side_b
        else:
            ckpt = weights_b                           # every momentum buffer cloned
        phase("checkpoint", after_grads, retained, comm - exchange, ckpt)
    peak = max(phases, key=lambda n: sum(phases[n].values()))
    totals = {n: sum(v.values()) for n, v in phases.items()}
    return MemoryPrediction({p: int(phases[peak][p]) for p in PARTS}, totals, peak, device, notes)


def _momentum_gather(buckets: list[int], k: int, cpu: bool) -> int:
    """Elements the sharded update's ``momentum_state`` holds at its peak: the full momentum
    assembled bucket by bucket (a zeroed flat bucket, gloo's copy of it, the clones)."""
    done, peak = 0, 0
    for n in buckets:
        shard = -(-n // k)
        peak = max(peak, done + shard + shard * k + max(shard * k if cpu and k > 1 else 0, n))
        done += n
    return max(peak, done)


def _eval_bytes(net: NetMemory, strategy: str, k: int, n: int, cut: int, cpu: bool) -> int:
    """What one evaluation batch of ``n`` examples allocates beyond the model: a layer's
    input and output in the no-grad forward, and the logits. A sharded head keeps its own
    classes' logits (the top-5 is merged from K x 5 pairs per example,
    :func:`~onetrick.distributed.tensor_parallel.sharded_top_classes`); the hybrid's head
    runs on every worker's rows (scheme (a)), gathered; a row-wise classifier all-reduces
    the full partial logits."""
    trunk = 2 * net.trunk_saved(n, cut).largest
    c = net.classes
    if strategy in ("single", "data") or k == 1:
        return trunk + n * c * 4
    rows = k * n if strategy == "hybrid" else n
    gathered = rows * net.features(cut) * 4 * (2 if cpu else 1) if strategy == "hybrid" else 0
    if net.sharded(cut, k).row_wise:
        return trunk + gathered + 2 * rows * c * 4
    return trunk + gathered + 2 * rows * -(-c // k) * 4   # this worker's logits, and the top-5's float copy


# == a run's figure, and what a worker has ================================================
def variant_of(cfg):
    """The cost model's :class:`~onetrick.perf.predict.step.Variant` of a TrainConfig."""
    from onetrick.perf.predict.step import Variant

    if cfg.strategy == "data":
        return Variant("data", cfg.sync)
    if cfg.strategy == "hybrid":
        return Variant("hybrid", None, cfg.scheme if cfg.scheme in ("a", "b", "c") else "b", cfg.fc_batch, cfg.cut)
    return Variant("single" if cfg.workers == 1 and cfg.strategy in ("single", "data") else cfg.strategy)


def predict_for_config(cfg, classes: int, channels: int, image_size: int, run: str = "train",
                       baseline: bool = False, net: NetMemory | None = None) -> MemoryPrediction:
    """:func:`predict_memory` of a TrainConfig's run: ``net``, the network already
    described (:meth:`NetMemory.from_model`: a launch's, or a user's own model), or else
    its model built here on the meta device."""
    net = net or net_memory(cfg.model, classes, channels, image_size, cfg.dropout)
    if cfg.strategy in ("hogwild", "paramserver"):
        return async_memory(net, cfg)
    return predict_memory(net, variant_of(cfg), cfg.workers, cfg.batch, precision=cfg.precision, device=cfg.device,
                          run=run, baseline=baseline, on_nan=cfg.on_nan, weight_decay=cfg.weight_decay > 0)


def async_memory(net: NetMemory, cfg) -> MemoryPrediction:
    """A rough, honest figure for the asynchronous strategies (their loops are their own):
    hogwild's workers share one copy of the weights (shared memory, counted once per worker
    here as it appears in each one's RSS) and keep their own gradients and momentum; a
    parameter-server worker keeps a full copy of the weights, its gradients, its unpushed
    accumulation and momentum, a server 1/S of weights and momentum. Activations as one
    worker's at ``batch``."""
    e = PARAM_BYTES
    w = sum(n for _, n in net.params) * e
    acts = net.trunk_saved(cfg.batch) + net.head_saved(cfg.batch)
    extra = 2 * w if cfg.strategy == "hogwild" else 3 * w
    base = CPU_BASE_BYTES if cfg.device == "cpu" else 0
    parts = {"base": base, "parameters": w, "gradients": w, "optimizer": w, "activations": acts.total,
             "comm": 0 if cfg.strategy == "hogwild" else w, "transient": max(2 * acts.largest, extra - 2 * w)}
    total = sum(parts.values())
    return MemoryPrediction(parts, {"step": total}, "step", cfg.device,
                            [f"{cfg.strategy}: rough (its own layout; not calibrated)"])


def predicted_for_run(cfg, net: NetMemory | None) -> dict | None:
    """summary.json's ``predicted_memory``: the prediction of this run, by part, from its
    network as the launcher described it (None where the meta device cannot describe it)."""
    if net is None:
        return None
    channels, image_size, _ = net.in_shape
    try:
        return predict_for_config(cfg, net.classes, channels, image_size, net=net).as_dict()
    except (ValueError, RuntimeError, NotImplementedError, TypeError, AttributeError):
        return None
