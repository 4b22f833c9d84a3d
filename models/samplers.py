"""Samplers in EDM's sigma parametrisation (x = y + sigma n): Heun (Karras et al. 2022, Algorithm 2), DDIM
(= Euler for eta 0) and DPM-Solver++(2M) (Lu et al. 2022, arXiv:2211.01095, Algorithm 2).

All three integrate the probability-flow ODE ``dx/dsigma = (x - D(x; sigma)) / sigma`` (Eq. 1 with sigma(t) =
t, s(t) = 1, and the score of Eq. 3) from ``sigma_max`` down to 0 over the time steps of Eq. 5, or over noise
levels the caller gives (``sigmas``, e.g. a distilled student's). ``denoise`` is any callable ``(x, sigma) -> D(x; sigma)`` with ``x`` [B, ...] and ``sigma`` a [B] tensor, so a caller can close
over conditioning or blend the denoised estimates of overlapping patches (multi-diffusion) at every step.

Randomness comes only from explicit ``torch.Generator`` objects: the caller draws ``latents`` (unit normal)
with one and passes another for the stochastic variants. :func:`seed_for` derives independent 63-bit seeds
per (base seed, time index, member, patch, ...) with numpy's SeedSequence, never Python's ``hash()``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch

__all__ = [
    "Denoiser",
    "karras_sigmas",
    "noise_levels",
    "edm_sampler",
    "ddim_sampler",
    "dpmpp_2m_sampler",
    "make_generator",
    "seed_for",
]

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def seed_for(base_seed: int, *ints: int) -> int:
    """A 63-bit seed derived from ``base_seed`` and ``ints`` (e.g. time index, member): stable across runs,
    platforms and Python versions, and statistically independent for distinct tuples."""
    values = (base_seed, *ints)
    bad = [v for v in values if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 0]
    if bad:
        raise ValueError(f"seed_for needs non-negative integers, got {values!r} (bad: {bad!r})")
    lo, hi = np.random.SeedSequence([int(v) for v in values]).generate_state(2, dtype=np.uint32)
    return ((int(hi) << 32) | int(lo)) & ((1 << 63) - 1)


def make_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A ``torch.Generator`` on ``device`` seeded with ``seed``."""
    return torch.Generator(device=device).manual_seed(int(seed))


def karras_sigmas(
    num_steps: int,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    rho: float = 7.0,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """The ``num_steps + 1`` noise levels of Eq. 5: sigma_max ... sigma_min, then sigma_N = 0."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if not 0 < sigma_min <= sigma_max:
        raise ValueError(f"need 0 < sigma_min <= sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}")
    i = torch.arange(num_steps, dtype=dtype, device=device)
    ramp = i / max(num_steps - 1, 1)
    t = (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return torch.cat([t, torch.zeros_like(t[:1])])


def noise_levels(
    num_steps: int,
    sigma_min: float,
    sigma_max: float,
    rho: float,
    sigmas: Sequence[float] | None,
    *,
    device: torch.device | str,
    dtype: torch.dtype,
) -> torch.Tensor:
    """The sampler's noise levels: ``sigmas`` when given (strictly decreasing, positive except a final 0,
    e.g. the levels a distilled student was trained on), else Eq. 5's ``karras_sigmas``."""
    if sigmas is None:
        return karras_sigmas(num_steps, sigma_min, sigma_max, rho, device=device, dtype=dtype)
    t = torch.as_tensor([float(s) for s in sigmas], dtype=dtype, device=device)
    if t.ndim != 1 or len(t) < 2 or bool((t[:-1] <= 0).any()) or bool((t[1:] >= t[:-1]).any()) or t[-1] < 0:
        raise ValueError(
            f"sigmas must be >= 2 strictly decreasing noise levels, positive but for a final 0; got {list(sigmas)}"
        )
    return t


Generators = torch.Generator | Sequence[torch.Generator]


def _randn_like(x: torch.Tensor, generator: Generators | None, what: str) -> torch.Tensor:
    """Unit normal noise shaped like ``x`` from ``generator``; a sequence of (CPU) generators draws one equal
    block of ``x``'s leading dim each (per-item noise, independent of the other items in the batch)."""
    if generator is None:
        raise ValueError(f"{what} draws fresh noise: pass an explicit torch.Generator (see make_generator)")
    if isinstance(generator, torch.Generator):
        return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    k = len(generator)
    if k == 0 or x.shape[0] % k:
        raise ValueError(f"{what}: {k} generators cannot split a batch of {x.shape[0]} into equal blocks")
    block = (x.shape[0] // k, *x.shape[1:])
    noise = [torch.randn(block, generator=g, dtype=x.dtype, device=g.device) for g in generator]
    return torch.cat(noise).to(x.device)


def _call(denoise: Denoiser, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    return denoise(x, sigma.expand(x.shape[0])).to(x.dtype)


@torch.no_grad()
def edm_sampler(
    denoise: Denoiser,
    latents: torch.Tensor,
    *,
    num_steps: int = 18,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    rho: float = 7.0,
    S_churn: float = 0.0,
    S_min: float = 0.0,
    S_max: float = math.inf,
    S_noise: float = 1.0,
    generator: Generators | None = None,
    dtype: torch.dtype = torch.float64,
    sigmas: Sequence[float] | None = None,
) -> torch.Tensor:
    """Algorithm 2 (stochastic sampler with Heun's 2nd-order correction); S_churn = 0 gives Algorithm 1.

    ``latents`` are unit-normal; the chain starts at ``x_0 = sigma_max * latents``. The computation runs in
    ``dtype`` (float64 as in the reference code) and the result is returned in ``latents.dtype``. ``sigmas``
    replaces the Eq. 5 levels (:func:`noise_levels`); a step to sigma 0 takes no Heun correction.
    """
    t_steps = noise_levels(num_steps, sigma_min, sigma_max, rho, sigmas, device=latents.device, dtype=dtype)
    num_steps = len(t_steps) - 1
    x_next = latents.to(dtype) * t_steps[0]  # line 2: x_0 ~ N(0, t_0^2 I)
    for t_cur, t_next in zip(t_steps[:-1], t_steps[1:], strict=True):  # line 3
        x_cur = x_next
        # lines 4-6: temporarily raise the noise level by gamma_i (churn), adding matching fresh noise.
        gamma = min(S_churn / num_steps, math.sqrt(2) - 1) if S_min <= float(t_cur) <= S_max else 0.0
        t_hat = t_cur + gamma * t_cur
        x_hat = x_cur
        if gamma > 0:
            eps = _randn_like(x_cur, generator, "edm_sampler with S_churn > 0") * S_noise
            x_hat = x_cur + (t_hat**2 - t_cur**2).sqrt() * eps
        # lines 7-8: Euler step from t_hat to t_next.
        d_cur = (x_hat - _call(denoise, x_hat, t_hat)) / t_hat
        x_next = x_hat + (t_next - t_hat) * d_cur
        # lines 9-11: Heun's 2nd-order correction, except on a step to sigma = 0.
        if float(t_next) > 0:
            d_prime = (x_next - _call(denoise, x_next, t_next)) / t_next
            x_next = x_hat + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_prime)
    return x_next.to(latents.dtype)


@torch.no_grad()
def ddim_sampler(
    denoise: Denoiser,
    latents: torch.Tensor,
    *,
    num_steps: int = 50,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    rho: float = 7.0,
    eta: float = 0.0,
    generator: Generators | None = None,
    dtype: torch.dtype = torch.float64,
    sigmas: Sequence[float] | None = None,
) -> torch.Tensor:
    """DDIM (Song et al. 2021) in the variance-exploding sigma parametrisation, first order.

    Each step predicts ``eps = (x - D(x; sigma)) / sigma`` and moves to ``sigma_next``::

        sigma_up   = eta * sigma_next * sqrt(1 - sigma_next^2 / sigma^2)   (capped at sigma_next)
        sigma_down = sqrt(sigma_next^2 - sigma_up^2)
        x_next     = D + sigma_down * eps + sigma_up * z,  z ~ N(0, I)

    ``eta = 0`` is deterministic DDIM (= an Euler step of the ODE); ``eta = 1`` is ancestral (DDPM-like)
    sampling. Noise levels follow Eq. 5 unless ``sigmas`` are given, like :func:`edm_sampler`.
    """
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    t_steps = noise_levels(num_steps, sigma_min, sigma_max, rho, sigmas, device=latents.device, dtype=dtype)
    x = latents.to(dtype) * t_steps[0]
    for t_cur, t_next in zip(t_steps[:-1], t_steps[1:], strict=True):
        denoised = _call(denoise, x, t_cur)
        eps = (x - denoised) / t_cur
        sigma_up = torch.clamp(eta * t_next * (1 - t_next**2 / t_cur**2).clamp(min=0).sqrt(), max=t_next)
        sigma_down = (t_next**2 - sigma_up**2).clamp(min=0).sqrt()
        x = denoised + sigma_down * eps
        if eta > 0 and float(sigma_up) > 0:
            x = x + sigma_up * _randn_like(x, generator, "ddim_sampler with eta > 0")
    return x.to(latents.dtype)


@torch.no_grad()
def dpmpp_2m_sampler(
    denoise: Denoiser,
    latents: torch.Tensor,
    *,
    num_steps: int = 10,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    rho: float = 7.0,
    generator: Generators | None = None,
    dtype: torch.dtype = torch.float64,
    sigmas: Sequence[float] | None = None,
) -> torch.Tensor:
    """DPM-Solver++(2M): the second-order multistep solver of Lu et al. (2022), Algorithm 2, one network call
    per step (``num_steps`` calls in all), deterministic (``generator`` is unused).

    With alpha = 1 and ``lambda = -ln(sigma)``, step ``i`` (``h = lambda_{i+1} - lambda_i``) is::

        D'      = D_i                                                  (first step, or a step to sigma 0)
        D'      = (1 + 1/(2 r)) D_i - 1/(2 r) D_{i-1},  r = h_{i-1} / h   (otherwise)
        x_{i+1} = (sigma_{i+1} / sigma_i) x_i - expm1(-h) D'

    so the data prediction is extrapolated linearly in lambda from the last two calls. Noise levels as in
    :func:`edm_sampler`.
    """
    t_steps = noise_levels(num_steps, sigma_min, sigma_max, rho, sigmas, device=latents.device, dtype=dtype)
    x = latents.to(dtype) * t_steps[0]
    denoised_prev, h_prev = None, None
    for t_cur, t_next in zip(t_steps[:-1], t_steps[1:], strict=True):
        denoised = _call(denoise, x, t_cur)
        if float(t_next) == 0:  # the last step lands on the data prediction itself
            x = denoised
            break
        h = t_cur.log() - t_next.log()  # lambda_{i+1} - lambda_i
        d = denoised
        if denoised_prev is not None:
            r = h_prev / h
            d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * denoised_prev
        x = (t_next / t_cur) * x - torch.expm1(-h) * d
        denoised_prev, h_prev = denoised, h
    return x.to(latents.dtype)
