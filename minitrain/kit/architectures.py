"""torchvision's image classifiers by name (``resnet18``, ``mobilenet_v3_small``, ...), with a
head for the recipe's classes, and their pretrained weights where they are already on this
machine: nothing is downloaded, so a run never waits on the network or fails halfway for it.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlparse

import torch

from minitrain.engine.errors import MinitrainError
from minitrain.kit.finetune import load_matching


def build(arch: str, classes: int) -> torch.nn.Module:
    """torchvision's ``arch``, untrained, with ``classes`` outputs."""
    import torchvision.models

    names = torchvision.models.list_models(module=torchvision.models)
    if arch not in names:
        raise MinitrainError(
            f"arch {arch!r} is neither convnet nor a torchvision classifier (resnet18, resnet50, "
            f"mobilenet_v3_small, efficientnet_b0, ...: {len(names)} in torchvision.models.list_models())"
        )
    return torchvision.models.get_model(arch, weights=None, num_classes=classes)


def head_name(model: torch.nn.Module) -> str:
    """The name of the model's last linear layer, which maps its features to the classes."""
    linear = [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)]
    if not linear:
        raise MinitrainError(f"{type(model).__name__} has no linear layer to serve as its classifier head")
    return linear[-1]


def weights_file(arch: str) -> tuple[str, Path]:
    """``(url, path)``: where torchvision downloads ``arch``'s default pretrained weights from,
    and where in the torch hub cache it looks for them first (``$TORCH_HOME/hub/checkpoints``)."""
    import torchvision.models

    weights = torchvision.models.get_model_weights(arch).DEFAULT
    return weights.url, Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(weights.url).path).name


def cached_weights(arch: str) -> Path:
    """The file of ``arch``'s pretrained weights in the local cache; where it is absent, one line
    saying where to put it."""
    url, path = weights_file(arch)
    if not path.is_file():
        raise MinitrainError(
            f"pretrained=true: {arch}'s weights are not in torch's hub cache; download {url} to {path} "
            "(TORCH_HOME moves the cache), or train from scratch with pretrained=false"
        )
    return path


def load_pretrained(model: torch.nn.Module, path: Path) -> list[str]:
    """Load the weights in ``path`` into ``model``, every tensor whose name and shape fit (all
    but a head for other classes); returns the names left new."""
    return load_matching(model, torch.load(path, map_location="cpu", weights_only=True))
