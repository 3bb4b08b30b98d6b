"""The network as the cost model sees it: a list of :class:`Block`.

A block is every layer with weights plus the weightless layers that follow it
(``conv2 -> relu2 -> norm2 -> pool2`` is one block). A dry run on one example gives each
block's shapes and multiply-adds; the head's blocks also record their ``Linear``'s
``(in_features, out_features)``, the shape a neuron-sharded layer splits.

A trunk that is not an ``nn.Sequential`` (a torchvision model, which keeps its own
``forward``) is split the same way into the *units* its forward runs one after another:
its children, every ``nn.Sequential`` among them opened into its children (a ResNet:
``conv1``, ``bn1`` ... ``layer1.0`` ... ``layer4.1``, ``avgpool``). The split must be
exact: every unit called once on one tensor and every parameter inside a unit, or the
trunk stays one block (alexnet2012's towers, ViT's class token). Blocks matter for the
gradient buckets: a data-parallel worker sends a bucket once its last block's backward is
done, so a one-block trunk would send every trunk gradient after the whole backward.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass, field

import torch
from torch import nn

__all__ = ["TIMED_CLASSES", "Block", "activation_bytes", "describe", "model_blocks", "numel"]

#: the widest classifier :func:`model_blocks` builds for real (a wider one is described on
#: the meta device): what :class:`~onetrick.perf.measure.block_times.MeasuredCosts` times a
#: whole step at
TIMED_CLASSES = 1000


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


def _units(trunk: nn.Module, prefix: str = "") -> list[tuple[str, nn.Module]]:
    """The trunk's children, each ``nn.Sequential`` among them opened, recursively."""
    out: list[tuple[str, nn.Module]] = []
    for name, child in trunk.named_children():
        if isinstance(child, nn.Sequential):
            out += _units(child, f"{prefix}{name}.")
        else:
            out.append((f"{prefix}{name}", child))
    return out


def _unit_groups(trunk: nn.Module, x: torch.Tensor) -> tuple[list[tuple[torch.Tensor | None, list[tuple[str, nn.Module]]]], torch.Tensor]:
    """An opaque trunk's units in call order, grouped into blocks (each unit with weights
    starts one, as does a unit whose input is not the previous one's output shape: the
    forward flattened between them), each group with its input; and the trunk's output.
    One group of the whole trunk where the split is not exact (module docstring)."""
    units = _units(trunk)
    calls: list[tuple[str, nn.Module, tuple, object]] = []
    handles = [m.register_forward_hook(lambda mod, args, out, n=n: calls.append((n, mod, args, out)))
               for n, m in units]
    try:
        with torch.no_grad():
            y = trunk(x)
    finally:
        for h in handles:
            h.remove()
    covered = {id(p) for _, m in units for p in m.parameters()}
    exact = (sorted(n for n, *_ in calls) == sorted(n for n, _ in units)
             and all(len(a) == 1 and isinstance(a[0], torch.Tensor) and isinstance(o, torch.Tensor) for *_, a, o in calls)
             and all(id(p) in covered for p in trunk.parameters()))
    if not exact:
        return [(x, [("", trunk)])], y
    groups: list[tuple[torch.Tensor | None, list[tuple[str, nn.Module]]]] = []
    last_out: torch.Size | None = None
    for name, mod, (inp,), out in calls:
        weighted = any(True for _ in mod.parameters())
        if not groups or weighted or inp.shape != last_out:
            groups.append((inp, []))
        groups[-1][1].append((name, mod))
        last_out = out.shape
    return groups, y


def _trunk_blocks(trunk: nn.Module, x: torch.Tensor) -> tuple[list[Block], torch.Tensor]:
    """The trunk's blocks on input ``x`` (one example) and its output, flattened."""
    if isinstance(trunk, nn.Sequential):   # each group's input is the previous group's output
        groups, y = [(None, mods) for _, mods in _group(trunk, "trunk")], None
    else:
        groups, y = _unit_groups(trunk, x)
    blocks: list[Block] = []
    for inp, mods in groups:
        inp = x if inp is None else inp
        seq = nn.Sequential(*[m for _, m in mods])
        params = [(f"trunk.{n}.{p}" if n else f"trunk.{p}", q.numel()) for n, m in mods for p, q in m.named_parameters()]
        x, macs = _macs(seq, inp)
        blocks.append(Block(mods[0][0] or "trunk", "trunk", seq, params, macs, tuple(inp.shape[1:]), tuple(x.shape[1:]),
                            towers=len(getattr(trunk, "towers", ()))))
    if y is not None:   # the trunk's own output: what its forward does after its last unit (pooling, flattening)
        blocks[-1].out_shape = tuple(y.shape[1:])
        x = y
    return blocks, torch.flatten(x, 1)


def describe(model: nn.Module, image_size: int, in_channels: int = 3, classes: int | None = None) -> list[Block]:
    """Blocks of a :class:`~onetrick.models.TrunkHeadNet`, trunk then head, real or on the
    meta device (the same shapes and multiply-adds, and a 10^7-class head costs nothing).
    ``classes``: describe the classifier (the head's last Linear) this wide, on the meta
    device, instead of as built (:func:`model_blocks`: a real model to time, built narrow)."""
    was_training = model.training
    model.eval()
    image = torch.zeros(1, in_channels, image_size, image_size, device=_device(model, torch.device("cpu")))
    blocks, x = _trunk_blocks(model.trunk, image)
    head = model.head if classes is None else _widened(model.head, classes)
    for name, mods in _group(head, "head"):
        seq = nn.Sequential(*[m for _, m in mods])
        params = [(f"head.{n}.{p}", q.numel()) for n, m in mods for p, q in m.named_parameters()]
        out, macs = _macs(seq, x.to(_device(seq, x.device)))
        lin = mods[0][1]
        linear = (lin.in_features, lin.out_features) if isinstance(lin, nn.Linear) else None
        blocks.append(Block(name, "head", seq, params, macs, tuple(x.shape[1:]), tuple(out.shape[1:]), linear,
                            [m for _, m in mods[1:]]))
        x = out
    model.train(was_training)
    return blocks


def _device(module: nn.Module, default: torch.device) -> torch.device:
    """Where ``module``'s parameters are (``default`` for a module without any)."""
    p = next(module.parameters(), None)
    return p.device if p is not None else default


def _widened(head: nn.Sequential, classes: int) -> nn.Sequential:
    """``head`` with its classifier (its last Linear) rebuilt ``classes`` wide on the meta
    device, its other layers shared."""
    layers = list(head.named_children())
    i = max(j for j, (_, m) in enumerate(layers) if isinstance(m, nn.Linear))
    name, lin = layers[i]
    layers[i] = (name, nn.Linear(lin.in_features, classes, bias=lin.bias is not None, device="meta"))
    return nn.Sequential(OrderedDict(layers)).train(head.training)


def model_blocks(model_name: str, classes: int, image_size: int, with_model: bool = False, channels: int = 3):
    """Blocks of a named model, described on the meta device (nothing allocated: shapes and
    multiply-adds are all a FLOP count needs). With ``with_model``, ``(blocks, model)`` for
    costs timed on this machine: the model real (seed 0) but its classifier at most
    :data:`TIMED_CLASSES` wide, the blocks' classifier at the full width on the meta device.
    Time what is real and scale the rest (:mod:`~onetrick.perf.measure.block_times`): a
    10^6-class resnet50 built whole held 8 GB of classifier weights before anything was
    timed, and the planner that says whether a plan fits ran out of memory first."""
    from onetrick.models import build_model, meta_model

    if not with_model:
        return describe(meta_model(model_name, classes, channels), image_size, channels)
    torch.manual_seed(0)
    model = build_model(model_name, min(classes, TIMED_CLASSES), channels)
    return describe(model, image_size, channels, classes if classes > TIMED_CLASSES else None), model


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
