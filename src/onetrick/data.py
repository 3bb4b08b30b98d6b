"""Data sets for onetrick: what the training loop reads, already augmented.

:func:`build_data` turns a *spec* string into a :class:`DataBundle`:

``"digits"`` (default of the tool)
    scikit-learn's bundled 8x8 digits (1,797 images, 10 classes, nothing downloads).
    A fixed stratified split (360 test images, ``random_state=0``, independent of
    ``seed`` so that test sets are comparable across runs). Pixels scaled to [0, 1],
    upsampled bilinearly to ``image_size``, one channel, normalised by the training
    set's mean and std. Training augmentation: random translation by up to
    ``image_size // 16`` pixels (pad and random crop; no flips, digits are not mirror
    symmetric). Multi-view testing uses ten *translations* instead of the paper's
    corners + flips (see :class:`DigitsTest`). Held in memory, ``loader_workers=0``.

``"imagefolder:PATH"``
    torchvision ``ImageFolder`` layout: ``PATH/train/<class>/*`` and ``PATH/val/<class>/*``
    (``PATH/test`` is accepted instead of ``val``). The paper's preprocessing: shorter
    side resized to ``r = image_size * 256 // 224`` and the central ``r x r`` square
    kept (the stored 256x256 image of cuda-convnet2); training takes a random
    ``image_size`` crop of it plus a random horizontal flip; test takes the centre
    crop (1 view) or torchvision's ``TenCrop`` (4 corners + centre and their flips).
    Pixels are scaled to [0, 1], the ImageNet channel means are subtracted and the
    result divided by the ImageNet channel stds (torchvision's convention; the paper
    subtracts the mean only, on a 0..255 scale). PCA colour noise is not applied.
    Corrupt images raise ``DataError("corrupt image: PATH (reason)")`` when read, or,
    with ``skip_corrupt=True``, are replaced by the next readable image of the same
    split; the skipped paths are listed in ``dataset.skipped`` (per process: with
    DataLoader workers each worker keeps its own list) and a warning is issued once per
    path and process. ``loader_workers=2``.

``"synthetic"`` / ``"synthetic:NUM_CLASSES"`` (default 1000 classes)
    For benchmarks: 100,000 training and 1,000 test images, 3 channels, each image
    (standard normal pixels) and its label drawn from a ``torch.Generator`` seeded by
    the split and index only, generated on access so memory stays small at 224x224.
    No augmentation; labels are random, so nothing can be learnt. ``loader_workers=0``.

Randomness of the augmentation comes from torch's global RNG (which DataLoader seeds
per worker), never from Python's ``random``: ``torch.manual_seed`` makes it repeatable.
"""
from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "DataBundle", "DataError", "build_data"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

DIGITS_TEST_SIZE = 360
DIGITS_SPLIT_SEED = 0
SYNTHETIC_TRAIN = 100_000
SYNTHETIC_TEST = 1_000
SYNTHETIC_CLASSES = 1000

VALID_SPECS = '"digits", "imagefolder:PATH", "synthetic" or "synthetic:NUM_CLASSES"'


class DataError(ValueError):
    """Bad data input; its message is one line naming the problem (path, spec).

    A DataError raised inside a DataLoader worker comes back to the main process
    wrapped in a traceback ("Caught DataError in DataLoader worker ..."); the
    constructor reduces such a message to the original single line.
    """

    def __init__(self, message: str = "") -> None:
        message = str(message)
        if "\nOriginal Traceback" in message:
            lines = [line for line in message.strip().splitlines() if line.strip()]
            last = lines[-1] if lines else message
            marker = "DataError: "
            message = last[last.index(marker) + len(marker):] if marker in last else last
        super().__init__(message)


@dataclass
class DataBundle:
    """A data set ready for training: the augmented training set and test views."""

    name: str
    train: Dataset  # items: (float Tensor[C, H, W], int label), augmented per access
    num_classes: int
    in_channels: int
    image_size: int
    loader_workers: int  # recommended DataLoader num_workers
    test_factory: Callable[[int], Dataset] = field(default=None, repr=False)  # views -> test set

    def __post_init__(self) -> None:
        self._tests: dict[int, Dataset] = {}

    def test(self, views: int = 1) -> Dataset:
        """The test set. ``views=1``: items ``(Tensor[C, H, W], label)``;
        ``views=10``: items ``(Tensor[10, C, H, W], label)`` (4 corners + centre and their
        horizontal flips; for digits ten translations, see :class:`DigitsTest`)."""
        if views not in (1, 10):
            raise DataError(f"test views must be 1 or 10, not {views!r}")
        if views not in self._tests:
            self._tests[views] = self.test_factory(views)
        return self._tests[views]


def build_data(spec: str, image_size: int, seed: int = 0, skip_corrupt: bool = False) -> DataBundle:
    """Build the data set named by ``spec`` (see the module docstring) at ``image_size``.

    ``seed`` is accepted for the tool's sake; no data set here depends on it (splits and
    synthetic images are fixed so that runs with different seeds are comparable).
    Augmentation draws from torch's global RNG at access time.
    """
    if not isinstance(image_size, int) or isinstance(image_size, bool) or image_size < 1:
        raise DataError(f"image size must be a positive integer, not {image_size!r}")
    spec = str(spec)
    if spec == "digits":
        return _build_digits(image_size)
    if spec.startswith("imagefolder:"):
        path = spec[len("imagefolder:"):]
        if not path:
            raise DataError(f"data spec {spec!r} names no path; use imagefolder:PATH")
        return _build_imagefolder(Path(path).expanduser(), image_size, skip_corrupt)
    if spec == "synthetic" or spec.startswith("synthetic:"):
        classes = SYNTHETIC_CLASSES
        if spec != "synthetic":
            text = spec[len("synthetic:"):]
            try:
                classes = int(text)
            except ValueError:
                classes = 0
            if classes < 2:
                raise DataError(f"data spec {spec!r}: NUM_CLASSES must be an integer >= 2")
        return _build_synthetic(classes, image_size)
    raise DataError(f"unknown data spec {spec!r}; valid forms: {VALID_SPECS}")


# ----------------------------------------------------------------------------- digits


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


def _build_digits(image_size: int) -> DataBundle:
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


# ------------------------------------------------------------------------ imagefolder


class ImageFiles(Dataset):
    """``(path, label)`` samples read with PIL and passed through ``transform``.

    A file PIL cannot read raises ``DataError("corrupt image: PATH (reason)")``, or, with
    ``skip_corrupt``, is replaced by the next readable file (wrapping around); its
    path is appended to ``self.skipped`` and a warning issued once (per process)."""

    def __init__(self, samples: list[tuple[str, int]], transform: Callable, skip_corrupt: bool) -> None:
        self.samples, self.transform, self.skip_corrupt = samples, transform, skip_corrupt
        self.targets = [label for _, label in samples]
        self.skipped: list[str] = []

    def __len__(self) -> int:
        return len(self.samples)

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
                if path not in self.skipped:
                    self.skipped.append(path)
                    warnings.warn(f"skipping {err}", RuntimeWarning, stacklevel=2)
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


def _build_imagefolder(root: Path, image_size: int, skip_corrupt: bool) -> DataBundle:
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
    for split_dir, samples in ((train_dir, train_samples), (test_dir, test_samples)):
        if not samples:
            raise DataError(f"no images in {split_dir}")
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


# -------------------------------------------------------------------------- synthetic


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


def _build_synthetic(num_classes: int, image_size: int) -> DataBundle:
    train = SyntheticImages(SYNTHETIC_TRAIN, num_classes, image_size, split=0)
    return DataBundle(name=f"synthetic:{num_classes}", train=train, num_classes=num_classes, in_channels=3,
                      image_size=image_size, loader_workers=0,
                      test_factory=_SyntheticTestFactory(num_classes, image_size))
