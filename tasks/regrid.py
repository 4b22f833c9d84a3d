"""Regridding between regular lat/lon grids: block means, bilinear, first-order conservative, static fields.

Every function takes and returns ``xr.Dataset``s in the project conventions (dims ``(..., lat, lon)``,
``lat`` ascending, ``lon`` increasing, in either convention) and stays lazy on dask: spatial dims may be
rechunked, the ``time`` (and ``member``) chunks are kept. Variables without both ``lat`` and ``lon`` (e.g.
``time_bnds``) pass through; source ``lat_bnds``/``lon_bnds`` are dropped (they describe the old grid).

Cells are areas, not points: a source cell spans the midpoints between its centre and its neighbours'
(outer cells mirrored, latitudes clipped at the poles), which is exact for regular grids and the usual
reading of Gaussian ones (MPI-ESM T63). Area weights are exact spherical areas (differences of sin lat).

Structural checks raise :class:`RegridError` (curvilinear/rotated grids, targets outside the source
domain); :func:`check_time_slices` is separate because it has to compute the data.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Literal

import numpy as np
import xarray as xr
from xarray_regrid.methods.conservative import apply_weights, format_weights
from xarray_regrid.methods.interp import interp_regrid
from xarray_regrid.utils import create_dot_dataarray

from climrecon.tasks.grids import Grid, lat_edges_from_centres, lon_edges_from_centres

__all__ = [
    "RegridError",
    "check_regular_latlon",
    "check_time_slices",
    "check_target_in_domain",
    "area_weights",
    "coarsen_blocks",
    "bilinear",
    "conservative",
    "conservative_weights",
    "static_on_grid",
]

_SPATIAL = ("lat", "lon")
_TOL = 1e-6


class RegridError(ValueError):
    """A source or target cannot be regridded as asked; the message names the dataset and what to do."""


# -- checks ---------------------------------------------------------------------------------------------
def check_regular_latlon(ds: xr.Dataset, name: str) -> None:
    """Raise RegridError unless ``ds`` has 1-D ascending ``lat`` and increasing ``lon`` dimension coords."""
    mappings = {
        str(ds[v].attrs.get("grid_mapping_name")) for v in ds.variables if "grid_mapping_name" in ds[v].attrs
    }
    rotated = bool(mappings - {"latitude_longitude"}) or bool({"rlat", "rlon"} & set(ds.dims))
    curvilinear = any(c in ds.variables and ds[c].ndim != 1 for c in _SPATIAL)
    if rotated or curvilinear:
        raise RegridError(
            f"{name}: curvilinear/rotated-pole grid (2-D lat/lon or rotated_pole grid mapping) is not "
            "supported yet; provide a regular lat/lon source"
        )
    for c in _SPATIAL:
        if c not in ds.dims or c not in ds.coords:
            raise RegridError(
                f"{name}: no 1-D {c!r} dimension coordinate (dims {dict(ds.sizes)}); expected dims "
                "(time, lat, lon) named as in the data conventions (run the ingest stage first)"
            )
        values = np.asarray(ds[c], float)
        if values.size < 2 or np.any(np.diff(values) <= 0):
            order = "ascending" if c == "lat" else "increasing"
            raise RegridError(
                f"{name}: {c} must be strictly {order} with at least 2 values (got {values[:3]}...); "
                "put the source into the conventions first (ingest stage)"
            )


def check_time_slices(ds: xr.Dataset, name: str) -> None:
    """Raise RegridError naming the variable and time(s) of any step that is NaN everywhere (computes)."""
    for var in _spatial_vars(ds):
        da = ds[var]
        if "time" not in da.dims:
            continue
        empty = np.asarray(
            (~da.notnull().any(_SPATIAL)).any([d for d in da.dims if d not in (*_SPATIAL, "time")])
        )
        if empty.any():
            times = [str(t) for t in np.asarray(da["time"])[empty][:5]]
            raise RegridError(
                f"{name}: variable {var!r} is NaN everywhere at {int(empty.sum())} time step(s), first "
                f"{times}; drop or fill those steps before regridding"
            )


def _source_domain(ds: xr.Dataset) -> tuple[np.ndarray, np.ndarray, bool]:
    """Source cell edges (lat, lon) and whether the source wraps around the globe in longitude."""
    lat_e, lon_e = lat_edges_from_centres(ds["lat"]), lon_edges_from_centres(ds["lon"])
    step = float(np.median(np.diff(np.asarray(ds["lon"], float))))
    return lat_e, lon_e, abs((lon_e[-1] - lon_e[0]) - 360.0) < 0.01 * step


def _lon_shift(target_lon: np.ndarray, lon_edges: np.ndarray) -> float:
    """The multiple of 360 to subtract from target longitudes to put them in the source's frame."""
    return 360.0 * round((np.mean(target_lon[[0, -1]]) - np.mean(lon_edges[[0, -1]])) / 360.0)


def check_target_in_domain(ds: xr.Dataset, target_lat: np.ndarray, target_lon: np.ndarray, name: str) -> None:
    """Raise RegridError if any target cell centre lies outside the source's cells (longitudes modulo 360)."""
    lat_e, lon_e, global_lon = _source_domain(ds)
    tlon = target_lon - _lon_shift(target_lon, lon_e)
    bad_lat = target_lat.min() < lat_e[0] - _TOL or target_lat.max() > lat_e[-1] + _TOL
    bad_lon = not global_lon and (tlon.min() < lon_e[0] - _TOL or tlon.max() > lon_e[-1] + _TOL)
    if bad_lat or bad_lon:
        raise RegridError(
            f"{name}: the target region (lat {target_lat.min():g}..{target_lat.max():g}, lon "
            f"{target_lon.min():g}..{target_lon.max():g}, cell centres) lies partly outside the source "
            f"domain (lat {lat_e[0]:g}..{lat_e[-1]:g}, lon {lon_e[0]:g}..{lon_e[-1]:g}); "
            "choose a region inside it"
        )


# -- helpers --------------------------------------------------------------------------------------------
def _spatial_vars(ds: xr.Dataset) -> list[Hashable]:
    return [v for v in ds.data_vars if set(_SPATIAL) <= set(ds[v].dims) and v not in ("lat_bnds", "lon_bnds")]


def _drop_bounds(ds: xr.Dataset) -> xr.Dataset:
    return ds.drop_vars([v for v in ("lat_bnds", "lon_bnds") if v in ds.variables])


def area_weights(lat: np.ndarray | xr.DataArray, lon: np.ndarray | xr.DataArray) -> xr.DataArray:
    """Exact spherical cell areas on the unit sphere, ``(lat, lon)``: dlon[rad] * (sin lat_n - sin lat_s)."""
    lat, lon = np.asarray(lat, float), np.asarray(lon, float)
    band = np.diff(np.sin(np.radians(lat_edges_from_centres(lat))))
    width = np.radians(np.diff(lon_edges_from_centres(lon)))
    return xr.DataArray(np.outer(band, width), dims=_SPATIAL, coords={"lat": lat, "lon": lon})


def _target_latlon(target: Grid | xr.Dataset) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(target, Grid):
        return target.lat, target.lon
    check_regular_latlon(target, "target grid")
    return np.asarray(target["lat"], float), np.asarray(target["lon"], float)


def _keep_dtype(out: xr.DataArray, like: xr.DataArray) -> xr.DataArray:
    """``out`` with the dtype, attrs, dim order and non-spatial (time, member) dask chunks of ``like``."""
    out = out.astype(like.dtype) if np.issubdtype(like.dtype, np.floating) else out
    out.attrs = like.attrs
    out = out.transpose(*like.dims)
    if like.chunks is not None and out.chunks is not None:
        kept = {d: like.chunksizes[d] for d in like.dims if d not in _SPATIAL}
        if any(out.chunksizes[d] != c for d, c in kept.items()):
            out = out.chunk(kept)
    return out


# -- block mean -----------------------------------------------------------------------------------------
def coarsen_blocks(
    ds: xr.Dataset, factor: int, *, boundary: Literal["exact", "trim"] = "exact"
) -> xr.Dataset:
    """Exact area-weighted mean over ``factor x factor`` blocks of a regular grid.

    The perfect-model "fine truth area-averaged to a coarse grid": each coarse value is
    sum(area * x) / sum(area) over the block's valid (non-NaN) fine cells, NaN where none is valid; new
    ``lat``/``lon`` are the block centres. ``boundary="exact"`` requires both sizes divisible by ``factor``;
    ``"trim"`` drops the remainder cells at the north/east end.
    """
    check_regular_latlon(ds, "coarsen_blocks source")
    if factor < 1 or boundary not in ("exact", "trim"):
        raise RegridError(
            f"coarsen_blocks: need factor >= 1 and boundary 'exact' or 'trim', got {factor}, {boundary!r}"
        )
    for dim in _SPATIAL:
        if boundary == "exact" and ds.sizes[dim] % factor:
            raise RegridError(
                f"coarsen_blocks: {dim} has {ds.sizes[dim]} cells, not divisible by factor {factor}; "
                f"pass boundary='trim' to drop the last {ds.sizes[dim] % factor}"
            )
    ds = _drop_bounds(ds)
    weights = area_weights(ds["lat"], ds["lon"])
    blocks = {"lat": factor, "lon": factor}
    out = ds.drop_vars(_spatial_vars(ds)).drop_dims(_SPATIAL, errors="ignore")
    coarse = {}
    for var in _spatial_vars(ds):
        da = _spatial_single_chunk(ds[var], factor)
        total = (da.fillna(0) * weights).coarsen(blocks, boundary=boundary).sum()
        area = (da.notnull() * weights).coarsen(blocks, boundary=boundary).sum()
        coarse[var] = _keep_dtype(total / area.where(area > 0), ds[var])
    return out.assign(coarse)


def _spatial_single_chunk(da: xr.DataArray, factor: int) -> xr.DataArray:
    """Rechunk lat/lon whose dask chunks are not multiples of ``factor`` (time chunks untouched)."""
    if da.chunks is None:
        return da
    bad = {d: -1 for d in _SPATIAL if any(c % factor for c in da.chunksizes[d][:-1])}
    return da.chunk(bad) if bad else da


# -- bilinear -------------------------------------------------------------------------------------------
def _edge_ghost(da: xr.DataArray, dim: str, edge: float, side: int) -> xr.DataArray:
    """A ghost row/column at ``edge``, linearly extrapolated from the two outermost cells on ``side``."""
    i0, i1 = (0, 1) if side == 0 else (-1, -2)
    c0, c1 = float(da[dim][i0]), float(da[dim][i1])
    v0 = da.isel({dim: [i0]})
    v1 = da.isel({dim: [i1]}).assign_coords({dim: v0[dim].values})
    ghost = v0 + (v0 - v1) * ((edge - c0) / (c0 - c1))
    return ghost.assign_coords({dim: [edge]})


def _wrap_lon(ds: xr.Dataset, target_lon: np.ndarray) -> xr.Dataset:
    """Relabel a globe-wrapping source into the target's frame; pad it with wrapped columns on both sides."""
    lon = np.asarray(ds["lon"], float)
    step = float(np.median(np.diff(lon)))
    lo = target_lon.min() - 1.5 * step
    shifted = (lon - lo) % 360.0 + lo
    order = np.argsort(shifted, kind="stable")
    ds = ds.isel(lon=order).assign_coords(lon=shifted[order])
    n_right = int(np.sum(shifted[order] + 360.0 <= target_lon.max() + 1.5 * step))
    right = ds.isel(lon=slice(0, n_right)).assign_coords(lon=shifted[order][:n_right] + 360.0)
    return xr.concat(
        [ds, right], dim="lon", data_vars="all", coords="minimal", compat="override", join="override"
    )


def _pole_ghost(da: xr.DataArray, pole: float, side: int) -> xr.DataArray:
    """A ghost row at the pole: the zonal mean of the outermost row (one value at the pole, like ESMF)."""
    row = da.isel(lat=[side])
    return (xr.zeros_like(row) + row.mean("lon")).assign_coords(lat=[pole])  # broadcast back over lon


def _pad_to_edges(da: xr.DataArray, lat_e: np.ndarray, lon_e: np.ndarray, global_lon: bool) -> xr.DataArray:
    """Ghost rows/columns on the domain edges: pole rows for a global source, else linear extrapolation."""
    dims = [("lat", lat_e)] + ([] if global_lon else [("lon", lon_e)])
    for dim, edges in dims:
        pieces = [da]
        for side, edge in ((0, float(edges[0])), (-1, float(edges[-1]))):
            if abs(edge - float(da[dim][side])) <= _TOL:
                continue
            at_pole = dim == "lat" and global_lon and abs(edge) == 90.0
            ghost = _pole_ghost(da, edge, side) if at_pole else _edge_ghost(da, dim, edge, side)
            pieces.insert(0 if side == 0 else len(pieces), ghost)
        da = xr.concat(pieces, dim=dim, join="override") if len(pieces) > 1 else da
    return da


def bilinear(
    ds: xr.Dataset,
    target: Grid | xr.Dataset,
    *,
    allow_extrapolation: bool = False,
    name: str = "bilinear source",
) -> xr.Dataset:
    """Bilinear interpolation of ``ds`` to the target cell centres (coarse fields as model conditioning).

    Source values sit at cell centres; longitudes are periodic for a globe-wrapping source (wrapped columns
    padded on both sides, so no seam at the dateline or Greenwich). In the half cell between the outermost
    centres and the domain edge: towards a pole of a global source, interpolation runs to a pole value (the
    zonal mean of the last row, as ESMF does); at a regional edge, values are extrapolated linearly from the
    two outermost cells (so a field linear in lat/lon is reproduced exactly everywhere inside a regional
    domain, but a non-negative field may dip below zero there: clip pr if that matters). Target centres
    outside the domain raise RegridError unless ``allow_extrapolation`` (then they take the nearest edge
    value). Output lon is the target's.
    """
    check_regular_latlon(ds, name)
    tlat, tlon = _target_latlon(target)
    if not allow_extrapolation:
        check_target_in_domain(ds, tlat, tlon, name)
    lat_e, lon_e, global_lon = _source_domain(ds)
    ds = _drop_bounds(ds)
    if global_lon:
        ds, frame_lon = _wrap_lon(ds, tlon), tlon
    else:
        frame_lon = tlon - _lon_shift(tlon, lon_e)
    fields = {v: _pad_to_edges(ds[v], lat_e, lon_e, global_lon) for v in _spatial_vars(ds)}
    out = ds.drop_vars(list(fields)).drop_dims(_SPATIAL, errors="ignore")
    for var, da in fields.items():
        lat_q = np.clip(tlat, float(da["lat"][0]), float(da["lat"][-1]))
        lon_q = np.clip(frame_lon, float(da["lon"][0]), float(da["lon"][-1]))
        query = xr.Dataset(coords={"lat": lat_q, "lon": lon_q})
        interp = interp_regrid(da.to_dataset(name="v"), query, "linear")["v"]
        out[var] = _keep_dtype(interp.assign_coords(lat=tlat, lon=tlon), ds[var])
    return out.assign_coords(
        lat=("lat", tlat, {"units": "degrees_north", "standard_name": "latitude"}),
        lon=("lon", tlon, {"units": "degrees_east", "standard_name": "longitude"}),
    )


# -- conservative ---------------------------------------------------------------------------------------
def _target_edges(target: Grid | xr.Dataset) -> tuple[np.ndarray, np.ndarray]:
    """Target cell edges (lat, lon), from a Grid, from CF ``lat_bnds``/``lon_bnds``, or from the centres."""
    if isinstance(target, Grid):
        lat_b, lon_b = target.bounds()
        return np.append(lat_b[:, 0], lat_b[-1, 1]), np.append(lon_b[:, 0], lon_b[-1, 1])
    if "lat_bnds" in target and "lon_bnds" in target:
        lat_b, lon_b = np.asarray(target["lat_bnds"], float), np.asarray(target["lon_bnds"], float)
        return np.append(lat_b[:, 0], lat_b[-1, 1]), np.append(lon_b[:, 0], lon_b[-1, 1])
    return lat_edges_from_centres(target["lat"]), lon_edges_from_centres(target["lon"])


def _overlap(src_lo: np.ndarray, src_hi: np.ndarray, dst_lo: np.ndarray, dst_hi: np.ndarray) -> np.ndarray:
    """Lengths of the overlaps of source intervals (rows) with target intervals (columns)."""
    lo = np.maximum(src_lo[:, None], dst_lo[None, :])
    hi = np.minimum(src_hi[:, None], dst_hi[None, :])
    return np.maximum(hi - lo, 0.0)


def conservative_weights(
    src_lat_edges: np.ndarray, src_lon_edges: np.ndarray, dst_lat_edges: np.ndarray, dst_lon_edges: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Factorised first-order conservative weights ``(W_lat[s, t], W_lon[s, t])``.

    The overlap area of source cell (i, j) and target cell (k, l) on the sphere is
    ``[sin] overlap of lat intervals x [rad] overlap of lon intervals`` (lon overlaps taken modulo 360),
    so the weights factorise per axis; each column is normalised to sum to 1 over the source cells it
    covers (0 where it covers none).
    """
    mu_s, mu_t = np.sin(np.radians(src_lat_edges)), np.sin(np.radians(dst_lat_edges))
    w_lat = _overlap(mu_s[:-1], mu_s[1:], mu_t[:-1], mu_t[1:])
    w_lon = sum(
        _overlap(src_lon_edges[:-1] + k, src_lon_edges[1:] + k, dst_lon_edges[:-1], dst_lon_edges[1:])
        for k in (-720.0, -360.0, 0.0, 360.0, 720.0)
    )
    return tuple(w / np.where(w.sum(0) > 0, w.sum(0), 1.0) for w in (w_lat, w_lon))  # type: ignore[return-value]


def conservative(
    ds: xr.Dataset, target: Grid | xr.Dataset, *, skipna: bool = True, name: str = "conservative source"
) -> xr.Dataset:
    """First-order conservative (area-weighted) regridding onto the target cells.

    Each target value is sum(a * x) / sum(a) over the source cells it overlaps, ``a`` the exact spherical
    overlap area; with ``skipna`` NaN cells are left out and the weights renormalised over the valid part
    (NaN only where no valid source overlaps), without it any NaN contributor makes the target NaN.
    Longitudes are periodic, cells reach the poles. So the area-weighted mean over any union of target
    cells equals the source's area-weighted mean over the same area (exactly, in float64; output is cast
    back to the input dtype). A target cell only partly inside the source domain is the mean over its
    covered part; target cells whose centres lie outside the source domain raise RegridError.
    """
    check_regular_latlon(ds, name)
    tlat, tlon = _target_latlon(target)
    check_target_in_domain(ds, tlat, tlon, name)
    src_lat_e, src_lon_e, _ = _source_domain(ds)
    dst_lat_e, dst_lon_e = _target_edges(target)
    w_lat, w_lon = conservative_weights(src_lat_e, src_lon_e, dst_lat_e, dst_lon_e)
    # only source rows/columns that touch a target cell enter the dot product (a region of a global source)
    rows, cols = np.flatnonzero(w_lat.sum(1) > 0), np.flatnonzero(w_lon.sum(1) > 0)
    ds, w_lat, w_lon = _drop_bounds(ds).isel(lat=rows, lon=cols), w_lat[rows], w_lon[cols]
    out = ds.drop_vars(_spatial_vars(ds)).drop_dims(_SPATIAL, errors="ignore")
    regridded = {}
    for var in _spatial_vars(ds):
        da = ds[var].astype("float64")
        weights = {
            "lat": _weight_array(w_lat, "lat", ds["lat"].values, tlat, da),
            "lon": _weight_array(w_lon, "lon", ds["lon"].values, tlon, da),
        }
        # xarray-regrid's dot-product application: NaN-aware renormalisation, weights chunked like the data.
        # nan_threshold 1.0 keeps targets with any valid input; 0.0 keeps only targets with no NaN input.
        res = apply_weights(da, weights, skipna=True, nan_threshold=1.0 if skipna else 0.0)
        regridded[var] = _keep_dtype(res.assign_coords(lat=tlat, lon=tlon), ds[var])
    return out.assign(regridded).assign_coords(
        lat=("lat", tlat, {"units": "degrees_north", "standard_name": "latitude"}),
        lon=("lon", tlon, {"units": "degrees_east", "standard_name": "longitude"}),
    )


def _weight_array(
    w: np.ndarray, dim: str, src: np.ndarray, dst: np.ndarray, like: xr.DataArray
) -> xr.DataArray:
    da = create_dot_dataarray(w, dim, dst, src)
    # one output chunk per spatial dim (xarray-regrid reuses the input chunk size, splitting fine targets)
    return format_weights(da, dim, like.dtype, like.chunksizes.get(dim), dst.size)


# -- static fields --------------------------------------------------------------------------------------
_STATIC_ATTRS = {
    "orog": {"units": "m", "standard_name": "surface_altitude", "long_name": "area-mean surface altitude"},
    "orog_std": {"units": "m", "long_name": "sub-grid standard deviation of surface altitude"},
    "sftlf": {"units": "%", "standard_name": "land_area_fraction", "long_name": "land area fraction"},
}


def static_on_grid(static: xr.Dataset, target: Grid, *, name: str = "static source") -> xr.Dataset:
    """``orog`` [m], ``orog_std`` [m] and ``sftlf`` [%] on ``target`` from a fine static dataset.

    Target coarser than (or as fine as) the source: conservative area means of orog, orog**2 and sftlf,
    with orog_std = sqrt(mean(orog**2) - mean(orog)**2), the area-weighted sub-grid spread. Target finer
    than the source: bilinear orog/sftlf, and orog_std = the source's local (3x3 cell) standard deviation
    interpolated bilinearly; ``attrs["method"]`` says which was used. Output float32, sftlf in 0..100.
    """
    missing = [v for v in ("orog", "sftlf") if v not in static]
    if missing:
        raise RegridError(
            f"{name}: static fields {missing} missing (have {sorted(map(str, static.data_vars))})"
        )
    check_regular_latlon(static, name)
    src_res = float(np.median(np.diff(np.asarray(static["lat"], float))))
    if target.dlat >= src_res * (1 - 1e-3):
        fields, method = _static_aggregated(static, target, name), "conservative"
    else:
        fields, method = _static_interpolated(static, target, name), "bilinear"
    out = xr.Dataset(coords=target.to_dataset().drop_vars(["lat_bnds", "lon_bnds"]).coords)
    for var, da in fields.items():
        out[var] = da.astype("float32").assign_attrs(_STATIC_ATTRS[var])
    out["sftlf"] = out["sftlf"].clip(0, 100)
    out.attrs["method"] = f"{method}: target {target.dlat:g} deg vs source {src_res:g} deg; " + (
        "orog_std from the area-weighted sub-grid variance"
        if method == "conservative"
        else "target finer than the source, orog_std is the source's local 3x3 standard deviation"
    )
    return out


def _static_aggregated(static: xr.Dataset, target: Grid, name: str) -> dict[str, xr.DataArray]:
    orog = static["orog"].astype("float64")
    src = xr.Dataset({"orog": orog, "orog2": orog**2, "sftlf": static["sftlf"].astype("float64")})
    agg = conservative(src, target, name=name)
    variance = (agg["orog2"] - agg["orog"] ** 2).clip(min=0)
    return {"orog": agg["orog"], "orog_std": np.sqrt(variance), "sftlf": agg["sftlf"]}


def _static_interpolated(static: xr.Dataset, target: Grid, name: str) -> dict[str, xr.DataArray]:
    orog = static["orog"].astype("float64")
    window = {"lat": 3, "lon": 3}
    local_mean = orog.rolling(window, center=True, min_periods=1).mean()
    local_var = ((orog**2).rolling(window, center=True, min_periods=1).mean() - local_mean**2).clip(min=0)
    src = xr.Dataset(
        {"orog": orog, "orog_std": np.sqrt(local_var), "sftlf": static["sftlf"].astype("float64")}
    )
    out = bilinear(src, target, name=name)
    return {"orog": out["orog"], "orog_std": out["orog_std"].clip(min=0), "sftlf": out["sftlf"]}
