"""onetrick: train convolutional networks in parallel, the way Krizhevsky's
"One weird trick for parallelizing convolutional neural networks" does.

The Python API (docs/usage.md, "Python API"): :func:`fit`, :func:`parallelize`, :func:`load`,
:class:`TrainConfig`, :class:`TrunkHeadNet`. Imported on first use, so that
``import onetrick`` stays light.
"""
from __future__ import annotations

from typing import Any

from onetrick.version import __version__

__all__ = ["__version__", "TrainConfig", "TrunkHeadNet", "fit", "load", "parallelize"]


def __getattr__(name: str) -> Any:
    if name in ("fit", "load", "parallelize"):
        from onetrick import api

        return getattr(api, name)
    if name == "TrainConfig":
        from onetrick.config import TrainConfig

        return TrainConfig
    if name == "TrunkHeadNet":
        from onetrick.models import TrunkHeadNet

        return TrunkHeadNet
    raise AttributeError(f"module 'onetrick' has no attribute {name!r}")
