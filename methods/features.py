"""Model conditioning on the fine grid: the coarse field put back on the fine grid, static fields, position.

One home for the inputs every diffusion method sees, so training (perfect-model pairs from fine truth)
and inference (a regridded GCM) build them identically:

- ``<var>_coarse``: the coarse field (fine truth area-averaged by ``factor`` in training, or a GCM
  conservatively regridded onto the same coarse grid at inference) bilinearly interpolated to the fine
  grid, edges clamped (the outermost half coarse cell lies outside the coarse centres);
- static fields on the fine grid: ``orog`` (m), ``orog_std`` (m), ``sftlf`` (%), scaled for the network by
  the fixed constants of :data:`STATIC_SCALING`;
- the coarse grid's view of static fields, ``<static>_coarse`` (e.g. ``orog_coarse``): the static field
  area-averaged onto the coarse grid and put back on the fine grid exactly like the coarse input
  (:func:`coarse_static_on_fine`). ``orog - orog_coarse`` is the terrain the coarse model does not resolve,
  the predictor of every elevation (lapse-rate) correction, and it tells a network where the coarse cells
  lie, which a random patch crop otherwise hides;
- ``<var>_clim`` (optional, ``ConditioningSpec.climatology``): the TRAINING period's mean residual of the
  fine field over its coarse input, ``mean(truth - <var>_coarse)`` per fine cell and calendar month
  (:func:`residual_climatology`): what the climatological-delta baseline knows. It is computed from
  training times only and stored with the checkpoint (:class:`Climatology`), so a model never has to
  rediscover the fixed fine-scale pattern of its region from the terrain alone;
- position: sin/cos of latitude and longitude;
- hour of day (sub-daily data, ``ConditioningSpec.diurnal``): sin/cos of the clock time, two planes;
- time of year: the cyclic fraction of the year at mid-month, passed to the network as an embedding.

:func:`normalize_conditioning` maps a stack to network space (the same for training and inference).

Contract: :func:`conditioning_stack` returns a DataArray (time, channel, lat, lon) float32 whose
``channel`` coordinate equals :meth:`ConditioningSpec.channel_names`, in that order.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import xarray as xr

from climrecon.models.normalization import NormalizationStats
from climrecon.tasks.grids import Grid

__all__ = [
    "TARGET_KINDS",
    "ConditioningSpec",
    "ConditioningError",
    "Climatology",
    "residual_climatology",
    "perfect_model_coarse",
    "fill_nearest",
    "coarse_view",
    "coarse_on_fine",
    "coarse_static_on_fine",
    "with_coarse_static",
    "conditioning_stack",
    "time_of_year",
    "STATIC_SCALING",
    "normalize_conditioning",
]

# what a patch model generates: the fine field's residual over the bilinear coarse input, or the field itself
TARGET_KINDS = ("residual", "full")

POSITION_CHANNELS = ("sin_lat", "cos_lat", "sin_lon", "cos_lon")
DIURNAL_CHANNELS = ("sin_hour", "cos_hour")
CLIM_SUFFIX = "_clim"
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
    """Which variables the model downscales, the coarsening factor, and the extra conditioning channels.

    Channel order: ``<variable>_coarse`` for each variable, ``<variable>_clim`` for each variable when
    ``climatology`` (the training-period residual climatology of the month), the ``static`` fields,
    ``<name>_coarse`` for each of ``static_coarse`` (the coarse grid's view of a static field), then the
    position channels; ``sin_hour``, ``cos_hour`` follow the climatology when ``diurnal``. The time-varying
    channels (coarse, climatology, hour of day) come first: :meth:`n_dynamic`.
    """

    variables: tuple[str, ...]
    factor: int
    static: tuple[str, ...] = ("orog", "orog_std", "sftlf")
    static_coarse: tuple[str, ...] = ()
    position: bool = True
    climatology: bool = False
    diurnal: bool = False  # sub-daily data: sin/cos of the hour of day as two more (time-varying) planes
    # the coarse fields as planes; False: a prior of the fine fields (ZSSD), no coarse input
    coarse: bool = True
    coarse_suffix: str = field(default="_coarse", repr=False)

    def __post_init__(self) -> None:
        unknown = [s for s in (*self.static, *self.static_coarse) if s not in STATIC_SCALING]
        if unknown:
            raise ConditioningError(f"unknown static field(s) {unknown}; known: {sorted(STATIC_SCALING)}")

    def static_names(self) -> list[str]:
        """Names of the static planes a caller supplies on the fine grid (``static``, then coarse views)."""
        return list(self.static) + [f"{s}{self.coarse_suffix}" for s in self.static_coarse]

    def climatology_names(self) -> list[str]:
        return [f"{v}{CLIM_SUFFIX}" for v in self.variables] if self.climatology else []

    def n_dynamic(self) -> int:
        """How many leading channels change with time (coarse fields, their climatology, the hour of day)."""
        return (
            len(self.coarse_names())
            + len(self.climatology_names())
            + (len(DIURNAL_CHANNELS) if self.diurnal else 0)
        )

    def coarse_names(self) -> list[str]:
        """The ``<variable>_coarse`` planes (none for a prior: ``coarse=False``)."""
        return [f"{v}{self.coarse_suffix}" for v in self.variables] if self.coarse else []

    def channel_names(self) -> list[str]:
        names = self.coarse_names() + self.climatology_names()
        names += list(DIURNAL_CHANNELS) if self.diurnal else []
        names += self.static_names()
        return names + (list(POSITION_CHANNELS) if self.position else [])

    @classmethod
    def from_channel_names(
        cls, variables: Sequence[str], factor: int, channels: Sequence[str]
    ) -> ConditioningSpec:
        """The spec whose :meth:`channel_names` are ``channels`` (e.g. a checkpoint's); ConditioningError if
        no spec produces exactly that list."""
        channels = list(channels)
        static = tuple(c for c in channels if c in STATIC_SCALING)
        static_coarse = tuple(
            c[: -len("_coarse")]
            for c in channels
            if c.endswith("_coarse") and c[: -len("_coarse")] in STATIC_SCALING
        )
        position = all(c in channels for c in POSITION_CHANNELS)
        climatology = any(c.endswith(CLIM_SUFFIX) for c in channels)
        spec = cls(
            tuple(variables),
            int(factor),
            static=static,
            static_coarse=static_coarse,
            position=position,
            climatology=climatology,
            diurnal=all(c in channels for c in DIURNAL_CHANNELS),
            coarse=any(f"{v}_coarse" in channels for v in variables),
        )
        if spec.channel_names() != channels:
            raise ConditioningError(
                f"conditioning channels {channels} are not [<variable>_coarse for {list(variables)}, static fields "
                f"from {sorted(STATIC_SCALING)}, their <name>_coarse views, {list(POSITION_CHANNELS)}]; the closest "
                f"layout is {spec.channel_names()}"
            )
        return spec


@dataclass(frozen=True)
class Climatology:
    """A training period's mean residual ``truth - <var>_coarse`` per calendar month, on a fine grid.

    ``values`` (12, V, H, W) float32, month 1..12 along the first axis, 0 where a cell is never valid;
    ``scale`` the per-variable std of the training residuals (network value = climatology / scale);
    ``months_present`` the calendar months the training times covered: a month without training data
    takes the mean of the months present (stated in the checkpoint). Stored in a checkpoint as arrays
    (:meth:`arrays`) plus a JSON description (:meth:`describe`).
    """

    values: np.ndarray
    variables: tuple[str, ...]
    lat: np.ndarray
    lon: np.ndarray
    scale: tuple[float, ...]
    months_present: tuple[int, ...] = tuple(range(1, 13))

    def arrays(self) -> dict[str, torch.Tensor]:
        return {
            "climatology": torch.from_numpy(np.ascontiguousarray(self.values, np.float32)),
            "climatology_lat": torch.tensor(np.asarray(self.lat, np.float64)),
            "climatology_lon": torch.tensor(np.asarray(self.lon, np.float64)),
        }

    def describe(self) -> dict[str, object]:
        return {
            "definition": "mean(truth - <var>_coarse) per fine cell and calendar month over the training times",
            "variables": list(self.variables),
            "scale": [float(s) for s in self.scale],
            "months_present": list(self.months_present),
            "shape": list(self.values.shape),
        }

    @classmethod
    def from_arrays(cls, arrays: dict[str, torch.Tensor], description: dict[str, object]) -> Climatology:
        missing = [k for k in ("climatology", "climatology_lat", "climatology_lon") if k not in arrays]
        if missing:
            raise ConditioningError(f"the checkpoint describes a climatology but lacks its arrays {missing}")
        return cls(
            values=arrays["climatology"].numpy(),
            variables=tuple(description["variables"]),  # type: ignore[arg-type]
            lat=arrays["climatology_lat"].numpy(),
            lon=arrays["climatology_lon"].numpy(),
            scale=tuple(description["scale"]),  # type: ignore[arg-type]
            months_present=tuple(description.get("months_present", range(1, 13))),  # type: ignore[arg-type]
        )

    def on(self, grid: Grid, months: Sequence[int], variables: Sequence[str]) -> np.ndarray:
        """(T, V, H, W) float32 for calendar ``months`` on ``grid`` (cells within 1e-3 of a cell of the
        climatology's grid); ConditioningError when the grid leaves the region it was computed on."""
        tol = 1e-3 * float(grid.dlat)

        def index(want: np.ndarray, have: np.ndarray, axis: str) -> np.ndarray:
            pos = np.clip(np.searchsorted(have, want), 1, max(len(have) - 1, 1))
            near = np.where(np.abs(have[pos - 1] - want) <= np.abs(have[pos] - want), pos - 1, pos)
            near = np.clip(near, 0, len(have) - 1)
            if len(have) == 0 or np.abs(have[near] - want).max() > tol:
                raise ConditioningError(
                    f"the model's training-period climatology covers {axis} {have.min():g}..{have.max():g} at "
                    f"{abs(have[1] - have[0]) if len(have) > 1 else 0:g} deg; the target grid's {axis} "
                    f"{want.min():g}..{want.max():g} are not all on it: a model conditioned on a climatology "
                    "downscales the region (and grid) it was trained on"
                )
            return near

        rows = index(np.asarray(grid.lat, np.float64), np.asarray(self.lat, np.float64), "latitudes")
        lon = np.asarray(grid.lon, np.float64)
        have_lon = np.asarray(self.lon, np.float64)
        lon = np.where(
            lon - have_lon.min() < -180, lon + 360, np.where(lon - have_lon.min() > 360, lon - 360, lon)
        )
        cols = index(lon, have_lon, "longitudes")
        try:
            vi = [self.variables.index(v) for v in variables]
        except ValueError:
            raise ConditioningError(
                f"the climatology holds {list(self.variables)}, not all of {list(variables)}"
            ) from None
        m = np.asarray(months, dtype=int) - 1
        return np.ascontiguousarray(self.values[np.ix_(m, vi, rows, cols)], np.float32)


def residual_climatology(
    target: xr.Dataset, coarse_fine: xr.Dataset, variables: Sequence[str]
) -> Climatology:
    """The :class:`Climatology` of ``target - coarse_fine`` over ALL the times given (pass training times
    only): per fine cell and calendar month, NaNs skipped."""
    res = np.stack(
        [(target[v] - coarse_fine[v].values).transpose("time", "lat", "lon").values for v in variables],
        axis=1,
    ).astype(np.float64)
    months = np.array([t.month for t in target["time"].values])
    present = sorted(set(months.tolist()))
    values = np.zeros((12, len(variables), *res.shape[2:]), np.float64)
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN cells: masked, filled with 0 below
        for m in present:
            values[m - 1] = np.nanmean(res[months == m], axis=0)
        fill = np.nanmean(values[[m - 1 for m in present]], axis=0)
        for m in set(range(1, 13)) - set(present):
            values[m - 1] = fill
        scale = np.nanstd(res, axis=(0, 2, 3))
    values = np.nan_to_num(values, nan=0.0)
    return Climatology(
        values=values.astype(np.float32),
        variables=tuple(variables),
        lat=np.asarray(target["lat"].values, np.float64),
        lon=np.asarray(target["lon"].values, np.float64),
        scale=tuple(float(max(s, 1e-12)) if np.isfinite(s) else 1.0 for s in scale),
        months_present=tuple(present),
    )


def perfect_model_coarse(truth: xr.Dataset, factor: int) -> xr.Dataset:
    """Fine truth area-averaged by ``factor`` (the coarse input of perfect-model training and evaluation):
    means over each block's valid cells; a block without any valid cell (all ocean or missing) takes the
    value of the nearest valid block (:func:`fill_nearest`), as a coarse model covers every cell."""
    from climrecon.tasks.regrid import coarsen_blocks

    return fill_nearest(coarsen_blocks(truth, factor))


def fill_nearest(ds: xr.Dataset) -> xr.Dataset:
    """``ds`` with NaN cells of each (lat, lon) map set to the nearest finite cell of the same map (in index
    space); unchanged (the same object) when nothing is NaN; a map without any finite cell stays NaN."""
    import scipy.ndimage

    names = [v for v in ds.data_vars if {"lat", "lon"} <= set(ds[v].dims)]
    if not any(bool(ds[v].isnull().any()) for v in names):
        return ds

    def fill(a: np.ndarray) -> np.ndarray:
        out = np.array(a, copy=True)
        flat = out.reshape(-1, *out.shape[-2:])
        for m in flat:
            bad = ~np.isfinite(m)
            if bad.any() and not bad.all():
                idx = scipy.ndimage.distance_transform_edt(bad, return_distances=False, return_indices=True)
                m[...] = m[tuple(idx)]
        return out

    planes = {v: ds[v].transpose(..., "lat", "lon") for v in names}
    return ds.assign({v: da.copy(data=fill(da.values)) for v, da in planes.items()})


def coarse_view(fine: xr.Dataset, coarse: Grid) -> xr.Dataset:
    """``fine`` area-averaged onto ``coarse``: whole blocks (``regrid.coarsen_blocks``) when ``coarse`` is a
    whole-number coarsening of the fine grid, else conservative regridding; coordinates exactly ``coarse``'s."""
    from climrecon.tasks.grids import GridError
    from climrecon.tasks.regrid import coarsen_blocks, conservative

    fine_grid = Grid.from_dataset(fine, "fine fields")
    factor = int(round(coarse.dlat / fine_grid.dlat))
    try:
        nested = factor >= 1 and fine_grid.coarsened(factor).same_cells(coarse)
    except GridError:
        nested = False
    out = coarsen_blocks(fine, factor) if nested else conservative(fine, coarse)
    return out.assign_coords(lat=coarse.lat, lon=coarse.lon)


def coarse_on_fine(coarse: xr.Dataset, fine: Grid) -> xr.Dataset:
    """Bilinear interpolation of coarse fields to the fine grid, clamped at the edges."""
    from climrecon.tasks.regrid import bilinear

    return bilinear(coarse, fine, allow_extrapolation=True)


def coarse_static_on_fine(
    static_source: xr.Dataset, coarse: Grid, fine: Grid, names: Sequence[str]
) -> xr.Dataset:
    """``<name>_coarse`` on ``fine`` for each of ``names``: the static source area-averaged onto ``coarse``
    (``regrid.static_on_grid``, conservative) and put back with :func:`coarse_on_fine`, the operators the
    coarse input goes through. ``static_source`` must cover ``coarse`` (a global store, or fine static
    fields when ``coarse`` holds whole blocks of ``fine``, as in perfect-model pairs)."""
    from climrecon.tasks.regrid import static_on_grid

    on_coarse = static_on_grid(static_source, coarse, name="static fields for the coarse grid")[list(names)]
    out = coarse_on_fine(on_coarse.astype("float64"), fine).astype("float32")
    return out.rename({n: f"{n}_coarse" for n in names})


def with_coarse_static(static_fine: xr.Dataset, coarse: Grid, names: Sequence[str]) -> xr.Dataset:
    """``static_fine`` plus its ``<name>_coarse`` views through ``coarse`` (:func:`coarse_static_on_fine`
    with the fine static fields as source), on ``static_fine``'s own coordinates; unchanged if ``names`` is
    empty. ``coarse`` must hold whole blocks of the fine grid (perfect-model pairs, evaluation)."""
    if not names:
        return static_fine
    views = coarse_static_on_fine(static_fine, coarse, Grid.from_dataset(static_fine, "static fields"), names)
    return static_fine.assign(
        {k: v.assign_coords(lat=static_fine.lat, lon=static_fine.lon) for k, v in views.items()}
    )


def time_of_year(time: xr.DataArray | np.ndarray, time_step: str = "month") -> np.ndarray:
    """Fraction of the year of each label, float32 in [0, 1): monthly labels (month - 0.5) / 12 in any
    calendar (what every checkpoint so far was trained with); daily and hourly labels from the calendar's
    own day of year (:func:`climrecon.tasks.fine_data.time_of_year`, the one home of time features)."""
    from climrecon.tasks.fine_data import time_of_year as _time_of_year

    return _time_of_year(np.asarray(time).ravel(), time_step)


def _position(grid: Grid) -> dict[str, np.ndarray]:
    lat2, lon2 = np.meshgrid(np.deg2rad(grid.lat), np.deg2rad(grid.lon), indexing="ij")
    return {
        "sin_lat": np.sin(lat2),
        "cos_lat": np.cos(lat2),
        "sin_lon": np.sin(lon2),
        "cos_lon": np.cos(lon2),
    }


def conditioning_stack(
    coarse_fine: xr.Dataset,
    static_fine: xr.Dataset,
    spec: ConditioningSpec,
    climatology: Climatology | None = None,
) -> xr.DataArray:
    """Stack coarse-on-fine fields, their climatology, static fields and position into (time, channel, lat,
    lon) float32.

    ``coarse_fine`` holds ``spec.variables`` on the fine grid (output of :func:`coarse_on_fine`);
    ``static_fine`` holds ``spec.static`` on the same grid (see ``regrid.static_on_grid``); ``climatology``
    is required when ``spec.climatology`` (the residual climatology of each time's calendar month).
    """
    if spec.climatology and climatology is None:
        raise ConditioningError(
            f"the conditioning includes {spec.climatology_names()} but no training-period climatology was given"
        )
    missing = [v for v in spec.variables if v not in coarse_fine]
    if missing and (spec.coarse or spec.climatology):
        raise ConditioningError(
            f"coarse input lacks variable(s) {missing}; it has {sorted(map(str, coarse_fine.data_vars))}"
        )
    missing = [v for v in spec.static_names() if v not in static_fine]
    if missing:
        raise ConditioningError(
            f"static fields lack {missing}; they have {sorted(map(str, static_fine.data_vars))}"
            + (
                " (<name>_coarse fields come from coarse_static_on_fine; a regrid stage of this version writes "
                "them into its static store)"
                if any(m.endswith("_coarse") for m in missing)
                else ""
            )
        )
    grid = Grid.from_dataset(coarse_fine, "coarse input on the fine grid")
    if Grid.from_dataset(static_fine, "static fields") != grid:
        raise ConditioningError(
            f"static fields are on {Grid.from_dataset(static_fine).describe()} but the coarse input on {grid.describe()}"
        )
    times = coarse_fine["time"]
    # one (time, lat, lon) float32 plane of zeros: the template every computed plane is put on
    zeros = xr.DataArray(
        np.zeros((times.size, grid.nlat, grid.nlon), np.float32),
        dims=("time", "lat", "lon"),
        coords={"time": times, "lat": coarse_fine.lat, "lon": coarse_fine.lon},
    )
    planes = (
        [coarse_fine[v].transpose("time", "lat", "lon").astype("float32") for v in spec.variables]
        if spec.coarse
        else []
    )
    if spec.climatology:
        months = [t.month for t in times.values]
        clim = climatology.on(grid, months, spec.variables)
        for i, _ in enumerate(spec.variables):
            planes.append(zeros.copy(data=clim[:, i]))
    if spec.diurnal:
        from climrecon.tasks.fine_data import hour_of_day

        angle = 2 * np.pi * hour_of_day(times.values).astype(np.float64)
        shape = (1, grid.nlat, grid.nlon)
        for wave in (np.sin(angle), np.cos(angle)):
            planes.append(zeros.copy(data=(wave[:, None, None] * np.ones(shape)).astype(np.float32)))
    for name in spec.static_names():
        planes.append(
            static_fine[name].transpose("lat", "lon").astype("float32").expand_dims(time=coarse_fine.time)
        )
    if spec.position:
        for arr in _position(grid).values():
            plane = xr.DataArray(
                arr.astype("float32"),
                dims=("lat", "lon"),
                coords={"lat": coarse_fine.lat, "lon": coarse_fine.lon},
            )
            planes.append(plane.expand_dims(time=coarse_fine.time))
    stack = xr.concat(
        [p.drop_vars([c for c in p.coords if c not in ("time", "lat", "lon")]) for p in planes], dim="channel"
    )
    stack = stack.assign_coords(channel=spec.channel_names()).transpose("time", "channel", "lat", "lon")
    return stack.rename("conditioning")


def normalize_conditioning(
    cond: np.ndarray | torch.Tensor,
    channel_names: Sequence[str],
    stats: NormalizationStats,
    clim_scale: dict[str, float] | None = None,
) -> np.ndarray | torch.Tensor:
    """Physical conditioning [..., C, H, W] -> network space: each ``<var>_coarse`` channel with its
    variable's statistics in ``stats`` (so coarse and fine share one scale), each ``<var>_clim`` channel
    divided by ``clim_scale[var]`` (:attr:`Climatology.scale`), static channels (and their ``_coarse``
    views) with the FIXED constants of :data:`STATIC_SCALING`, position channels (sin/cos, already in [-1, 1]) unchanged. Same
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
        elif name in STATIC_SCALING or (
            name.endswith("_coarse") and name[: -len("_coarse")] in STATIC_SCALING
        ):
            offset, scale = STATIC_SCALING[name.removesuffix("_coarse")]
            planes.append((x - offset) / scale)
        elif name.endswith(CLIM_SUFFIX) and name[: -len(CLIM_SUFFIX)] in (clim_scale or {}):
            planes.append(x / clim_scale[name[: -len(CLIM_SUFFIX)]])
        elif name in POSITION_CHANNELS or name in DIURNAL_CHANNELS:
            planes.append(x)
        else:
            raise ConditioningError(
                f"no normalisation rule for conditioning channel {name!r}; known: <variable>_coarse for "
                f"{list(stats.variables)}, <variable>_clim for {sorted(clim_scale or {})}, "
                f"{sorted(STATIC_SCALING)}, {list(POSITION_CHANNELS)}"
            )
    if isinstance(cond, torch.Tensor):
        return torch.stack(planes, dim=-3).to(torch.float32)
    return np.stack(planes, axis=-3).astype(np.float32)
