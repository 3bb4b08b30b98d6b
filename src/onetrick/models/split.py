"""Turning a user's model into a :class:`TrunkHeadNet` without changing what it computes.

The strategies need to know where the convolutional trunk ends. A model says so by being a
:class:`TrunkHeadNet`, by having torchvision's ``features`` / ``classifier`` children, or
by the caller naming the child module where the head starts (``head="fc"``; for an
``nn.Sequential`` the index, ``head="6"``). The children before that one become the trunk,
that child and the ones after it the head; the trunk's output is flattened in between,
which is exactly what torchvision's AlexNet and VGG do in ``forward``.
"""
from __future__ import annotations

from collections import OrderedDict

from torch import nn

from onetrick.models.base import TrunkHeadNet


def as_trunk_head(model: nn.Module, head: str | None = None) -> TrunkHeadNet:
    """``model`` as a TrunkHeadNet sharing its modules (and so its weights).

    Parameter names keep the children's names: torchvision's ``features.0.weight``
    becomes ``trunk.features.0.weight`` and ``classifier.1.weight`` becomes
    ``head.1.weight``. Raises ValueError (one line) when the split point is unknown.
    """
    if isinstance(model, TrunkHeadNet) and head in (None, "head"):
        return model
    kind = type(model).__name__
    if head is None:
        if not (hasattr(model, "features") and hasattr(model, "classifier")):
            raise ValueError(f"cannot tell where the trunk of {kind} ends: pass a TrunkHeadNet, a model with "
                             "`features` and `classifier` children, or head=NAME (the child where the head starts)")
        head = "classifier"
    children = list(model.named_children())
    names = [name for name, _ in children]
    if head not in names:
        raise ValueError(f"{kind} has no child module {head!r} to start the head at; its children are: {', '.join(names)}")
    at = names.index(head)
    if at == 0:
        raise ValueError(f"head={head!r} is {kind}'s first child: the trunk would be empty")
    trunk = nn.Sequential(OrderedDict(children[:at]))
    rest = children[at:]
    if len(rest) == 1 and isinstance(rest[0][1], nn.Sequential):
        return TrunkHeadNet(trunk, rest[0][1])
    return TrunkHeadNet(trunk, nn.Sequential(OrderedDict(rest)))
