"""CIFAR-10 on disk and the ImageLoader: exact reads, batching, normalisation, deterministic
order and augmentation, and set_position (what exact resume relies on)."""

from __future__ import annotations

import pickle
import warnings

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
    _read_batch,
    cifar10_loaders,
    content_digest,
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


def test_data_that_is_not_the_release_gets_one_warning_naming_every_file(fake_cifar):
    """Generated data (or any other data in CIFAR-10's layout): one warning per folder and command,
    naming each file whose images or labels are not the release's, the files not loaded yet too."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_cifar10(fake_cifar, train=False)
        load_cifar10(fake_cifar, train=True)
    assert len(caught) == 1
    message = str(caught[0].message)
    assert "the images or labels of data_batch_1, data_batch_2" in message and "test_batch" in message
    assert "differ from the official release of CIFAR-10" in message and "checksums" not in message


@pytest.fixture
def known(fake_cifar, monkeypatch):
    """The generated files taken for the release: their content digests become the known ones."""
    digests = {}
    for name in minitrain.kit.data.CIFAR10_SHA256:
        path = fake_cifar / CIFAR10_FOLDER / name
        digests[name] = content_digest(*_read_batch(path, path.read_bytes()))
    monkeypatch.setattr(minitrain.kit.data, "CIFAR10_SHA256", digests)
    return fake_cifar


def _quietly_loaded(folder):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning fails
        return load_cifar10(folder, train=True), load_cifar10(folder, train=False)


def test_a_rebuilt_copy_with_the_same_contents_loads_without_a_word(known):
    """Other bytes (re-pickled, other per-image filenames, as the copy in ~/.cache is), the same
    pixels and labels in the same order: nothing to say."""
    path = known / CIFAR10_FOLDER / "data_batch_2"
    batch = _pickled(known, "data_batch_2")
    batch["filenames"] = [f"renamed_{i}.png" for i in range(len(batch["labels"]))]
    batch["batch_label"] = "rebuilt"
    rebuilt = pickle.dumps(batch)
    assert rebuilt != path.read_bytes()
    path.write_bytes(rebuilt)
    (train, _), (test, _) = _quietly_loaded(known)
    assert train.shape == (80, 3, 32, 32) and test.shape == (32, 3, 32, 32)


def test_a_copy_with_flipped_pixel_bytes_is_named_file_by_file(known):
    """The issue's copy: bytes flipped in one file's pixels trained with the same warning as a
    sound copy. Now the warning names that file, and that file only."""
    _quietly_loaded(known)  # sound: not a word
    minitrain.kit.data._contents_reported.clear()  # (a new command)
    path = known / CIFAR10_FOLDER / "data_batch_3"
    raw = bytearray(path.read_bytes())
    pixels = _pickled(known, "data_batch_3")["data"].tobytes()
    offset = bytes(raw).index(pixels[:64])
    for i in range(offset + 100, offset + 400):  # 300 bytes of pixels flipped
        raw[i] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.warns(UserWarning) as caught:
        load_cifar10(known, train=True)
    (message,) = [str(w.message) for w in caught]
    assert "the images or labels of data_batch_3 differ from the official release" in message
    assert "data_batch_1" not in message and "test_batch" not in message
    _quietly_loaded(known)  # said once per folder and command


def test_changed_labels_are_found_too(known):
    batch = _pickled(known, "test_batch")
    batch["labels"] = [(label + 1) % 10 for label in batch["labels"]]
    (known / CIFAR10_FOLDER / "test_batch").write_bytes(pickle.dumps(batch))
    with pytest.warns(UserWarning, match="the images or labels of test_batch differ"):
        load_cifar10(known, train=False)


def test_the_known_digests_are_of_the_release_contents():
    """The digests were computed from a copy with the release's pixels and labels (checked
    against the official archive's order); a digest is of the decoded arrays alone."""
    images = torch.zeros(2, 3, 32, 32, dtype=torch.uint8)
    labels = torch.tensor([3, 8])
    assert content_digest(images, labels) != content_digest(images, torch.tensor([8, 3]))
    assert sorted(minitrain.kit.data.CIFAR10_SHA256) == [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    assert all(len(digest) == 64 for digest in minitrain.kit.data.CIFAR10_SHA256.values())


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
