"""torchvision ``ImageFolder`` layout: ``PATH/train/<class>/*`` and ``PATH/val/<class>/*``.

``PATH/test`` is accepted instead of ``val``. The paper's preprocessing: shorter side
resized to ``r = image_size * 256 // 224`` and the central ``r x r`` square kept (the
stored 256x256 image of cuda-convnet2); training takes a random ``image_size`` crop of
it plus a random horizontal flip; test takes the centre crop (1 view) or torchvision's
``TenCrop`` (4 corners + centre and their flips). Pixels are scaled to [0, 1], the
ImageNet channel means are subtracted and the result divided by the ImageNet channel
stds (torchvision's convention; the paper subtracts the mean only, on a 0..255 scale).
PCA colour noise is not applied. A class folder without an image (in train/ or val/)
is refused when the data set is built: its classifier output could never be right, yet
the run would train and test on the other classes without a word. Corrupt images raise
``DataError("corrupt image: PATH (reason)")`` when read, or, with ``skip_corrupt=True``,
are replaced by the next readable image of the same split; the skipped paths are listed
in ``dataset.skipped`` and a :class:`CorruptImageSkipped` warning of one line (no source
line) is issued once per path, however many DataLoader workers, epochs and evaluations
read it (the flags live in shared memory, so the workers a DataLoader forks each epoch
see them). ``loader_workers=2``.
"""
from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset

from onetrick.data.bundle import IMAGENET_MEAN, IMAGENET_STD, DataBundle, DataError


class CorruptImageSkipped(RuntimeWarning):
    """An unreadable image that ``--skip-corrupt`` replaced; shown as one line."""


_plain_format = warnings.formatwarning


def _one_line(message, category, filename, lineno, line=None) -> str:
    """:class:`CorruptImageSkipped` as ``onetrick: warning: MESSAGE``: the file and source
    line warnings add by default would double every line of a long list of bad images.
    Every other warning keeps Python's format."""
    if issubclass(category, CorruptImageSkipped):
        return f"onetrick: warning: {message}\n"
    return _plain_format(message, category, filename, lineno, line)


warnings.formatwarning = _one_line


class ImageFiles(Dataset):
    """``(path, label)`` samples read with PIL and passed through ``transform``.

    A file PIL cannot read raises ``DataError("corrupt image: PATH (reason)")``, or, with
    ``skip_corrupt``, is replaced by the next readable file (wrapping around); its path
    joins ``self.skipped`` and is warned about once. ``_flags`` (shared memory: one byte
    per sample, 1 once skipped) makes that once across the DataLoader workers too."""

    def __init__(self, samples: list[tuple[str, int]], transform: Callable, skip_corrupt: bool) -> None:
        self.samples, self.transform, self.skip_corrupt = samples, transform, skip_corrupt
        self.targets = [label for _, label in samples]
        self._flags = torch.zeros(len(samples), dtype=torch.uint8)
        if skip_corrupt and samples:
            self._flags.share_memory_()

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def skipped(self) -> list[str]:
        """The paths skipped so far, by any process reading this data set."""
        return [self.samples[i][0] for i in self._flags.nonzero().flatten().tolist()]

    def _skip(self, index: int, err: DataError) -> None:
        """Flag sample ``index`` and warn, the first time it is skipped."""
        if not self._flags[index]:
            self._flags[index] = 1
            warnings.warn(f"skipping {err}", CorruptImageSkipped, stacklevel=2)

    def select(self, indices: torch.Tensor) -> ImageFiles:
        """The same data set restricted to ``indices`` (``--train-examples``)."""
        return ImageFiles([self.samples[i] for i in indices.tolist()], self.transform, self.skip_corrupt)

    def _read(self, path: str):
        from PIL import Image

        try:
            with Image.open(path) as img:
                return img.convert("RGB")
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise DataError(f"corrupt image: {path} ({reason})") from None

    def __getitem__(self, index: int):
        n = len(self.samples)
        for k in range(n):
            path, label = self.samples[(index + k) % n]
            try:
                image = self._read(path)
            except DataError as err:
                if not self.skip_corrupt:
                    raise
                self._skip((index + k) % n, err)
                continue
            return self.transform(image), label
        raise DataError(f"no readable image among the {n} files of this split")


class _TenCropStack:
    """TenCrop -> (10, C, H, W) tensor, normalised."""

    def __init__(self, size: int) -> None:
        from torchvision import transforms

        self.crop = transforms.TenCrop(size)
        self.to_tensor = transforms.ToTensor()
        self.normalize = transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)

    def __call__(self, image) -> torch.Tensor:
        return torch.stack([self.normalize(self.to_tensor(view)) for view in self.crop(image)])


def _scan(split_dir: Path) -> tuple[list[str], list[tuple[str, int]]]:
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

    try:
        classes, class_to_idx = find_classes(split_dir)
    except FileNotFoundError:
        raise DataError(f"no class folders in {split_dir}") from None
    samples = make_dataset(str(split_dir), class_to_idx, extensions=IMG_EXTENSIONS, allow_empty=True)
    return classes, samples


def _check_every_class_has_images(split_dir: Path, classes: list[str], samples: list[tuple[str, int]]) -> None:
    """One line naming a class folder of ``split_dir`` that holds no image: trained, its
    output would never be right; tested, its error never measured."""
    if not samples:
        raise DataError(f"no images in {split_dir}")
    counts = Counter(label for _, label in samples)
    empty = [name for index, name in enumerate(classes) if not counts[index]]
    if empty:
        more = f" (and {len(empty) - 1} more)" if len(empty) > 1 else ""
        raise DataError(f"no images in class folder {split_dir / empty[0]}{more}: "
                        "add some, or remove the class from both splits")


def build_imagefolder(root: Path, image_size: int, skip_corrupt: bool) -> DataBundle:
    from torchvision import transforms

    if not root.is_dir():
        raise DataError(f"data path not found: {root}")
    train_dir = root / "train"
    if not train_dir.is_dir():
        raise DataError(f"missing training folder: {train_dir}")
    test_dir = next((root / n for n in ("val", "test") if (root / n).is_dir()), None)
    if test_dir is None:
        raise DataError(f"missing test folder: {root / 'val'} (or {root / 'test'})")
    train_classes, train_samples = _scan(train_dir)
    test_classes, test_samples = _scan(test_dir)
    if train_classes != test_classes:
        only_train = sorted(set(train_classes) - set(test_classes))
        only_test = sorted(set(test_classes) - set(train_classes))
        raise DataError(f"class folders differ between {train_dir} and {test_dir}: "
                        f"only in train {only_train[:5]}, only in {test_dir.name} {only_test[:5]}")
    _check_every_class_has_images(train_dir, train_classes, train_samples)
    _check_every_class_has_images(test_dir, test_classes, test_samples)
    resize = image_size * 256 // 224
    normalize = transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    stored = [transforms.Resize(resize), transforms.CenterCrop(resize)]  # cuda-convnet2's stored square
    train_tf = transforms.Compose(stored + [
        transforms.RandomCrop(image_size), transforms.RandomHorizontalFlip(), transforms.ToTensor(), normalize])
    train = ImageFiles(train_samples, train_tf, skip_corrupt)
    factory = _FolderTestFactory(test_samples, image_size, resize, skip_corrupt)
    return DataBundle(name=f"imagefolder:{root}", train=train, num_classes=len(train_classes), in_channels=3,
                      image_size=image_size, loader_workers=2, test_factory=factory)


@dataclass
class _FolderTestFactory:
    samples: list
    size: int
    resize: int
    skip_corrupt: bool

    def __call__(self, views: int) -> Dataset:
        from torchvision import transforms

        stored = [transforms.Resize(self.resize), transforms.CenterCrop(self.resize)]
        if views == 1:
            tf = transforms.Compose(stored + [transforms.CenterCrop(self.size), transforms.ToTensor(),
                                              transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
        else:
            tf = transforms.Compose(stored + [_TenCropStack(self.size)])
        return ImageFiles(self.samples, tf, self.skip_corrupt)
