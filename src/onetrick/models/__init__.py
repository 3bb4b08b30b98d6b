"""Model zoo: every model is a plain :class:`TrunkHeadNet`."""
from __future__ import annotations

from onetrick.models.base import ELEMENTWISE, TrunkHeadNet, fc_head, unshardable
from onetrick.models.split import as_trunk_head

__all__ = ["ELEMENTWISE", "MODELS", "TrunkHeadNet", "as_trunk_head", "build_model", "builds", "check_model",
           "fc_head", "input_size", "meta_model", "unshardable"]

#: Models built in this process so far, by kind: a launch should describe its model once
#: (``run/description.py``), and a test counts it here (:func:`builds`).
_BUILDS = {"meta": 0, "real": 0}


def builds() -> dict[str, int]:
    """How many models this process has built: ``{"meta": ..., "real": ...}`` (a
    ``check_model`` of a torchvision name counts as a meta build: it builds one)."""
    return dict(_BUILDS)


def _registry():
    from onetrick.models.alexnet import alexnet, alexnet2012
    from onetrick.models.smallnet import smallnet

    return {"alexnet": alexnet, "alexnet2012": alexnet2012, "smallnet": smallnet}


#: The built-in models; ``torchvision:NAME`` (e.g. ``torchvision:vgg16``) names torchvision's.
MODELS = ("smallnet", "alexnet", "alexnet2012")


def build_model(name: str, num_classes: int, in_channels: int = 3, dropout: float = 0.5) -> TrunkHeadNet:
    """Build a model by name with its initialisation (deterministic under torch.manual_seed)."""
    _BUILDS["real"] += 1
    return _build(name, num_classes, in_channels, dropout)


def _build(name: str, num_classes: int, in_channels: int, dropout: float) -> TrunkHeadNet:
    from onetrick.models.vision import PREFIX, torchvision_model

    if name.startswith(PREFIX):
        return torchvision_model(name[len(PREFIX):], num_classes, in_channels, dropout)
    registry = _registry()
    if name not in registry:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(MODELS)}, or torchvision:NAME")
    return registry[name](num_classes=num_classes, in_channels=in_channels, dropout=dropout)


def meta_model(name: str, num_classes: int, in_channels: int = 3, dropout: float = 0.5) -> TrunkHeadNet:
    """The model on PyTorch's ``meta`` device: shapes and parameter counts, no memory."""
    import torch

    from onetrick.models.vision import PREFIX, meta_torchvision

    _BUILDS["meta"] += 1
    if name.startswith(PREFIX):
        return meta_torchvision(name[len(PREFIX):], num_classes, in_channels, dropout)
    with torch.device("meta"):
        return _build(name, num_classes, in_channels, dropout)


def check_model(name: str, image_size: int | None = None) -> None:
    """Raise ValueError (one line) unless ``name`` builds, and runs at ``image_size``
    (torchvision models: checked on the meta device, nothing allocated)."""
    from onetrick.models.vision import PREFIX, check_torchvision

    if name.startswith(PREFIX):
        _BUILDS["meta"] += 1
        check_torchvision(name[len(PREFIX):], image_size or input_size(name))
    elif name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(MODELS)}, or torchvision:NAME")


def input_size(name: str) -> int:
    """The image side a model is designed for (its default ``--image-size``)."""
    return 32 if name == "smallnet" else 224
