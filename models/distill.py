"""Few-step students of a deterministic EDM sampler: progressive distillation (Salimans & Ho 2022, "Progressive
Distillation for Fast Sampling of Diffusion Models", arXiv:2202.00512, Algorithm 2), one round of factor K
with a Heun teacher (EDM's Algorithm 1) instead of K halving rounds with a DDIM teacher.

The student ``D_s`` samples with DDIM (= Euler, one network call per step) on ``N`` noise levels
``s_0 > ... > s_N = 0`` that are every K-th level of the teacher's Eq. 5 schedule ``t_0 .. t_{KN}``
(:func:`student_levels`). For segment ``k``, from ``x`` at ``s_k = t_{Kk}``:

- the teacher integrates K Heun steps ``t_{Kk} -> t_{K(k+1)}`` and lands at ``x_T``;
- one Euler step of the student lands at ``x' = (s_{k+1}/s_k) x + (1 - s_{k+1}/s_k) D_s(x; s_k)``;
- so ``x' = x_T`` exactly when ``D_s(x; s_k) = (x_T - (s_{k+1}/s_k) x) / (1 - s_{k+1}/s_k)``: the
  distillation target (Algorithm 2's x~ in the sigma parametrisation), and the loss is EDM's weighted
  squared error against it.

As in the paper, ``x`` is drawn from the forward process of training data (``y + s_k n``) and the student
starts from the teacher's weights. :class:`DistillationLoss` has the trainer's loss signature, so the one
training loop (:mod:`climrecon.models.trainer`) trains students too.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from climrecon.models.samplers import edm_sampler, karras_sigmas

__all__ = ["student_levels", "DistillationLoss"]


def student_levels(
    steps: int, teacher_steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(student levels ``s_0..s_N`` with ``s_N = 0``, teacher levels ``t_0..t_{KN}``): the teacher's are Eq. 5
    with ``teacher_steps`` steps, the student's every K-th of them (``K = teacher_steps / steps``)."""
    if steps < 1 or teacher_steps % steps:
        raise ValueError(
            f"teacher_steps ({teacher_steps}) must be a positive multiple of the student's steps ({steps})"
        )
    teacher = karras_sigmas(teacher_steps, sigma_min, sigma_max, rho).tolist()
    k = teacher_steps // steps
    return tuple(teacher[::k]), tuple(teacher)


class DistillationLoss:
    """Per-element distillation loss [B, C, H, W] of a student denoiser against K Heun steps of ``teacher``
    (module docstring); one segment per batch, drawn from the trainer's generator.

    ``teacher(x, sigma [B], cond, time_of_year) -> D(x)``, frozen (no gradients flow into it);
    ``sigma_data`` sets EDM's weight ``lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2``.
    """

    def __init__(
        self,
        teacher: Callable[..., torch.Tensor],
        steps: int,
        teacher_steps: int,
        *,
        sigma_data: float = 1.0,
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
        rho: float = 7.0,
    ):
        self.teacher = teacher
        self.levels, self.teacher_levels = student_levels(steps, teacher_steps, sigma_min, sigma_max, rho)
        self.k = teacher_steps // steps
        self.sigma_data = float(sigma_data)

    def target(
        self,
        x: torch.Tensor,
        segment: int,
        cond: torch.Tensor | None,
        time_of_year: torch.Tensor | None,
    ) -> torch.Tensor:
        """The denoised field whose Euler step from ``s_segment`` lands where the teacher's K Heun steps do."""
        s, s_next = self.levels[segment], self.levels[segment + 1]
        sub = self.teacher_levels[self.k * segment : self.k * (segment + 1) + 1]
        with torch.no_grad():
            x_teacher = edm_sampler(
                lambda z, sigma: self.teacher(z, sigma, cond, time_of_year),
                x / s,  # edm_sampler starts from latents * sub[0] = x
                sigmas=sub,
                dtype=torch.float32,
            )
        ratio = s_next / s
        return (x_teacher - ratio * x) / (1 - ratio)

    def __call__(
        self,
        net: Callable[..., torch.Tensor],
        y: torch.Tensor,
        cond: torch.Tensor | None = None,
        time_of_year: torch.Tensor | None = None,
        *,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        n_segments = len(self.levels) - 1
        segment = int(torch.randint(n_segments, (1,), generator=generator, device=y.device))
        sigma = self.levels[segment]
        x = y + sigma * torch.randn(y.shape, device=y.device, dtype=y.dtype, generator=generator)
        target = self.target(x, segment, cond, time_of_year)
        sig = torch.full((y.shape[0],), sigma, device=y.device, dtype=torch.float32)
        weight = (sigma**2 + self.sigma_data**2) / (sigma * self.sigma_data) ** 2
        return weight * (net(x, sig, cond, time_of_year) - target) ** 2
