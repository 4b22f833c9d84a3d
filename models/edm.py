"""EDM: preconditioning and training loss of Karras et al. (2022), "Elucidating the Design Space of
Diffusion-Based Generative Models" (NeurIPS; arXiv:2206.00364), Table 1 "Ours" column.

The denoiser D_theta(x; sigma) estimates the clean field y from x = y + n, n ~ N(0, sigma^2 I). It wraps a raw
network F_theta so that F's inputs and training targets have unit variance at every noise level:

    D_theta(x; sigma) = c_skip(sigma) x + c_out(sigma) F_theta(c_in(sigma) x; c_noise(sigma))      (Eq. 7)

    c_skip  = sigma_data^2 / (sigma^2 + sigma_data^2)
    c_out   = sigma sigma_data / sqrt(sigma^2 + sigma_data^2)
    c_in    = 1 / sqrt(sigma^2 + sigma_data^2)
    c_noise = ln(sigma) / 4

Training minimises the denoising loss (Eq. 2) weighted by lambda(sigma) = 1 / c_out^2 (Eq. 8, Table 1)
with ln(sigma) ~ N(P_mean, P_std^2). Fields are standardised per variable
(:mod:`climrecon.models.normalization`), hence the default ``sigma_data = 1`` rather than the paper's 0.5
for images in [-1, 1].
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
from torch import nn

from climrecon.models.unet import UNet

__all__ = ["EDMConfig", "EDMPrecond", "EDMLoss", "RegressionLoss", "REGRESSION_SIGMA"]

REGRESSION_SIGMA = 20.0
"""Fixed noise level at which an :class:`EDMPrecond` is used as a plain regression network (input zeros)."""


@dataclass(frozen=True)
class EDMConfig:
    """Settings of the EDM formulation saved with a model (sampling settings are chosen at sampling time)."""

    sigma_data: float = 1.0  # standard deviation of the (normalised) training data
    P_mean: float = -1.2  # training noise levels: ln(sigma) ~ N(P_mean, P_std^2)
    P_std: float = 1.2

    def __post_init__(self) -> None:
        if not self.sigma_data > 0:
            raise ValueError(f"invalid EDMConfig: sigma_data must be > 0, got {self.sigma_data}")
        if not self.P_std > 0:
            raise ValueError(f"invalid EDMConfig: P_std must be > 0, got {self.P_std}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> EDMConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown EDMConfig field(s) {unknown}; expected a subset of {sorted(known)}")
        return cls(**{k: float(v) for k, v in d.items()})


class EDMPrecond(nn.Module):
    """D_theta(x; sigma, cond, time_of_year) of Eq. 7 around a :class:`UNet`."""

    def __init__(self, net: UNet, config: EDMConfig = EDMConfig()):
        super().__init__()
        self.net = net
        self.config = config
        self.sigma_data = config.sigma_data

    def coefficients(
        self, sigma: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(c_skip, c_out, c_in, c_noise) at ``sigma`` (Table 1)."""
        sd = self.sigma_data
        c_skip = sd**2 / (sigma**2 + sd**2)
        c_out = sigma * sd / (sigma**2 + sd**2).sqrt()
        c_in = 1 / (sd**2 + sigma**2).sqrt()
        c_noise = sigma.log() / 4
        return c_skip, c_out, c_in, c_noise

    def forward(
        self,
        x_noisy: torch.Tensor,
        sigma: torch.Tensor | float,
        cond: torch.Tensor | None = None,
        time_of_year: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x_noisy [B, C, H, W]; sigma a scalar or [B]; returns D(x) [B, C, H, W] in float32."""
        x = x_noisy.to(torch.float32)
        b = x.shape[0]
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1)
        if sigma.numel() == 1:
            sigma = sigma.expand(b)
        if sigma.shape[0] != b:
            raise ValueError(
                f"sigma must be a scalar or have one value per sample ({b}), got {sigma.shape[0]}"
            )
        if cond is not None:
            cond = cond.to(torch.float32)
        c_skip, c_out, c_in, c_noise = (c.reshape(-1, 1, 1, 1) for c in self.coefficients(sigma))
        F_x = self.net(c_in * x, c_noise.reshape(-1), cond, time_of_year)  # Eq. 7
        return c_skip * x + c_out * F_x.to(torch.float32)


class EDMLoss:
    """Weighted denoising loss (Eq. 2 with lambda(sigma) of Table 1), per element: [B, C, H, W]."""

    def __init__(self, config: EDMConfig = EDMConfig()):
        self.P_mean = config.P_mean
        self.P_std = config.P_std
        self.sigma_data = config.sigma_data

    def sample_sigma(
        self, batch: int, *, device: torch.device, generator: torch.Generator | None
    ) -> torch.Tensor:
        """ln(sigma) ~ N(P_mean, P_std^2) (Table 1, "Noise distribution"); [B, 1, 1, 1]."""
        rnd_normal = torch.randn([batch, 1, 1, 1], device=device, generator=generator)
        return (rnd_normal * self.P_std + self.P_mean).exp()

    def weight(self, sigma: torch.Tensor) -> torch.Tensor:
        """lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2 = 1 / c_out^2."""
        return (sigma**2 + self.sigma_data**2) / (sigma * self.sigma_data) ** 2

    def __call__(
        self,
        net: EDMPrecond,
        y: torch.Tensor,
        cond: torch.Tensor | None = None,
        time_of_year: torch.Tensor | None = None,
        *,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        sigma = self.sample_sigma(y.shape[0], device=y.device, generator=generator)
        n = torch.randn(y.shape, device=y.device, dtype=y.dtype, generator=generator) * sigma
        D_yn = net(y + n, sigma.reshape(-1), cond, time_of_year)
        return self.weight(sigma) * (D_yn - y) ** 2  # Eq. 2, weighted as in Eq. 8


class RegressionLoss:
    """Mean squared error of an :class:`EDMPrecond` used as a deterministic regression (CorrDiff's mean
    network): ``D(0; sigma_fixed, cond, time_of_year)`` against the target, per element [B, C, H, W].

    The noisy input is all zeros and the noise level fixed (``sigma``), so ``D = c_out(sigma) F(0; c_noise, cond)``
    depends on the conditioning only; the generator is unused (the loss is deterministic given the batch).
    """

    def __init__(self, sigma: float = REGRESSION_SIGMA):
        if not sigma > 0:
            raise ValueError(f"RegressionLoss sigma must be > 0, got {sigma}")
        self.sigma = float(sigma)

    def __call__(
        self,
        net: EDMPrecond,
        y: torch.Tensor,
        cond: torch.Tensor | None = None,
        time_of_year: torch.Tensor | None = None,
        *,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        sigma = torch.full((y.shape[0],), self.sigma, device=y.device, dtype=torch.float32)
        return (net(torch.zeros_like(y), sigma, cond, time_of_year) - y) ** 2
