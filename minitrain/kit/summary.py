"""What a model is, in a line (the console prints it when a run starts) or in a table per module
(``minitrain summary RECIPE``: name, type, output shape for one batch, parameters), without
training."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def describe_model(model: nn.Module) -> str:
    """``2.31M parameters (2.30M trainable), 9.2 MB, float32 on cpu``."""
    parameters = list(model.parameters())
    total, trainable = sum(p.numel() for p in parameters), sum(p.numel() for p in parameters if p.requires_grad)
    size = sum(t.numel() * t.element_size() for t in [*parameters, *model.buffers()])
    dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in parameters})
    devices = sorted({str(p.device) for p in parameters})
    return (
        f"{count(total)} parameters ({count(trainable)} trainable), "
        f"{f'{size / 1e6:.1f} MB' if size >= 1e5 else f'{size / 1e3:.1f} kB'}, "
        f"{'/'.join(dtypes) or '-'} on {'/'.join(devices) or '-'}"
    )


def count(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}k" if n >= 1e3 else str(n)


def table(model: nn.Module, inputs: Any, depth: int = 3) -> str:
    """One row per module down to ``depth`` levels: name, type, the shape of its output for
    ``inputs`` (one forward pass, in eval mode, without gradients) and its parameters (its
    children's included)."""
    shapes: dict[str, str] = {}
    handles = []
    for name, module in model.named_modules():
        if name.count(".") < depth:
            handles.append(
                module.register_forward_hook(
                    lambda module, args, output, name=name: shapes.setdefault(name, _shape(output)) and None
                )
            )
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(inputs)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    rows = [("module", "type", "output", "parameters")]
    for name, module in model.named_modules():
        if name.count(".") < depth:
            own = sum(p.numel() for p in module.parameters())
            label = "(model)" if not name else "  " * name.count(".") + name.rsplit(".", 1)[-1]
            rows.append((label, type(module).__name__, shapes.get(name, "-"), f"{own:,}"))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = [
        "  ".join(cell.ljust(w) if i < 3 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
        for row in rows
    ]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def _shape(output: Any) -> str:
    if isinstance(output, torch.Tensor):
        return "×".join(map(str, output.shape))
    if isinstance(output, (tuple, list)):
        return "(" + ", ".join(_shape(o) for o in output) + ")"
    if isinstance(output, dict):
        return "{" + ", ".join(f"{k}: {_shape(v)}" for k, v in output.items()) + "}"
    return type(output).__name__
