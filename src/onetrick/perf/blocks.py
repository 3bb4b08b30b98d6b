"""The network as the cost model sees it: a list of :class:`Block`.

A block is every layer with weights plus the weightless layers that follow it
(``conv2 -> relu2 -> norm2 -> pool2`` is one block). A dry run on one example gives each
block's shapes and multiply-adds; the head's blocks also record their ``Linear``'s
``(in_features, out_features)``, the shape a neuron-sharded layer splits.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

__all__ = ["Block", "activation_bytes", "describe", "model_blocks", "numel"]


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
        """Parameters of the block."""
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


def model_blocks(model_name: str, classes: int, image_size: int, with_model: bool = False):
    """Blocks of a named model (seed 0, 3 input channels); with ``with_model`` also the
    model itself, ``(blocks, model)``, for costs that time the whole network."""
    from ..models import build_model

    torch.manual_seed(0)
    model = build_model(model_name, classes, 3)
    blocks = describe(model, image_size, 3)
    return (blocks, model) if with_model else blocks


def activation_bytes(sent: dict) -> float:
    """Bytes of every activation tag (last-conv activations and the FC head's exchanges)."""
    return sum(v for t, v in sent.items() if "activations" in t)


def param_sizes(blocks: list[Block], k: int = 1) -> list[int]:
    """Element counts of the parameter tensors of ``blocks``, each split over ``k`` workers
    (a sharded layer's: the largest shard)."""
    return [-(-n // k) for b in blocks for _, n in b.params]


def numel(shape: tuple[int, ...]) -> int:
    """Elements of one example of ``shape``."""
    return math.prod(shape)
