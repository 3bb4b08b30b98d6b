"""Synchronous data parallelism (docs/PAPER.md form 2): K workers, same model, different
examples, gradients combined every step so the batch is K*B.

Two ways to synchronise, ``--sync``:

* ``ddp``: torch's DistributedDataParallel (bucketed all-reduce overlapped with the
  backward pass). A comm hook counts the bytes.
* ``sharded``: the paper's scheme, written by hand because DDP lacks it. Parameters
  are packed into flat buckets; each worker owns 1/K of every bucket. As soon as a
  bucket's gradients are complete during backward, an asynchronous reduce-scatter sums
  them into their owner's shard; the owner applies SGD (momentum, weight decay) to its
  shard only; an all-gather then gives every worker the new weights.

Both average gradients over workers, so with ``--lr-scale none`` K workers of batch B
equal one worker of batch K*B exactly (tests prove it).

BatchNorm (ResNets and the like): each worker normalises with the statistics of its own B
examples, as DDP does (SyncBatchNorm, which would normalise over all K*B, needs CUDA);
the running statistics are worker 0's, broadcast before every step and before evaluation
(DDP's ``broadcast_buffers``; :func:`broadcast_buffers` for the sharded update and the
hybrid). A model without BatchNorm has no buffers and pays nothing.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel

from onetrick.config import TrainConfig
from onetrick.distributed.runtime import Runtime
from onetrick.distributed.strategy import SingleStrategy, StepOutput, Strategy
from onetrick.models import TrunkHeadNet
from onetrick.recipe import make_sgd, param_groups

BUCKET_BYTES = 25 * 2**20


def broadcast_buffers(module: nn.Module, comm) -> None:
    """Worker 0's floating-point buffers (BatchNorm's running mean and variance) to every
    worker, in one broadcast; integer buffers (``num_batches_tracked``) advance alike
    everywhere. Nothing is sent for a module without such buffers."""
    buffers = [b for b in module.buffers() if b.is_floating_point()]
    if not buffers or comm.size == 1:
        return
    flat = torch.cat([b.detach().flatten() for b in buffers])
    with comm.exact():  # the running statistics stay fp32 whatever --comm-dtype
        comm.broadcast(flat, src=0, tag="buffers")
    offset = 0
    for b in buffers:
        b.copy_(flat[offset:offset + b.numel()].view_as(b))
        offset += b.numel()


class DDPStrategy(SingleStrategy):
    """Data parallelism through DistributedDataParallel: the one-worker step, with the
    forward pass through DDP so the backward pass all-reduces (averages) gradients."""

    name = "data/ddp"

    def __init__(self, model: TrunkHeadNet, cfg: TrainConfig, rt: Runtime) -> None:
        super().__init__(model, cfg, rt)
        device_ids = [rt.device.index] if rt.device.type == "cuda" else None
        self.net = DistributedDataParallel(self.model, device_ids=device_ids)
        bf16 = cfg.comm_dtype == "bf16"
        self.net.register_comm_hook(self.comm, _counting_bf16_hook if bf16 else _counting_allreduce_hook)

    def set_training(self, mode: bool) -> None:
        if not mode:  # DDP broadcast worker 0's buffers before each training forward; evaluation too
            broadcast_buffers(self.model, self.comm)
        super().set_training(mode)


def _counting_allreduce_hook(comm, bucket):  # no annotations: DDP checks them against real types
    """DDP's own all-reduce hook, with the bucket's bytes counted."""
    comm.record("weights", "all_reduce", 2 * (comm.size - 1) / comm.size * bucket.buffer().numel() * bucket.buffer().element_size())
    return default_hooks.allreduce_hook(comm.group, bucket)


def _counting_bf16_hook(comm, bucket):
    """DDP's bf16 compression hook (gradients sent in bfloat16, averaged, cast back), with
    the bytes counted at the bf16 size actually sent."""
    comm.record("weights", "all_reduce", 2 * (comm.size - 1) / comm.size * bucket.buffer().numel() * 2)
    return default_hooks.bf16_compress_hook(comm.group, bucket)


@dataclass
class _Owned:
    """The part of one parameter that falls in this worker's shard of a bucket."""

    name: str
    view: torch.Tensor       # into the bucket's master shard: what SGD updates
    grad: torch.Tensor       # into the reduced gradient shard
    param_offset: int        # where the view starts inside the parameter (flattened)


class FlatBucket:
    """A flat, padded run of parameters; this worker owns slice ``[rank*S, (rank+1)*S)``.
    The parameter server lays its weights out the same way, one slice per server."""

    def __init__(self, params: list[tuple[str, nn.Parameter]], world: int, rank: int) -> None:
        self.params = params
        numel = sum(p.numel() for _, p in params)
        self.shard_numel = -(-numel // world)
        p0 = params[0][1]
        self.flat = torch.zeros(self.shard_numel * world, dtype=p0.dtype, device=p0.device)
        self.grad = torch.zeros_like(self.flat)
        self.grad_shard = torch.zeros(self.shard_numel, dtype=p0.dtype, device=p0.device)
        self.ranges: list[tuple[int, int]] = []
        offset = 0
        for _, p in params:  # params become views into the flat buffer
            self.flat[offset:offset + p.numel()].copy_(p.detach().flatten())
            p.data = self.flat[offset:offset + p.numel()].view_as(p)
            self.ranges.append((offset, offset + p.numel()))
            offset += p.numel()
        self.lo = rank * self.shard_numel
        self.shard = self.flat[self.lo:self.lo + self.shard_numel].clone()  # the owner's master copy
        self.pending = len(params)
        self.work = None
        self.owned: list[_Owned] = []
        for (name, _), (a, b) in zip(params, self.ranges):
            s, e = max(a, self.lo), min(b, self.lo + self.shard_numel)
            if s < e:
                self.owned.append(_Owned(name, self.shard[s - self.lo:e - self.lo],
                                         self.grad_shard[s - self.lo:e - self.lo], s - a))


class ShardedDataParallel(Strategy):
    """Data parallelism with the paper's owner-computes update (reduce-scatter, SGD on
    the owned shard, all-gather), overlapped with the backward pass bucket by bucket.

    ``module`` (default: the whole model) is the part kept data-parallel; the hybrid
    passes the trunk alone. ``average`` divides the summed gradients by K (as DDP does);
    the hybrid turns it off where its activation gradients already carry the 1/K.
    """

    name = "data/sharded"
    tag = "weights"

    def __init__(self, model: TrunkHeadNet, cfg: TrainConfig, rt: Runtime, module: nn.Module | None = None,
                 lr: float | None = None, average: bool = True) -> None:
        super().__init__(model, cfg, rt)
        self.synced = module if module is not None else self.model
        self.average = average
        self.buckets = [FlatBucket(group, self.comm.size, self.comm.rank) for group in _group_params(self.synced)]
        self.optimizer = self._shard_optimizer(cfg, self.base_lr() if lr is None else lr)
        for bucket in self.buckets:
            for _, p in bucket.params:
                p.register_post_accumulate_grad_hook(lambda p, b=bucket: self._grad_ready(b))

    def _shard_optimizer(self, cfg: TrainConfig, lr: float) -> torch.optim.SGD:
        """SGD over this worker's shard views, each in its parameter's group."""
        named = [(o.name, o.view) for b in self.buckets for o in b.owned]
        if not named:  # more workers than elements: own nothing but keep a valid optimizer
            named = [("_empty", torch.zeros(0, device=self.rt.device))]
        opt = make_sgd(param_groups(named, cfg, lr), cfg)
        for b in self.buckets:
            for o in b.owned:
                o.view.grad = o.grad
                opt.state[o.view]["momentum_buffer"] = torch.zeros_like(o.view)
        return opt

    # -- gradient path -------------------------------------------------------------
    def _grad_ready(self, bucket: FlatBucket) -> None:
        bucket.pending -= 1
        if bucket.pending == 0:
            self._launch(bucket)

    def _launch(self, bucket: FlatBucket) -> None:
        for (_, p), (a, b) in zip(bucket.params, bucket.ranges):
            if p.grad is None:
                bucket.grad[a:b].zero_()
            else:
                bucket.grad[a:b].copy_(p.grad.flatten())
        bucket.work = self.comm.reduce_scatter(bucket.grad_shard, bucket.grad, tag=self.tag, async_op=True)

    def sync_and_step(self, finite: torch.Tensor) -> None:
        """Finish the reduce-scatters, update the owned shards (skipped on the device where
        ``finite`` is false under ``--on-nan skip``), all-gather the weights."""
        for bucket in self.buckets:
            if bucket.work is None:  # a bucket whose hooks did not all fire (unused params)
                self._launch(bucket)
            self.comm.wait(bucket.work)
            bucket.work = None
            bucket.pending = len(bucket.params)
            if self.average:
                bucket.grad_shard.div_(self.comm.size)
        self.step(self.optimizer, finite)
        with self.comm.exact():  # weights travel in fp32 whatever --comm-dtype: every replica holds the master
            works = [self.comm.all_gather(b.flat, b.shard, tag=self.tag, async_op=True) for b in self.buckets]
        for work in works:
            self.comm.wait(work)
        for p in self.synced.parameters():
            p.grad = None

    def set_training(self, mode: bool) -> None:
        if not mode:
            broadcast_buffers(self.synced, self.comm)
        super().set_training(mode)

    def train_step(self, images: torch.Tensor, targets: torch.Tensor) -> StepOutput:
        broadcast_buffers(self.synced, self.comm)
        logits = self.model(images)
        loss = F.cross_entropy(logits.float(), targets)
        loss.backward()
        out = self.global_stats(loss * len(targets), logits, targets)
        self.sync_and_step(out.finite)
        return out

    # -- state: full momentum assembled from the shards --------------------------
    def momentum_state(self) -> dict[str, torch.Tensor]:
        momentum = {}
        for bucket in self.buckets:
            shard = torch.zeros_like(bucket.shard)
            for o in bucket.owned:
                start = o.view.storage_offset() - bucket.shard.storage_offset()
                shard[start:start + o.view.numel()] = self.optimizer.state[o.view]["momentum_buffer"]
            flat = torch.zeros_like(bucket.flat)
            self.comm.all_gather(flat, shard, tag="checkpoint")
            for (name, p), (a, b) in zip(bucket.params, bucket.ranges):
                momentum[name] = flat[a:b].view_as(p).clone()
        return momentum

    def load_momentum_state(self, momentum: dict[str, torch.Tensor]) -> None:
        for bucket in self.buckets:
            bucket.shard.copy_(bucket.flat[bucket.lo:bucket.lo + bucket.shard_numel])
            for o in bucket.owned:
                full = momentum[o.name].to(o.view.device).flatten()
                self.optimizer.state[o.view]["momentum_buffer"].copy_(full[o.param_offset:o.param_offset + o.view.numel()])

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "momentum": self.momentum_state()}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])  # copies into the flat buffers
        self.load_momentum_state(state["momentum"])


def _group_params(module: nn.Module) -> list[list[tuple[str, nn.Parameter]]]:
    """Buckets in reverse registration order (the order backward produces gradients),
    split at BUCKET_BYTES, so early buckets can be reduced while backward continues."""
    groups: list[list[tuple[str, nn.Parameter]]] = [[]]
    size = 0
    for name, p in reversed(list(module.named_parameters())):
        if size >= BUCKET_BYTES:
            groups.append([])
            size = 0
        groups[-1].append((name, p))
        size += p.numel() * p.element_size()
    return [g for g in groups if g]


def data_parallel(model: TrunkHeadNet, cfg: TrainConfig, rt: Runtime) -> Strategy:
    return DDPStrategy(model, cfg, rt) if cfg.sync == "ddp" else ShardedDataParallel(model, cfg, rt)
