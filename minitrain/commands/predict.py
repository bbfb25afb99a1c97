"""``minitrain predict``: classify image files, or the images in folders, with a model that
``minitrain export`` wrote.

Each image (PNG, JPEG or anything else Pillow reads, of any size and mode) is turned upright as
its EXIF orientation says, converted to the model's channels (transparency is laid on white,
16-bit and float pixels are scaled to 8 bits), fitted to the model's input size, stretched or
scaled and cut at the centre, and normalised with the mean and std stored in the file; the
model's softmax gives the probabilities. Everything needed is in the model file: no recipe, no
run directory. An image that cannot be read is reported on its own; the others are classified.

A folder stands for the images under it, at any depth, in the sorted order of their paths: the
files whose name ends in the extension of a format Pillow decodes (:func:`image_suffixes`, in
any case), hidden files and folders left out. Its other files are named in one warning and not
read; a file with an image's extension that does not decode is reported like any other. A
folder without images is bad input, one line. The model sees the images in batches of
:data:`BATCH`, so a large folder needs no more memory than a small one.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from PIL import Image, ImageOps

from minitrain.commands import export
from minitrain.commands.exits import BAD_INPUT
from minitrain.engine.errors import MinitrainError
from minitrain.kit.images import image_suffixes, open_image

RESIZE = ("stretch", "crop")
BATCH = 64
"""Images read and classified at a time."""
COMMON = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
"""The extensions a folder without images is said to lack, of the many :func:`image_suffixes` holds."""


def add_parser(command) -> None:
    """Register ``minitrain predict``."""
    parser = command("predict", help="classify images with a model written by `minitrain export`")
    parser.add_argument("model", help="the exported model file")
    parser.add_argument(
        "images",
        nargs="+",
        metavar="IMAGE|FOLDER",
        help="PNG, JPEG or other image files, any size, or folders: the images under them, at any "
        "depth, sorted by path (files whose extension is of a format Pillow decodes)",
    )
    parser.add_argument("--top-k", type=int, default=5, metavar="K", help="classes to show per image (default 5)")
    parser.add_argument(
        "--resize",
        choices=["stretch", "crop"],
        default="stretch",
        help="stretch each image to the input size (default), or scale its short side and "
        "cut the centre (keeps the proportions)",
    )
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    results = predict(args.model, args.images, args.top_k, args.resize)
    if args.json:
        print(json.dumps(results, indent=2))
    for result in results:
        if "error" in result:
            print(f"minitrain: error: {result['error']}", file=sys.stderr)
        elif not args.json:
            print(f"{result['image']}: " + ", ".join(f"{t['class']} {t['probability']:.3f}" for t in result["top"]))
    return BAD_INPUT if any("error" in result for result in results) else 0


def predict(
    model_path: str | Path, images: list[str | Path], top_k: int = 5, resize: str = "stretch"
) -> list[dict[str, Any]]:
    """For each image, ``{"image": path, "top": [{"class", "index", "probability"}, ...]}``, the
    ``top_k`` most probable classes first, or ``{"image": path, "error": reason}``; a folder in
    ``images`` stands for the images under it (:func:`expand`)."""
    if top_k < 1:
        raise MinitrainError(f"--top-k must be at least 1, not {top_k}")
    if resize not in RESIZE:
        raise MinitrainError(f"--resize must be one of {', '.join(RESIZE)}, not {resize!r}")
    paths = expand(images)  # before the model loads: a folder without images is bad input
    model, metadata = export.load(model_path)
    names = metadata["class_names"]
    results: list[dict[str, Any]] = []
    for first in range(0, len(paths), BATCH):
        pixels: list[np.ndarray] = []
        readable: list[dict[str, Any]] = []
        for path in paths[first : first + BATCH]:
            try:
                pixels.append(read(Path(path), metadata, resize))
                readable.append({"image": str(path)})
                results.append(readable[-1])
            except MinitrainError as exc:
                results.append({"image": str(path), "error": str(exc)})
        if not readable:
            continue
        with torch.no_grad():
            probabilities = torch.softmax(model(normalize(pixels, metadata)).float(), dim=1)
        values, indices = probabilities.topk(min(top_k, probabilities.shape[1]), dim=1)
        for result, idx, val in zip(readable, indices, values):
            result["top"] = [
                {"class": names[i], "index": i, "probability": p} for i, p in zip(idx.tolist(), val.tolist())
            ]
    return results


def expand(arguments: list[str | Path]) -> list[str | Path]:
    """The images ``arguments`` name, in their order: a file (or anything not a folder) as it is,
    a folder as the images under it, at any depth, sorted by path. Hidden files and folders
    (names that start with a dot) are left out; the folder's files that are not images by their
    extension are named in one warning. A folder without images is a :class:`MinitrainError`."""
    suffixes = image_suffixes()
    paths: list[str | Path] = []
    for argument in arguments:
        folder = Path(argument)
        if not folder.is_dir():
            paths.append(argument)
            continue
        found: list[Path] = []
        others: list[Path] = []
        for root, dirs, files in os.walk(folder):  # symbolic links to folders are not followed
            dirs[:] = [name for name in dirs if not name.startswith(".")]
            for name in files:
                if not name.startswith("."):
                    (found if Path(name).suffix.lower() in suffixes else others).append(Path(root, name))
        others = sorted(others)
        listed = ", ".join(str(path.relative_to(folder)) for path in others[:5]) + (", ..." if len(others) > 5 else "")
        if not found:
            holds = f"; it holds {len(others)} other file(s): {listed}" if others else ""
            raise MinitrainError(
                f"no images in folder {folder} (looked at any depth for names ending "
                f"{', '.join(sorted(suffixes & COMMON))} or another format Pillow decodes){holds}"
            )
        if others:
            warnings.warn(
                f"predict: skipped {len(others)} file(s) in {folder} whose extension is not of an image "
                f"format Pillow decodes: {listed}",
                stacklevel=2,
            )
        paths.extend(sorted(found))
    return paths


def normalize(pixels: list[np.ndarray], metadata: dict[str, Any]) -> torch.Tensor:
    """uint8 H×W(×C) arrays -> one normalised float batch, N×C×H×W, as the exported model expects."""
    mean = torch.tensor(metadata["mean"]).view(-1, 1, 1)
    std = torch.tensor(metadata["std"]).view(-1, 1, 1)
    batch = torch.from_numpy(np.stack(pixels)).float().div_(255)
    batch = batch.unsqueeze(1) if batch.dim() == 3 else batch.permute(0, 3, 1, 2)
    return (batch - mean) / std


def read(path: Path | IO[bytes], metadata: dict[str, Any], resize: str = "stretch", name: str = "") -> np.ndarray:
    """One image file (or file object, called ``name`` in errors: ``minitrain serve``'s uploads)
    as uint8 pixels of the model's size and channels."""
    height, width = metadata["input_size"]
    channels = len(metadata["mean"])
    if channels not in (1, 3):
        raise MinitrainError(f"cannot feed images to a model with {channels} input channels")
    image = open_image(path, "L" if channels == 1 else "RGB", name=name)
    if resize == "crop":
        image = ImageOps.fit(image, (width, height), Image.Resampling.BILINEAR)
    else:
        image = image.resize((width, height), Image.Resampling.BILINEAR)
    return np.asarray(image)
