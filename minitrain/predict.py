"""``minitrain predict``: classify image files with a model that ``minitrain export`` wrote.

Each image (PNG, JPEG or anything else Pillow reads, of any size) is converted to the model's
channels, resized to its input size and normalised with the mean and std stored in the file;
the model's softmax gives the probabilities. Everything needed is in the model file: no recipe,
no run directory.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from minitrain import export
from minitrain.errors import MinitrainError


def predict(model_path: str | Path, images: list[str | Path], top_k: int = 5) -> list[dict[str, Any]]:
    """For each image, ``{"image": path, "top": [{"class", "index", "probability"}, ...]}``, the
    ``top_k`` most probable classes first."""
    if top_k < 1:
        raise MinitrainError(f"--top-k must be at least 1, not {top_k}")
    model, metadata = export.load(model_path)
    batch = preprocess(images, metadata)
    with torch.no_grad():
        probabilities = torch.softmax(model(batch).float(), dim=1)
    values, indices = probabilities.topk(min(top_k, probabilities.shape[1]), dim=1)
    names = metadata["class_names"]
    return [{"image": str(path),
             "top": [{"class": names[i], "index": i, "probability": p} for i, p in zip(idx.tolist(), val.tolist())]}
            for path, idx, val in zip(images, indices, values)]


def preprocess(images: list[str | Path], metadata: dict[str, Any]) -> torch.Tensor:
    """The images as one normalised float batch, N×C×H×W, the way the exported model expects."""
    height, width = metadata["input_size"]
    mean = torch.tensor(metadata["mean"]).view(-1, 1, 1)
    std = torch.tensor(metadata["std"]).view(-1, 1, 1)
    mode = {1: "L", 3: "RGB"}.get(len(metadata["mean"]))
    if mode is None:
        raise MinitrainError(f"cannot feed images to a model with {len(metadata['mean'])} input channels")
    pixels = [_read(Path(path), mode, (width, height)) for path in images]
    batch = torch.from_numpy(np.stack(pixels)).float().div_(255)
    batch = batch.unsqueeze(1) if mode == "L" else batch.permute(0, 3, 1, 2)
    return (batch - mean) / std


def _read(path: Path, mode: str, size: tuple[int, int]) -> np.ndarray:
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert(mode).resize(size, Image.Resampling.BILINEAR))
    except FileNotFoundError:
        raise MinitrainError(f"image not found: {path}") from None
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise MinitrainError(f"cannot read image {path}: {' '.join(str(exc).split())}") from None
