"""The small interface every parallelism implements, and the one-worker baseline.

A strategy wraps a plain :class:`~onetrick.models.TrunkHeadNet`, runs one training step
on this worker's part of the batch (forward, backward, communication, update), computes
logits for evaluation, reports the bytes it sent (via ``self.comm``), and exposes its
state in the canonical form ``{"model": {param: tensor}, "momentum": {param: tensor}}``
that checkpoints store (sharded strategies return DTensors there).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..config import TrainConfig
from ..models import TrunkHeadNet
from ..recipe import lr_scale_factor, model_sgd
from .comm import Comm
from .runtime import Runtime


@dataclass
class StepOutput:
    """Loss and top-1 errors over the *global* batch (all workers' examples)."""

    loss: float
    errors: int
    count: int


class Strategy:
    """Base class: one process, or a data-parallel group of them (see subclasses)."""

    name = "single"

    def __init__(self, model: TrunkHeadNet, cfg: TrainConfig, rt: Runtime) -> None:
        self.cfg = cfg
        self.rt = rt
        self.model = model.to(rt.device)
        self.comm = Comm()
        self.nonfinite = False

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

    @torch.no_grad()
    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)

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
        """Sum loss, errors and count over the data-parallel workers (one tiny all-reduce)."""
        errors = (logits.argmax(1) != targets).sum()
        stats = torch.stack([loss_sum.detach().float(), errors.float(), torch.tensor(float(len(targets)), device=logits.device)])
        if self.data_world > 1:
            self.comm.all_reduce(stats, tag="metrics")
        self.nonfinite = not bool(torch.isfinite(stats[0]))
        return StepOutput(loss=float(stats[0] / stats[2]), errors=int(stats[1]), count=int(stats[2]))


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
        loss = F.cross_entropy(logits, targets)
        loss.backward()
        out = self.global_stats(loss * len(targets), logits, targets)
        if not self.nonfinite:
            self.optimizer.step()
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
