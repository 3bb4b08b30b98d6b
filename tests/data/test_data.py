"""Data specs: digits, image folders (with corrupt files) and synthetic images."""
from __future__ import annotations

import os
import re
import warnings

import pytest
import torch
from torch.utils.data import DataLoader

from onetrick.data import DataBundle, DataError, build_data

torch.set_num_threads(1)


# ----------------------------------------------------------------------------- digits


@pytest.fixture(scope="module")
def digits() -> DataBundle:
    return build_data("digits", image_size=32)


def test_digits_sizes_and_split(digits):
    assert digits.num_classes == 10 and digits.in_channels == 1 and digits.loader_workers == 0
    test = digits.test()
    assert len(digits.train) + len(test) == 1797
    assert len(test) == 360
    train_idx = set(digits.train.indices)
    assert len(train_idx) == len(digits.train)
    # the split does not depend on the seed
    other = build_data("digits", image_size=32, seed=7)
    assert other.train.indices == digits.train.indices
    assert torch.equal(other.test()[5][0], test[5][0])


def test_digits_train_and_test_disjoint(digits):
    train_idx, test_idx = set(digits.train.indices), set(digits.test().indices)
    assert not train_idx & test_idx
    assert train_idx | test_idx == set(range(1797))
    # stratified: every class in both splits, in about the same proportion
    test_labels = torch.bincount(digits.test().labels, minlength=10)
    assert test_labels.min() >= 30 and test_labels.max() <= 40


def test_digits_shapes_labels_and_normalisation(digits):
    image, label = digits.train[0]
    assert image.shape == (1, 32, 32) and image.dtype == torch.float32
    assert isinstance(label, int)
    labels = {digits.train[i][1] for i in range(len(digits.train))}
    assert labels == set(range(10))
    stack = torch.stack([digits.test()[i][0] for i in range(len(digits.test()))])
    assert abs(stack.mean().item()) < 0.2 and 0.8 < stack.std().item() < 1.2
    views, label = digits.test(views=10)[3]
    assert views.shape == (10, 1, 32, 32)
    assert torch.equal(views[4], digits.test()[3][0])  # view 4 is the centre


def test_digits_augmentation_is_deterministic_and_random(digits):
    torch.manual_seed(3)
    a = torch.stack([digits.train[i][0] for i in range(20)])
    torch.manual_seed(3)
    b = torch.stack([digits.train[i][0] for i in range(20)])
    assert torch.equal(a, b)
    torch.manual_seed(4)
    c = torch.stack([digits.train[i][0] for i in range(20)])
    assert not torch.equal(a, c)
    # through a DataLoader too
    loader = DataLoader(digits.train, batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(5)
    x1, y1 = next(iter(loader))
    loader = DataLoader(digits.train, batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(5)
    x2, y2 = next(iter(loader))
    assert x1.shape == (16, 1, 32, 32) and torch.equal(x1, x2) and torch.equal(y1, y2)


def test_digits_other_size(digits):
    small = build_data("digits", image_size=8)
    assert small.train[0][0].shape == (1, 8, 8)
    assert small.test(10)[0][0].shape == (10, 1, 8, 8)


# ------------------------------------------------------------------------ imagefolder


def _make_folder(root, classes=("cat", "dog"), per_class=3, split_names=("train", "val"), corrupt=True):
    from PIL import Image

    gen = torch.Generator().manual_seed(0)
    for split in split_names:
        for c, name in enumerate(classes):
            d = root / split / name
            d.mkdir(parents=True)
            for i in range(per_class):
                pixels = (torch.rand(40, 48, 3, generator=gen) * 255).to(torch.uint8).numpy()
                pixels[..., c % 3] = 200  # a class colour
                Image.fromarray(pixels).save(d / f"{i}.jpg")
    bad = None
    if corrupt:
        bad = root / "train" / classes[0] / "1b_broken.jpg"  # sorts between 1.jpg and 2.jpg
        bad.write_bytes(os.urandom(600))
    return bad


def test_imagefolder_shapes_labels_views(tmp_path):
    _make_folder(tmp_path, corrupt=False)
    data = build_data(f"imagefolder:{tmp_path}", image_size=32)
    assert data.num_classes == 2 and data.in_channels == 3 and data.loader_workers >= 1
    assert len(data.train) == 6 and len(data.test()) == 6
    torch.manual_seed(0)
    image, label = data.train[4]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32 and label == 1
    assert sorted(data.train[i][1] for i in range(6)) == [0, 0, 0, 1, 1, 1]
    image, label = data.test()[0]
    assert image.shape == (3, 32, 32) and label == 0
    views, label = data.test(views=10)[5]
    assert views.shape == (10, 3, 32, 32) and label == 1
    # views 5..9 are the horizontal flips of views 0..4; the centre view equals views=1
    assert torch.allclose(views[4], data.test()[5][0], atol=1e-5)
    torch.manual_seed(1)
    a = data.train[0][0]
    torch.manual_seed(1)
    assert torch.equal(a, data.train[0][0])
    with pytest.raises(DataError):
        data.test(views=3)


def test_imagefolder_batches_through_workers(tmp_path):
    _make_folder(tmp_path, corrupt=False)
    data = build_data(f"imagefolder:{tmp_path}", image_size=24)
    loader = DataLoader(data.test(views=10), batch_size=4, num_workers=1)
    images, labels = next(iter(loader))
    assert images.shape == (4, 10, 3, 24, 24) and labels.tolist() == [0, 0, 0, 1]


def test_imagefolder_accepts_test_folder(tmp_path):
    _make_folder(tmp_path, split_names=("train", "test"), corrupt=False)
    data = build_data(f"imagefolder:{tmp_path}", image_size=32)
    assert len(data.test()) == 6


def test_imagefolder_corrupt_file_raises_naming_path(tmp_path):
    bad = _make_folder(tmp_path)
    data = build_data(f"imagefolder:{tmp_path}", image_size=32)
    index = [p for p, _ in data.train.samples].index(str(bad))
    data.train[0]  # readable files are fine
    with pytest.raises(DataError) as info:
        data.train[index]
    message = str(info.value)
    assert message.startswith("corrupt image: ") and str(bad) in message and "\n" not in message


def test_imagefolder_corrupt_error_is_one_line_from_worker(tmp_path):
    bad = _make_folder(tmp_path)
    data = build_data(f"imagefolder:{tmp_path}", image_size=32)
    loader = DataLoader(data.train, batch_size=8, num_workers=1)
    with pytest.raises(DataError) as info:
        next(iter(loader))
    message = str(info.value)
    assert message.startswith("corrupt image: ") and str(bad) in message and "\n" not in message


def test_imagefolder_skip_corrupt(tmp_path):
    bad = _make_folder(tmp_path)
    data = build_data(f"imagefolder:{tmp_path}", image_size=32, skip_corrupt=True)
    assert len(data.train) == 7
    index = [p for p, _ in data.train.samples].index(str(bad))
    with pytest.warns(RuntimeWarning, match="corrupt image"):
        image, label = data.train[index]
    assert image.shape == (3, 32, 32) and label == 0  # the next file, 2.jpg of the same class
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per path: no second warning
        data.train[index]
    assert data.train.skipped == [str(bad)]
    images, labels = next(iter(DataLoader(data.train, batch_size=7)))
    assert images.shape == (7, 3, 32, 32)


def test_imagefolder_errors(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError, match=re.escape(f"data path not found: {missing}")):
        build_data(f"imagefolder:{missing}", image_size=32)
    (tmp_path / "a").mkdir()
    with pytest.raises(DataError, match="missing training folder"):
        build_data(f"imagefolder:{tmp_path / 'a'}", image_size=32)
    (tmp_path / "a" / "train" / "x").mkdir(parents=True)
    with pytest.raises(DataError, match="missing test folder"):
        build_data(f"imagefolder:{tmp_path / 'a'}", image_size=32)
    (tmp_path / "a" / "val" / "x").mkdir(parents=True)
    with pytest.raises(DataError, match="no images in"):
        build_data(f"imagefolder:{tmp_path / 'a'}", image_size=32)
    _make_folder(tmp_path / "b", corrupt=False)
    (tmp_path / "b" / "val" / "dog").rename(tmp_path / "b" / "val" / "horse")
    with pytest.raises(DataError, match="class folders differ") as info:
        build_data(f"imagefolder:{tmp_path / 'b'}", image_size=32)
    assert "\n" not in str(info.value)


# -------------------------------------------------------------------------- synthetic


def test_synthetic_shapes_and_determinism():
    data = build_data("synthetic", image_size=64)
    assert data.num_classes == 1000 and data.in_channels == 3 and data.loader_workers == 0
    assert len(data.train) == 100_000 and len(data.test()) == 1_000
    image, label = data.train[12345]
    assert image.shape == (3, 64, 64) and 0 <= label < 1000
    torch.manual_seed(99)  # the global RNG plays no part
    again, label2 = build_data("synthetic", image_size=64).train[12345]
    assert torch.equal(image, again) and label == label2
    assert not torch.equal(data.train[0][0], data.train[1][0])
    assert not torch.equal(data.train[0][0], data.test()[0][0])
    assert data.test(10)[0][0].shape == (10, 3, 64, 64)
    small = build_data("synthetic:7", image_size=16)
    assert small.num_classes == 7
    assert {small.train[i][1] for i in range(200)} == set(range(7))


# ------------------------------------------------------------------------------ specs


@pytest.mark.parametrize("spec", ["mnist", "synthetic:x", "synthetic:1", "imagefolder:", "", "digits:3", "cifar10",
                                  "cifar10:", "fashion-mnist:"])
def test_bad_specs(spec):
    with pytest.raises(DataError) as info:
        build_data(spec, image_size=32)
    assert spec in str(info.value) and "\n" not in str(info.value)


def test_unknown_spec_lists_valid_forms():
    with pytest.raises(DataError, match="imagefolder:PATH") as info:
        build_data("cifar100", image_size=32)
    assert "fashion-mnist[:DIR]" in str(info.value) and "cifar10:DIR" in str(info.value)


def test_bad_image_size():
    with pytest.raises(DataError):
        build_data("digits", image_size=0)
