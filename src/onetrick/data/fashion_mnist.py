"""Fashion-MNIST (Xiao et al. 2017): 60,000 training and 10,000 test images, 28x28 grey,
10 classes of clothing, MIT licence. ``fashion-mnist`` or ``fashion-mnist:DIR``.

Where the four idx files (``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``, each plain or ``.gz``) are
looked for: with ``DIR``, in ``DIR`` itself, then in torchvision's layout
``DIR/FashionMNIST/raw`` (what ``torchvision.datasets.FashionMNIST(DIR, download=True)``
writes; ``--download`` does that); without, in Debian's ``/usr/share/datasets/fashion-mnist``
(package ``dataset-fashion-mnist``). The files are parsed by torchvision's idx reader.

Held as one uint8 tensor. The 28x28 image sits centred on a 32x32 zero canvas (LeNet-5's
treatment of MNIST: smallnet's three 2x poolings want 32), padded by ``pad = 2`` more;
training takes random 32x32 crops (translations by up to 2 pixels, the paper's crop at
this scale) and no flips: several classes (shoes, bags) are not mirror symmetric in the
data. Normalised by the training set's mean and std. Ten test views: translations
(see :class:`~onetrick.data.transforms.PaddedImages`). ``loader_workers=0``.
"""
from __future__ import annotations

import gzip
import shutil
import tempfile
from pathlib import Path

import torch

from onetrick.data.bundle import DataBundle, DataError
from onetrick.data.transforms import PaddedImages, channel_stats, pad_images

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
TRAIN_SIZE = 60_000
CANVAS = 32
PAD = 2
HOW_TO_GET = ("install Debian's package (apt-get install dataset-fashion-mnist) or, with internet, "
              "let torchvision download them: --data fashion-mnist:DIR --download")


def candidates(directory: str | None) -> list[Path]:
    """Where the files are looked for, in order."""
    if directory:
        root = Path(directory).expanduser()
        return [root, root / "FashionMNIST" / "raw"]
    return [DEBIAN_DIR]


def _file(folder: Path, name: str) -> Path | None:
    return next((p for p in (folder / name, folder / f"{name}.gz") if p.is_file()), None)


def locate(directory: str | None) -> Path:
    """The first candidate folder holding all four files, or a one-line DataError."""
    places = candidates(directory)
    for folder in places:
        if all(_file(folder, name) for name in FILES):
            return folder
    raise DataError(f"Fashion-MNIST's four idx files not found in {' or '.join(map(str, places))}; {HOW_TO_GET}")


def download(directory: str) -> None:
    """torchvision's download into ``directory/FashionMNIST/raw`` (needs internet)."""
    from torchvision.datasets import FashionMNIST

    try:
        FashionMNIST(directory, train=True, download=True)
    except Exception as err:  # URLError, RuntimeError with a multi-line mirror list, OSError
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DataError(f"Fashion-MNIST download into {directory} failed: {reason}") from None


def _read(path: Path, reader) -> torch.Tensor:
    """torchvision's idx reader opens plain files only: a ``.gz`` is unpacked to a
    temporary file first."""
    try:
        if path.suffix != ".gz":
            return reader(str(path))
        with tempfile.NamedTemporaryFile(suffix=".idx") as tmp:
            with gzip.open(path, "rb") as src:
                shutil.copyfileobj(src, tmp)
            tmp.flush()
            return reader(tmp.name)
    except (OSError, EOFError, AssertionError, TypeError, ValueError, RuntimeError) as err:
        raise DataError(f"unreadable idx file {path} ({type(err).__name__}: {str(err)[:80]})") from None


def load(folder: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images ``(N, 1, 28, 28)`` and long labels of ``split`` ("train" or "t10k")."""
    from torchvision.datasets.mnist import read_image_file, read_label_file

    images = _read(_file(folder, f"{split}-images-idx3-ubyte"), read_image_file)
    labels = _read(_file(folder, f"{split}-labels-idx1-ubyte"), read_label_file)
    if len(images) != len(labels):
        raise DataError(f"{folder}: {len(images)} {split} images but {len(labels)} labels")
    return images[:, None], labels


def build_fashion_mnist(directory: str | None, image_size: int) -> DataBundle:
    folder = locate(directory)
    train_images, train_labels = load(folder, "train")
    test_images, test_labels = load(folder, "t10k")
    mean, std = channel_stats(train_images)
    train = PaddedImages(pad_images(train_images, CANVAS, PAD), train_labels, PAD, mean, std, flip=False,
                         out_size=image_size)
    test = PaddedImages(pad_images(test_images, CANVAS, PAD), test_labels, PAD, mean, std, flip=False,
                        out_size=image_size)
    return DataBundle(name="fashion-mnist", train=train, num_classes=10, in_channels=1, image_size=image_size,
                      loader_workers=0, test_factory=test.with_views)
