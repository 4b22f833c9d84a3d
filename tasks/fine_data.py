"""The user's own fine data, from a description in config to a clean, checked dataset every stage can use.

Users bring ERA5, a national analysis, gridded observations or regional model output: daily, hourly or
monthly; with ocean or missing cells; under their own variable names; on a region whose grid does not tile
the coarsening factor; with coordinates a few ulps off the regular cell centres; for short records.
:func:`open_fine_data` turns a :class:`~climrecon.config.FineDataConfig` into a :class:`FineData`:

- ``ds``: the product variables (renamed from their sources), float32, dims ``(time, lat, lon)``, cftime
  times ascending, ``lat``/``lon`` exactly the centres of ``grid`` (lat ascending, lon increasing in the
  file's own convention), NaN wherever ``mask`` is False. Variables stay lazy (dask); only what the mask
  needs (one pass: is every value of a cell finite) is computed.
- ``mask``: bool ``(lat, lon)``, True = a valid cell (see ``FineDataConfig.mask`` for the rule).
- ``grid``: the regular :class:`~climrecon.tasks.grids.Grid` the coordinates were snapped onto.
- ``time_step``: "month", "day", "hour" (``step_hours`` 1..6) or "year", from the median spacing of the
  times (28-31 days, 1 day, 1-6 hours, 360-366 days); a single time step is "month" unless the config's
  ``time_step`` says otherwise (a given ``time_step`` must agree with what the times show).
- ``transforms``: product -> "identity" | "log1p" (the config's, else
  :data:`climrecon.models.normalization.DEFAULT_TRANSFORMS`, else identity).
- ``source``: a JSON-able description (public URL, renames, transforms, coordinate fixes, snapping offset,
  masked cells, crop/pad applied) for provenance.

Time labels become network inputs and seeds through :func:`time_of_year`, :func:`hour_of_day` and
:func:`time_index`; for monthly labels these are exactly the project's existing functions
(:func:`climrecon.methods.features.time_of_year`, :func:`climrecon.methods.base.month_index`), so existing
checkpoints and stores stay valid. :func:`fine_static` gives orog, orog_std and sftlf on a FineData's grid.
"""

from __future__ import annotations

import calendar as _calendar
import datetime as _dt
import functools
import glob
from collections.abc import Sequence
from dataclasses import dataclass, replace
from fractions import Fraction
from typing import Any, Literal

import cftime
import numpy as np
import xarray as xr

from climrecon.config import FineDataConfig, TimeSelection
from climrecon.storage import is_remote, public_url, url_options
from climrecon.tasks.grids import Grid, GridError

__all__ = [
    "DAILY_INDEX_BASE",
    "TimeStep",
    "FineDataError",
    "FineData",
    "open_fine_data",
    "snap_coordinates",
    "infer_time_step",
    "time_of_year",
    "hour_of_day",
    "time_index",
    "fine_static",
]

TimeStep = Literal["month", "day", "hour", "year"]
DAILY_INDEX_BASE = 10_000_000
"""Offset of the :func:`time_index` of day/hour labels, far above any month index (``year * 12 + month``)."""

_TIME_CODER = xr.coders.CFDatetimeCoder(use_cftime=True)
_COORD_RENAMES = {"latitude": "lat", "longitude": "lon", "valid_time": "time"}
_NETCDF_SUFFIXES = (".nc", ".nc4", ".netcdf", ".cdf", ".h5", ".hdf5")
_NICE_DENOMINATOR = 7200  # grid spacings and edges are tried as fractions of a degree with this denominator
_UNIT_ALIASES = {
    "degK": "K",
    "deg_K": "K",
    "Kelvin": "K",
    "kelvin": "K",
    "°C": "degC",
    "deg_C": "degC",
    "Celsius": "degC",
    "celsius": "degC",
    "kg/m2/s": "kg m-2 s-1",
    "kg m-2s-1": "kg m-2 s-1",
    "mm/day": "mm day-1",
    "mm d-1": "mm day-1",
    "m/s": "m s-1",
}


class FineDataError(ValueError):
    """The fine data cannot be used as configured; the message names the file, variable or field at fault."""


# -- the dataset ----------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class FineData:
    """A clean fine dataset (see the module docstring for the contract of each field)."""

    ds: xr.Dataset
    mask: xr.DataArray
    grid: Grid
    time_step: TimeStep
    transforms: dict[str, str]
    source: dict[str, Any]
    step_hours: float | None = None  # hours between labels: 24 for "day", 1..6 for "hour", None otherwise
    domain: Literal["crop", "pad"] = "crop"  # how :meth:`for_factor` makes the grid tile a factor

    @property
    def variables(self) -> list[str]:
        return [str(v) for v in self.ds.data_vars]

    def select(self, selection: TimeSelection, name: str = "selection") -> xr.Dataset:
        """The time steps of ``selection`` (window, then every ``every``-th from ``offset``); a selection
        that keeps no time step raises naming ``name``, the selection and the data's time span."""
        times = self.ds["time"].values
        idx = _selected(times, selection)
        if idx.size == 0:
            raise FineDataError(
                f"{name} ({selection.describe()}) selects no time step of the fine data "
                f"({_span(times, self.time_step)}); change the {name} selection"
            )
        return self.ds.isel(time=idx)

    def splits(self, cfg: FineDataConfig) -> dict[str, xr.Dataset]:
        """``{"train", "validation" (only when configured), "heldout"}`` -> their time steps; raises when
        train or validation shares any time step with heldout, naming the first shared time."""
        out = {"train": self.select(cfg.train, "train")}
        if cfg.validation is not None:
            out["validation"] = self.select(cfg.validation, "validation")
        out["heldout"] = self.select(cfg.heldout, "heldout")
        held = set(out["heldout"]["time"].values.tolist())
        for name in ("train", "validation"):
            if name not in out:
                continue
            shared = [t for t in out[name]["time"].values.tolist() if t in held]
            if shared:
                raise FineDataError(
                    f"{name} ({getattr(cfg, name).describe()}) and heldout ({cfg.heldout.describe()}) share "
                    f"{len(shared)} time step(s), the first {_label(shared[0])}; held-out times must never be "
                    "trained on"
                )
        return out

    def for_factor(self, factor: int) -> FineData:
        """This data on a grid that tiles ``factor`` x ``factor`` blocks, by ``domain``: "crop" removes the last
        ``n % factor`` rows/columns at the north/east end, "pad" adds ``(-n) % factor`` rows/columns of masked
        (NaN) cells there. Unchanged when the grid already tiles the factor."""
        if factor < 1:
            raise FineDataError(f"coarsening factor must be >= 1, got {factor}")
        g = self.grid
        if not g.nlat % factor and not g.nlon % factor:
            return self
        if self.domain == "crop":
            nlat, nlon = g.nlat - g.nlat % factor, g.nlon - g.nlon % factor
            if not nlat or not nlon:
                raise FineDataError(
                    f"the fine grid ({g.describe()}) is smaller than one {factor} x {factor} block; "
                    "set data.domain: pad or use a smaller factor"
                )
            grid = replace(g, nlat=nlat, nlon=nlon)
            ds = self.ds.isel(lat=slice(0, nlat), lon=slice(0, nlon))
            mask = self.mask.isel(lat=slice(0, nlat), lon=slice(0, nlon))
        else:
            add_lat, add_lon = -g.nlat % factor, -g.nlon % factor
            try:
                grid = replace(g, nlat=g.nlat + add_lat, nlon=g.nlon + add_lon)
            except GridError as exc:
                raise FineDataError(
                    f"padding the fine grid ({g.describe()}) to tile {factor} fails: {exc}; set data.domain: crop"
                ) from None
            ds = self.ds.pad(lat=(0, add_lat), lon=(0, add_lon))
            mask = self.mask.pad(lat=(0, add_lat), lon=(0, add_lon), constant_values=False)
        ds, mask = _on_grid(ds, grid), _on_grid(mask, grid)
        change = {
            "rule": self.domain,
            "factor": int(factor),
            "side": "north/east",
            "lat_rows": int(grid.nlat - g.nlat),
            "lon_cols": int(grid.nlon - g.nlon),
        }
        source = {
            **self.source,
            "domain": change,
            "grid": grid.describe(),
            "masked_cells": int((~mask).sum()),
        }
        return replace(self, ds=ds, mask=mask, grid=grid, source=source)


def _on_grid(obj: Any, grid: Grid) -> Any:
    """``obj`` with lat/lon exactly the centres of ``grid`` (CF attributes kept)."""
    return obj.assign_coords(lat=("lat", grid.lat, obj["lat"].attrs), lon=("lon", grid.lon, obj["lon"].attrs))


# -- opening ---------------------------------------------------------------------------------------------------
def open_fine_data(
    cfg: FineDataConfig,
    storage_options: dict[str, Any] | None = None,
    *,
    catalog: str | None = None,
) -> FineData:
    """Open, rename, check and clean the fine data ``cfg`` describes (see the module docstring).

    ``cfg.path``: a Zarr store (any fsspec URL, opened with ``storage_options``), a local netCDF file, or a
    glob of local netCDF files (each file cut to the configured variables, so bounds such as ``time_bnds``
    never need to be present or to agree); else ``cfg.query`` on ``cfg.catalog`` (default ``catalog``) must
    match exactly one dataset. Raises :class:`FineDataError` naming the file/variable/field at fault.
    """
    ds, where, how, per_file = _open_source(cfg, storage_options, catalog)
    ds, coords = _conform(ds, where, cfg.snap)
    if per_file:  # the files were snapped one by one: report their worst offset
        coords["snap"]["max_offset_deg"] = max(info["snap"]["max_offset_deg"] for info in per_file)
        coords["snap"]["max_offset_cells"] = max(info["snap"]["max_offset_cells"] for info in per_file)
        coords.update({k: v for info in per_file for k, v in info.items() if k != "snap"})
    units = _check_units(ds, cfg, where)
    ds, mask_var = _products(ds, cfg)
    ds, time_step, step_hours, time_info = _clean_times(ds, cfg, where)
    mask, mask_info = _build_mask(ds, mask_var, cfg, where)
    if mask_info["masked_cells"]:
        ds = ds.where(mask)
    grid = Grid(**{k: coords["grid"][k] for k in ("south", "west", "dlat", "dlon", "nlat", "nlon")})
    transforms = _transforms(cfg)
    source = {
        "where": where,
        "how": how,
        "variables": {
            p: {"source": s, "transform": transforms[p], "units": units.get(p)}
            for p, s in cfg.sources().items()
        },
        "renamed": {s: p for p, s in cfg.sources().items() if s != p},
        **{k: v for k, v in coords.items() if k != "grid"},
        "grid": grid.describe(),
        "time_step": time_step,
        "step_hours": step_hours,
        **time_info,
        **mask_info,
        "domain": None,
    }
    return FineData(ds, mask, grid, time_step, transforms, source, step_hours, cfg.domain)


def _kind(path: str) -> Literal["glob", "netcdf", "zarr"]:
    if any(c in path for c in "*?["):
        return "glob"
    return "netcdf" if path.rstrip("/").lower().endswith(_NETCDF_SUFFIXES) else "zarr"


def _needed(cfg: FineDataConfig) -> list[str]:
    """The variables to read: every source, plus the mask variable if one is named."""
    return [*cfg.sources().values(), *([cfg.mask] if cfg.mask not in (None, "auto") else [])]


def _keep(ds: xr.Dataset, cfg: FineDataConfig, where: str) -> xr.Dataset:
    """``ds`` cut to the configured sources (and mask variable) and their coordinates: bounds variables
    (time_bnds, lat_bnds) and everything else are dropped. A missing one raises naming ``where``."""
    missing = [v for v in _needed(cfg) if v not in ds.variables]
    if missing:
        what = [f"{v!r} (data.mask)" if v == cfg.mask else repr(v) for v in missing]
        raise FineDataError(
            f"fine data {where} lacks variable(s) {', '.join(what)}; it has {sorted(map(str, ds.data_vars))} "
            "(set data.variables.<name>.source to the name in the file)"
        )
    keep_coords = {"time", "lat", "lon", *_COORD_RENAMES}
    out = xr.Dataset({v: ds[v] for v in _needed(cfg)}, attrs=ds.attrs)
    return out.drop_vars([c for c in out.coords if c not in out.dims and c not in keep_coords])


def _open_source(
    cfg: FineDataConfig, storage_options: dict[str, Any] | None, catalog: str | None
) -> tuple[xr.Dataset, str, str, list[dict[str, Any]]]:
    """(data cut to the needed variables, public location, how it was opened, per-file coordinate info)."""
    if cfg.path is None:
        return (*_open_query(cfg, storage_options, catalog), [])
    path, where = str(cfg.path), public_url(str(cfg.path))
    kind = _kind(path)
    if kind != "zarr" and is_remote(path):
        raise FineDataError(
            f"data.path {where}: netCDF must be local files; copy them here or convert them to a Zarr store"
        )
    if kind == "zarr":
        try:
            ds = xr.open_zarr(
                path, storage_options=url_options(path, storage_options), decode_times=_TIME_CODER
            )
        except Exception as exc:  # noqa: BLE001 - every opening problem becomes a message naming the store
            raise FineDataError(
                f"data.path: cannot open Zarr store {where} ({type(exc).__name__}: {exc})"
            ) from None
        return _keep(ds, cfg, where), where, "zarr store", []
    if kind == "netcdf":
        try:
            ds = xr.open_dataset(path, decode_times=_TIME_CODER, chunks={})
        except FileNotFoundError:
            raise FineDataError(f"data.path: no netCDF file at {where}") from None
        except Exception as exc:  # noqa: BLE001
            raise FineDataError(
                f"data.path: cannot open netCDF file {where} ({type(exc).__name__}: {exc})"
            ) from None
        return _keep(ds, cfg, where), where, "netCDF file", []
    files = sorted(glob.glob(path))
    if not files:
        raise FineDataError(f"data.path: no file matches the pattern {where}")
    per_file: list[dict[str, Any]] = []

    def preprocess(part: xr.Dataset) -> xr.Dataset:
        name = str(part.encoding.get("source", where))
        part, info = _conform(_keep(part, cfg, name), name, cfg.snap)
        per_file.append(info)
        return part

    try:
        ds = xr.open_mfdataset(
            files,
            preprocess=preprocess,
            combine="by_coords",
            decode_times=_TIME_CODER,
            data_vars="minimal",
            coords="minimal",
            compat="override",
            join="exact",
            chunks={},
        )
    except FineDataError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise FineDataError(
            f"data.path: the {len(files)} netCDF files of {where} cannot be combined into one dataset "
            f"({type(exc).__name__}: {exc}); they must share one grid and cover distinct times"
        ) from None
    return ds, where, f"{len(files)} netCDF files", per_file


def _open_query(
    cfg: FineDataConfig, storage_options: dict[str, Any] | None, default_catalog: str | None
) -> tuple[xr.Dataset, str, str]:
    from climrecon.catalogs.esmcat import CatalogError, open_datasets

    catalog = cfg.catalog or default_catalog
    if not catalog:
        raise FineDataError("data.query needs a catalog: set data.catalog to an intake-esm JSON")
    assert cfg.query is not None
    terms = cfg.query.search_terms()
    try:
        found = open_datasets(catalog, storage_options=storage_options, **terms)
    except CatalogError as exc:
        raise FineDataError(f"data.query: {exc}") from None
    if len(found) != 1:
        raise FineDataError(
            f"data.query {terms} matches {len(found)} datasets {sorted(found)} in {public_url(catalog)}; "
            "narrow it to one"
        )
    ((key, ds),) = found.items()
    ds.attrs = {k: v for k, v in ds.attrs.items() if not str(k).startswith("intake_esm")}
    if cfg.query.time:
        ds = ds.isel(time=_selected(ds["time"].values, TimeSelection(dates=cfg.query.time)))
    return _keep(ds, cfg, key), key, f"catalog query {terms} in {public_url(catalog)}"


# -- coordinates -----------------------------------------------------------------------------------------------
def _conform(ds: xr.Dataset, where: str, snap: float) -> tuple[xr.Dataset, dict[str, Any]]:
    """Coordinates in the project conventions: names time/lat/lon, extra size-1 dimensions dropped, lat
    ascending, lon increasing (in the file's convention where it can be), snapped onto a regular grid.
    Returns the dataset and a JSON-able description of what was changed (``grid``: the Grid's fields)."""
    info: dict[str, Any] = {}
    renames = {k: v for k, v in _COORD_RENAMES.items() if k in ds.variables and v not in ds.variables}
    ds = ds.rename(renames)
    if renames:
        info["renamed_coordinates"] = renames
    if "time" in ds.coords and "time" not in ds.dims and ds["time"].ndim == 0:  # one field, a scalar time
        ds = ds.expand_dims("time")
        info["time_dimension_added"] = True
    for c in ("time", "lat", "lon"):
        if c not in ds.dims:
            two_d = c in ds.variables and ds[c].ndim > 1
            raise FineDataError(
                f"{where}: no {c!r} dimension (dims {dict(ds.sizes)}); "
                + (
                    f"its {c} is {ds[c].ndim}-D: curvilinear/rotated grids are not supported, regrid to lat/lon"
                    if two_d
                    else "expected dims (time, lat|latitude, lon|longitude)"
                )
            )
    extra = [d for d in ds.dims if d not in ("time", "lat", "lon")]
    wide = {d: ds.sizes[d] for d in extra if ds.sizes[d] != 1}
    if wide:
        users = sorted(str(v) for v in ds.data_vars if set(wide) & set(ds[v].dims))
        raise FineDataError(
            f"{where}: variable(s) {users} have extra dimension(s) {wide} besides (time, lat, lon); "
            "select one level/member first"
        )
    if extra:
        ds = ds.isel(dict.fromkeys(extra, 0), drop=True)
        info["dropped_dimensions"] = [str(d) for d in extra]
    ds = ds.transpose("time", "lat", "lon")
    lat = np.asarray(ds["lat"], float)
    if lat.size > 1 and lat[0] > lat[-1]:
        ds = ds.isel(lat=slice(None, None, -1))
        info["lat_reversed"] = True
    ds, lon_change = _increasing_lon(ds, where)
    if lon_change:
        info["lon_reordered"] = lon_change
    ds, grid, _ = snap_coordinates(ds, snap, name=where)
    info["snap"] = ds.attrs.pop("_snap")
    info["grid"] = {k: getattr(grid, k) for k in ("south", "west", "dlat", "dlon", "nlat", "nlon")}
    return ds, info


def _increasing_lon(ds: xr.Dataset, where: str) -> tuple[xr.Dataset, str | None]:
    """lon increasing and evenly spaced: as stored if it is; else sorted, in the file's convention first,
    then -180..180, then 0..360 (a box across Greenwich stored in 0..360 becomes -180..180)."""
    lon = np.asarray(ds["lon"], float)
    if lon.size < 2 or _evenly_increasing(lon):
        return ds, None
    for label, values in (
        ("sorted", lon),
        ("-180..180", (lon + 180.0) % 360.0 - 180.0),
        ("0..360", lon % 360.0),
    ):
        order = np.argsort(values, kind="stable")
        if _evenly_increasing(values[order]):
            out = ds.isel(lon=order)
            return out.assign_coords(lon=("lon", values[order], ds["lon"].attrs)), label
    raise FineDataError(
        f"{where}: lon values {lon[:3]}..{lon[-3:]} are not evenly spaced in any order or convention "
        "(-180..180, 0..360); expected a regular lat/lon grid"
    )


def _evenly_increasing(values: np.ndarray) -> bool:
    """Strictly increasing with steps that differ by less than half a step (no gap, e.g. across 0 or 180)."""
    steps = np.diff(values)
    return bool(steps.min() > 0 and steps.max() - steps.min() <= 0.5 * np.median(steps))


def _nice(value: float) -> float:
    """``value`` as the nearest fraction of a degree with a small denominator (0.25, 1/12, -10.125 ...)."""
    return float(Fraction(value).limit_denominator(_NICE_DENOMINATOR))


def _fit_axis(values: np.ndarray, snap: float, coord: str, name: str) -> tuple[float, float, float]:
    """(first edge, step, worst offset in degrees) of the regular grid within ``snap`` cells of ``values``.

    The step and origin are medians (one bad value cannot move the fit); a grid of "nice" step and edge
    (small-denominator fractions of a degree) is preferred when it is within ``snap`` too."""
    x = np.asarray(values, float)
    if x.ndim != 1 or x.size < 2:
        raise FineDataError(
            f"{name}: {coord} has {x.size} value(s); a regular grid needs at least 2 cells along each axis"
        )
    if not np.all(np.diff(x) > 0):
        k = int(np.argmin(np.diff(x)))
        raise FineDataError(
            f"{name}: {coord} is not strictly increasing ({coord}[{k}] = {float(x[k])!r}, "
            f"{coord}[{k + 1}] = {float(x[k + 1])!r})"
        )
    i = np.arange(x.size) + 0.5
    step = float(np.median(np.diff(x)))
    edge = float(np.median(x - i * step))
    best = None
    for e, s in ((_nice(edge), _nice(step)), (edge, step)):
        if s <= 0:
            continue
        offsets = np.abs(x - (e + i * s))
        worst = float(offsets.max())
        if worst <= snap * s:
            return e, s, worst
        if best is None or worst < best[0]:
            best = (worst, int(np.argmax(offsets)), s)
    assert best is not None
    worst, k, s = best
    raise FineDataError(
        f"{name}: {coord} is not a regular grid: {coord}[{k}] = {float(x[k])!r} is {worst:.3g} deg ({worst / s:.3g} "
        f"cells) from the regular {s:g}-deg grid fitted to it, more than data.snap = {snap} cells; fix the "
        f"coordinate, or raise data.snap above {worst / s:.3g} if that is the intended grid"
    )


def snap_coordinates(
    ds: xr.Dataset | xr.DataArray, snap: float, *, name: str = "dataset"
) -> tuple[xr.Dataset, Grid, float]:
    """(``ds`` with lat/lon exactly the cell centres of a regular grid, that Grid, worst offset in degrees).

    ``ds`` needs ascending 1-D ``lat`` and increasing 1-D ``lon``. Each coordinate must lie within ``snap``
    cells of a regular grid (median fit; a grid with "nice" spacing and edges, e.g. 0.25 deg from 36.0, is
    preferred when it fits too), else :class:`FineDataError` names the coordinate, the value and its offset.
    The new coordinates are ``Grid.lat``/``Grid.lon`` themselves, so they compare bitwise equal to any
    grid regenerated from the same (south, west, dlat, dlon). ``attrs["_snap"]`` describes the offsets.
    """
    south, dlat, off_lat = _fit_axis(np.asarray(ds["lat"]), snap, "lat", name)
    west, dlon, off_lon = _fit_axis(np.asarray(ds["lon"]), snap, "lon", name)
    try:
        grid = Grid(south, west, dlat, dlon, ds.sizes["lat"], ds.sizes["lon"])
    except GridError as exc:
        raise FineDataError(
            f"{name}: lat/lon are not the centres of a cell-centred grid ({exc}); point grids that include "
            "the poles (e.g. ERA5's 721 latitudes) need their polar rows dropped or a regridding first"
        ) from None
    out = _on_grid(ds, grid)
    worst = max(off_lat, off_lon)
    out.attrs = {
        **ds.attrs,
        "_snap": {
            "lat_offset_deg": off_lat,
            "lon_offset_deg": off_lon,
            "max_offset_deg": worst,
            "max_offset_cells": max(off_lat / dlat, off_lon / dlon),
            "tolerance_cells": float(snap),
        },
    }
    return out, grid, worst


# -- variables, units, transforms, mask ------------------------------------------------------------------------
def _normal_units(units: str) -> str:
    text = " ".join(str(units).replace("**", "").replace("^", "").split())
    return _UNIT_ALIASES.get(text, text)


def _check_units(ds: xr.Dataset, cfg: FineDataConfig, where: str) -> dict[str, str]:
    """Product -> units (the file's, else the expected ones); a mismatch of both raises naming them."""
    out: dict[str, str] = {}
    for product, spec in cfg.variables.items():
        source = spec.source or product
        have = ds[source].attrs.get("units")
        if have is not None and spec.units is not None and _normal_units(have) != _normal_units(spec.units):
            raise FineDataError(
                f"{where}: variable {product!r} (source {source!r}) has units {have!r} but "
                f"data.variables.{product}.units expects {spec.units!r}; convert the data or correct the units"
            )
        if have is not None or spec.units is not None:
            out[product] = str(have if have is not None else spec.units)
    return out


def _products(ds: xr.Dataset, cfg: FineDataConfig) -> tuple[xr.Dataset, xr.DataArray | None]:
    """(the product variables, float32, renamed from their sources; the mask variable if one is named)."""
    data = {}
    for product, source in cfg.sources().items():
        da = ds[source].astype("float32")
        da.attrs = {k: v for k, v in ds[source].attrs.items() if k not in ("_FillValue", "missing_value")}
        da.encoding = {}
        data[product] = da
    out = xr.Dataset(data, attrs=ds.attrs)
    for (
        name,
        var,
    ) in out.variables.items():  # the file's storage encoding would only get in the way of writers
        var.encoding = {
            k: v for k, v in var.encoding.items() if name == "time" and k in ("units", "calendar")
        }
    return out, (ds[cfg.mask] if cfg.mask not in (None, "auto") else None)


def _transforms(cfg: FineDataConfig) -> dict[str, str]:
    from climrecon.models.normalization import DEFAULT_TRANSFORMS

    return {p: spec.transform or DEFAULT_TRANSFORMS.get(p, "identity") for p, spec in cfg.variables.items()}


def _build_mask(
    ds: xr.Dataset, mask_var: xr.DataArray | None, cfg: FineDataConfig, where: str
) -> tuple[xr.DataArray, dict[str, Any]]:
    """The valid-cell mask (bool lat x lon) by ``cfg.mask`` and a JSON-able description; one dask pass
    tells, per variable, which cells are finite at every time and at some time."""
    finite = {v: np.isfinite(ds[v]) for v in ds.data_vars}
    checks = xr.Dataset(
        {f"all_{v}": f.all("time") for v, f in finite.items()}
        | {f"any_{v}": f.any("time") for v, f in finite.items()}
    ).compute()
    everywhere = np.logical_and.reduce([checks[f"all_{v}"].values for v in ds.data_vars])
    somewhere = np.logical_or.reduce([checks[f"any_{v}"].values for v in ds.data_vars])
    if mask_var is not None:
        if "time" in mask_var.dims:
            if mask_var.sizes["time"] != 1:
                raise FineDataError(
                    f"{where}: mask variable {cfg.mask!r} varies with time (dims {dict(mask_var.sizes)}); "
                    "give a 2-D (lat, lon) mask"
                )
            mask_var = mask_var.isel(time=0, drop=True)
        values = np.asarray(mask_var.transpose("lat", "lon"))
        valid = (values != 0) & ~(np.isnan(values) if values.dtype.kind == "f" else False)
        rule = f"variable {cfg.mask!r} (nonzero = valid)"
        for v in ds.data_vars:
            bad = valid & ~checks[f"all_{v}"].values
            if bad.any():
                r, c = np.argwhere(bad)[0]
                raise FineDataError(
                    f"{where}: {int(bad.sum())} cell(s) inside mask {cfg.mask!r} have missing values of {v!r} "
                    f"(source {cfg.sources()[str(v)]!r}), e.g. at lat={float(ds.lat[r])}, lon={float(ds.lon[c])}; "
                    "fill them, fix the mask, or set data.mask: auto (valid = finite at every time)"
                )
    elif cfg.mask == "auto" or not everywhere.all():
        valid, rule = everywhere, "auto: finite in every variable at every time"
    else:
        valid, rule = everywhere, "all cells valid (no missing value)"
    if not valid.any():
        raise FineDataError(
            f"{where}: no valid cell is left by the mask ({rule}); check data.mask and the data"
        )
    mask = xr.DataArray(valid, dims=("lat", "lon"), coords={"lat": ds["lat"], "lon": ds["lon"]}, name="mask")
    info = {
        "mask": rule,
        "masked_cells": int((~valid).sum()),
        "partially_missing_cells": int((somewhere & ~everywhere).sum()),  # some values missing, not all
    }
    return mask, info


# -- times -----------------------------------------------------------------------------------------------------
def _clean_times(
    ds: xr.Dataset, cfg: FineDataConfig, where: str
) -> tuple[xr.Dataset, TimeStep, float | None, dict[str, Any]]:
    """Times ascending and distinct cftime labels; the time step and what was done."""
    times = ds["time"].values
    if times.size == 0:
        raise FineDataError(f"{where}: no time step")
    if not isinstance(times[0], cftime.datetime):
        raise FineDataError(
            f"{where}: time values ({times[0]!r}, ...) are not CF dates; the time variable needs a units "
            "attribute such as 'days since 2001-01-01' (and a calendar)"
        )
    info: dict[str, Any] = {}
    if not all(a < b for a, b in zip(times[:-1], times[1:], strict=True)):
        ds = ds.sortby("time")
        times = ds["time"].values
        same = [a for a, b in zip(times[:-1], times[1:], strict=True) if a == b]
        if same:
            raise FineDataError(f"{where}: time {_label(same[0])} appears more than once")
        info["times_sorted"] = True
    try:
        step, hours = infer_time_step(times, cfg.time_step)
    except FineDataError as exc:
        raise FineDataError(f"{where}: {exc}") from None
    info.update(
        {
            "times": int(times.size),
            "first": _label(times[0]),
            "last": _label(times[-1]),
            "calendar": times[0].calendar,
        }
    )
    return ds, step, hours, info


def infer_time_step(
    times: Sequence[Any] | np.ndarray, told: TimeStep | None = None
) -> tuple[TimeStep, float | None]:
    """(time step, hours per step) from the median spacing of ascending ``times``: 1-6 hours -> ("hour",
    hours), 1 day -> ("day", 24.0), 28-31 days -> ("month", None), 360-366 days -> ("year", None). One
    time step: ``told`` or "month" (hour: 1.0). A ``told`` step the spacing contradicts raises."""
    times = np.asarray(times).ravel()
    if times.size < 2:
        step = told or "month"
        return step, {"day": 24.0, "hour": 1.0}.get(step)
    hours = float(np.median([d.total_seconds() for d in np.diff(times)])) / 3600.0
    if 0.99 <= hours <= 6.01:
        found: tuple[TimeStep, float | None] = ("hour", round(hours, 6))
    elif 23.9 <= hours <= 24.1:
        found = ("day", 24.0)
    elif 27.5 * 24 <= hours <= 31.5 * 24:
        found = ("month", None)
    elif 359 * 24 <= hours <= 367 * 24:
        found = ("year", None)
    else:
        raise FineDataError(
            f"the times are {hours:g} hours apart (median); expected 1-6 hours, 1 day, a month or a year"
        )
    if told is not None and told != found[0]:
        raise FineDataError(
            f"data.time_step is {told!r} but the times are {hours:g} hours apart ({found[0]})"
        )
    return found


def _parts(t: Any) -> tuple[int, int, int, int]:
    return (t.year, t.month, t.day, t.hour)


def _selected(times: np.ndarray, selection: TimeSelection) -> np.ndarray:
    """Indices of ``times`` kept by ``selection``: inside its window, then ``[offset::every]``."""
    window = selection.window()
    idx = np.arange(len(times))
    if window is not None:
        start, end = window
        parts = [_parts(t) for t in times]
        idx = np.array(
            [i for i, p in enumerate(parts) if p[: len(start)] >= start and p[: len(end)] <= end], int
        )
    return idx[selection.offset :: selection.every]


def _label(t: Any) -> str:
    return t.isoformat() if hasattr(t, "isoformat") else str(t)


def _span(times: np.ndarray, step: str) -> str:
    return (
        f"{len(times)} {step} step(s) {_label(times[0])}..{_label(times[-1])}" if len(times) else "no times"
    )


# -- time features and seeds ------------------------------------------------------------------------------------
def _labels(times: Any) -> list[Any]:
    """cftime or datetime objects of ``times`` (DataArray, array of cftime, or datetime64)."""
    values = np.asarray(getattr(times, "values", times)).ravel()
    if values.dtype.kind == "M":
        import pandas as pd

        return list(pd.DatetimeIndex(values).to_pydatetime())
    return list(values)


@functools.lru_cache(maxsize=4096)
def _days_in_year(year: int, calendar: str, has_year_zero: bool) -> int:
    new = cftime.datetime(year + 1, 1, 1, calendar=calendar, has_year_zero=has_year_zero)
    return (new - cftime.datetime(year, 1, 1, calendar=calendar, has_year_zero=has_year_zero)).days


def _day_and_length(t: Any) -> tuple[int, int]:
    """(day of year from 1, days in that year), calendar-aware."""
    if isinstance(t, cftime.datetime):
        return t.dayofyr, _days_in_year(t.year, t.calendar, t.has_year_zero)
    if isinstance(t, _dt.datetime):
        return t.timetuple().tm_yday, 366 if _calendar.isleap(t.year) else 365
    raise FineDataError(f"time label {t!r} is neither a cftime nor a datetime object")


def time_of_year(times: Any, time_step: TimeStep) -> np.ndarray:
    """Fraction of the year of each label, float32 in [0, 1).

    month: exactly ``(month - 0.5) / 12`` (= :func:`climrecon.methods.features.time_of_year`, which trained
    checkpoints rely on); day/hour: ``(dayofyear - 1 + (hour + 0.5) / 24) / days_in_year`` with the
    calendar's own day of year and year length (365, 366, 360 ...); year: 0.5.
    """
    labels = _labels(times)
    if time_step == "month":
        months = np.array([t.month for t in labels], dtype=np.float32)
        return ((months - 0.5) / 12.0).astype(np.float32)
    if time_step == "year":
        return np.full(len(labels), 0.5, dtype=np.float32)
    if time_step not in ("day", "hour"):
        raise FineDataError(f"time_step must be month, day, hour or year, not {time_step!r}")
    out = np.empty(len(labels), dtype=np.float64)
    for k, t in enumerate(labels):
        day, length = _day_and_length(t)
        out[k] = (day - 1 + (t.hour + 0.5) / 24.0) / length
    return out.astype(np.float32)


def hour_of_day(times: Any) -> np.ndarray:
    """The clock time of each label as a fraction of the day, ``(hour + minute / 60 + second / 3600) / 24``,
    float32 in [0, 1) (0 for daily and monthly labels at midnight)."""
    labels = _labels(times)
    values = [(t.hour + t.minute / 60.0 + t.second / 3600.0) / 24.0 for t in labels]
    return np.asarray(values, dtype=np.float32)


def time_index(times: Any, time_step: TimeStep) -> list[int]:
    """A distinct non-negative integer per label, for seeding.

    month (and year): exactly ``year * 12 + month - 1`` (= :func:`climrecon.methods.base.month_index`, on
    which the bytes of existing stores depend). day/hour:
    ``DAILY_INDEX_BASE + ((year * 12 + month - 1) * 31 + day - 1) * 24 + hour``: one per (date, hour),
    ordered like the labels, and above any month index of years below 833 000. Labels that share an index
    (two in one hour, or one month) and labels before year 0 raise.
    """
    labels = _labels(times)
    if time_step in ("month", "year"):
        out = [int(t.year) * 12 + int(t.month) - 1 for t in labels]
    elif time_step in ("day", "hour"):
        out = [
            DAILY_INDEX_BASE
            + ((int(t.year) * 12 + int(t.month) - 1) * 31 + int(t.day) - 1) * 24
            + int(t.hour)
            for t in labels
        ]
    else:
        raise FineDataError(f"time_step must be month, day, hour or year, not {time_step!r}")
    if any(i < 0 for i in out):
        raise FineDataError(f"time labels before year 0 cannot be indexed (first: {_label(labels[0])})")
    if len(set(out)) != len(out):
        seen: dict[int, Any] = {}
        for i, t in zip(out, labels, strict=True):
            if i in seen:
                raise FineDataError(
                    f"time labels {_label(seen[i])} and {_label(t)} share one {time_step} index; "
                    f"the data have more than one label per {time_step}"
                )
            seen[i] = t
    return out


# -- static fields ---------------------------------------------------------------------------------------------
_STATIC_FIELDS = ("orog", "orog_std", "sftlf")


def fine_static(fine: FineData, url: str, storage_options: dict[str, Any] | None = None) -> xr.Dataset:
    """orog [m], orog_std [m] and sftlf [%] on ``fine.grid`` (float32, lat/lon exactly its centres).

    ``url`` is a Zarr store or netCDF file. A store on the fine grid's cells (the same spacing, aligned,
    coordinates within ``snap`` of the grid; e.g. written for this dataset) is used cell by cell and must
    hold all three fields; cells it does not cover must be masked ones (padding), which get 0. Any other
    store (a global 5' store) is aggregated/interpolated onto the grid by
    :func:`climrecon.tasks.regrid.static_on_grid` and must cover the grid.
    """
    where = public_url(str(url))
    try:
        if _kind(str(url)) == "netcdf":
            raw = xr.open_dataset(str(url))
        else:
            raw = xr.open_zarr(str(url), storage_options=url_options(str(url), storage_options))
    except Exception as exc:  # noqa: BLE001
        raise FineDataError(f"data.static: cannot open {where} ({type(exc).__name__}: {exc})") from None
    missing = [v for v in ("orog", "sftlf") if v not in raw.data_vars]
    if missing:
        raise FineDataError(f"data.static {where} lacks {missing}; it has {sorted(map(str, raw.data_vars))}")
    names = [v for v in _STATIC_FIELDS if v in raw.data_vars]
    raw = raw[names].rename(
        {k: v for k, v in _COORD_RENAMES.items() if k in raw.variables and v not in raw.variables}
    )
    if float(raw["lat"][0]) > float(raw["lat"][-1]):
        raw = raw.isel(lat=slice(None, None, -1))
    raw, _ = _increasing_lon(raw, where)
    snap = float(fine.source.get("snap", {}).get("tolerance_cells", 0.01))
    raw, sgrid, _ = snap_coordinates(raw, snap, name=f"data.static {where}")
    raw.attrs.pop("_snap", None)
    g = fine.grid
    same_spacing = abs(sgrid.dlat - g.dlat) <= 1e-6 * g.dlat and abs(sgrid.dlon - g.dlon) <= 1e-6 * g.dlon
    if same_spacing:
        return _static_cells(raw, sgrid, fine, where)
    return _static_regridded(raw, fine, where)


def _static_cells(raw: xr.Dataset, sgrid: Grid, fine: FineData, where: str) -> xr.Dataset:
    """A static store on the fine grid's cells, cut (by index) to ``fine.grid``; uncovered cells must be masked."""
    g = fine.grid
    if "orog_std" not in raw:
        raise FineDataError(
            f"data.static {where} is on the fine grid but lacks orog_std (the sub-grid spread cannot be "
            "computed at the same resolution); add it, or give a finer (e.g. global 5') static store"
        )
    di = (g.south - sgrid.south) / g.dlat
    dj = ((g.west - sgrid.west) % 360.0 if sgrid.is_global_lon else g.west - sgrid.west) / g.dlon
    if abs(di - round(di)) > 1e-3 or abs(dj - round(dj)) > 1e-3:
        raise FineDataError(
            f"data.static {where} ({sgrid.describe()}) has the fine spacing but its cells are shifted from "
            f"the fine grid ({g.describe()}) by a fraction of a cell"
        )
    rows = np.arange(g.nlat) + int(round(di))
    cols = np.arange(g.nlon) + int(round(dj))
    if sgrid.is_global_lon:
        cols %= sgrid.nlon
    inside = (rows >= 0) & (rows < sgrid.nlat), (cols >= 0) & (cols < sgrid.nlon)
    covered = np.outer(*inside)
    if (fine.mask.values & ~covered).any():
        raise FineDataError(
            f"data.static {where} ({sgrid.describe()}) does not cover every valid cell of the fine grid "
            f"({g.describe()})"
        )
    cut = raw.isel(lat=np.clip(rows, 0, sgrid.nlat - 1), lon=np.clip(cols, 0, sgrid.nlon - 1)).load()
    out = xr.Dataset(
        {
            v: (("lat", "lon"), np.where(covered, cut[v].values, 0.0).astype("float32"), cut[v].attrs)
            for v in _STATIC_FIELDS
        },
        coords={"lat": ("lat", g.lat, fine.ds["lat"].attrs), "lon": ("lon", g.lon, fine.ds["lon"].attrs)},
    )
    out.attrs["method"] = (
        f"cells of {where} on the fine grid; {int((~covered).sum())} uncovered (padded) cells set to 0"
    )
    return out


def _static_regridded(raw: xr.Dataset, fine: FineData, where: str) -> xr.Dataset:
    """A static store of another resolution regridded onto ``fine.grid`` (its longitudes put into the fine
    grid's convention first)."""
    from climrecon.tasks.regrid import RegridError, static_on_grid

    g = fine.grid
    if g.lon_convention == "0..360" and float(raw["lon"].min()) < 0:
        raw = raw.assign_coords(lon=raw["lon"] % 360.0).sortby("lon")
    elif g.lon_convention == "-180..180" and float(raw["lon"].max()) > 180:
        raw = raw.assign_coords(lon=(raw["lon"] + 180.0) % 360.0 - 180.0).sortby("lon")
    pad = 1.0  # degrees around the domain, enough for interpolation / aggregation stencils
    sub = raw.sel(lat=slice(g.south - pad, g.north + pad), lon=slice(g.west - pad, g.east + pad))
    try:
        out = static_on_grid(sub.load(), g, name=f"data.static {where}")
    except (RegridError, ValueError) as exc:
        raise FineDataError(
            f"data.static {where} cannot be put on the fine grid ({g.describe()}): {exc}"
        ) from None
    return _on_grid(out, g)
