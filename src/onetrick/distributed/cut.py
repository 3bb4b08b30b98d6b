"""Where the hybrid cuts a network between its data- and model-parallel layers.

``--cut N`` moves the first N Linear layers of the head (with the activations and
dropout that follow them) to the data-parallel side: they run with the trunk on each
worker's own examples, and their weights are synchronised with the trunk's. The model
is not changed: :func:`split_at_cut` returns a view of the same modules, re-split, and
parameter names stay the plain model's (``trunk.…``, ``head.<index>.…`` with the
head's own indices), so checkpoints written at any cut load at any other, or under any
other strategy.
"""
from __future__ import annotations

import torch
from torch import nn

from onetrick.models import TrunkHeadNet


class DataSide(nn.Module):
    """The trunk and the head's first layers as one module: the data-parallel side.

    Its children are ``trunk`` (the model's trunk) and ``head`` (an ``nn.Sequential`` of
    the head's first layers under their indices in the whole head), so its parameter and
    state names are exactly the whole model's. ``forward`` returns the activations at
    the cut, flattened: what the hybrid's schemes move between workers."""

    def __init__(self, trunk: nn.Module, head: nn.Sequential) -> None:
        super().__init__()
        self.trunk = trunk
        self.head = head

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.trunk(images), 1))


def cut_index(head: nn.Sequential, cut: int) -> int:
    """Position in ``head`` of the first model-parallel layer: its ``cut``-th Linear
    (0-based). Raises ValueError (one line) when the head has no such Linear."""
    linears = [i for i, layer in enumerate(head) if isinstance(layer, nn.Linear)]
    if not 0 <= cut < len(linears):
        raise ValueError(f"--cut {cut} must be below the {len(linears)} fully-connected layers of the head "
                         f"(0..{len(linears) - 1}): at least one must stay model-parallel")
    return linears[cut]


def split_at_cut(model: TrunkHeadNet, cut: int) -> TrunkHeadNet:
    """A view of ``model`` sharing its modules: trunk' = :class:`DataSide` (trunk,
    flatten, the head up to its ``cut``-th Linear), head' = the rest of the head, its
    children keeping their names (``head[i:]`` of an ``nn.Sequential`` keeps them)."""
    at = cut_index(model.head, cut)
    return TrunkHeadNet(DataSide(model.trunk, model.head[:at]), model.head[at:])
