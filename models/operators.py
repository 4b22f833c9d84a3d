"""Observation operators as plain callables on torch tensors.

:class:`SeparableOperator` is a linear map between regular lat/lon grids that factorises per axis,
``out[..., i, j] = sum_kl lat[i, k] x[..., k, l] lon[j, l]`` (``lat @ x @ lon.T``): the area-weighted
(conservative) mean onto coarser cells, bilinear interpolation, and their compositions are all of this form
on regular grids, so an operator of any source grid costs two small matrix products and is differentiable.
The matrices come from the regrid code (numpy); this module only applies them.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["SeparableOperator", "GroupMean"]


class SeparableOperator:
    """``x [..., H, W] -> lat @ x @ lon.T  [..., h, w]`` with ``lat`` [h, H] and ``lon`` [w, W] (float64).

    ``A @ B`` is the composition ``x -> A(B(x))``; :meth:`adjoint` applies ``lat.T @ r @ lon``.
    """

    def __init__(self, lat: np.ndarray | torch.Tensor, lon: np.ndarray | torch.Tensor):
        self.lat = torch.as_tensor(np.asarray(lat, dtype=np.float64))
        self.lon = torch.as_tensor(np.asarray(lon, dtype=np.float64))
        if self.lat.ndim != 2 or self.lon.ndim != 2:
            raise ValueError(
                f"lat and lon must be matrices, got shapes {tuple(self.lat.shape)}, {tuple(self.lon.shape)}"
            )

    @property
    def in_shape(self) -> tuple[int, int]:
        return self.lat.shape[1], self.lon.shape[1]

    @property
    def out_shape(self) -> tuple[int, int]:
        return self.lat.shape[0], self.lon.shape[0]

    def _on(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lat.to(x.device, x.dtype), self.lon.to(x.device, x.dtype)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[-2:]) != self.in_shape:
            raise ValueError(f"operator expects fields of shape {self.in_shape}, got {tuple(x.shape[-2:])}")
        lat, lon = self._on(x)
        return lat @ x @ lon.T

    def adjoint(self, r: torch.Tensor) -> torch.Tensor:
        lat, lon = self._on(r)
        return lat.T @ r @ lon

    def gram_norm(self, row_weights: torch.Tensor | np.ndarray | None = None) -> float:
        """Largest eigenvalue of ``A^T W A`` (``W``: ``row_weights`` [h] on the output rows, default 1):
        a gradient step on ``1/2 ||y - A x||_W^2`` is stable for step sizes below ``2 / gram_norm``. Exact
        and cheap for a separable operator: the product of the two axes' largest eigenvalues."""
        w = (
            torch.ones(self.lat.shape[0], dtype=torch.float64)
            if row_weights is None
            else torch.as_tensor(np.asarray(row_weights, dtype=np.float64))
        )
        lat = torch.linalg.eigvalsh(self.lat.T @ (w[:, None] * self.lat)).max()
        lon = torch.linalg.eigvalsh(self.lon.T @ self.lon).max()
        return float(lat * lon)

    def __matmul__(self, other: SeparableOperator) -> SeparableOperator:
        if other.out_shape != self.in_shape:
            raise ValueError(f"cannot compose: {other.out_shape} out, {self.in_shape} in")
        return SeparableOperator(self.lat @ other.lat, self.lon @ other.lon)


class GroupMean:
    """``x [B * k, ...] -> operator(mean of each group of k consecutive items) [B, ...]``: an observation of
    the mean of k time steps (e.g. an annual mean observing 12 monthly fields)."""

    def __init__(self, operator: SeparableOperator, k: int):
        if k < 1:
            raise ValueError(f"group size must be >= 1, got {k}")
        self.operator, self.k = operator, int(k)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] % self.k:
            raise ValueError(f"{x.shape[0]} items do not split into groups of {self.k}")
        return self.operator(x.reshape(x.shape[0] // self.k, self.k, *x.shape[1:]).mean(1))
