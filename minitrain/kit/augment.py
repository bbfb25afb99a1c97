"""Test-time augmentation as a computation: a model's logits averaged over flipped and shifted
views of each image. The ``tta`` plugin uses it in validation, and ``minitrain export --tta``
builds it into an exported model, so that the file scores as the run's validation did.

The untranslated image is the most informative view, so with ``translate`` the shifted views
together weigh as much as it does (each flip pair is averaged first): the weighting of the fast
CIFAR-10 scripts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def augmented_logits(model, inputs: torch.Tensor, flip: bool = True, translate: int = 0) -> torch.Tensor:
    """``model``'s logits for ``inputs`` (N×C×H×W) averaged over the views described above."""

    def mirrored(x: torch.Tensor) -> torch.Tensor:
        return (model(x) + model(x.flip(3))) / 2 if flip else model(x)

    logits = mirrored(inputs)
    if translate:
        t, (h, w) = translate, inputs.shape[2:]
        padded = F.pad(inputs, (t,) * 4, mode="reflect")
        shifted = (mirrored(padded[..., :h, :w]) + mirrored(padded[..., 2 * t :, 2 * t :])) / 2
        logits = (logits + shifted) / 2
    return logits


class TestTimeAugmented(nn.Module):
    """``model`` whose forward is :func:`augmented_logits`."""

    def __init__(self, model: nn.Module, flip: bool = True, translate: int = 0):
        super().__init__()
        self.model, self.flip, self.translate = model, flip, translate

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return augmented_logits(self.model, inputs, self.flip, self.translate)
