"""Building blocks of the fast CIFAR-10 networks, shared by the recipes."""

from __future__ import annotations

from typing import cast

import torch
from torch import nn


class PatchWhitening(nn.Conv2d):
    """A first layer whose filters whiten image patches: the eigenvectors of the training
    patches' covariance, scaled by 1/sqrt(eigenvalue), in both signs. The filters stay frozen;
    the bias may train."""

    def __init__(self, in_channels: int = 3, patch: int = 2, eps: float = 5e-4):
        super().__init__(in_channels, 2 * in_channels * patch * patch, patch, bias=True)
        self.eps = eps
        self.weight.requires_grad_(False)

    @torch.no_grad()
    def init_from(self, images: torch.Tensor) -> None:
        """``images``: normalised float N×C×H×W training images (a few thousand suffice)."""
        c, h, w = self.weight.shape[1:]
        patches = images.float().unfold(2, h, 1).unfold(3, w, 1)  # N, C, H', W', h, w
        patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(-1, c * h * w).double()
        eigvals, eigvecs = torch.linalg.eigh(patches.T @ patches / len(patches))
        filters = (eigvecs.T / torch.sqrt(eigvals + self.eps)[:, None]).reshape(-1, c, h, w)
        self.weight.copy_(torch.cat([filters, -filters]).to(self.weight))
        assert self.bias is not None  # built with bias=True
        self.bias.zero_()


def batch_norm(channels: int, momentum: float) -> nn.BatchNorm2d:
    """BatchNorm with its scale fixed at 1 (only the shift trains), as the fast scripts use."""
    bn = nn.BatchNorm2d(channels, momentum=momentum)
    bn.weight.requires_grad_(False)
    return bn


class ConvBlock(nn.Sequential):
    def __init__(self, c_in: int, c_out: int, bn_momentum: float):
        super().__init__(
            nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
            nn.MaxPool2d(2),
            batch_norm(c_out, bn_momentum),
            nn.GELU(),
            nn.Conv2d(c_out, c_out, 3, padding=1, bias=False),
            batch_norm(c_out, bn_momentum),
            nn.GELU(),
        )
        convs = cast("tuple[nn.Conv2d, nn.Conv2d]", (self[0], self[4]))  # the two convolutions above
        for conv in convs:  # start near identity on the channels that carry through
            nn.init.dirac_(conv.weight[: min(conv.in_channels, conv.out_channels)])


class ConvNet(nn.Module):
    """Patch whitening, three conv blocks that each halve the resolution, max-pool, linear head
    with scaled-down logits."""

    def __init__(self, widths=(64, 256, 256), classes: int = 10, bn_momentum: float = 0.4, logit_scale: float = 1 / 9):
        super().__init__()
        self.whiten = PatchWhitening(3, 2)
        channels = [self.whiten.out_channels, *widths]
        self.blocks = nn.Sequential(*(ConvBlock(a, b, bn_momentum) for a, b in zip(channels, channels[1:])))
        self.head = nn.Linear(widths[-1], classes, bias=False)
        self.logit_scale = logit_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(nn.functional.gelu(self.whiten(x)))
        return self.head(torch.amax(x, dim=(2, 3))) * self.logit_scale

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]
