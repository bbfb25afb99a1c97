"""CIFAR-10 from torchvision's on-disk layout, and a loader that batches and augments whole
tensors (in host memory, or resident on the device) deterministically enough to resume exactly.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from minitrain.engine import distributed
from minitrain.engine.errors import MinitrainError

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_ARCHIVE_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR10_FOLDER = "cifar-10-batches-py"
# The contents of each file of the official release: sha256 of its pixels (uint8, N×3×32×32 in
# the file's order) followed by its labels (int64, little-endian), as `content_digest` computes it.
# Contents, not file bytes: a copy rebuilt losslessly (re-pickled, other per-image filenames) has
# other bytes but the same images and labels, and one damaged in its pixels or labels does not.
CIFAR10_SHA256 = {
    "data_batch_1": "54b2ed21fbd6a52cfc507fb5af63b8610e1938828f3017b159e69e87bb1965db",
    "data_batch_2": "a860ea80505c3e017d336ca80eca64bdc58099bf285ae8650980ed6c846f5e53",
    "data_batch_3": "701e5e97f12252a2ec703b29fe275315471b883e27926ec8e9d3b08ca81b2fab",
    "data_batch_4": "6c9358a56fb97959b9b494683c1c1ef9f0c4f291f3686302835e08a0b0ab2f47",
    "data_batch_5": "c2108fec4d9d07a51c26c680b5886f54ff810c859a3f7ba7efe3a4a82a838293",
    "test_batch": "2c33b053d1cd726af8d86e174a96dd89d7000ba1412add026d68142375b89d51",
}


_contents_reported: set[Path] = set()  # folders already warned about in this process


def default_data_dir() -> Path:
    return Path(os.environ.get("MINITRAIN_DATA") or Path.home() / ".cache" / "minitrain" / "cifar10")


def load_cifar10(data_dir: str | Path, train: bool, download: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """``(images uint8 N×3×32×32, labels int64 N)`` read straight from the pickled batches."""
    folder = Path(data_dir).expanduser() / CIFAR10_FOLDER
    names = [f"data_batch_{i}" for i in range(1, 6)] if train else ["test_batch"]
    if not all((folder / n).is_file() for n in names):
        if download:
            _download(Path(data_dir).expanduser())
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise MinitrainError(_missing_message(folder, missing))
    batches = {n: _read_batch(folder / n, (folder / n).read_bytes()) for n in names}
    differ = [n for n, (x, y) in batches.items() if content_digest(x, y) != CIFAR10_SHA256[n]]
    if differ and folder not in _contents_reported and distributed.is_main():  # once per folder and command
        _contents_reported.add(folder)
        named = [n for n in CIFAR10_SHA256 if n in differ or (n not in batches and _differs(folder / n))]
        warnings.warn(
            f"{folder}: the images or labels of {', '.join(named)} differ from the official "
            "release of CIFAR-10 (a damaged or modified copy, or other data); training on them as they are",
            stacklevel=2,
        )
    images, labels = zip(*batches.values())
    return torch.cat(images), torch.cat(labels)


class _ArraysOnly(pickle.Unpickler):
    """CIFAR-10's batches are pickles, and unpickling can run any code the file names. These
    files only ever hold numpy arrays in plain dicts and lists, so nothing else is looked up."""

    ALLOWED = {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: only numpy arrays are read")
        return super().find_class(module, name)


def _read_batch(path: Path, raw: bytes) -> tuple[torch.Tensor, torch.Tensor]:
    try:
        entry = _ArraysOnly(io.BytesIO(raw), encoding="latin1").load()
        data, labels = entry["data"], entry.get("labels", entry.get("fine_labels"))
    except Exception as exc:
        raise MinitrainError(f"{path}: not a readable CIFAR-10 batch ({type(exc).__name__}: {exc})") from None
    shape = getattr(data, "shape", None)
    if shape is None or len(shape) != 2 or shape[1] != 3 * 32 * 32 or labels is None or len(labels) != shape[0]:
        raise MinitrainError(
            f"{path}: expected 'data' of shape (N, 3072) and N 'labels', "
            f"got data {shape} and {None if labels is None else len(labels)} labels"
        )
    images = torch.from_numpy(data.reshape(-1, 3, 32, 32).copy())
    if images.dtype != torch.uint8:
        raise MinitrainError(f"{path}: expected uint8 pixels, got {images.dtype}")
    targets = torch.as_tensor(labels, dtype=torch.int64)
    if targets.numel() and (targets.min() < 0 or targets.max() > 9):
        raise MinitrainError(f"{path}: labels outside 0..9")
    return images, targets


def content_digest(images: torch.Tensor, labels: torch.Tensor) -> str:
    """sha256 of a batch's pixels then labels (``CIFAR10_SHA256``): what the file holds, whatever
    else its pickle carries or however it was written."""
    digest = hashlib.sha256(images.contiguous().numpy().data)  # (a view: 30 MB are not copied)
    digest.update(labels.numpy().astype("<i8").tobytes())
    return digest.hexdigest()


def _differs(path: Path) -> bool:
    """Whether a batch file that this command does not load differs from the release too, so that
    the one warning names every such file (a file that is missing or unreadable is left to the load
    that needs it)."""
    try:
        return content_digest(*_read_batch(path, path.read_bytes())) != CIFAR10_SHA256[path.name]
    except (OSError, MinitrainError):
        return False


def _download(root: Path) -> None:
    try:
        from torchvision.datasets.utils import download_and_extract_archive

        download_and_extract_archive(CIFAR10_URL, str(root), md5=CIFAR10_ARCHIVE_MD5)
    except Exception as exc:  # offline, proxy, disk: say where the files belong instead
        warnings.warn(f"could not download CIFAR-10: {type(exc).__name__}: {exc}", stacklevel=3)


def _missing_message(folder: Path, missing: list[str]) -> str:
    return (
        f"CIFAR-10 not found: {folder} lacks {', '.join(missing)}. Put the python version of "
        f"CIFAR-10 ({CIFAR10_URL}) there, unpacked, or point MINITRAIN_DATA / --set data_dir= "
        "at the folder that holds cifar-10-batches-py/"
    )


def derive_seed(*parts: int) -> int:
    """A seed for one draw (an epoch's order, a batch's augmentation) from the run's seed and its place."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class ImageLoader:
    """Batches of ``(normalised float images, int64 labels)`` from whole uint8 tensors.

    ``resident=True`` keeps the data set on ``device`` and augments there (the fast GPU path);
    otherwise batches are cut and augmented on the host and copied over. Order and augmentation
    depend only on ``(seed, epoch, batch index)``, so :meth:`set_position` can start an epoch at
    any batch without producing the earlier ones — which is what exact resume needs.

    Augmentation: ``crop`` pads by that many pixels and cuts a random 32×32 window
    (``pad_mode`` 'constant' or 'reflect'); ``flip`` is 'none', 'random' (each image, each
    epoch) or 'alternate' (a random choice per image in even epochs, its opposite in odd ones).

    ``normalize_once=True`` normalises the whole set into ``dtype`` at construction instead of
    every batch: per step the loader then only gathers, crops and flips (half precision also
    halves the memory the resident set takes). Constant padding then fills with the mean colour
    (0 after normalisation) rather than black.

    Under ``torchrun`` (``world_size`` > 1, read from the process group unless given) every rank
    draws the same permutation and takes every ``world_size``-th index from its ``rank`` on, as
    ``DistributedSampler`` does: so a step of W ranks at batch B sees the same images as one
    process at batch W·B. A shuffled (training) loader first drops the permutation's last
    ``N mod W`` indices, so that every rank runs the same number of steps, as DDP requires (other
    images are left out each epoch); an ordered (evaluation) loader keeps them all, so that every
    image is counted exactly once. Augmentation draws differ per rank.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        batch_size: int,
        *,
        device: str | torch.device = "cpu",
        resident: bool = False,
        shuffle: bool = False,
        crop: int = 0,
        pad_mode: str = "constant",
        flip: str = "none",
        seed: int = 0,
        drop_last: bool = False,
        mean=CIFAR10_MEAN,
        std=CIFAR10_STD,
        dtype: torch.dtype = torch.float32,
        channels_last: bool = False,
        normalize_once: bool = False,
        rank: int | None = None,
        world_size: int | None = None,
    ):
        if batch_size < 1:
            raise MinitrainError(f"batch_size must be positive, got {batch_size}")
        if flip not in ("none", "random", "alternate"):
            raise MinitrainError(f"flip must be 'none', 'random' or 'alternate', not {flip!r}")
        if pad_mode not in ("constant", "reflect"):
            raise MinitrainError(f"pad_mode must be 'constant' or 'reflect', not {pad_mode!r}")
        self.device = torch.device(device)
        self.data_device = self.device if resident else torch.device("cpu")
        self.images = images.to(self.data_device)
        self.labels = labels.to(self.data_device)
        self.batch_size, self.shuffle, self.crop, self.pad_mode = batch_size, shuffle, crop, pad_mode
        self.flip, self.seed, self.drop_last = flip, seed, drop_last
        self.dtype = dtype
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.mean, self.std = tuple(mean), tuple(std)  # kept for the run's record (``minitrain export``)
        self.input_size = tuple(images.shape[-2:])
        self.scale = (1.0 / (255.0 * torch.tensor(std, device=self.device))).view(1, -1, 1, 1)
        self.shift = (-torch.tensor(mean, device=self.device) / torch.tensor(std, device=self.device)).view(1, -1, 1, 1)
        self.pin = self.device.type == "cuda" and not resident
        if normalize_once:
            self.images = self.normalize(self.images).to(self.data_device)
        self.epoch, self.start = 0, 0
        self._flip_base: torch.Tensor | None = None
        self.rank = distributed.rank() if rank is None else rank
        self.world_size = distributed.world_size() if world_size is None else world_size
        if len(self.labels) < self.world_size:
            raise MinitrainError(f"{len(self.labels)} images cannot be shared among {self.world_size} ranks")
        n, w = len(self.labels), self.world_size
        self.shard_size = n // w if shuffle else len(range(self.rank, n, w))

    def __len__(self) -> int:
        n = self.shard_size
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def set_position(self, epoch: int, batch_idx: int = 0) -> None:
        """The next iteration yields epoch ``epoch``'s batches from ``batch_idx`` on."""
        self.epoch, self.start = epoch, batch_idx

    def __iter__(self):
        epoch, start, bs = self.epoch, self.start, self.batch_size
        self.start = 0  # a later pass, without set_position, starts the epoch afresh
        gen = torch.Generator(device=self.data_device)
        if self.shuffle:
            gen.manual_seed(derive_seed(self.seed, epoch, -1))
            order = torch.randperm(len(self.labels), generator=gen, device=self.data_device)
        else:
            order = torch.arange(len(self.labels), device=self.data_device)
        if self.world_size > 1:
            order = order[: self.shard_size * self.world_size if self.shuffle else None][self.rank :: self.world_size]
        rank = (self.rank,) if self.world_size > 1 else ()  # one process keeps its seeds as they were
        for b in range(start, len(self)):
            idx = order[b * bs : (b + 1) * bs]
            images, labels = self.images[idx], self.labels[idx]
            if self.crop or self.flip != "none":
                gen.manual_seed(derive_seed(self.seed, epoch, b, *rank))
                images = self._augment(images, idx, epoch, gen)
            if self.pin:
                images, labels = images.pin_memory(), labels.pin_memory()
            labels = labels.to(self.device, non_blocking=True)
            yield self.normalize(images), labels

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images -> normalised ``dtype`` on ``device``, in the loader's memory format.
        Images normalised already (floating point: ``normalize_once``) are only moved and cast."""
        x = images.to(self.device, non_blocking=True)
        if not x.is_floating_point():
            x = x.to(self.scale.dtype) * self.scale + self.shift
        return x.to(self.dtype, memory_format=self.memory_format)

    def _augment(self, images: torch.Tensor, idx: torch.Tensor, epoch: int, gen: torch.Generator) -> torch.Tensor:
        if self.crop:
            images = random_crop(images, self.crop, gen, self.pad_mode)
        if self.flip == "random":
            mask = torch.rand(len(idx), generator=gen, device=images.device) < 0.5
        elif self.flip == "alternate":
            if self._flip_base is None:
                base_gen = torch.Generator(device=self.data_device).manual_seed(derive_seed(self.seed, -2))
                self._flip_base = torch.rand(len(self.labels), generator=base_gen, device=self.data_device) < 0.5
            mask = self._flip_base[idx] ^ bool(epoch % 2)
        else:
            return images
        return torch.where(mask.view(-1, 1, 1, 1), images.flip(3), images)


def random_crop(images: torch.Tensor, pad: int, gen: torch.Generator, mode: str = "constant") -> torch.Tensor:
    """Pad each image by ``pad`` and cut a randomly placed window of the original size."""
    n, c, h, w = images.shape
    if mode == "reflect":
        source = images if images.is_floating_point() else images.float()  # no reflect padding for uint8
        padded = F.pad(source, (pad,) * 4, mode="reflect").to(images.dtype)
    else:
        padded = F.pad(images, (pad,) * 4)
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=gen, device=images.device)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=gen, device=images.device)
    rows = (dy.view(n, 1) + torch.arange(h, device=images.device)).view(n, 1, h, 1)
    cols = (dx.view(n, 1) + torch.arange(w, device=images.device)).view(n, 1, 1, w)
    batch = torch.arange(n, device=images.device).view(n, 1, 1, 1)
    channel = torch.arange(c, device=images.device).view(1, c, 1, 1)
    return padded[batch, channel, rows, cols]


def cifar10_loaders(
    data_dir: str | Path,
    batch_size: int,
    *,
    device: str | torch.device = "cpu",
    resident: bool = False,
    seed: int = 0,
    crop: int = 4,
    flip: str = "random",
    eval_batch_size: int | None = None,
    **options,
) -> tuple[ImageLoader, ImageLoader]:
    """Training loader (shuffled, augmented) and test loader for CIFAR-10 in ``data_dir``."""
    train_x, train_y = load_cifar10(data_dir, train=True)
    test_x, test_y = load_cifar10(data_dir, train=False)
    train = ImageLoader(
        train_x,
        train_y,
        batch_size,
        device=device,
        resident=resident,
        shuffle=True,
        crop=crop,
        flip=flip,
        seed=seed,
        **options,
    )
    test = ImageLoader(test_x, test_y, eval_batch_size or batch_size * 2, device=device, resident=resident, **options)
    return train, test
