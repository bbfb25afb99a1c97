"""ONNX files for ``minitrain export --format onnx``, and reading them back through ONNX Runtime.

The graph comes from PyTorch's own exporter (``torch.onnx.export``, its ``torch.export`` based
path), with a free batch dimension; the metadata a user of the file needs (class names, input
size, normalisation, pixel scale) goes into the model's ``metadata_props``, one JSON-encoded
value per key, where any ONNX tool shows it. ``onnx.checker`` checks the file before it is
written. onnx, onnxscript and onnxruntime come with the ``serve`` extra and are imported only here,
when an ONNX file is written or read.
"""

from __future__ import annotations

import contextlib
import io
import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from minitrain.engine.errors import MinitrainError

INPUT, OUTPUT = "images", "logits"
EXTRA = "the serve extra: pip install 'minitrain[serve]'"


def save(model: torch.nn.Module, example: torch.Tensor, metadata: dict[str, Any], out: Path) -> None:
    """Write ``model`` (traced on ``example``, batch dimension free) with ``metadata`` to ``out``."""
    try:
        import onnx
    except ImportError:
        raise MinitrainError(f"--format onnx needs onnx and onnxscript, from {EXTRA}") from None
    batch = torch.export.Dim("batch")
    with _quietly(), torch.no_grad():
        program = torch.onnx.export(
            model,
            (example,),
            dynamo=True,
            input_names=[INPUT],
            output_names=[OUTPUT],
            dynamic_shapes=({0: batch},),
            external_data=False,
            verbose=False,
        )
    assert program is not None  # (only the legacy exporter, writing a file itself, returns None)
    proto = program.model_proto
    proto.producer_name = "minitrain"
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, json.dumps(value)
    onnx.checker.check_model(proto, full_check=True)  # the graph, the types and the shapes
    onnx.save(proto, out)


def load(path: Path) -> tuple[OnnxModel, dict[str, Any]]:
    """``(model, metadata)`` of an ONNX file ``save`` wrote, run by ONNX Runtime."""
    try:
        import onnxruntime
    except ImportError:
        raise MinitrainError(f"running an ONNX file needs onnxruntime, from {EXTRA}") from None
    try:
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise MinitrainError(
            f"{path}: unreadable ONNX file ({type(exc).__name__}: {' '.join(str(exc).split())[:200]})"
        ) from None
    props = session.get_modelmeta().custom_metadata_map
    if "class_names" not in props or "input_size" not in props:
        raise MinitrainError(
            f"{path} is an ONNX file without minitrain's metadata (class names, input size, "
            "normalisation): write it with `minitrain export --format onnx`"
        )
    return OnnxModel(session), {key: json.loads(value) for key, value in props.items()}


class OnnxModel:
    """An ONNX Runtime session called like the PyTorch models ``export.load`` gives (a float
    batch in, logits out), or on numpy arrays with :meth:`numpy`."""

    def __init__(self, session: Any):
        self.session = session
        self.input = session.get_inputs()[0].name

    def numpy(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input: np.ascontiguousarray(batch, dtype=np.float32)})[0]

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.numpy(batch.detach().cpu().numpy()))


@contextlib.contextmanager
def _quietly():
    """The exporter reports each of its steps on stdout, and warns about what it handles itself."""
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield
