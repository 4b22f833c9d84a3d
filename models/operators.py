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

__all__ = ["SeparableOperator"]


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

    def __matmul__(self, other: SeparableOperator) -> SeparableOperator:
        if other.out_shape != self.in_shape:
            raise ValueError(f"cannot compose: {other.out_shape} out, {self.in_shape} in")
        return SeparableOperator(self.lat @ other.lat, self.lon @ other.lon)
