"""Window folding: a prior over windows of k consecutive time steps turned into the denoiser of a sequence.

A window network denoises ``k`` consecutive steps stacked time-major along channels (``[N, k * C, H, W]``:
channel ``j * C + c`` is variable ``c`` of the window's step ``j``). For a sequence of ``n >= k`` steps the
``n - k + 1`` windows starting at every step are denoised together, and step ``t`` keeps the estimate of the
window CENTRED on it, ``start(t) = clip(t - k // 2, 0, n - k)`` (the first and last ``k // 2`` steps keep
the first/last window's), as Schmidt et al.'s reference code (Climate2Weather) does: every step's score
sees ``k // 2`` steps of context on each side wherever the sequence has them.

:class:`WindowDenoiser` is a denoiser wrapper like the others (tiling, guidance): the samplers integrate the
sequence state ``[B * n, C, H, W]`` (B sequences, step-major within each) and never know windows exist.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

__all__ = ["window_starts", "window_centres", "fold", "unfold", "WindowDenoiser"]

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _check(n: int, k: int) -> None:
    if k < 1 or k % 2 == 0:
        raise ValueError(f"a window is an odd number of steps, got {k}")
    if n < k:
        raise ValueError(f"a sequence of {n} steps is shorter than the prior's window of {k} steps")


def window_starts(n: int, k: int) -> np.ndarray:
    """[n] first step of the window whose estimate step ``t`` keeps (the window centred on it, clipped)."""
    _check(n, k)
    return np.clip(np.arange(n) - k // 2, 0, n - k)


def window_centres(n: int, k: int) -> np.ndarray:
    """[n - k + 1] the centre step of each window (window ``s`` covers steps ``s .. s + k - 1``)."""
    _check(n, k)
    return np.arange(n - k + 1) + k // 2


def fold(x: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """``[B * n, C, ...]`` (B sequences of n steps) -> ``[B * (n - k + 1), k * C, ...]``: every window."""
    _check(n, k)
    b, rest = x.shape[0] // n, x.shape[1:]
    seq = x.reshape(b, n, *rest)
    windows = seq.unfold(1, k, 1)  # [B, n - k + 1, C, ..., k]
    windows = windows.movedim(-1, 2)  # [B, n - k + 1, k, C, ...]
    return windows.reshape(b * (n - k + 1), k * rest[0], *rest[1:])


def unfold(w: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """Inverse of :func:`fold` on the kept estimates: ``[B * (n - k + 1), k * C, ...]`` -> ``[B * n, C, ...]``,
    step ``t`` from slot ``t - start(t)`` of window ``start(t)`` (:func:`window_starts`)."""
    starts = torch.as_tensor(window_starts(n, k), device=w.device)
    slots = torch.arange(n, device=w.device) - starts
    m = n - k + 1
    b, c = w.shape[0] // m, w.shape[1] // k
    windows = w.reshape(b, m, k, c, *w.shape[2:])
    return windows[:, starts, slots].reshape(b * n, c, *w.shape[2:])


class WindowDenoiser:
    """``D(x; sigma)`` of B sequences of ``n`` steps ``[B * n, C, ...]`` from a denoiser of windows
    ``[B * (n - k + 1), k * C, ...]`` (module docstring); one noise level for the whole call."""

    def __init__(self, denoise_windows: Denoiser, n: int, k: int):
        _check(n, k)
        self.denoise, self.n, self.k = denoise_windows, int(n), int(k)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        if x.shape[0] % self.n:
            raise ValueError(f"{x.shape[0]} items are not whole sequences of {self.n} steps")
        windows = fold(x, self.n, self.k)
        sig = sigma.reshape(-1)[:1].expand(windows.shape[0])
        return unfold(self.denoise(windows, sig), self.n, self.k)
