"""Tensor-side augmentation shared by the in-memory image sets (Fashion-MNIST, CIFAR-10),
and the class-stratified training subset of ``--train-examples``.

Images are held as one uint8 tensor ``(N, C, S + 2p, S + 2p)``: the ``S x S`` canvas
padded by ``p`` pixels of zeros once, at load. A training item is a random ``S x S``
crop of it (a translation by up to ``p`` pixels, the paper's crop at this scale), a
random horizontal flip where the data set allows one, then scaling to [0, 1] and the
training set's per-channel normalisation; all on tensors, drawing from torch's global
RNG, so ``loader_workers=0`` and ``--resume`` stays bit-exact.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

SUBSET_SEED = 0  # --train-examples picks the same examples whatever the run's seed


def channel_stats(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std of uint8 ``(N, C, H, W)`` images scaled to [0, 1]."""
    # From each channel's 256-bin histogram: exact, and no float copy of the whole set.
    values = torch.arange(256, dtype=torch.float64) / 255.0
    means, stds = [], []
    for c in range(images.shape[1]):
        counts = torch.bincount(images[:, c].flatten(), minlength=256).double()
        n = counts.sum()
        mean = (counts * values).sum() / n
        means.append(mean)
        stds.append(((counts * (values - mean) ** 2).sum() / (n - 1)).sqrt())
    return torch.stack(means).float(), torch.stack(stds).float().clamp_min(1e-6)


class PaddedImages(Dataset):
    """uint8 images padded by ``pad``; items are ``size x size`` crops, normalised.

    ``views=None``: training items, a random translation and (with ``flip``) a random
    mirror image. ``views=1``: the centre crop. ``views=10``: with ``flip``, the paper's
    ten views at this scale (the four corner translations ``(+-p, +-p)``, the centre, and
    their mirror images); without, the corners, the centre, the four half translations
    ``(+-p/2, +-p/2)`` and the centre again (mirror images of an asymmetric class are
    not that class). ``out_size`` other than the canvas side resizes each crop bilinearly.
    """

    def __init__(self, padded: torch.Tensor, labels: torch.Tensor, pad: int, mean: torch.Tensor,
                 std: torch.Tensor, flip: bool, views: int | None = None, out_size: int | None = None) -> None:
        self.padded, self.labels, self.pad, self.flip, self.views = padded, labels, pad, flip, views
        self.size = padded.shape[-1] - 2 * pad
        self.out_size = out_size or self.size
        self.mean, self.std = mean.view(-1, 1, 1), std.view(-1, 1, 1)
        p, h = pad, pad // 2
        corners = [(-p, -p), (-p, p), (p, -p), (p, p), (0, 0)]
        self.shifts = corners + ([] if flip else [(-h, -h), (-h, h), (h, -h), (h, h), (0, 0)])

    def __len__(self) -> int:
        return len(self.labels)

    def _crop(self, index: int, dy: int, dx: int) -> torch.Tensor:
        y, x, s = self.pad + dy, self.pad + dx, self.size
        image = (self.padded[index, :, y:y + s, x:x + s].float() / 255.0 - self.mean) / self.std
        if self.out_size != s:
            image = F.interpolate(image[None], size=(self.out_size, self.out_size), mode="bilinear",
                                  align_corners=False)[0]
        return image

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        label = int(self.labels[index])
        if self.views is None:
            dy, dx = (torch.randint(0, 2 * self.pad + 1, (2,)) - self.pad).tolist() if self.pad else (0, 0)
            image = self._crop(index, dy, dx)
            if self.flip and bool(torch.randint(0, 2, ())):
                image = image.flip(-1)
            return image, label
        if self.views == 1:
            return self._crop(index, 0, 0), label
        crops = [self._crop(index, dy, dx) for dy, dx in self.shifts]
        if self.flip:
            crops += [c.flip(-1) for c in crops]
        return torch.stack(crops), label

    def select(self, indices: torch.Tensor) -> PaddedImages:
        """The same data set restricted to ``indices`` (``--train-examples``)."""
        return PaddedImages(self.padded[indices].clone(), self.labels[indices].clone(), self.pad, self.mean.flatten(),
                            self.std.flatten(), self.flip, self.views, self.out_size)

    def with_views(self, views: int | None) -> PaddedImages:
        """The same images with another view mode (the test sets)."""
        return PaddedImages(self.padded, self.labels, self.pad, self.mean.flatten(), self.std.flatten(), self.flip,
                            views, self.out_size)


def pad_images(images: torch.Tensor, canvas: int, pad: int) -> torch.Tensor:
    """uint8 ``(N, C, H, W)`` centred on a zero ``canvas x canvas`` square (resized down
    first where larger), then padded by ``pad`` more zeros on every side."""
    if images.shape[-1] > canvas:
        images = F.interpolate(images.float(), size=(canvas, canvas), mode="bilinear", align_corners=False,
                               antialias=True).round().clamp(0, 255).to(torch.uint8)
    h, w = images.shape[-2:]
    top, left = (canvas - h) // 2 + pad, (canvas - w) // 2 + pad
    return F.pad(images, (left, canvas + 2 * pad - w - left, top, canvas + 2 * pad - h - top))


def stratified_indices(labels: torch.Tensor, n: int, seed: int = SUBSET_SEED) -> torch.Tensor:
    """``n`` positions of ``labels``, each class in proportion to its share (largest
    remainders round), chosen at random by ``seed``; sorted, so the subset keeps the
    original order."""
    labels = torch.as_tensor(labels)
    classes, counts = labels.unique(return_counts=True)
    quota = counts.double() * n / len(labels)
    take = quota.floor().long()
    short = n - int(take.sum())
    take[(quota - take).argsort(descending=True, stable=True)[:short]] += 1
    gen = torch.Generator().manual_seed(seed)
    chosen = []
    for c, k in zip(classes.tolist(), take.tolist()):
        members = (labels == c).nonzero().flatten()
        chosen.append(members[torch.randperm(len(members), generator=gen)[:k]])
    return torch.cat(chosen).sort().values
