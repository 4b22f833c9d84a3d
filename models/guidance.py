"""Guidance as a wrapper around a denoiser (physicsnemo's diffusion/guidance, Climate2Weather's score.py).

:class:`GuidedDenoiser` turns any full-field denoiser ``D(x; sigma)`` into the denoiser of the posterior
given an observation ``y = A(x) + noise``, with a linear observation operator ``A`` (a plain callable, e.g.
:class:`climrecon.models.operators.SeparableOperator`)::

    x0      = D(x; sigma)                            # the prior's denoised estimate
    L(x)    = loss(y, A(x0), weight)                 # "mse": 1/2 sum w (y - A x0)^2;  "norm": ||y - A x0||
    D'(x)   = x0 - zeta * s(sigma) * grad_x L        # moves every sampler step toward consistency with y

``s = 1`` (a fixed step: DPS's rule with the "norm" loss, ZSSD's with "mse"), or with ``noise=(sigma_y,
gamma)`` the Gaussian likelihood's ``s = sigma^2 / (sigma_y^2 + gamma v(sigma))``, ``v = sigma^2 /
(1 + sigma^2)`` the variance of x0 given x_t for a unit-variance prior (physicsnemo's DataConsistencyDPS
weight, Climate2Weather's ``std^2 + gamma (sigma/mu)^2`` with the EDM variance): with a Gaussian prior it is
the exact posterior score. The Jacobian ``d x0 / d x`` is exact with ``jacobian="network"``; with
``"identity"`` it is taken isotropic, ``(v / sigma^2) I`` (exact for a Gaussian prior; for the fixed-step
rules its scale is part of ``zeta``).

Since ``D = x + sigma^2 score``, the shift is a guidance term on the score (DPS, Chung et al. 2023: the
gradient of the unsquared norm, so the step is ``zeta / ||residual||``). ``jacobian="identity"`` takes
``d x0 / d x`` isotropic (the gradient is ``-A^T w (y - A x0)`` up to a scale, no backprop through the
network, memory of one field); ``jacobian="network"`` backpropagates through the denoiser (exact DPS).
The samplers never know guidance is there.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch

__all__ = ["GuidedDenoiser"]

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class GuidedDenoiser:
    """``D'(x; sigma)`` of :func:`D` guided toward ``y`` through ``operator`` (module docstring).

    ``y`` [B, C, *obs] and ``weight`` (broadcastable, >= 0; 0 drops a cell) live in the operator's output
    space; ``shape`` = (H, W) of the domain the operator reads: the first H x W cells of the denoiser's
    canvas (a tiled canvas may be larger; its padding is never guided).
    """

    def __init__(
        self,
        denoise: Denoiser,
        operator: Callable[[torch.Tensor], torch.Tensor],
        y: torch.Tensor,
        *,
        weight: torch.Tensor | None = None,
        zeta: float = 1.0,
        loss: Literal["mse", "norm"] = "mse",
        jacobian: Literal["identity", "network"] = "identity",
        shape: tuple[int, int] | None = None,
        noise: tuple[float, float] | None = None,
    ):
        if loss not in ("mse", "norm"):
            raise ValueError(f"loss must be 'mse' or 'norm', got {loss!r}")
        if jacobian not in ("identity", "network"):
            raise ValueError(f"jacobian must be 'identity' or 'network', got {jacobian!r}")
        self.denoise, self.operator, self.y = denoise, operator, y
        self.weight = torch.ones_like(y) if weight is None else weight
        self.zeta, self.loss_kind, self.jacobian, self.shape = float(zeta), loss, jacobian, shape
        self.noise = noise

    def step(self, sigma: torch.Tensor) -> torch.Tensor | float:
        """``zeta * s(sigma)`` (module docstring), broadcastable over [B, C, H, W]."""
        if self.noise is None:
            return self.zeta
        sigma_y, gamma = self.noise
        s2 = sigma.reshape(-1, 1, 1, 1).to(torch.float64) ** 2
        v = s2 / (1 + s2)
        # exact Jacobian: sigma^2 J^T; isotropic one, J = (v / sigma^2) I (Tweedie): sigma^2 J^T = v
        return self.zeta * (s2 if self.jacobian == "network" else v) / (sigma_y**2 + gamma * v)

    def loss(self, x0: torch.Tensor) -> torch.Tensor:
        """Sum over items of each item's loss (so each item's gradient is its own)."""
        y, w = self.y.to(x0.device, x0.dtype), self.weight.to(x0.device, x0.dtype)
        r = y - self.operator(x0)
        if self.loss_kind == "mse":
            return 0.5 * (w * r**2).sum()
        per_item = (w * r**2).flatten(1).sum(1)
        return per_item.clamp_min(1e-24).sqrt().sum()

    def _crop(self, field: torch.Tensor) -> torch.Tensor:
        return field if self.shape is None else field[..., : self.shape[0], : self.shape[1]]

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        if self.jacobian == "network":
            with torch.enable_grad():
                xg = x.detach().requires_grad_(True)
                x0 = self.denoise(xg, sigma)
                (grad,) = torch.autograd.grad(self.loss(self._crop(x0)), xg)
            return x0.detach() - self.step(sigma) * grad
        x0 = self.denoise(x, sigma)
        with torch.enable_grad():
            x0c = self._crop(x0).detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(self.loss(x0c), x0c)
        out = x0.clone()
        self._crop(out).sub_(self.step(sigma) * grad)
        return out
