"""torchvision's classification networks as :class:`TrunkHeadNet` s: ``--model torchvision:NAME``.

A network qualifies when it has ``features`` and ``classifier`` children and its forward
pass is ``classifier(flatten(avgpool(features(x))))`` (AlexNet, the VGGs): ``features`` and
``avgpool`` become the trunk, ``classifier`` the head. Weights are torchvision's own
initialisation (``weights=None``: nothing is downloaded), deterministic under
``torch.manual_seed``. Input with other than 3 channels (the 1-channel digits) gets a new
first convolution of the same shape otherwise.
"""
from __future__ import annotations

import torch
from torch import nn

from .base import TrunkHeadNet
from .split import as_trunk_head

PREFIX = "torchvision:"


def _construct(name: str, num_classes: int, dropout: float) -> nn.Module:
    import torchvision

    if name not in torchvision.models.list_models(module=torchvision.models):
        raise ValueError(f"unknown torchvision model {name!r}; e.g. torchvision:alexnet, torchvision:vgg11, torchvision:vgg16")
    try:
        return torchvision.models.get_model(name, weights=None, num_classes=num_classes, dropout=dropout)
    except TypeError:  # a constructor without a dropout option
        return torchvision.models.get_model(name, weights=None, num_classes=num_classes)


def _replace_first_conv(model: nn.Module, in_channels: int) -> None:
    for parent in model.modules():
        for child_name, child in parent.named_children():
            if isinstance(child, nn.Conv2d):
                setattr(parent, child_name, nn.Conv2d(in_channels, child.out_channels, child.kernel_size,
                                                      child.stride, child.padding, child.dilation, child.groups,
                                                      bias=child.bias is not None))
                return


def torchvision_model(name: str, num_classes: int, in_channels: int = 3, dropout: float = 0.5) -> TrunkHeadNet:
    """torchvision's ``NAME`` (untrained) split into trunk (``features``, ``avgpool``) and head.

    Parameter names: ``trunk.features.0.weight`` ... and ``head.1.weight`` ... (the
    ``classifier``'s indices). Raises ValueError (one line) for an unknown name or a
    network without ``features`` and ``classifier``.
    """
    model = _construct(name, num_classes, dropout)
    if not (hasattr(model, "features") and hasattr(model, "classifier")):
        raise ValueError(f"torchvision:{name} has no `features` and `classifier` to split into trunk and head; "
                         "use e.g. torchvision:alexnet, torchvision:vgg11 or torchvision:vgg16")
    if in_channels != 3:
        _replace_first_conv(model, in_channels)
    return as_trunk_head(model)


def check_torchvision(name: str, image_size: int, in_channels: int = 3) -> None:
    """Build ``NAME`` on the meta device (no memory, no time) and run a meta image of
    ``image_size`` through trunk and head: a one-line ValueError if either fails."""
    with torch.device("meta"):
        model = torchvision_model(name, num_classes=10, in_channels=in_channels)
        try:
            model(torch.empty(1, in_channels, image_size, image_size))
        except RuntimeError as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ValueError(f"torchvision:{name} does not run on {image_size}x{image_size} images: {first}") from None
