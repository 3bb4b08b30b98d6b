"""The model of one launch, described once before any worker starts.

Every step of a launch before the workers asks something of the model and its data:
preflight's checks (the image size, ``--lr-mult``'s names, ``--cut``'s range, the batch
against the training set, the warm-up, the memory), the planner of ``--strategy auto`` /
``--scheme auto`` (its memory check), and summary.json's ``predicted_memory``. They all
read one :class:`ModelDescription`, made by :func:`describe`: the model built once on
PyTorch's ``meta`` device (shapes and parameter counts, no memory, so a 1,000,000-class
head costs nothing), the data's classes, channels, image size and training-set size, and
what the memory model needs of the network (:class:`~onetrick.perf.predict.activations.NetMemory`,
measured lazily on that same meta model). A user's own model (:func:`onetrick.fit`) is
described as it is, without a build.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import nn

from onetrick.config import ConfigError, TrainConfig
from onetrick.perf.predict.activations import NetMemory

if TYPE_CHECKING:
    from onetrick.data import DataBundle
    from onetrick.run.source import Source

__all__ = ["ModelDescription", "check_model_and_data", "describe"]


@dataclass(frozen=True)
class ModelDescription:
    """One launch's model and data, as the launcher's checks and predictions need them."""

    model: nn.Module          # a TrunkHeadNet on the meta device (or the user's own, as given)
    data_name: str
    classes: int              # the classifier's width: the data's classes, or --classes
    channels: int
    image_size: int
    train_size: int           # training examples (after --train-examples)
    net: NetMemory | None     # None where the meta device cannot describe the network
    head_linears: int         # the head's nn.Linear layers: --cut ranges over 0..head_linears-1


def describe(cfg: TrainConfig, source: Source | None = None) -> ModelDescription:
    """The description of ``cfg``'s run: ``--data`` checked (and downloaded, with
    ``--download``) and built as the workers will build it, ``--model`` built once on the
    meta device. One-line ConfigError/DataError for a bad name or spec. ``source``: the
    user's own model and data (:func:`onetrick.fit`), described as they are."""
    if source is not None:
        return _described(source.model, source.data, cfg.model)
    from onetrick.models import meta_model
    from onetrick.run.worker_setup import run_data

    check_data(cfg)
    data = run_data(cfg)
    try:
        model = meta_model(cfg.model, num_classes=data.num_classes, in_channels=data.in_channels, dropout=cfg.dropout)
    except ValueError as err:   # an unknown name, a network without a fully-connected head to split
        raise ConfigError(str(err)) from None
    return _described(model, data, cfg.model)


def check_model_and_data(cfg: TrainConfig) -> None:
    """``--model`` (its name, and a torchvision model's image size) and ``--data`` (its
    form and files; the download with ``--download``), in one line each, without reading
    the data: for a command that checks before its first run starts (``onetrick study``)."""
    from onetrick.models import check_model

    try:
        check_model(cfg.model, cfg.image_size)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    check_data(cfg)


def check_data(cfg: TrainConfig) -> None:
    """--data, --train-examples and --download, checked (and the download done, once) in
    the launching process: a missing file fails here, not in K workers."""
    from onetrick.data import DataError, check_spec

    try:
        check_spec(cfg.data, cfg.train_examples, cfg.download)
    except DataError as err:
        raise ConfigError(str(err)) from None


def _described(model: nn.Module, data: DataBundle, label: str) -> ModelDescription:
    try:
        net = NetMemory.from_model(model, data.image_size, data.in_channels, label)
    except (ValueError, RuntimeError, NotImplementedError, TypeError, AttributeError, StopIteration):
        net = None   # a model the meta device cannot describe: nothing to predict from
    return ModelDescription(model=model, data_name=data.name, classes=data.num_classes, channels=data.in_channels,
                            image_size=data.image_size, train_size=len(data.train), net=net,
                            head_linears=sum(isinstance(m, nn.Linear) for m in model.head))
