"""scikit-learn's bundled 8x8 digits (1,797 images, 10 classes, nothing downloads).

A fixed stratified split (360 test images, ``random_state=0``, independent of ``seed``
so that test sets are comparable across runs). Pixels scaled to [0, 1], upsampled
bilinearly to ``image_size``, one channel, normalised by the training set's mean and
std. Training augmentation: random translation by up to ``image_size // 16`` pixels
(pad and random crop; no flips, digits are not mirror symmetric). Multi-view testing
uses ten *translations* instead of the paper's corners + flips (see :class:`DigitsTest`).
Held in memory, ``loader_workers=0``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from onetrick.data.bundle import DataBundle

DIGITS_TEST_SIZE = 360
DIGITS_SPLIT_SEED = 0
DIGITS_TRAIN_SIZE = 1797 - DIGITS_TEST_SIZE


class DigitsTrain(Dataset):
    """In-memory digits with random translation: each item is a random ``size`` crop
    of the image padded by ``pad`` pixels (padding = the normalised background)."""

    def __init__(self, padded: torch.Tensor, labels: torch.Tensor, size: int, pad: int) -> None:
        self.padded, self.labels, self.size, self.pad = padded, labels, size, pad

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        dy, dx = (torch.randint(0, 2 * self.pad + 1, (2,)).tolist() if self.pad else (0, 0))
        image = self.padded[index, :, dy:dy + self.size, dx:dx + self.size].contiguous()
        return image, int(self.labels[index])

    def select(self, indices: torch.Tensor) -> DigitsTrain:
        """The same data set restricted to ``indices`` (``--train-examples``)."""
        part = DigitsTrain(self.padded[indices].clone(), self.labels[indices].clone(), self.size, self.pad)
        part.indices = [self.indices[i] for i in indices.tolist()]
        return part


class DigitsTest(Dataset):
    """Digits test set. One view: the untranslated image. Ten views: translations by
    the corners and centre of the training shift range (offsets ``{-p, +p}^2`` and 0)
    and by half of it (``{-p/2, +p/2}^2`` and 0), ``p = image_size // 16``. Flipped
    views would show the network mirrored digits it never trained on, so the paper's
    flips are replaced by the half shifts; the centre view counts twice."""

    def __init__(self, padded: torch.Tensor, labels: torch.Tensor, size: int, pad: int, views: int) -> None:
        self.padded, self.labels, self.size, self.pad, self.views = padded, labels, size, pad, views
        p, h = pad, pad // 2
        shifts = [(-p, -p), (-p, p), (p, -p), (p, p), (0, 0), (-h, -h), (-h, h), (h, -h), (h, h), (0, 0)]
        self.offsets = [(pad + dy, pad + dx) for dy, dx in shifts]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        s, img = self.size, self.padded[index]
        if self.views == 1:
            image = img[:, self.pad:self.pad + s, self.pad:self.pad + s].contiguous()
        else:
            image = torch.stack([img[:, y:y + s, x:x + s] for y, x in self.offsets])
        return image, int(self.labels[index])


def build_digits(image_size: int) -> DataBundle:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = torch.as_tensor(digits.images, dtype=torch.float32) / 16.0  # (N, 8, 8) in [0, 1]
    labels = torch.as_tensor(digits.target, dtype=torch.long)
    idx_train, idx_test = train_test_split(
        list(range(len(labels))), test_size=DIGITS_TEST_SIZE, stratify=digits.target,
        random_state=DIGITS_SPLIT_SEED)
    images = images[:, None]
    if image_size != images.shape[-1]:
        images = F.interpolate(images, size=(image_size, image_size), mode="bilinear", align_corners=False)
    train_images = images[idx_train]
    mean, std = train_images.mean(), train_images.std().clamp_min(1e-6)
    normalised = (images - mean) / std
    pad = image_size // 16
    background = float((0.0 - mean) / std)
    padded = F.pad(normalised, (pad, pad, pad, pad), value=background) if pad else normalised
    train_idx, test_idx = torch.tensor(idx_train), torch.tensor(idx_test)
    train = DigitsTrain(padded[train_idx].clone(), labels[train_idx].clone(), image_size, pad)
    test_padded, test_labels = padded[test_idx].clone(), labels[test_idx].clone()
    train.indices = list(idx_train)  # positions in load_digits(), for reference
    return DataBundle(
        name="digits", train=train, num_classes=10, in_channels=1, image_size=image_size, loader_workers=0,
        test_factory=_DigitsTestFactory(test_padded, test_labels, image_size, pad, list(idx_test)))


@dataclass
class _DigitsTestFactory:
    padded: torch.Tensor
    labels: torch.Tensor
    size: int
    pad: int
    indices: list

    def __call__(self, views: int) -> Dataset:
        test = DigitsTest(self.padded, self.labels, self.size, self.pad, views)
        test.indices = self.indices  # positions in load_digits()
        return test
