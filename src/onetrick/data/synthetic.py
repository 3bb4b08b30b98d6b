"""Synthetic images for benchmarks: ``synthetic`` / ``synthetic:NUM_CLASSES`` (default 1000).

100,000 training and 1,000 test images, 3 channels, each image (standard normal pixels)
and its label drawn from a ``torch.Generator`` seeded by the split and index only,
generated on access so memory stays small at 224x224. No augmentation; labels are
random, so nothing can be learnt. ``loader_workers=0``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.data import Dataset

from onetrick.data.bundle import DataBundle

SYNTHETIC_TRAIN = 100_000
SYNTHETIC_TEST = 1_000
SYNTHETIC_CLASSES = 1000


class SyntheticImages(Dataset):
    """Standard normal images and uniform random labels, generated per index from a
    generator seeded by ``(split, index)``: the same item every time, in any process.
    Ten views are the image five times and its mirror image five times (the shape of
    the real multi-view test, for timing)."""

    def __init__(self, length: int, num_classes: int, size: int, split: int, views: int = 1) -> None:
        self.length, self.num_classes, self.size, self.split, self.views = length, num_classes, size, split, views

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if not 0 <= index < self.length:
            raise IndexError(index)
        gen = torch.Generator().manual_seed(self.split * 1_000_003 + index)
        label = int(torch.randint(self.num_classes, (1,), generator=gen))
        image = torch.randn(3, self.size, self.size, generator=gen)
        if self.views == 10:
            image = torch.stack([image] * 5 + [image.flip(-1)] * 5)
        return image, label


@dataclass
class _SyntheticTestFactory:
    num_classes: int
    size: int

    def __call__(self, views: int) -> Dataset:
        return SyntheticImages(SYNTHETIC_TEST, self.num_classes, self.size, split=1, views=views)


def build_synthetic(num_classes: int, image_size: int) -> DataBundle:
    train = SyntheticImages(SYNTHETIC_TRAIN, num_classes, image_size, split=0)
    return DataBundle(name=f"synthetic:{num_classes}", train=train, num_classes=num_classes, in_channels=3,
                      image_size=image_size, loader_workers=0,
                      test_factory=_SyntheticTestFactory(num_classes, image_size))
