"""CIFAR-10 on disk and the ImageLoader: exact reads, batching, normalisation, deterministic
order and augmentation, and set_position (what exact resume relies on)."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

import minitrain.kit.data
from minitrain.engine.errors import MinitrainError
from minitrain.kit.data import (
    CIFAR10_FOLDER,
    CIFAR10_MEAN,
    CIFAR10_STD,
    ImageLoader,
    cifar10_loaders,
    load_cifar10,
    random_crop,
)
from minitrain.testing import make_fake_cifar10

REAL_DOWNLOAD = minitrain.kit.data._download  # conftest swaps it for a no-op in every test


def _pickled(folder, name):
    with open(folder / CIFAR10_FOLDER / name, "rb") as f:
        return pickle.load(f, encoding="latin1")


def test_load_cifar10_reads_what_was_written(fake_cifar):
    images, labels = load_cifar10(fake_cifar, train=True)
    assert images.dtype == torch.uint8 and images.shape == (80, 3, 32, 32)
    assert labels.dtype == torch.int64 and labels.shape == (80,)
    written = [_pickled(fake_cifar, f"data_batch_{i}") for i in range(1, 6)]
    expected = np.concatenate([w["data"] for w in written]).reshape(-1, 3, 32, 32)
    assert torch.equal(images, torch.from_numpy(expected))
    assert labels.tolist() == sum((w["labels"] for w in written), [])

    test_images, test_labels = load_cifar10(fake_cifar, train=False)
    test = _pickled(fake_cifar, "test_batch")
    assert test_images.shape == (32, 3, 32, 32)
    assert torch.equal(test_images, torch.from_numpy(test["data"].reshape(-1, 3, 32, 32)))
    assert test_labels.tolist() == test["labels"]


def test_rebuilt_copy_is_accepted_with_a_warning(fake_cifar):
    with pytest.warns(UserWarning, match="differ from the official release"):
        load_cifar10(fake_cifar, train=False)


def test_missing_files_are_downloaded_first(tmp_path, monkeypatch):
    calls = []

    def fake_download(root):
        calls.append(root)
        make_fake_cifar10(root, train_per_batch=2, test_size=3)

    monkeypatch.setattr(minitrain.kit.data, "_download", fake_download)
    images, labels = load_cifar10(tmp_path / "fresh", train=False)
    assert calls == [tmp_path / "fresh"] and images.shape == (3, 3, 32, 32)
    load_cifar10(tmp_path / "fresh", train=False)
    assert len(calls) == 1  # present now: no second download


def test_missing_files_without_download(tmp_path):
    with pytest.raises(MinitrainError, match="CIFAR-10 not found") as info:
        load_cifar10(tmp_path, train=True, download=False)
    assert str(tmp_path / CIFAR10_FOLDER) in str(info.value) and "MINITRAIN_DATA" in str(info.value)


def test_failed_download_warns_then_says_where_files_belong(tmp_path, monkeypatch):
    monkeypatch.setattr(minitrain.kit.data, "_download", REAL_DOWNLOAD)  # the real one, made to fail offline
    import torchvision.datasets.utils as tv_utils

    def offline(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(tv_utils, "download_and_extract_archive", offline)
    with pytest.warns(UserWarning, match="could not download CIFAR-10: OSError: network is unreachable"):
        with pytest.raises(MinitrainError, match="test_batch"):
            load_cifar10(tmp_path, train=False)


# --- ImageLoader -------------------------------------------------------------------------------


@pytest.fixture
def data():
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(1, 256, (50, 3, 32, 32), generator=gen, dtype=torch.uint8)
    labels = torch.randint(0, 10, (50,), generator=gen)
    return images, labels


def _batches(loader):
    return [(x.clone(), y.clone()) for x, y in loader]


def _equal(a, b):
    return len(a) == len(b) and all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(a, b))


def test_lengths_and_drop_last(data):
    images, labels = data
    loader = ImageLoader(images, labels, 16)
    assert len(loader) == 4
    assert [len(y) for _, y in loader] == [16, 16, 16, 2]
    dropping = ImageLoader(images, labels, 16, drop_last=True)
    assert len(dropping) == 3
    assert [len(y) for _, y in dropping] == [16, 16, 16]
    assert len(ImageLoader(images, labels, 25)) == 2 == len(ImageLoader(images, labels, 25, drop_last=True))


def test_unshuffled_batches_are_normalised_images_in_order(data):
    images, labels = data
    batches = list(ImageLoader(images, labels, 16))
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    assert x.dtype == torch.float32 and x.shape == (50, 3, 32, 32)
    assert torch.equal(y, labels)
    mean = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
    assert torch.allclose(x, (images.float() / 255 - mean) / std, atol=1e-5)


def test_custom_normalisation_dtype_and_memory_format(data):
    images, labels = data
    x, _ = next(
        iter(ImageLoader(images, labels, 8, mean=(0, 0, 0), std=(1, 1, 1), dtype=torch.float64, channels_last=True))
    )
    assert x.dtype == torch.float64 and x.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(x, images[:8].double() / 255)


def test_resident_loader_matches_host_loader(data):
    images, labels = data
    options = dict(shuffle=True, crop=4, flip="random", seed=3)
    assert _equal(
        _batches(ImageLoader(images, labels, 16, resident=True, **options)),
        _batches(ImageLoader(images, labels, 16, **options)),
    )


@pytest.mark.parametrize(
    "augment",
    [{}, {"crop": 4, "flip": "random"}, {"crop": 2, "pad_mode": "reflect", "flip": "alternate"}],
    ids=["plain", "crop-flip", "reflect-alternate"],
)
def test_same_seed_and_epoch_give_same_batches(data, augment):
    images, labels = data
    a = ImageLoader(images, labels, 16, shuffle=True, seed=5, **augment)
    b = ImageLoader(images, labels, 16, shuffle=True, seed=5, **augment)
    a.set_position(3)
    b.set_position(3)
    first = _batches(a)
    assert _equal(first, _batches(b))
    a.set_position(3)
    assert _equal(first, _batches(a))  # and again from the same loader


def test_different_epochs_and_seeds_give_different_orders(data):
    images, labels = data
    loader = ImageLoader(images, labels, 50, shuffle=True, seed=5)
    orders = []
    for epoch in range(3):
        loader.set_position(epoch)
        orders.append(next(iter(loader))[0])
    assert not torch.equal(orders[0], orders[1]) and not torch.equal(orders[1], orders[2])
    # a permutation of the same images, each time
    flat = [o.flatten(1) for o in orders]
    assert torch.equal(flat[0].sort(0).values, flat[1].sort(0).values)
    other = ImageLoader(images, labels, 50, shuffle=True, seed=6)
    assert not torch.equal(next(iter(other))[0], orders[0])


@pytest.mark.parametrize("k", [0, 1, 3, 4])
def test_set_position_yields_the_rest_of_the_epoch_exactly(data, k):
    images, labels = data
    loader = ImageLoader(images, labels, 12, shuffle=True, crop=4, flip="random", seed=11)
    loader.set_position(2)
    full = _batches(loader)
    assert len(full) == 5
    fresh = ImageLoader(images, labels, 12, shuffle=True, crop=4, flip="random", seed=11)
    fresh.set_position(2, k)
    assert _equal(_batches(fresh), full[k:])  # bitwise: what exact resume relies on
    # the position applies to one pass only; the next pass is the whole epoch again
    assert _equal(_batches(fresh), full)


def test_random_crop_keeps_shape_and_cuts_a_shifted_window(data):
    images = data[0][:8]
    pad = 3
    gen = torch.Generator().manual_seed(0)
    cropped = random_crop(images, pad, gen)
    assert cropped.shape == images.shape and cropped.dtype == images.dtype
    padded = torch.nn.functional.pad(images, (pad,) * 4)
    shifts = set()
    for i in range(len(images)):
        matches = [
            (dy, dx)
            for dy in range(2 * pad + 1)
            for dx in range(2 * pad + 1)
            if torch.equal(cropped[i], padded[i, :, dy : dy + 32, dx : dx + 32])
        ]
        assert len(matches) == 1, i  # exactly one window (the pixels are never 0, the padding is)
        shifts.add(matches[0])
    assert len(shifts) > 1  # each image gets its own offset


def test_random_crop_reflect_pads_with_image_content(data):
    images = data[0][:4]
    cropped = random_crop(images, 4, torch.Generator().manual_seed(1), mode="reflect")
    assert cropped.shape == images.shape and (cropped > 0).all()  # no zero padding


def test_random_crop_is_deterministic_per_generator_seed(data):
    images = data[0][:8]
    a = random_crop(images, 4, torch.Generator().manual_seed(7))
    b = random_crop(images, 4, torch.Generator().manual_seed(7))
    assert torch.equal(a, b)


def test_random_flip_flips_some_images(data):
    images, labels = data
    loader = ImageLoader(images, labels, 50, flip="random", seed=1, mean=(0, 0, 0), std=(1 / 255,) * 3)
    x = next(iter(loader))[0]
    original = images.float()
    flipped = [torch.allclose(x[i], original[i].flip(2)) for i in range(50)]
    kept = [torch.allclose(x[i], original[i]) for i in range(50)]
    assert all(f != k for f, k in zip(flipped, kept))  # each image is one or the other
    assert 5 < sum(flipped) < 45


def test_alternate_flip_is_opposite_in_consecutive_epochs(data):
    images, labels = data
    loader = ImageLoader(images, labels, 16, shuffle=False, flip="alternate", seed=2)
    per_epoch = []
    for epoch in range(3):
        loader.set_position(epoch)
        per_epoch.append(torch.cat([x for x, _ in loader]))
    e0, e1, e2 = per_epoch
    assert torch.equal(e0, e1.flip(3))  # every image flipped the other way in the next epoch
    assert torch.equal(e0, e2)
    assert not torch.equal(e0, e1)
    plain = torch.cat([x for x, _ in ImageLoader(images, labels, 16)])
    flipped_in_e0 = [not torch.equal(e0[i], plain[i]) for i in range(50)]
    assert 5 < sum(flipped_in_e0) < 45  # a random half, not all or none


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"batch_size": 0}, "batch_size"),
        ({"flip": "sometimes"}, "flip"),
        ({"pad_mode": "wrap"}, "pad_mode"),
    ],
)
def test_bad_loader_options(data, kwargs, message):
    options = {"batch_size": 8, **kwargs}
    with pytest.raises(MinitrainError, match=message):
        ImageLoader(*data, **options)


def test_cifar10_loaders(fake_cifar):
    train, test = cifar10_loaders(fake_cifar, 16, crop=4, flip="random", seed=1)
    assert len(train) == 5 and len(test) == 1  # evaluation batches default to twice the size
    assert train.shuffle and not test.shuffle and test.crop == 0 and test.flip == "none"
    x, y = next(iter(train))
    assert x.shape == (16, 3, 32, 32) and y.dtype == torch.int64
