"""The small interface every parallelism implements, and the one-worker baseline.

A strategy wraps a plain :class:`~onetrick.models.TrunkHeadNet`, runs one training step
on this worker's part of the batch (forward, backward, communication, update), computes
logits for evaluation, reports the bytes it sent (via ``self.comm``), and exposes its
state in the canonical form ``{"model": {param: tensor}, "momentum": {param: tensor}}``
that checkpoints store (sharded strategies return DTensors there).

``--precision bf16``: every strategy's ``train_step`` and ``logits`` run under
``torch.autocast`` in bfloat16 (on the CUDA or CPU device at hand); parameters, their
gradients and the optimizer's state stay fp32 (autocast casts copies for the matmuls and
convolutions), and the loss is taken on fp32 logits. ``--comm-dtype`` sets
``self.comm.wire_dtype`` (:class:`~onetrick.distributed.comm.Comm`).
"""
from __future__ import annotations

import functools
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from onetrick.config import TrainConfig
from onetrick.distributed.comm import Comm
from onetrick.distributed.runtime import Runtime
from onetrick.models import TrunkHeadNet
from onetrick.recipe import lr_scale_factor, model_sgd


@dataclass
class StepOutput:
    """Summed loss and top-1 errors over the *global* batch (all workers' examples), as
    device tensors: a step never waits for the device (the loop reads them on logging
    and checkpoint steps only, see :class:`StepStats`). ``finite`` (a device bool) says
    whether the loss was finite; the same on every worker."""

    loss_sum: torch.Tensor
    errors: torch.Tensor
    count: int
    finite: torch.Tensor

    @property
    def loss(self) -> float:
        """The mean loss, read from the device (a host-device sync: tests and tools only)."""
        return float(self.loss_sum) / self.count


class StepStats:
    """Sums of :class:`StepOutput` on the device between two reads, so the logged figures
    are exact over the interval and a step costs no host-device sync. Steps whose loss
    was not finite are counted (and the first one's index kept), not summed."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.sums = torch.zeros(4, dtype=torch.float64, device=self.device)  # loss, errors, count, bad steps
        self.first_bad = torch.full((), -1, dtype=torch.long, device=self.device)
        self.steps = 0

    def add(self, out: StepOutput, step: int) -> None:
        """Accumulate step ``step`` (0-based); no host read."""
        ok = out.finite
        good = torch.stack([out.loss_sum.double(), out.errors.double(), ok.double() * out.count])
        self.sums[:3] += torch.where(ok, good, torch.zeros_like(good))  # (a scalar count is a kernel argument: no copy)
        self.sums[3] += (~ok).double()
        self.first_bad = torch.where((self.first_bad < 0) & ~ok, step, self.first_bad)
        self.steps += 1

    def read(self) -> dict:
        """One host-device sync: the interval's mean loss, error rate, example count,
        non-finite steps and the first of them (-1: none). :meth:`reset` starts a new one."""
        loss, errors, count, bad, first_bad = torch.cat([self.sums, self.first_bad.double()[None]]).tolist()
        nan = float("nan")
        return {"loss": loss / count if count else nan, "train_error": errors / count if count else nan,
                "examples": int(count), "nonfinite_steps": int(bad), "first_nonfinite_step": int(first_bad)}


def top_k_classes(logits: torch.Tensor, k: int, views: int = 1) -> torch.Tensor:
    """Indices of the ``k`` best classes of every example, best first: by logit, or with
    ``views`` > 1 (rows ``i*views .. i*views+views-1`` are one example's views) by the mean
    of their softmax."""
    scores = logits.float()
    if views > 1:
        scores = scores.softmax(-1).view(-1, views, scores.shape[-1]).mean(1)
    return scores.topk(min(k, scores.shape[-1]), dim=-1).indices


def guarded_step(optimizer: torch.optim.Optimizer, finite: torch.Tensor, skip: bool) -> None:
    """``optimizer.step()``; with ``skip``, a step whose ``finite`` flag (a device bool) is
    false leaves parameters and momentum as they were, decided on the device without a
    host read (as ``torch.amp.GradScaler`` skips a step). Costs, in skip mode only, one
    copy of the stepped parameters and their momentum, and an elementwise select."""
    if not skip:
        optimizer.step()
        return
    params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    zero = torch.zeros((), device=finite.device)
    with torch.no_grad():
        for p in params:  # a masked gradient also makes accumulating "optimizers" skip
            p.grad.copy_(torch.where(finite, p.grad, zero.to(p.grad.dtype)))
        old = [p.detach().clone() for p in params]
        bufs = [optimizer.state.get(p, {}).get("momentum_buffer") for p in params]
        old_bufs = [b.clone() if b is not None else None for b in bufs]
        optimizer.step()
        for p, o, b in zip(params, old, old_bufs):
            p.copy_(torch.where(finite, p, o))
            new = optimizer.state.get(p, {}).get("momentum_buffer")
            if new is not None:  # a buffer born on a skipped step is zero: the same as none (no dampening)
                new.copy_(torch.where(finite, new, b if b is not None else zero.to(new.dtype)))


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _in_precision(fn):
    """``fn`` (a strategy method) run under the strategy's :meth:`Strategy.precision`."""
    @functools.wraps(fn)
    def run(self, *args, **kwargs):
        with self.precision():
            return fn(self, *args, **kwargs)
    return run


class Strategy:
    """Base class: one process, or a data-parallel group of them (see subclasses).

    Every subclass's ``train_step``, ``logits`` and ``top_classes`` run under :meth:`precision` (wrapped
    when the subclass is defined), so a strategy needs no code of its own for bf16."""

    name = "single"

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        for name in ("train_step", "logits", "top_classes"):
            if name in cls.__dict__:
                setattr(cls, name, _in_precision(cls.__dict__[name]))

    def __init__(self, model: TrunkHeadNet, cfg: TrainConfig, rt: Runtime) -> None:
        self.cfg = cfg
        self.rt = rt
        self.model = model.to(rt.device)
        self.comm = Comm()
        self.comm.wire_dtype = DTYPES[cfg.comm_dtype]

    def precision(self):
        """The compute precision's context: bf16 autocast on this worker's device, or none."""
        if self.cfg.precision == "bf16":
            return torch.autocast(self.rt.device.type, dtype=torch.bfloat16)
        return nullcontext()

    # -- data placement: which slice of each global batch this worker reads ----
    @property
    def data_rank(self) -> int:
        return self.rt.rank if self.cfg.data_parallel_degree > 1 else 0

    @property
    def data_world(self) -> int:
        return self.cfg.data_parallel_degree

    def base_lr(self) -> float:
        """The recipe's rate, scaled for the data-parallel batch growth (--lr-scale)."""
        return self.cfg.lr * lr_scale_factor(self.cfg.lr_scale, self.data_world)

    # -- the interface ---------------------------------------------------------
    def optimizers(self) -> list[torch.optim.Optimizer]:
        return [self.optimizer]

    def train_step(self, images: torch.Tensor, targets: torch.Tensor) -> StepOutput:
        raise NotImplementedError

    @_in_precision
    @torch.no_grad()
    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """Every class's logits for this worker's ``images`` (evaluation mode is the caller's)."""
        return self.model(images)

    @_in_precision
    @torch.no_grad()
    def top_classes(self, images: torch.Tensor, k: int = 5, views: int = 1) -> torch.Tensor:
        """The ``k`` best classes (N, min(k, classes)) of each of this worker's N examples,
        best first, from ``images`` holding ``views`` consecutive views of each (N*views
        rows: their softmax is averaged). What evaluation needs, without assembling all
        classes' logits where the head is sharded (:meth:`ShardedHeadStrategy.top_classes`)."""
        return top_k_classes(self.logits(images), k, views)

    def named_weights(self) -> list[tuple[str, torch.Tensor]]:
        """This worker's parameters under the whole model's names (for per-layer logs;
        a sharded layer gives this worker's shard)."""
        return list(self.model.named_parameters())

    def set_training(self, mode: bool) -> None:
        self.model.train(mode)

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "momentum": momentum_by_name(self.model, self.optimizer)}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        load_momentum(self.model, self.optimizer, state["momentum"])

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Unsharded model weights (identical on every worker)."""
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    # -- shared helpers ----------------------------------------------------------
    def global_stats(self, loss_sum: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor) -> StepOutput:
        """Sum loss and errors over the data-parallel workers (one tiny all-reduce on the
        device, never read here): the finite flag is then the same on every worker."""
        errors = (logits.detach().argmax(1) != targets).sum()
        loss_sum = loss_sum.detach().float()
        stats = torch.stack([loss_sum, errors.float(), loss_sum.new_full((), float(len(targets)))])  # a fill: no copy
        if self.data_world > 1:
            self.comm.all_reduce(stats, tag="metrics")
        return StepOutput(stats[0], stats[1], count=len(targets) * self.data_world, finite=torch.isfinite(stats[0]))

    def step(self, optimizer: torch.optim.Optimizer, finite: torch.Tensor) -> None:
        """Apply an update; ``--on-nan skip`` skips it on the device where the loss was not finite."""
        guarded_step(optimizer, finite, self.cfg.on_nan == "skip")


class SingleStrategy(Strategy):
    """One worker, plain PyTorch: the reference every other strategy must equal."""

    name = "single"

    def __init__(self, model: TrunkHeadNet, cfg: TrainConfig, rt: Runtime) -> None:
        super().__init__(model, cfg, rt)
        self.optimizer = model_sgd(self.model, cfg, self.base_lr())
        self.net: torch.nn.Module = self.model   # what the forward pass calls (DDP wraps it)

    def train_step(self, images: torch.Tensor, targets: torch.Tensor) -> StepOutput:
        self.optimizer.zero_grad(set_to_none=True)
        logits = self.net(images)
        loss = F.cross_entropy(logits.float(), targets)  # the loss in fp32 (a no-op at fp32)
        loss.backward()
        out = self.global_stats(loss * len(targets), logits, targets)
        self.step(self.optimizer, out.finite)
        return out


def momentum_by_name(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """SGD momentum buffers keyed by parameter name (zeros before the first step)."""
    out = {}
    for name, p in model.named_parameters():
        buf = optimizer.state.get(p, {}).get("momentum_buffer")
        out[name] = buf.detach().clone() if buf is not None else torch.zeros_like(p)
    return out


def load_momentum(model: torch.nn.Module, optimizer: torch.optim.Optimizer, momentum: dict[str, torch.Tensor]) -> None:
    for name, p in model.named_parameters():
        optimizer.state[p]["momentum_buffer"] = momentum[name].to(p.device).clone()
