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

import functools
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any, Literal

import dask.array
import numpy as np
import xarray as xr

from climrecon.tasks.grids import Grid, lat_edges_from_centres, lon_edges_from_centres

__all__ = [
    "RegridError",
    "check_regular_latlon",
    "check_time_slices",
    "check_target_in_domain",
    "area_weights",
    "coarsen_blocks",
    "SeparableWeights",
    "apply_separable",
    "bilinear",
    "bilinear_weights",
    "conservative",
    "conservative_weights",
    "cell_edges",
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


# -- separable application --------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class SeparableWeights:
    """A regridding between regular grids as 1-D operators: ``out[t] = lat @ x[t][rows][:, cols] @ lon.T``.

    ``rows``/``cols`` index the source cells the target needs (a region of a global source reads only its
    own part); ``lat`` is ``(n_target_lat, len(rows))``, ``lon`` ``(n_target_lon, len(cols))``. ``pole``
    (bilinear from a global source only) adds ``pole @ zonal_mean(x[t][rows])`` to every target longitude:
    the ghost rows at the poles. Built once per (source grid, target grid); applied by
    :func:`apply_separable`, one NumPy call per dask chunk, as sparse row gathers (each row has a few
    non-zero weights: 2 for bilinear, about the resolution ratio for conservative).
    """

    lat: np.ndarray
    lon: np.ndarray
    rows: np.ndarray
    cols: np.ndarray
    pole: np.ndarray | None = None
    # bilinear only: which source values a NaN propagates from (1.0 = in the stencil, even at weight 0)
    nan_lat: np.ndarray | None = None
    nan_lon: np.ndarray | None = None
    nan_pole: np.ndarray | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return self.lat.shape[0], self.lon.shape[0]

    @functools.cached_property
    def _rows_of(self) -> dict[str, _RowEntries]:
        names = ("lat", "lon", "pole", "nan_lat", "nan_lon", "nan_pole")
        return {n: _RowEntries.of(getattr(self, n)) for n in names if getattr(self, n) is not None}

    def sparse(self, name: str) -> _RowEntries:
        """The operator ``name`` ("lat", "lon", "pole", "nan_lat", ...) as its non-zero entries per row."""
        return self._rows_of[name]


@dataclass(frozen=True)
class _RowEntries:
    """A matrix ``(n_out, n_in)`` as the ``k`` non-zero entries of each row: ``index``/``value`` ``(k, n_out)``
    (rows with fewer are padded with weight 0). Applying it gathers and adds ``k`` slices of the input:
    O(non-zeros), no BLAS (whose threads only contend with dask's on such thin matrices)."""

    index: np.ndarray
    value: np.ndarray

    @classmethod
    def of(cls, w: np.ndarray) -> _RowEntries:
        nonzero = w != 0
        k = max(int(nonzero.sum(1).max(initial=0)), 1)
        order = np.argsort(~nonzero, axis=1, kind="stable")[:, :k]  # non-zero columns first
        return cls(order.T.copy(), np.take_along_axis(w, order, axis=1).T.copy())

    @property
    def k(self) -> int:
        return self.index.shape[0]

    def apply(self, x: np.ndarray, axis: int) -> np.ndarray:
        """``w @ x`` along ``axis`` (-1 or -2) of ``x``; ``x`` must be finite (0 weights pad the rows)."""
        shape = (-1,) if axis == -1 else (-1, 1)
        out = np.take(x, self.index[0], axis=axis) * self.value[0].reshape(shape)
        for index, value in zip(self.index[1:], self.value[1:], strict=True):
            out += np.take(x, index, axis=axis) * value.reshape(shape)
        return out


def _apply_2sided(lat: _RowEntries, x: np.ndarray, lon: _RowEntries) -> np.ndarray:
    """``W_lat @ x @ W_lon.T`` over the last two axes of ``x``, in the cheaper order."""
    (r, c), tl, tn = x.shape[-2:], lat.index.shape[1], lon.index.shape[1]
    if lat.k * tl * c + lon.k * tl * tn <= lon.k * r * tn + lat.k * tl * tn:
        return lon.apply(lat.apply(x, -2), -1)
    return lat.apply(lon.apply(x, -1), -2)


def _bilinear_kernel(x: np.ndarray, w: SeparableWeights, dtype: np.dtype) -> np.ndarray:
    """Bilinear on the last two axes; NaN wherever a source value in the target's stencil is NaN."""
    rows = x[..., w.rows, :].astype(np.float64)
    sub = rows[..., w.cols]
    nan = np.isnan(sub)
    any_nan = bool(nan.any())
    out = _apply_2sided(w.sparse("lat"), np.where(nan, 0.0, sub) if any_nan else sub, w.sparse("lon"))
    if any_nan:  # NaN reaches every target whose 2 x 2 stencil holds it (as in scipy's interp1d)
        out[_apply_2sided(w.sparse("nan_lat"), nan.astype(float), w.sparse("nan_lon")) > 0] = np.nan
    if w.pole is not None:  # pole value: the zonal mean of the outermost row (NaN cells skipped)
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = np.nansum(rows, axis=-1) / np.sum(~np.isnan(rows), axis=-1)
        out += w.sparse("pole").apply(np.where(np.isnan(mean), 0.0, mean), -1)[..., None]
        empty = w.sparse("nan_pole").apply(np.isnan(mean).astype(float), -1)[..., None] > 0
        out = np.where(empty, np.nan, out)
    return out.astype(dtype, copy=False)


def _conservative_kernel(x: np.ndarray, w: SeparableWeights, threshold: float, dtype: np.dtype) -> np.ndarray:
    """Area-weighted means on the last two axes, renormalised over the valid (non-NaN) overlap."""
    sub = x[..., w.rows[:, None], w.cols[None, :]].astype(np.float64)
    nan = np.isnan(sub)
    lat, lon = w.sparse("lat"), w.sparse("lon")
    if nan.any():
        total = _apply_2sided(lat, np.where(nan, 0.0, sub), lon)
        valid = _apply_2sided(lat, (~nan).astype(float), lon)
    else:
        total = _apply_2sided(lat, sub, lon)
        valid = np.broadcast_to(np.outer(w.lat.sum(1), w.lon.sum(1)), total.shape)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = total / valid
    out[valid < threshold] = np.nan
    return out.astype(dtype, copy=False)


def apply_separable(
    da: xr.DataArray,
    weights: SeparableWeights,
    kernel: Callable[..., np.ndarray],
    tlat: np.ndarray,
    tlon: np.ndarray,
    **kwargs: float,
) -> xr.DataArray:
    """``kernel(x, w=weights, dtype=..., **kwargs)`` over ``(lat, lon)`` of ``da``: one task per dask chunk.

    Spatial dims are put in one chunk each (time/member chunks kept); the output has ``da``'s dims, attrs
    and (floating) dtype, float64 for integer input, and the target ``lat``/``lon``.
    """
    dtype = da.dtype if np.issubdtype(da.dtype, np.floating) else np.dtype("float64")
    if da.chunks is not None and any(len(da.chunksizes[d]) > 1 for d in _SPATIAL):
        da = da.chunk({"lat": -1, "lon": -1})
    out = xr.apply_ufunc(
        _per_block,
        da,
        input_core_dims=[list(_SPATIAL)],
        output_core_dims=[list(_SPATIAL)],
        exclude_dims=set(_SPATIAL),
        kwargs={"kernel": kernel, "w": weights, "dtype": dtype, **kwargs},
        dask="allowed",
        keep_attrs=True,
    )
    out = out.assign_coords(lat=tlat, lon=tlon)
    return out if out.dims == da.dims else out.transpose(*da.dims)


def _per_block(x: Any, kernel: Callable[..., np.ndarray], w: SeparableWeights, **kwargs: Any) -> Any:
    """``kernel`` on a NumPy array, or block by block on a dask array (one layer, one task per chunk)."""
    apply = functools.partial(kernel, w=w, **kwargs)
    if not isinstance(x, dask.array.Array):
        return apply(x)
    chunks = (*x.chunks[:-2], (w.shape[0],), (w.shape[1],))
    meta = np.empty((0,) * x.ndim, dtype=kwargs["dtype"])
    return x.map_blocks(
        apply, chunks=chunks, dtype=kwargs["dtype"], meta=meta, token=kernel.__name__.strip("_")
    )


# -- bilinear -------------------------------------------------------------------------------------------
def _interp_matrix(axis: np.ndarray, query: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """1-D linear interpolation on the increasing ``axis``: ``(weights, stencil)``, ``(len(query), len(axis))``.

    Queries are clamped to the axis ends. The stencil marks the two bracketing nodes ``axis[k - 1] < q
    <= axis[k]`` (scipy's interp1d), so a query on node ``k`` also lists ``k - 1``, at weight 0.
    """
    q = np.clip(query, axis[0], axis[-1])
    hi = np.clip(np.searchsorted(axis, q, side="left"), 1, axis.size - 1)
    lo, at = hi - 1, np.arange(q.size)
    frac = (q - axis[lo]) / (axis[hi] - axis[lo])
    weights, stencil = np.zeros((q.size, axis.size)), np.zeros((q.size, axis.size))
    weights[at, lo], weights[at, hi] = 1.0 - frac, frac
    stencil[at, lo] = stencil[at, hi] = 1.0
    return weights, stencil


def _edge_ghost(centres: np.ndarray, edge: float, side: int) -> np.ndarray:
    """Weights on ``centres`` of a ghost value at ``edge``, linearly extrapolated from the two outermost."""
    i0, i1 = (0, 1) if side == 0 else (centres.size - 1, centres.size - 2)
    r = (edge - centres[i0]) / (centres[i0] - centres[i1])
    ghost = np.zeros(centres.size)
    ghost[i0], ghost[i1] = 1.0 + r, -r
    return ghost


def _padded_axis(
    centres: np.ndarray, edges: np.ndarray, poles: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Centres with ghost points on the domain edges: ``(coords, weights on centres, weights on row means)``.

    A ghost at a pole of a global source (``poles``) is the zonal mean of the outermost row (one value at
    the pole, like ESMF); any other ghost is linearly extrapolated from the two outermost centres.
    """
    coords, direct, mean = [centres], [np.eye(centres.size)], [np.zeros((centres.size, centres.size))]
    for side, edge in ((0, float(edges[0])), (-1, float(edges[-1]))):
        if abs(edge - float(centres[side])) <= _TOL:
            continue
        ghost, zonal = _edge_ghost(centres, edge, side)[None], np.zeros((1, centres.size))
        if poles and abs(edge) == 90.0:
            ghost, zonal[0, side] = np.zeros((1, centres.size)), 1.0
        at = 0 if side == 0 else len(coords)
        coords.insert(at, np.array([edge]))
        direct.insert(at, ghost)
        mean.insert(at, zonal)
    return np.concatenate(coords), np.concatenate(direct), np.concatenate(mean)


def _wrapped_axis(lon: np.ndarray, target_lon: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A globe-wrapping source's lon relabelled into the target's frame and padded with wrapped columns
    on both sides: ``(coords, weights on the source columns)``."""
    step = float(np.median(np.diff(lon)))
    lo = target_lon.min() - 1.5 * step
    shifted = (lon - lo) % 360.0 + lo
    order = np.argsort(shifted, kind="stable")
    n_right = int(np.sum(shifted[order] + 360.0 <= target_lon.max() + 1.5 * step))
    index = np.concatenate([order, order[:n_right]])
    coords = np.concatenate([shifted[order], shifted[order][:n_right] + 360.0])
    return coords, np.eye(lon.size)[index]


def _used(*weights: np.ndarray | None) -> np.ndarray:
    """Indices of the source cells (columns) that any of ``weights`` uses."""
    return np.flatnonzero(np.any([w != 0 for w in weights if w is not None], axis=(0, 1)))


@functools.lru_cache(maxsize=64)
def _bilinear_weights_cached(
    lat_bytes: bytes, lon_bytes: bytes, tlat_bytes: bytes, tlon_bytes: bytes
) -> SeparableWeights:
    lat, lon, tlat, tlon = (np.frombuffer(b) for b in (lat_bytes, lon_bytes, tlat_bytes, tlon_bytes))
    lat_e, lon_e = lat_edges_from_centres(lat), lon_edges_from_centres(lon)
    step = float(np.median(np.diff(lon)))
    global_lon = abs((lon_e[-1] - lon_e[0]) - 360.0) < 0.01 * step
    lat_axis, lat_direct, lat_mean = _padded_axis(lat, lat_e, poles=global_lon)
    if global_lon:
        lon_axis, lon_direct = _wrapped_axis(lon, tlon)
        frame_lon = tlon
    else:
        lon_axis, lon_direct, _ = _padded_axis(lon, lon_e, poles=False)
        frame_lon = tlon - _lon_shift(tlon, lon_e)
    (lat_w, lat_s), (lon_w, lon_s) = _interp_matrix(lat_axis, tlat), _interp_matrix(lon_axis, frame_lon)
    w_lat, w_pole, w_lon = lat_w @ lat_direct, lat_w @ lat_mean, lon_w @ lon_direct
    # NaN propagation: a ghost value is NaN if a source value it is made of is (all of a row for a pole)
    s_lat, s_pole, s_lon = (
        s @ (p != 0) for s, p in ((lat_s, lat_direct), (lat_s, lat_mean), (lon_s, lon_direct))
    )
    rows, cols = _used(w_lat, w_pole, s_lat, s_pole), _used(w_lon, s_lon)
    pole = bool(np.any(s_pole))  # the zonal mean reads whole rows; ``cols`` serves the rest
    return _frozen(
        SeparableWeights(
            lat=w_lat[:, rows],
            lon=w_lon[:, cols],
            rows=rows,
            cols=cols,
            pole=w_pole[:, rows] if pole else None,
            nan_lat=(s_lat[:, rows] > 0).astype(float),
            nan_lon=(s_lon[:, cols] > 0).astype(float),
            nan_pole=(s_pole[:, rows] > 0).astype(float) if pole else None,
        )
    )


def _frozen(w: SeparableWeights) -> SeparableWeights:
    """``w`` with read-only arrays (cached weights are shared between calls)."""
    for a in (w.lat, w.lon, w.rows, w.cols, w.pole, w.nan_lat, w.nan_lon, w.nan_pole):
        if a is not None:
            a.flags.writeable = False
    return w


def _key(values: np.ndarray | xr.DataArray) -> bytes:
    return np.ascontiguousarray(np.asarray(values, dtype=np.float64)).tobytes()


def bilinear_weights(
    src_lat: np.ndarray, src_lon: np.ndarray, target_lat: np.ndarray, target_lon: np.ndarray
) -> SeparableWeights:
    """Separable bilinear weights from source to target cell centres (cached per pair of grids).

    Source values sit at the centres ``src_lat``/``src_lon`` (ascending/increasing); longitudes are
    periodic for a globe-wrapping source, otherwise target longitudes are moved by a multiple of 360 into
    the source's frame. Between the outermost centres and the domain edge: towards a pole of a global
    source the ghost row is the pole value (zonal mean of the outermost row), elsewhere a ghost row/column
    linearly extrapolated from the two outermost. Targets beyond the edges take the edge value.
    """
    return _bilinear_weights_cached(_key(src_lat), _key(src_lon), _key(target_lat), _key(target_lon))


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
    value). Output lon is the target's. A target is NaN where any source value it draws on (non-zero
    weight) is NaN; a pole value is the mean of the row's valid cells.

    Bilinear on regular lat/lon grids is separable: per time step ``out = W_lat @ x @ W_lon.T`` with 1-D
    weights (:func:`bilinear_weights`, built once per pair of grids), one NumPy call per dask chunk.
    """
    check_regular_latlon(ds, name)
    tlat, tlon = _target_latlon(target)
    if not allow_extrapolation:
        check_target_in_domain(ds, tlat, tlon, name)
    ds = _drop_bounds(ds)
    weights = bilinear_weights(ds["lat"].values, ds["lon"].values, tlat, tlon)
    return _regridded(ds, weights, _bilinear_kernel, tlat, tlon)


def _regridded(
    ds: xr.Dataset,
    weights: SeparableWeights,
    kernel: Callable[..., np.ndarray],
    tlat: np.ndarray,
    tlon: np.ndarray,
    **kwargs: float,
) -> xr.Dataset:
    """``ds`` with every spatial variable regridded by ``kernel`` and the target coordinates."""
    out = ds.drop_vars(_spatial_vars(ds)).drop_dims(_SPATIAL, errors="ignore")
    fields = {v: apply_separable(ds[v], weights, kernel, tlat, tlon, **kwargs) for v in _spatial_vars(ds)}
    return out.assign(fields).assign_coords(
        lat=("lat", tlat, {"units": "degrees_north", "standard_name": "latitude"}),
        lon=("lon", tlon, {"units": "degrees_east", "standard_name": "longitude"}),
    )


# -- conservative ---------------------------------------------------------------------------------------
def cell_edges(target: Grid | xr.Dataset) -> tuple[np.ndarray, np.ndarray]:
    """Cell edges (lat, lon) of a grid: from a Grid, from CF ``lat_bnds``/``lon_bnds``, or from the centres."""
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
    dst_lat_e, dst_lon_e = cell_edges(target)
    w_lat, w_lon = conservative_weights(src_lat_e, src_lon_e, dst_lat_e, dst_lon_e)
    # only source rows/columns that touch a target cell are read (a region of a global source)
    rows, cols = np.flatnonzero(w_lat.sum(1) > 0), np.flatnonzero(w_lon.sum(1) > 0)
    weights = SeparableWeights(w_lat[rows].T.copy(), w_lon[cols].T.copy(), rows, cols)
    # skipna: keep targets with any valid overlap; otherwise only those whose whole overlap is valid
    # (the weighted valid fraction, up to float rounding: xesmf's and xarray-regrid's nan thresholds)
    threshold = 1e-6 if skipna else 1.0 - 1e-6
    return _regridded(_drop_bounds(ds), weights, _conservative_kernel, tlat, tlon, threshold=threshold)


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
