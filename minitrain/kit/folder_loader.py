"""Batches from a scanned folder of images (:mod:`minitrain.kit.folder`), decoded and augmented
in DataLoader worker processes, so that decoding overlaps training.

Each item of the underlying data set is a whole batch, ``(epoch, batch index, file indices)``:
a worker decodes its files (:func:`minitrain.kit.images.decode`), fits them to the input size,
augments them with a generator seeded by ``(seed, epoch, batch index, rank)`` and stacks them
as uint8. The order depends only on ``(seed, epoch)``, so :meth:`FolderLoader.set_position`
starts an epoch at any batch and a run resumes exactly, however many workers it has. The main
process normalises each batch on the device. Under torchrun each rank takes its shard of the
order, as :class:`~minitrain.kit.data.ImageLoader` does.

Workers are persistent (started once, not every epoch) and batches are pinned where the device
is CUDA. A file that fails to decode (a truncated JPEG) is left out of its batch and named in a
warning, once; :attr:`FolderLoader.skipped` counts them.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms.v2 import functional as TF

from minitrain.engine import distributed
from minitrain.engine.errors import MinitrainError
from minitrain.kit.data import derive_seed, random_crop
from minitrain.kit.folder import Folder, Item
from minitrain.kit.images import decode


@dataclass(frozen=True)
class Augment:
    """Training augmentation: ``crop`` 'pad' pads by ``pad`` pixels and cuts a random window
    (the CIFAR-10 recipes' translation), 'resized' cuts a random area of ``scale`` of the image
    at an aspect ratio in [3/4, 4/3] and resizes it (torchvision's RandomResizedCrop), 'none'
    neither; ``flip`` mirrors half the images."""

    crop: Literal["pad", "resized", "none"] = "pad"
    pad: int = 4
    scale: tuple[float, float] = (0.25, 1.0)
    flip: bool = True


def default_workers() -> int:
    """Half the CPUs (the other half run the training step), 1 to 8."""
    return max(1, min(8, (os.cpu_count() or 2) // 2))


class FolderBatches(Dataset):
    """A data set whose items are batches: ``(epoch, batch index, indices)`` -> ``(uint8
    N×3×S×S images, int64 labels, [why each left-out file failed])``."""

    def __init__(
        self,
        root: Path,
        items: list[Item],
        size: int,
        resize: str = "stretch",
        augment: Augment | None = None,
        seed: int = 0,
        rank: tuple[int, ...] = (),
    ):
        self.root, self.items, self.size, self.resize = root, items, size, resize
        self.augment, self.seed, self.rank = augment, seed, rank

    def __getitem__(self, spec: tuple[int, int, list[int]]) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        epoch, batch, indices = spec
        gen = torch.Generator().manual_seed(derive_seed(self.seed, epoch, batch, *self.rank))
        images, labels, failed = [], [], []
        for index in indices:
            item = self.items[index]
            try:
                pixels = decode(self.root / item.path, item.fast)
            except MinitrainError as exc:
                failed.append(str(exc))
                continue
            images.append(self._fit(pixels, gen))
            labels.append(item.label)
        batch_images = torch.stack(images) if images else torch.empty(0, 3, self.size, self.size, dtype=torch.uint8)
        augment = self.augment
        if augment is not None and images:
            if augment.crop == "pad" and augment.pad:
                batch_images = random_crop(batch_images, augment.pad, gen)
            if augment.flip:
                mask = torch.rand(len(images), generator=gen) < 0.5
                batch_images = torch.where(mask.view(-1, 1, 1, 1), batch_images.flip(3), batch_images)
        return batch_images, torch.tensor(labels, dtype=torch.int64), failed

    def _fit(self, pixels: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        size = [self.size, self.size]
        if self.augment is not None and self.augment.crop == "resized":
            top, left, height, width = _resized_crop_box(pixels.shape[1], pixels.shape[2], self.augment.scale, gen)
            return TF.resized_crop(pixels, top, left, height, width, size, antialias=True)
        if list(pixels.shape[1:]) == size:
            return pixels
        if self.resize == "crop":  # the short side to the size, then the centre
            return TF.center_crop(TF.resize(pixels, self.size, antialias=True), size)
        return TF.resize(pixels, size, antialias=True)


def _resized_crop_box(
    height: int, width: int, scale: tuple[float, float], gen: torch.Generator
) -> tuple[int, int, int, int]:
    """``(top, left, h, w)`` of a random window of ``scale`` of the area, aspect ratio 3/4 to
    4/3; the whole image where ten draws find none that fits."""
    area = height * width
    for _ in range(10):
        target = area * (scale[0] + (scale[1] - scale[0]) * torch.rand(1, generator=gen).item())
        ratio = math.exp(math.log(3 / 4) + math.log(16 / 9) * torch.rand(1, generator=gen).item())
        w, h = round(math.sqrt(target * ratio)), round(math.sqrt(target / ratio))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,), generator=gen))
            left = int(torch.randint(0, width - w + 1, (1,), generator=gen))
            return top, left, h, w
    return 0, 0, height, width


class _Order:
    """The sampler: one epoch's batches as ``(epoch, batch index, indices)``, from ``start``."""

    def __init__(self, n: int, batch_size: int, shuffle: bool, seed: int, drop_last: bool, rank: int, world: int):
        if n < world:
            raise MinitrainError(f"{n} images cannot be shared among {world} ranks")
        self.n, self.batch_size, self.shuffle, self.seed, self.drop_last = n, batch_size, shuffle, seed, drop_last
        self.rank, self.world = rank, world
        self.shard_size = n // world if shuffle else len(range(rank, n, world))
        self.epoch, self.start = 0, 0

    def __len__(self) -> int:
        n = self.shard_size
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self):
        epoch, start, bs = self.epoch, self.start, self.batch_size
        self.start = 0  # a later pass, without set_position, starts the epoch afresh
        if self.shuffle:
            order = torch.randperm(self.n, generator=torch.Generator().manual_seed(derive_seed(self.seed, epoch, -1)))
        else:
            order = torch.arange(self.n)
        if self.world > 1:
            order = order[: self.shard_size * self.world if self.shuffle else None][self.rank :: self.world]
        for b in range(start, len(self)):
            yield epoch, b, order[b * bs : (b + 1) * bs].tolist()


class FolderLoader:
    """Normalised float batches of one split of ``folder``; ``augment`` for training (shuffled,
    last partial batch dropped), ``None`` for evaluation (in order, every image once)."""

    def __init__(
        self,
        folder: Folder,
        split: str,
        batch_size: int,
        *,
        size: int,
        resize: str = "stretch",
        augment: Augment | None = None,
        seed: int = 0,
        device: str | torch.device = "cpu",
        num_workers: int | None = None,
        mean: tuple[float, ...] = (0.485, 0.456, 0.406),
        std: tuple[float, ...] = (0.229, 0.224, 0.225),
        channels_last: bool = False,
        dtype: torch.dtype = torch.float32,
    ):
        if batch_size < 1:
            raise MinitrainError(f"batch_size must be positive, got {batch_size}")
        self.device = torch.device(device)
        self.input_size, self.mean, self.std = (size, size), tuple(mean), tuple(std)  # for run.json: export
        self.scale = (1.0 / (255.0 * torch.tensor(std, device=self.device))).view(1, -1, 1, 1)
        self.shift = (-torch.tensor(mean, device=self.device) / torch.tensor(std, device=self.device)).view(1, -1, 1, 1)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.dtype = dtype
        rank, world = distributed.rank(), distributed.world_size()
        training = augment is not None
        self.order = _Order(len(folder.splits[split]), batch_size, training, seed, training, rank, world)
        if not len(self.order):
            raise MinitrainError(
                f"the {split} split has {self.order.shard_size} image(s) per process, fewer than batch_size "
                f"{batch_size}: lower batch_size"
            )
        self.dataset = FolderBatches(
            folder.root, folder.splits[split], size, resize, augment, seed, (rank,) if world > 1 else ()
        )
        workers = default_workers() if num_workers is None else num_workers
        self.loader = DataLoader(
            self.dataset,
            sampler=self.order,
            batch_size=None,
            num_workers=workers,
            persistent_workers=workers > 0,
            prefetch_factor=4 if workers > 0 else None,
            pin_memory=self.device.type == "cuda",
        )
        self.skipped: set[str] = set()

    def __len__(self) -> int:
        return len(self.order)

    def set_position(self, epoch: int, batch_idx: int = 0) -> None:
        """The next iteration yields epoch ``epoch``'s batches from ``batch_idx`` on."""
        self.order.epoch, self.order.start = epoch, batch_idx

    def __iter__(self):
        for images, labels, failed in self.loader:
            for message in failed:
                if message not in self.skipped:
                    self.skipped.add(message)
                    warnings.warn(f"{message}; left out ({len(self.skipped)} image(s) so far)", stacklevel=2)
            if len(labels):
                yield self.normalize(images), labels.to(self.device, non_blocking=True)

    def sample(self, count: int, seed: int) -> torch.Tensor:
        """``count`` of the split's images, drawn by ``seed`` and fitted as for evaluation (not
        augmented), uint8: what a first layer fitted to the data (ConvNet's whitening) sees."""
        d = self.dataset
        picked = torch.randperm(len(d.items), generator=torch.Generator().manual_seed(seed))[:count]
        return FolderBatches(d.root, d.items, d.size, d.resize)[(0, 0, picked.tolist())][0]

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images -> normalised ``dtype`` on the device, in the loader's memory format."""
        x = images.to(self.device, non_blocking=True).to(self.scale.dtype) * self.scale + self.shift
        return x.to(self.dtype, memory_format=self.memory_format)
