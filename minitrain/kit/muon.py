"""Muon: momentum SGD whose update for a weight matrix is replaced by the nearest
semi-orthogonal matrix, so that every direction of the update moves at the same rate instead of
the few dominant ones taking nearly all of it.

The orthogonalisation is a quintic Newton–Schulz iteration run in bf16 — a few matrix products,
no SVD. Its coefficients (3.4445, -4.7750, 2.0315), published with Muon, favour speed over
exactness: singular values land near 1 rather than on it, which training does not mind. A conv
filter bank counts as the matrix (out_channels, in_channels·kh·kw).

Groups with ``orthogonalize=False`` get plain SGD with coupled weight decay and (Nesterov)
momentum, the arithmetic of ``torch.optim.SGD``, so a single optimizer — and a single
learning-rate schedule — covers a model whose filters use Muon while its biases and head do not.
"""

from __future__ import annotations

import math

import torch

NEWTON_SCHULZ = (3.4445, -4.7750, 2.0315)


def orthogonalize(matrix: torch.Tensor, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    """Approximately ``U @ V.T`` for ``matrix = U S V.T``, same shape and dtype as ``matrix``."""
    a, b, c = NEWTON_SCHULZ
    x = matrix.bfloat16()
    tall = x.size(0) > x.size(1)
    if tall:  # iterate on the smaller Gram matrix
        x = x.T
    x = x / (x.norm() + eps)  # singular values into (0, 1], where the iteration converges
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return (x.T if tall else x).to(matrix.dtype)


class Muon(torch.optim.Optimizer):
    """Per-group options: ``lr``, ``momentum``, ``nesterov``, ``weight_decay``, ``orthogonalize``
    (Muon for this group), ``normalize`` (before each step rescale each orthogonalised tensor to
    norm sqrt(rows): for filters followed by BatchNorm the scale is irrelevant, and fixing it keeps
    the effective step size fixed, in place of weight decay) and ``ns_steps``."""

    def __init__(
        self,
        params,
        lr: float,
        momentum: float = 0.9,
        nesterov: bool = True,
        weight_decay: float = 0.0,
        orthogonalize: bool = False,
        normalize: bool = False,
        ns_steps: int = 3,
    ):
        if lr < 0 or not 0 <= momentum < 1 or weight_decay < 0 or ns_steps < 1:
            raise ValueError(
                f"Muon: invalid lr={lr}, momentum={momentum}, weight_decay={weight_decay} or ns_steps={ns_steps}"
            )
        super().__init__(
            params,
            dict(
                lr=lr,
                momentum=momentum,
                nesterov=nesterov,
                weight_decay=weight_decay,
                orthogonalize=orthogonalize,
                normalize=normalize,
                ns_steps=ns_steps,
            ),
        )

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._update(p, group)
        return loss

    def _update(self, p: torch.Tensor, group: dict) -> None:
        grad, momentum = p.grad, group["momentum"]
        assert grad is not None  # step() updates only parameters that have a gradient
        if group["weight_decay"]:
            grad = grad.add(p, alpha=group["weight_decay"])
        state = self.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = grad.clone()
        else:
            state["momentum_buffer"].mul_(momentum).add_(grad)
        buf = state["momentum_buffer"]
        update = grad.add(buf, alpha=momentum) if group["nesterov"] else buf
        if group["orthogonalize"]:
            if group["normalize"]:
                p.mul_(math.sqrt(p.size(0)) / p.norm())  # a device tensor: no host sync
            update = orthogonalize(update.reshape(len(update), -1), group["ns_steps"]).view_as(p)
        p.add_(update, alpha=-group["lr"])
