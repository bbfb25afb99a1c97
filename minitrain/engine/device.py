"""Devices, batches and random state: the small tensor plumbing the trainer and plugins share."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch

from minitrain.engine.errors import MinitrainError


def resolve_device(name: str) -> torch.device:
    """``auto`` picks cuda, then mps, then cpu; an explicit choice that is not there is an error."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise MinitrainError(f"device {name!r} requested but CUDA is not available here (use device=cpu or auto)")
    if name == "mps" and not torch.backends.mps.is_available():
        raise MinitrainError("device 'mps' requested but MPS is not available here (use device=cpu or auto)")
    return torch.device(name)


def to_device(batch: Any, device: torch.device) -> Any:
    """Move a tensor, or tensors nested in tuples/lists/dicts, without blocking the host."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (tuple, list)):
        moved = [to_device(b, device) for b in batch]
        if type(batch) is tuple:  # the common (inputs, targets) case, kept cheap: it runs every step
            return tuple(moved)
        return type(batch)(*moved) if hasattr(batch, "_fields") else type(batch)(moved)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch


class HostCopy:
    """A tensor's value brought to the host without making the host wait for the device.

    On CUDA the copy goes to pinned memory behind an event: :meth:`ready` can be polled at no
    cost, and :meth:`get` waits for this copy only, not for work queued after it. Elsewhere the
    copy is made at once. Plugins that show or log device values (a batch loss) use it so that
    reading them never stalls the training queue.
    """

    def __init__(self, tensor: torch.Tensor):
        tensor, self.event = tensor.detach(), None
        if tensor.device.type == "cuda":
            self.value = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            self.value.copy_(tensor, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.value = tensor.cpu()

    def ready(self) -> bool:
        return self.event is None or self.event.query()

    def get(self) -> torch.Tensor:
        if not self.ready():
            assert self.event is not None  # ready() is True without an event
            self.event.synchronize()
        return self.value


def batch_size(batch: Any) -> int:
    """Samples in a batch: the leading dimension of its first tensor (a host-side shape read)."""
    while not isinstance(batch, torch.Tensor):
        batch = next(iter(batch.values())) if isinstance(batch, dict) else batch[0]
    return batch.shape[0]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def get_rng_state() -> dict[str, Any]:
    """Every global generator's state, in types that ``torch.load(weights_only=True)`` accepts."""
    np_state = np.random.get_state(legacy=False)
    state = {
        "python": random.getstate(),
        "numpy": {
            "bit_generator": np_state["bit_generator"],
            "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np_state = state["numpy"]
    np.random.set_state(
        {
            "bit_generator": np_state["bit_generator"],
            "state": {"key": np_state["key"].numpy().astype(np.uint32), "pos": np_state["pos"]},
            "has_gauss": np_state["has_gauss"],
            "gauss": np_state["gauss"],
        }
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
