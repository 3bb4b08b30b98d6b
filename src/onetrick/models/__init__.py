"""Model zoo: every model is a plain :class:`TrunkHeadNet`."""
from __future__ import annotations

from .base import TrunkHeadNet, fc_head

__all__ = ["MODELS", "TrunkHeadNet", "build_model", "fc_head", "input_size"]


def _registry():
    from .alexnet import alexnet, alexnet2012
    from .smallnet import smallnet

    return {"alexnet": alexnet, "alexnet2012": alexnet2012, "smallnet": smallnet}


MODELS = ("smallnet", "alexnet", "alexnet2012")


def build_model(name: str, num_classes: int, in_channels: int = 3, dropout: float = 0.5) -> TrunkHeadNet:
    """Build a model by name with the paper's initialisation (deterministic under torch.manual_seed)."""
    registry = _registry()
    if name not in registry:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(MODELS)}")
    return registry[name](num_classes=num_classes, in_channels=in_channels, dropout=dropout)


def input_size(name: str) -> int:
    """The image side a model is designed for (its default ``--image-size``)."""
    return 32 if name == "smallnet" else 224
