"""Model parallelism's building blocks: collectives with the right backward, a
fully-connected head whose every layer is split by output neurons, and a softmax
cross-entropy over class-sharded logits.

These are written on torch.distributed collectives rather than DTensor because they
need uneven shards (a width not divisible by K), byte accounting, and the hybrid's
round-by-round use (scheme b), none of which DTensor's ColwiseParallel expresses.

Conventions: K workers; a width n is split as DTensor's ``Shard(0)`` splits it (the first
workers get ``ceil(n/K)``, the last what remains), see :func:`shard_sizes`.
"""
from __future__ import annotations

import math
import warnings

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.autograd import Function

from ..models.base import ELEMENTWISE, unshardable
from .comm import Comm

TAG = "activations"          # last-conv activations (and their gradients) between workers
HEAD_TAG = "fc_activations"  # activations exchanged inside the sharded FC head, and the loss


def shard_sizes(n: int, k: int) -> list[int]:
    """Sizes of the K shards of a width ``n`` (torch.chunk / DTensor Shard semantics)."""
    step = -(-n // k)
    return [max(0, min(step, n - r * step)) for r in range(k)]


def shard_range(n: int, k: int, rank: int) -> tuple[int, int]:
    start = sum(shard_sizes(n, k)[:rank])
    return start, start + shard_sizes(n, k)[rank]


# -- autograd collectives ---------------------------------------------------------
class _GatherColumns(Function):
    """(N, w_r) on worker r -> (N, sum w) on all; backward: reduce-scatter (sum of the
    partial gradients every worker's next layer produced, each worker keeps its columns)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, comm: Comm, widths: list[int], tag: str) -> torch.Tensor:
        ctx.comm, ctx.widths, ctx.tag = comm, widths, tag
        n, wmax = x.shape[0], max(widths)
        padded = F.pad(x, (0, wmax - x.shape[1])).contiguous()
        out = x.new_empty(comm.size * n * wmax)
        comm.all_gather(out, padded.flatten(), tag=tag)
        parts = out.view(comm.size, n, wmax)
        return torch.cat([parts[r, :, :w] for r, w in enumerate(widths)], dim=1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        comm, widths = ctx.comm, ctx.widths
        n, wmax = grad.shape[0], max(widths)
        pieces = [F.pad(g, (0, wmax - g.shape[1])) for g in grad.split(widths, dim=1)]
        stacked = torch.stack(pieces).contiguous()
        out = grad.new_empty(n * wmax)
        comm.reduce_scatter(out, stacked.flatten(), tag=ctx.tag)
        return out.view(n, wmax)[:, :widths[comm.rank]], None, None, None


class _GatherRows(Function):
    """(B, F) on each worker -> (K*B, F) on all; backward: reduce-scatter of rows."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, comm: Comm) -> torch.Tensor:
        ctx.comm = comm
        out = x.new_empty((comm.size * x.shape[0],) + tuple(x.shape[1:]))
        comm.all_gather(out, x.contiguous(), tag=TAG)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        comm = ctx.comm
        out = grad.new_empty((grad.shape[0] // comm.size,) + tuple(grad.shape[1:]))
        comm.reduce_scatter(out, grad.contiguous(), tag=TAG)
        return out, None


class _ReplicatedInput(Function):
    """Identity forward; backward sums the partial input gradients of all workers
    (Megatron's "f"): for a replicated input feeding a neuron-sharded layer."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, comm: Comm) -> torch.Tensor:
        ctx.comm = comm
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        ctx.comm.all_reduce(grad, tag=TAG)
        return grad, None


class _AllToAllRows(Function):
    """Worker r sends rows chunk j of its (B, F) to worker j; receives chunk r of
    everyone's. Backward is the same exchange in reverse."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, comm: Comm) -> torch.Tensor:
        ctx.comm = comm
        out = torch.empty_like(x)
        comm.all_to_all(out, x.contiguous(), tag=TAG)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        out = torch.empty_like(grad)
        ctx.comm.all_to_all(out, grad.contiguous(), tag=TAG)
        return out, None


def gather_columns(x: torch.Tensor, comm: Comm, widths: list[int], tag: str = TAG) -> torch.Tensor:
    return _GatherColumns.apply(x, comm, widths, tag)


def gather_rows(x: torch.Tensor, comm: Comm) -> torch.Tensor:
    return _GatherRows.apply(x, comm)


def replicated_input(x: torch.Tensor, comm: Comm) -> torch.Tensor:
    return _ReplicatedInput.apply(x, comm)


def all_to_all_rows(x: torch.Tensor, comm: Comm) -> torch.Tensor:
    return _AllToAllRows.apply(x, comm)


# -- the sharded head ----------------------------------------------------------------
class ShardedHead(nn.Module):
    """This worker's 1/K of every Linear layer of a dense head (by output neurons).

    ``forward(x)`` takes the full input (N, F), identical on every worker, and returns
    this worker's slice of the logits (N, C_r); between layers the activation slices are
    all-gathered. Gradients w.r.t. ``x`` are partial: callers wrap ``x`` with a
    collective whose backward sums them (:func:`replicated_input`, :func:`gather_rows`).
    """

    def __init__(self, head: nn.Sequential, comm: Comm) -> None:
        super().__init__()
        self.comm = comm
        self.layers = nn.ModuleList()
        self.widths: list[list[int]] = []    # per Linear: every worker's output width
        self.names: list[str] = []           # per Linear: its name in the dense head
        for name, layer in head.named_children():
            if not isinstance(layer, (nn.Linear, *ELEMENTWISE)):  # fit/parallelize refuse it earlier
                raise ValueError(unshardable(head))
            if isinstance(layer, nn.Linear):
                widths = shard_sizes(layer.out_features, comm.size)
                start, end = shard_range(layer.out_features, comm.size, comm.rank)
                # A worker may own no neurons of a narrow layer (10 classes over 8 workers:
                # 2,2,2,2,2,0,0,0, DTensor's Shard(0) layout); its shard is then empty.
                with warnings.catch_warnings():  # "initializing zero-element tensors is a no-op"
                    warnings.simplefilter("ignore", UserWarning)
                    local = nn.Linear(layer.in_features, end - start, bias=layer.bias is not None,
                                      device=layer.weight.device, dtype=layer.weight.dtype)
                with torch.no_grad():
                    for p, value in local.named_parameters():
                        value.copy_(getattr(layer, p)[start:end])
                self.layers.append(local)
                self.widths.append(widths)
                self.names.append(name)
            else:
                self.layers.append(layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        linear_seen = 0
        for layer in self.layers:
            if isinstance(layer, nn.Linear):
                if linear_seen:
                    x = gather_columns(x, self.comm, self.widths[linear_seen - 1], HEAD_TAG)
                linear_seen += 1
            x = layer(x)
        return x

    @property
    def class_offset(self) -> int:
        return sum(self.widths[-1][:self.comm.rank])

    def local_to_dense(self) -> dict[str, str]:
        """Local parameter name -> dense head parameter name."""
        mapping, i = {}, 0
        for idx, layer in enumerate(self.layers):
            if isinstance(layer, nn.Linear):
                for p, _ in layer.named_parameters():  # "weight", and "bias" unless bias=False
                    mapping[f"layers.{idx}.{p}"] = f"{self.names[i]}.{p}"
                i += 1
        return mapping

    def gather_dense(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """All-gather per-layer shards (``{local name: tensor}``) into dense-head tensors."""
        out = {}
        for idx, layer in enumerate(self.layers):
            if not isinstance(layer, nn.Linear):
                continue
            widths = self.widths[sum(isinstance(m, nn.Linear) for m in self.layers[:idx])]
            for p, _ in layer.named_parameters():
                local = tensors[f"layers.{idx}.{p}"]
                rows = local.reshape(local.shape[0], math.prod(local.shape[1:]))  # (0, F) for an empty shard
                full = gather_columns(rows.t().contiguous(), self.comm, widths, "checkpoint").t()
                out[self.local_to_dense()[f"layers.{idx}.{p}"]] = full.reshape((-1,) + tuple(local.shape[1:])).clone()
        return out


# -- cross-entropy on class-sharded logits --------------------------------------------
class _ShardedCrossEntropy(Function):
    """Mean softmax cross-entropy where worker r holds logits of classes
    [offset, offset + C_r). Only (N,)-sized vectors cross the network: the row max, the
    row sum of exponentials and the target logit; the full logits are never assembled."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, offset: int, comm: Comm) -> torch.Tensor:
        logits = logits.float()
        row_max = _row_max(logits)
        comm.all_reduce(row_max, tag=HEAD_TAG, op=dist.ReduceOp.MAX)
        exp = (logits - row_max[:, None]).exp()
        row_sum = exp.sum(dim=1)
        local_t = targets - offset
        mine = (local_t >= 0) & (local_t < logits.shape[1])
        idx = local_t.clamp(0, logits.shape[1] - 1)
        local_target = logits.gather(1, idx[:, None]).squeeze(1) if logits.shape[1] else torch.zeros_like(row_max)
        target_logit = torch.where(mine, local_target, torch.zeros_like(row_max))
        reduced = torch.stack([row_sum, target_logit])
        comm.all_reduce(reduced, tag=HEAD_TAG)
        row_sum, target_logit = reduced
        loss = (row_sum.log() + row_max - target_logit).mean()
        ctx.save_for_backward(exp / row_sum[:, None], mine, idx)
        return loss

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        softmax, mine, idx = ctx.saved_tensors
        g = softmax.clone()
        rows = mine.nonzero().squeeze(1)
        g[rows, idx[rows]] -= 1.0
        return g * (grad / softmax.shape[0]), None, None, None


def _row_max(logits: torch.Tensor) -> torch.Tensor:
    """Row maxima; -inf for a worker that owns no classes."""
    if logits.shape[1] == 0:
        return logits.new_full((logits.shape[0],), float("-inf"))
    return logits.max(dim=1).values


def sharded_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, offset: int, comm: Comm) -> torch.Tensor:
    """Mean cross-entropy over class-sharded ``logits`` (same value on every worker)."""
    return _ShardedCrossEntropy.apply(logits, targets, offset, comm)


def sharded_errors(logits: torch.Tensor, targets: torch.Tensor, offset: int, comm: Comm) -> torch.Tensor:
    """Top-1 errors from class-sharded logits: local best, then the global best (tiny all-gather)."""
    best = _row_max(logits)
    arg = logits.argmax(dim=1) if logits.shape[1] else torch.zeros_like(targets)
    both = torch.stack([best.float(), (arg + offset).float()], dim=1).contiguous()
    out = both.new_empty(comm.size * both.numel())
    comm.all_gather(out, both.flatten(), tag="metrics")
    cand = out.view(comm.size, -1, 2)
    winner = cand[:, :, 0].argmax(dim=0)
    predicted = cand[winner, torch.arange(cand.shape[1]), 1].long()
    return (predicted != targets).sum()
