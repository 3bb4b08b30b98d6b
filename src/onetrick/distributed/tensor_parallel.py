"""Model parallelism's building blocks: collectives with the right backward, a
fully-connected head split over workers (hidden layers by output neurons, the classifier
by classes or by inputs), and a softmax cross-entropy over class-sharded logits.

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
import torch.nn.functional as F
from torch import nn
from torch.autograd import Function

from onetrick.distributed.comm import Comm
from onetrick.models.base import ELEMENTWISE, unshardable

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


class _SumPartials(Function):
    """Sum of every worker's partial result (all-reduce); backward is the identity, since
    each worker's partial contributed with weight one (Megatron's "g")."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, comm: Comm) -> torch.Tensor:
        out = x.contiguous().clone()
        comm.all_reduce(out, tag=HEAD_TAG)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
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


def sum_partials(x: torch.Tensor, comm: Comm) -> torch.Tensor:
    return _SumPartials.apply(x, comm)


def all_to_all_rows(x: torch.Tensor, comm: Comm) -> torch.Tensor:
    return _AllToAllRows.apply(x, comm)


# -- the sharded head ----------------------------------------------------------------
class ShardedHead(nn.Module):
    """This worker's 1/K of every Linear layer of a dense head.

    Hidden layers are split by output neurons (``Shard(0)``); between them the activation
    slices are all-gathered. The classifier is split one of two ways:

    * by classes (``Shard(0)``, as the hidden layers) when it has more classes than
      inputs: ``forward`` returns this worker's slice of the logits (N, C_r), and the loss
      is :func:`sharded_cross_entropy` (100,000 classes never cross the network);
    * by inputs (``row_wise``: weight ``Shard(1)``, bias replicated) when it has at most
      as many classes as inputs (AlexNet's 4096 -> 1000): each worker multiplies its own
      slice of the last hidden activations, and one all-reduce of the (N, C) partial
      logits replaces the all-gather before the classifier, its reduce-scatter in
      backward and the sharded loss's exchange. Every worker then holds the full logits.

    ``forward(x)`` takes the full input (N, F), identical on every worker. Gradients
    w.r.t. ``x`` are partial: callers wrap ``x`` with a collective whose backward sums
    them (:func:`replicated_input`, :func:`gather_rows`).
    """

    def __init__(self, head: nn.Sequential, comm: Comm) -> None:
        super().__init__()
        self.comm = comm
        self.layers = nn.ModuleList()
        self.widths: list[list[int]] = []    # per Linear: every worker's width along its split
        self.names: list[str] = []           # per Linear: its name in the dense head
        linears = [m for m in head.children() if isinstance(m, nn.Linear)]
        last = linears[-1]
        self.row_wise = len(linears) > 1 and last.out_features <= last.in_features
        for name, layer in head.named_children():
            if not isinstance(layer, (nn.Linear, *ELEMENTWISE)):  # fit/parallelize refuse it earlier
                raise ValueError(unshardable(head))
            if isinstance(layer, nn.Linear):
                row = self.row_wise and layer is last
                n = layer.in_features if row else layer.out_features
                start, end = shard_range(n, comm.size, comm.rank)
                # A worker may own no neurons of a narrow layer (10 classes over 8 workers:
                # 2,2,2,2,2,0,0,0, DTensor's Shard(0) layout); its shard is then empty.
                with warnings.catch_warnings():  # "initializing zero-element tensors is a no-op"
                    warnings.simplefilter("ignore", UserWarning)
                    local = nn.Linear(end - start if row else layer.in_features,
                                      layer.out_features if row else end - start, bias=layer.bias is not None,
                                      device=layer.weight.device, dtype=layer.weight.dtype)
                with torch.no_grad():
                    local.weight.copy_(layer.weight[:, start:end] if row else layer.weight[start:end])
                    if layer.bias is not None:
                        local.bias.copy_(layer.bias if row else layer.bias[start:end])
                self.layers.append(local)
                self.widths.append(shard_sizes(n, comm.size))
                self.names.append(name)
            else:
                self.layers.append(layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        linear_seen, count = 0, len(self.names)
        for layer in self.layers:
            if isinstance(layer, nn.Linear):
                linear_seen += 1
                if self.row_wise and linear_seen == count:  # x is already this worker's slice
                    logits = sum_partials(F.linear(x, layer.weight), self.comm)
                    return logits if layer.bias is None else logits + layer.bias
                if linear_seen > 1:
                    x = gather_columns(x, self.comm, self.widths[linear_seen - 2], HEAD_TAG)
            x = layer(x)
        return x

    @property
    def class_offset(self) -> int:
        return 0 if self.row_wise else sum(self.widths[-1][:self.comm.rank])

    def split_dim(self, local_name: str) -> int | None:
        """How a local parameter splits its dense tensor: 0 (rows: output neurons),
        1 (columns: the row-wise classifier's weight) or None (replicated: its bias)."""
        if not (self.row_wise and self.linear_index(local_name) == len(self.names) - 1):
            return 0
        return 1 if local_name.endswith("weight") else None

    def dense_shape(self, local_name: str, local: torch.Tensor) -> tuple[int, ...]:
        dim, total = self.split_dim(local_name), sum(self.widths[self.linear_index(local_name)])
        shape = list(local.shape)
        if dim is not None:
            shape[dim] = total
        return tuple(shape)

    def linear_index(self, local_name: str) -> int:
        idx = int(local_name.split(".")[1])
        return sum(isinstance(m, nn.Linear) for m in self.layers[:idx])

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
        for local_name, dense_name in self.local_to_dense().items():
            local, dim = tensors[local_name], self.split_dim(local_name)
            widths = self.widths[self.linear_index(local_name)]
            if dim is None:
                out[dense_name] = local.clone()
            elif dim == 1:
                out[dense_name] = gather_columns(local.contiguous(), self.comm, widths, "checkpoint").clone()
            else:
                rows = local.reshape(local.shape[0], math.prod(local.shape[1:]))  # (0, F) for an empty shard
                full = gather_columns(rows.t().contiguous(), self.comm, widths, "checkpoint").t()
                out[dense_name] = full.reshape((-1,) + tuple(local.shape[1:])).clone()
        return out


# -- cross-entropy on class-sharded logits --------------------------------------------
class _ShardedCrossEntropy(Function):
    """Mean softmax cross-entropy, and the top-1 errors, where worker r holds the logits
    of classes [offset, offset + C_r). One all-gather of four numbers per example and
    worker (its classes' log-sum-exp, the target logit if it holds the target, its best
    logit and that class) gives every worker the exact loss and the errors; the full
    logits are never assembled."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, offset: int, comm: Comm):
        logits = logits.float()
        n, c = logits.shape
        local_t = targets - offset
        mine = (local_t >= 0) & (local_t < c)
        idx = local_t.clamp(0, max(c - 1, 0))
        if c:
            best, arg = logits.max(dim=1)
            lse, target = logits.logsumexp(dim=1), logits.gather(1, idx[:, None]).squeeze(1)
        else:  # a worker that owns no classes: -inf never wins, contributes exp(-inf) = 0
            best = lse = logits.new_full((n,), float("-inf"))
            arg, target = torch.zeros_like(targets), logits.new_zeros(n)
        mine_target = torch.where(mine, target, torch.zeros_like(target))
        stats = torch.stack([lse, mine_target, best, (arg + offset).float()], dim=1).contiguous()
        every = stats.new_empty(comm.size * stats.numel())
        with comm.exact():  # statistics stay fp32 on the wire: class indices, log-sum-exps
            comm.all_gather(every, stats.flatten(), tag=HEAD_TAG)
        every = every.view(comm.size, n, 4)
        total_lse = every[:, :, 0].logsumexp(dim=0)
        winner = every[:, :, 2].argmax(dim=0)   # the first worker with the best logit, as argmax
        predicted = every[winner, torch.arange(n, device=logits.device), 3].long()
        ctx.save_for_backward(logits, total_lse, mine, idx)
        ctx.mark_non_differentiable(predicted)
        loss = (total_lse - every[:, :, 1].sum(dim=0)).mean()
        return loss, (predicted != targets).sum()

    @staticmethod
    def backward(ctx, grad: torch.Tensor, _errors_grad):
        logits, total_lse, mine, idx = ctx.saved_tensors
        g = (logits - total_lse[:, None]).exp()
        if g.shape[1]:  # minus one at the target, where this worker holds it (no host read: no nonzero())
            g.scatter_add_(1, idx[:, None], -mine.to(g.dtype)[:, None])
        return g * (grad / logits.shape[0]), None, None, None


def sharded_loss_and_errors(logits: torch.Tensor, targets: torch.Tensor, offset: int,
                            comm: Comm) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy (differentiable) and the count of top-1 errors over
    class-sharded ``logits``: the same values on every worker, from one all-gather."""
    return _ShardedCrossEntropy.apply(logits, targets, offset, comm)


def sharded_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, offset: int, comm: Comm) -> torch.Tensor:
    """Mean cross-entropy over class-sharded ``logits`` (same value on every worker)."""
    return sharded_loss_and_errors(logits, targets, offset, comm)[0]


def sharded_top_classes(logits: torch.Tensor, k: int, views: int, offset: int, classes: int,
                        comm: Comm) -> torch.Tensor:
    """The ``k`` best of ``classes`` classes of every example (best first, the same on
    every worker) where worker r holds the logits of classes [offset, offset + C_r): each
    worker's own ``k`` best, then one all-gather of K x k (score, class) pairs per example.
    With ``views`` > 1 (consecutive rows: one example's views) the score is the mean softmax,
    its normaliser from one all-gather of every worker's log-sum-exp per row. The full
    logits (N x classes, 6 GB per worker for a K=4 hybrid's evaluation at 10^6 classes)
    are never assembled."""
    local = logits.float()
    rows, c = local.shape
    with comm.exact():   # scores and class indices stay exact on the wire
        if views > 1:
            lse = local.logsumexp(1) if c else local.new_full((rows,), float("-inf"))
            every_lse = lse.new_empty(comm.size * rows)
            comm.all_gather(every_lse, lse.contiguous(), tag="eval")
            local = (local - every_lse.view(comm.size, rows).logsumexp(0)[:, None]).exp()
            local = local.view(rows // views, views, c).mean(1)
        n, mine = local.shape[0], min(k, c)
        scores = local.new_full((n, k), float("-inf"))   # an empty or narrow shard pads with -inf
        index = torch.zeros(n, k, dtype=torch.float64, device=local.device)
        if mine:
            best = local.topk(mine, dim=1)
            scores[:, :mine] = best.values
            index[:, :mine] = (best.indices + offset).double()   # float64: exact class indices
        mine_pairs = torch.stack([scores.double(), index]).contiguous()
        pairs = mine_pairs.new_empty(comm.size * mine_pairs.numel())
        comm.all_gather(pairs, mine_pairs.flatten(), tag="eval")
    pairs = pairs.view(comm.size, 2, n, k).permute(1, 2, 0, 3).reshape(2, n, comm.size * k)
    winners = pairs[0].topk(min(k, classes), dim=1).indices
    return pairs[1].gather(1, winners).long()

