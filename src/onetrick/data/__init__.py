"""Data sets for onetrick: what the training loop reads, already augmented.

:func:`build_data` turns a *spec* string into a :class:`DataBundle`; each source lives in
its own module, whose docstring says what it reads and how it augments:

``"digits"`` (the tool's default; :mod:`.digits`)
    scikit-learn's bundled 8x8 digits, upsampled: 1,437 training / 360 test images.
``"fashion-mnist"`` / ``"fashion-mnist:DIR"`` (:mod:`.fashion_mnist`)
    60,000 / 10,000 28x28 grey images of clothing, from DIR, DIR/FashionMNIST/raw or
    Debian's ``dataset-fashion-mnist``; translations, no flips.
``"cifar10:DIR"`` (:mod:`.cifar10`)
    50,000 / 10,000 32x32 colour images, torchvision's pickle batches; crops and flips.
``"imagefolder:PATH"`` (:mod:`.imagefolder`)
    ``PATH/train/<class>/*`` and ``PATH/val/<class>/*``, the paper's ImageNet preprocessing.
``"synthetic"`` / ``"synthetic:NUM_CLASSES"`` (:mod:`.synthetic`)
    random images and labels for benchmarks.

``train_examples=N`` keeps a fixed, class-stratified subset of N training examples
(the same N for every seed; the test set stays whole). :func:`check_spec` makes the
cheap checks (form, files present) and, asked to, the download, in the launching
process before any worker starts.

Randomness of the augmentation comes from torch's global RNG (which DataLoader seeds
per worker), never from Python's ``random``: ``torch.manual_seed`` makes it repeatable.
"""
from __future__ import annotations

from pathlib import Path

from onetrick.data.bundle import IMAGENET_MEAN, IMAGENET_STD, DataBundle, DataError
from onetrick.data.synthetic import SYNTHETIC_CLASSES, SYNTHETIC_TEST, SYNTHETIC_TRAIN
from onetrick.data.transforms import stratified_indices

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "SYNTHETIC_CLASSES", "SYNTHETIC_TEST", "SYNTHETIC_TRAIN", "DataBundle",
           "DataError", "build_data", "check_spec", "train_size"]

VALID_SPECS = ('"digits", "fashion-mnist[:DIR]", "cifar10:DIR", "imagefolder:PATH", "synthetic" or '
               '"synthetic:NUM_CLASSES"')
DOWNLOADABLE = ("fashion-mnist", "cifar10")


def _parse(spec: str) -> tuple[str, str]:
    """``(kind, argument)``, or a one-line DataError for a malformed spec."""
    spec = str(spec)
    kind, colon, arg = spec.partition(":")
    if kind not in ("digits", "fashion-mnist", "cifar10", "imagefolder", "synthetic"):
        raise DataError(f"unknown --data {spec!r}; valid forms: {VALID_SPECS}")
    if kind == "digits" and colon:
        raise DataError(f"data spec {spec!r}: digits takes no argument")
    if kind in ("imagefolder", "cifar10") and not arg:
        raise DataError(f"data spec {spec!r} names no path; use {kind}:{'PATH' if kind == 'imagefolder' else 'DIR'}")
    if kind == "fashion-mnist" and colon and not arg:
        raise DataError(f"data spec {spec!r} names no folder; use fashion-mnist or fashion-mnist:DIR")
    if kind == "synthetic" and colon and not (arg.isdigit() and int(arg) >= 2):
        raise DataError(f"--data {spec!r}: synthetic:CLASSES needs an integer >= 2")
    return kind, arg


def train_size(spec: str) -> int | None:
    """Training examples of ``spec`` where known without reading it (None otherwise)."""
    from onetrick.data.cifar10 import TRAIN_SIZE as CIFAR
    from onetrick.data.digits import DIGITS_TRAIN_SIZE
    from onetrick.data.fashion_mnist import TRAIN_SIZE as FASHION

    return {"digits": DIGITS_TRAIN_SIZE, "fashion-mnist": FASHION, "cifar10": CIFAR,
            "synthetic": SYNTHETIC_TRAIN}.get(_parse(spec)[0])


def check_spec(spec: str, train_examples: int | None = None, download: bool = False) -> None:
    """Everything about ``spec`` that can fail without loading it: its form, its files
    (after torchvision's download where ``download``), ``train_examples`` against its size."""
    from onetrick.data import cifar10, fashion_mnist

    kind, arg = _parse(spec)
    if download and kind not in DOWNLOADABLE:
        raise DataError(f"--download works for fashion-mnist:DIR and cifar10:DIR, not {spec!r}")
    if download and not arg:
        raise DataError(f"--download needs a folder to write to: --data {kind}:DIR")
    if kind == "imagefolder" and not Path(arg).expanduser().is_dir():
        raise DataError(f"data path not found: {arg}")
    source = {"fashion-mnist": fashion_mnist, "cifar10": cifar10}.get(kind)
    if source is not None:
        if download:
            source.download(arg)
        source.locate(arg or None)
    if train_examples is not None:
        size = train_size(spec)
        if kind == "synthetic":
            raise DataError("--train-examples needs labelled data (digits, fashion-mnist, cifar10, imagefolder)")
        if train_examples < 1 or (size is not None and train_examples > size):
            raise DataError(f"--train-examples must be between 1 and {size or 'the training set size'} "
                            f"for {spec!r} (got {train_examples})")


def build_data(spec: str, image_size: int, seed: int = 0, skip_corrupt: bool = False,
               train_examples: int | None = None, classes: int | None = None) -> DataBundle:
    """Build the data set named by ``spec`` (see the module docstring) at ``image_size``.

    ``seed`` is accepted for the tool's sake; no data set here depends on it (splits,
    subsets and synthetic images are fixed so that runs with different seeds are
    comparable). Augmentation draws from torch's global RNG at access time. ``classes``:
    plain ``synthetic`` draws its labels from that many classes (``--classes``).
    """
    if not isinstance(image_size, int) or isinstance(image_size, bool) or image_size < 1:
        raise DataError(f"image size must be a positive integer, not {image_size!r}")
    kind, arg = _parse(spec)
    if kind == "digits":
        from onetrick.data.digits import build_digits
        bundle = build_digits(image_size)
    elif kind == "fashion-mnist":
        from onetrick.data.fashion_mnist import build_fashion_mnist
        bundle = build_fashion_mnist(arg or None, image_size)
    elif kind == "cifar10":
        from onetrick.data.cifar10 import build_cifar10
        bundle = build_cifar10(arg, image_size)
    elif kind == "imagefolder":
        from onetrick.data.imagefolder import build_imagefolder
        bundle = build_imagefolder(Path(arg).expanduser(), image_size, skip_corrupt)
    else:
        from onetrick.data.synthetic import build_synthetic
        bundle = build_synthetic(int(arg) if arg else classes or SYNTHETIC_CLASSES, image_size)
    return _subset(bundle, spec, train_examples) if train_examples is not None else bundle


def _subset(bundle: DataBundle, spec: str, n: int) -> DataBundle:
    labels = getattr(bundle.train, "labels", None)
    if labels is None:
        labels = getattr(bundle.train, "targets", None)
    if labels is None or not hasattr(bundle.train, "select"):
        raise DataError(f"--train-examples needs labelled data; {spec!r} has none")
    if not 1 <= n <= len(labels):
        raise DataError(f"--train-examples must be between 1 and {len(labels)} for {spec!r} (got {n})")
    bundle.train = bundle.train.select(stratified_indices(labels, n))
    return bundle
