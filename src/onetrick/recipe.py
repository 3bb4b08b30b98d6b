"""The paper's optimisation recipe: parameter groups, SGD, learning-rate schedules."""
from __future__ import annotations

import fnmatch
import math
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from onetrick.config import TrainConfig


def lr_scale_factor(mode: str, k: int) -> float:
    """Learning-rate multiplier for a batch K times larger than one worker's."""
    return {"none": 1.0, "linear": float(k), "sqrt": math.sqrt(k)}[mode]


def layer_multiplier(name: str, patterns: Sequence[str]) -> float:
    """Per-layer multiplier from ``GLOB=MULT`` patterns; the last matching pattern wins."""
    mult = 1.0
    for item in patterns:
        glob, value = item.split("=", 1)
        if fnmatch.fnmatch(name, glob):
            mult = float(value)
    return mult


def param_groups(named_params: Iterable[tuple[str, torch.Tensor]], cfg: TrainConfig, lr: float) -> list[dict]:
    """One SGD group per parameter: weights get ``lr`` and weight decay, biases
    ``bias_lr_mult * lr`` and none (docs/PAPER.md), both times any ``--lr-mult``.

    Each group keeps ``base_lr`` (its rate before the schedule), ``warmup_lr`` (the same
    parameter's rate at one worker, ``cfg.lr`` in place of ``lr``: where the warm-up starts)
    and ``name``.
    """
    groups = []
    for name, p in named_params:
        is_bias = name.endswith("bias")
        base = lr * layer_multiplier(name, cfg.lr_mult) * (cfg.bias_lr_mult if is_bias else 1.0)
        groups.append({"params": [p], "name": name, "base_lr": base, "lr": base, "warmup_lr": base * cfg.lr / lr,
                       "weight_decay": 0.0 if is_bias else cfg.weight_decay})
    return groups


def make_sgd(groups: list[dict], cfg: TrainConfig) -> torch.optim.SGD:
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)


def model_sgd(module: nn.Module, cfg: TrainConfig, lr: float, prefix: str = "") -> torch.optim.SGD:
    """SGD over a module's parameters with the recipe's groups."""
    named = ((prefix + n, p) for n, p in module.named_parameters())
    return make_sgd(param_groups(named, cfg, lr), cfg)


def schedule_factor(cfg: TrainConfig, step: int, total_steps: int) -> float:
    """Multiplier on every group's ``base_lr`` at ``step`` (0-based) of ``total_steps``.

    step: divide by ``1/lr_drop_factor`` at each fraction in ``lr_drops`` (the paper's stepped
    schedule); const; linear: decay to 0; exp: decay to ``lr_drop_factor`` at the end.
    """
    frac = step / max(1, total_steps)
    if cfg.schedule == "const":
        return 1.0
    if cfg.schedule == "linear":
        return 1.0 - frac
    if cfg.schedule == "exp":
        return cfg.lr_drop_factor ** frac
    return cfg.lr_drop_factor ** sum(frac >= d for d in cfg.lr_drops)


def warmup_progress(cfg: TrainConfig, step: int, steps_per_epoch: int) -> float:
    """How far the warm-up is at ``step`` (0-based): 0 at step 0, rising linearly to 1 at
    ``warmup_epochs * steps_per_epoch`` and 1 from then on (1 throughout without warm-up).

    The warm-up starts from the one-worker rate, not from 0 (Goyal et al. 2017): at step
    0 a K-worker run then takes one worker's step size with a K times less noisy gradient,
    which is safe, and no steps are spent at rates smaller than one worker's."""
    warmup_steps = cfg.warmup_epochs * steps_per_epoch
    return 1.0 if warmup_steps <= 0 else min(1.0, step / warmup_steps)


def set_lr(optimizers: Iterable[torch.optim.Optimizer], factor: float, warmup: float = 1.0) -> None:
    """Every group's rate: ``factor`` (the schedule) times its rate ``warmup`` of the way
    from ``warmup_lr`` to ``base_lr``. A group whose rate is not scaled with K (the
    hybrid's head under ``--fc-batch worker``) has ``warmup_lr == base_lr``: no warm-up."""
    for opt in optimizers:
        for group in opt.param_groups:
            start = group.get("warmup_lr", group["base_lr"])
            group["lr"] = factor * (start + (group["base_lr"] - start) * warmup)
