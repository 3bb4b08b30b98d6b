"""CIFAR-10 (Krizhevsky 2009): 50,000 training and 10,000 test images, 32x32 colour, 10
classes. ``cifar10:DIR`` reads the python-pickle batches that
``torchvision.datasets.CIFAR10(DIR, download=True)`` writes (``DIR/cifar-10-batches-py/``:
``data_batch_1..5``, ``test_batch``, ``batches.meta``), through torchvision's CIFAR10
class; ``--download`` runs that download (needs internet).

Files are checked for presence, not against torchvision's MD5 sums (so that a small file
in the same format, as the tests write, loads; a damaged pickle still fails, naming its
folder). Held as one uint8 tensor ``(N, 3, 40, 40)``: padded by 4 pixels, training takes
random 32x32 crops and random horizontal flips (the paper's augmentation at this scale);
normalised by the training set's channel means and stds. Ten test views: the four
corner crops, the centre and their mirror images, as the paper's. ``loader_workers=0``.
"""
from __future__ import annotations

import os
import pickle
from pathlib import Path

import torch

from onetrick.data.bundle import DataBundle, DataError
from onetrick.data.transforms import PaddedImages, channel_stats, pad_images

TRAIN_SIZE = 50_000
CANVAS = 32
PAD = 4
FOLDER = "cifar-10-batches-py"


def _dataset_class():
    from torchvision.datasets import CIFAR10

    class PresentCIFAR10(CIFAR10):
        """torchvision's CIFAR10 with a presence check instead of MD5 sums."""

        def _check_integrity(self) -> bool:
            return all(os.path.isfile(os.path.join(self.root, self.base_folder, name))
                       for name, _ in self.train_list + self.test_list)

        def _load_meta(self) -> None:
            path = os.path.join(self.root, self.base_folder, self.meta["filename"])
            with open(path, "rb") as fh:
                self.classes = pickle.load(fh, encoding="latin1")[self.meta["key"]]

    return PresentCIFAR10


def locate(directory: str) -> Path:
    """``directory`` if it holds the batches, or a one-line DataError."""
    root = Path(directory).expanduser()
    cls = _dataset_class()
    missing = [name for name, _ in cls.train_list + cls.test_list + [[cls.meta["filename"], ""]]
               if not (root / FOLDER / name).is_file()]
    if missing:
        raise DataError(f"CIFAR-10 batches not found in {root / FOLDER} (missing {', '.join(missing)}); "
                        "with internet, let torchvision download them: --data cifar10:DIR --download")
    return root


def download(directory: str) -> None:
    """torchvision's download and unpacking into ``directory`` (needs internet)."""
    from torchvision.datasets import CIFAR10

    try:
        CIFAR10(directory, train=True, download=True)
    except Exception as err:  # URLError, RuntimeError, OSError, tarfile errors
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DataError(f"CIFAR-10 download into {directory} failed: {reason}") from None


def load(root: Path, train: bool) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """uint8 images ``(N, 3, 32, 32)``, long labels and the class names."""
    try:
        ds = _dataset_class()(str(root), train=train)
    except (OSError, EOFError, KeyError, ValueError, pickle.UnpicklingError) as err:
        raise DataError(f"unreadable CIFAR-10 batches in {root / FOLDER} ({type(err).__name__}: "
                        f"{str(err)[:80]})") from None
    images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()  # torchvision keeps HWC
    return images, torch.as_tensor(ds.targets, dtype=torch.long), list(ds.classes)


def build_cifar10(directory: str, image_size: int) -> DataBundle:
    root = locate(directory)
    train_images, train_labels, classes = load(root, train=True)
    test_images, test_labels, _ = load(root, train=False)
    mean, std = channel_stats(train_images)
    train = PaddedImages(pad_images(train_images, CANVAS, PAD), train_labels, PAD, mean, std, flip=True,
                         out_size=image_size)
    test = PaddedImages(pad_images(test_images, CANVAS, PAD), test_labels, PAD, mean, std, flip=True,
                        out_size=image_size)
    return DataBundle(name=f"cifar10:{root}", train=train, num_classes=len(classes), in_channels=3,
                      image_size=image_size, loader_workers=0, test_factory=test.with_views)
