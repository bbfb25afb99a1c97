"""The model ``minitrain serve`` answers with: a run directory's last checkpoint (PyTorch, as
``export`` would write it) or an exported file (ONNX Runtime for ``.onnx``, PyTorch for the
others), turned into one function from a batch of uint8 pixels to class probabilities, by the
same steps as ``minitrain predict``, so that both give the same answer for the same image."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from minitrain.commands import export
from minitrain.commands.predict import normalize
from minitrain.engine.errors import MinitrainError

PRIVATE = ("checkpoint",)
"""Metadata not shown to clients: a path on the server."""


@dataclass
class Served:
    forward: Any  # normalised float batch (torch) -> logits (torch)
    metadata: dict[str, Any]
    runtime: str

    def probabilities(self, pixels: np.ndarray) -> np.ndarray:
        """N×H×W(×C) uint8 pixels -> N×classes probabilities. Called from worker threads: grad
        mode is per thread, hence inference mode here."""
        with torch.inference_mode():
            logits = self.forward(normalize(list(pixels), self.metadata))
            return torch.softmax(logits.float(), dim=1).numpy()

    def public_metadata(self) -> dict[str, Any]:
        return {key: value for key, value in self.metadata.items() if key not in PRIVATE}


def load(source: str | Path) -> Served:
    """The model of a run directory or of an exported file."""
    source = Path(source)
    if not source.exists():
        raise MinitrainError(f"not found: {source} (give a run directory or a file `minitrain export` wrote)")
    if source.is_dir():
        model, metadata, _ = export.prepare(*export.locate(source))
        metadata["format"] = "run directory"
        return Served(model, metadata, "pytorch")
    forward, metadata = export.load(source)
    return Served(forward, metadata, "onnxruntime" if source.suffix.lower() == ".onnx" else "pytorch")
