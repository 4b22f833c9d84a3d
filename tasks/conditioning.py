"""Model conditioning on the fine grid: the coarse field put back on the fine grid, static fields, position.

One home for the inputs every diffusion method sees, so training (perfect-model pairs from fine truth)
and inference (a regridded GCM) build them identically:

- ``<var>_coarse``: the coarse field (fine truth area-averaged by ``factor`` in training, or a GCM
  conservatively regridded onto the same coarse grid at inference) bilinearly interpolated to the fine
  grid, edges clamped (the outermost half coarse cell lies outside the coarse centres);
- static fields on the fine grid: ``orog`` (m), ``orog_std`` (m), ``sftlf`` (%), scaled for the network by
  the fixed constants of :data:`STATIC_SCALING`;
- position: sin/cos of latitude and longitude;
- time of year: the cyclic fraction of the year at mid-month, passed to the network as an embedding.

:func:`normalize_conditioning` maps a stack to network space (the same for training and inference).

Contract: :func:`conditioning_stack` returns a DataArray (time, channel, lat, lon) float32 whose
``channel`` coordinate equals :meth:`ConditioningSpec.channel_names`, in that order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import xarray as xr

from climrecon.models.normalization import NormalizationStats
from climrecon.tasks.grids import Grid

__all__ = [
    "ConditioningSpec",
    "ConditioningError",
    "perfect_model_coarse",
    "coarse_on_fine",
    "conditioning_stack",
    "time_of_year",
    "STATIC_SCALING",
    "normalize_conditioning",
]

POSITION_CHANNELS = ("sin_lat", "cos_lat", "sin_lon", "cos_lon")
STATIC_SCALING: dict[str, tuple[float, float]] = {
    "orog": (0.0, 1000.0),  # m -> km
    "orog_std": (0.0, 200.0),  # sub-grid spread, in units of 200 m
    "sftlf": (50.0, 50.0),  # % -> [-1, 1]
}
"""Fixed ``(offset, scale)`` of each static conditioning channel: network value = (x - offset) / scale."""


class ConditioningError(ValueError):
    """Inputs cannot be turned into the conditioning the model expects (missing variable, grid mismatch)."""


@dataclass(frozen=True)
class ConditioningSpec:
    """Which variables the model downscales, the coarsening factor, and the extra conditioning channels."""

    variables: tuple[str, ...]
    factor: int
    static: tuple[str, ...] = ("orog", "orog_std", "sftlf")
    position: bool = True
    coarse_suffix: str = field(default="_coarse", repr=False)

    def channel_names(self) -> list[str]:
        names = [f"{v}{self.coarse_suffix}" for v in self.variables] + list(self.static)
        return names + (list(POSITION_CHANNELS) if self.position else [])


def perfect_model_coarse(truth: xr.Dataset, factor: int) -> xr.Dataset:
    """Fine truth area-averaged by ``factor`` (the coarse input of perfect-model training and evaluation)."""
    from climrecon.tasks.regrid import coarsen_blocks

    return coarsen_blocks(truth, factor)


def coarse_on_fine(coarse: xr.Dataset, fine: Grid) -> xr.Dataset:
    """Bilinear interpolation of coarse fields to the fine grid, clamped at the edges."""
    from climrecon.tasks.regrid import bilinear

    return bilinear(coarse, fine, allow_extrapolation=True)


def time_of_year(time: xr.DataArray | np.ndarray) -> np.ndarray:
    """Fraction of the year at mid-month, in [0, 1), for monthly labels in any calendar: (month - 0.5) / 12."""
    months = np.array([t.month for t in np.asarray(time).ravel()], dtype=np.float32)
    return ((months - 0.5) / 12.0).astype(np.float32)


def _position(grid: Grid) -> dict[str, np.ndarray]:
    lat2, lon2 = np.meshgrid(np.deg2rad(grid.lat), np.deg2rad(grid.lon), indexing="ij")
    return {"sin_lat": np.sin(lat2), "cos_lat": np.cos(lat2), "sin_lon": np.sin(lon2), "cos_lon": np.cos(lon2)}


def conditioning_stack(coarse_fine: xr.Dataset, static_fine: xr.Dataset, spec: ConditioningSpec) -> xr.DataArray:
    """Stack coarse-on-fine fields, static fields and position into (time, channel, lat, lon) float32.

    ``coarse_fine`` holds ``spec.variables`` on the fine grid (output of :func:`coarse_on_fine`);
    ``static_fine`` holds ``spec.static`` on the same grid (see ``regrid.static_on_grid``).
    """
    missing = [v for v in spec.variables if v not in coarse_fine]
    if missing:
        raise ConditioningError(f"coarse input lacks variable(s) {missing}; it has {sorted(map(str, coarse_fine.data_vars))}")
    missing = [v for v in spec.static if v not in static_fine]
    if missing:
        raise ConditioningError(f"static fields lack {missing}; they have {sorted(map(str, static_fine.data_vars))}")
    grid = Grid.from_dataset(coarse_fine, "coarse input on the fine grid")
    if Grid.from_dataset(static_fine, "static fields") != grid:
        raise ConditioningError(
            f"static fields are on {Grid.from_dataset(static_fine).describe()} but the coarse input on {grid.describe()}"
        )
    planes = [coarse_fine[v].transpose("time", "lat", "lon").astype("float32") for v in spec.variables]
    for name in spec.static:
        planes.append(static_fine[name].transpose("lat", "lon").astype("float32").expand_dims(time=coarse_fine.time))
    if spec.position:
        for name, arr in _position(grid).items():
            plane = xr.DataArray(arr.astype("float32"), dims=("lat", "lon"), coords={"lat": coarse_fine.lat, "lon": coarse_fine.lon})
            planes.append(plane.expand_dims(time=coarse_fine.time))
    stack = xr.concat([p.drop_vars([c for c in p.coords if c not in ("time", "lat", "lon")]) for p in planes], dim="channel")
    stack = stack.assign_coords(channel=spec.channel_names()).transpose("time", "channel", "lat", "lon")
    return stack.rename("conditioning")


def normalize_conditioning(
    cond: np.ndarray | torch.Tensor, channel_names: Sequence[str], stats: NormalizationStats
) -> np.ndarray | torch.Tensor:
    """Physical conditioning [..., C, H, W] -> network space: each ``<var>_coarse`` channel with its
    variable's statistics in ``stats`` (so coarse and fine share one scale), static channels with the FIXED
    constants of :data:`STATIC_SCALING`, position channels (sin/cos, already in [-1, 1]) unchanged. Same
    array type out as in (numpy or torch), float32."""
    if cond.shape[-3] != len(channel_names):
        raise ConditioningError(
            f"conditioning has {cond.shape[-3]} channels but {len(channel_names)} names {list(channel_names)}"
        )
    planes = []
    for i, name in enumerate(channel_names):
        x = cond[..., i, :, :]
        if name.endswith("_coarse") and name[: -len("_coarse")] in stats.variables:
            one = stats.subset([name[: -len("_coarse")]])
            planes.append(one.normalize(x[..., None, :, :])[..., 0, :, :])
        elif name in STATIC_SCALING:
            offset, scale = STATIC_SCALING[name]
            planes.append((x - offset) / scale)
        elif name in POSITION_CHANNELS:
            planes.append(x)
        else:
            raise ConditioningError(
                f"no normalisation rule for conditioning channel {name!r}; known: <variable>_coarse for "
                f"{list(stats.variables)}, {sorted(STATIC_SCALING)}, {list(POSITION_CHANNELS)}"
            )
    if isinstance(cond, torch.Tensor):
        return torch.stack(planes, dim=-3).to(torch.float32)
    return np.stack(planes, axis=-3).astype(np.float32)
