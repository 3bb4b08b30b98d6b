"""A user's own model and data sets, carried to every worker in place of ``--model``/``--data``.

The launcher starts workers with ``spawn``, so a :class:`Source` reaches each of them
pickled: every worker unpickles the same initial weights and the same data sets. Their
classes must therefore be importable by name (defined at module level).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

from torch.utils.data import Dataset

from onetrick.data import DataBundle
from onetrick.models import TrunkHeadNet


class FixedTest:
    """A test-set factory for user data: one view (``views=1``) of the given data set."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __call__(self, views: int) -> Dataset:
        if views != 1:
            raise ValueError("a user's test set has one view per image: use eval_views=1")
        return self.dataset


@dataclass
class Source:
    """What ``setup`` builds from ``--model``/``--data`` otherwise: a model and its data."""

    model: TrunkHeadNet
    data: DataBundle

    def build(self) -> tuple[DataBundle, TrunkHeadNet]:
        """The data and a fresh copy of the untrained model (the original stays as given)."""
        return self.data, copy.deepcopy(self.model)


def user_data(train_set: Dataset, test_set: Dataset, num_classes: int, in_channels: int, image_size: int,
              loader_workers: int = 0) -> DataBundle:
    """Wrap a user's training and test sets (items ``(Tensor[C, H, W], int label)``)."""
    return DataBundle(name=f"custom:{type(train_set).__name__}", train=train_set, num_classes=num_classes,
                      in_channels=in_channels, image_size=image_size, loader_workers=loader_workers,
                      test_factory=FixedTest(test_set))
