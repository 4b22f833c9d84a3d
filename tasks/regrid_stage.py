"""Regrid stage: one ingested store -> the unified coarse grid, the fine target grid, static fields on it.

Three output stores, each a :class:`~climrecon.stores.StageStore` under ``<storage.root>``:

- ``regrid/<name>.coarse-<coarse_res>.<key>.zarr``: first-order conservative regridding of every
  time-dependent field onto the unified coarse grid: ``coarse_resolution`` cells on a global lattice
  anchored at (-90, -180), covering ``region`` extended outwards to whole coarse cells;
- ``regrid/<name>.fine-<res>.<key>.zarr``: that coarse field put on the fine target grid (``region`` in
  ``resolution`` cells) with ``fine_method`` (bilinear: exactly
  :func:`climrecon.methods.features.coarse_on_fine`, the conditioning the diffusion models train on);
- ``static/static.<grid>.<key>.zarr``: :func:`~climrecon.tasks.regrid.static_on_grid` of the static
  store on the fine grid (``orog``, ``orog_std`` [m], ``sftlf`` [%]), plus ``orog_coarse`` and
  ``sftlf_coarse``, the coarse grid's view of them put back on the fine grid
  (:func:`~climrecon.methods.features.coarse_static_on_fine`), keyed by the static store and the
  grid only, so every run and source on the same grid reuses it.

Contract:

- :func:`plan_regrid` opens the source and static stores lazily and checks everything that can be
  checked without reading the data (regular lat/lon source, source complete, region inside the source
  and static domains, CF units); it writes nothing, so a bad input leaves every store as it was.
- :func:`prepare_regrid` writes the static store (if not complete) and the coarse/fine templates once,
  and returns the time blocks still missing in either store.
- :func:`regrid_block` reads one block of ``time_chunk`` steps from the source, in pieces of at most the
  source's own time chunk (so memory is bounded by one source chunk, whatever ``time_chunk`` is), checks no step is NaN everywhere (:class:`RegridError` naming the variable and time;
  the stores stay incomplete), and writes one chunk-aligned region into each store that lacks it, so
  several Dask workers can fill the same stores and a re-run writes only what is missing.
- :func:`finalize_regrid` marks both stores complete (provenance: source store, its key and history,
  config, code version); :func:`run_regrid` chains the three, on a Dask client when given one.

Output keys: coarse = hash(source key, variables, coarse grid, time_chunk, zarr_format); fine =
hash(coarse key, resolution, fine_method); static = hash(static store key, fine grid, unit scale,
zarr_format); each also carries :data:`REGRID_VERSION`. Store URLs never hold secrets; storage options
are passed separately and never recorded.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import cf_units
import dask
import dask.array as da
import numpy as np
import xarray as xr

from climrecon.config import ClimReconConfig, RegridConfig, StorageConfig
from climrecon.methods.features import coarse_on_fine, coarse_static_on_fine
from climrecon.provenance import stage_attrs
from climrecon.storage import for_workers, resolve_storage_options, store_url, url_options
from climrecon.stores import StageStore, content_key, default_owner, time_blocks
from climrecon.tasks.grids import Grid, GridError, lat_edges_from_centres, lon_edges_from_centres
from climrecon.tasks.regrid import (
    RegridError,
    check_regular_latlon,
    check_target_in_domain,
    check_time_slices,
    conservative,
    static_on_grid,
)
from climrecon.tasks.standardize import CMIP_VARIABLES

__all__ = [
    "REGRID_VERSION",
    "GRAPH_BLOCKS",
    "RegridError",
    "RegridPlan",
    "RegridResult",
    "target_grids",
    "open_source",
    "plan_regrid",
    "default_sources",
    "write_static_on_grid",
    "prepare_regrid",
    "regrid_block",
    "regrid_blocks",
    "run_blocks",
    "read_steps",
    "time_chunk_for",
    "finalize_regrid",
    "run_regrid",
]

REGRID_VERSION = 1  # bump when what the stage computes changes, so old stores are not reused
STATIC_COARSE_VIEWS = ("orog", "sftlf")  # static fields also written as the coarse grid sees them
GRAPH_BLOCKS = 20  # time blocks per lazy regridding graph: amortises building it, bounds its size
_STATIC_MARGIN = 3  # static cells kept around the fine grid (3x3 sub-grid spread + bilinear stencil)
_TIME_CODER = xr.coders.CFDatetimeCoder(use_cftime=True)


# -- the plan -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RegridPlan:
    """Everything a worker needs to regrid one source (picklable, no secrets)."""

    name: str  # source store name without key and suffix, e.g. "MPI-ESM-LR.historical.r1i1p1.Amon"
    config: RegridConfig
    source_url: str
    source_key: str
    source_history: str
    variables: tuple[str, ...]
    time_labels: tuple[str, ...]  # "YYYY-MM" per source step (task names, messages)
    coarse_grid: Grid
    fine_grid: Grid
    coarse_url: str
    coarse_key: str
    fine_url: str
    fine_key: str
    static_source_url: str
    static_source_key: str
    static_url: str
    static_key: str
    sftlf_scale: float = 1.0  # 100 when the static store holds sftlf as a fraction (units "1")
    time_encoding: dict[str, Any] = field(default_factory=dict)

    @property
    def n_time(self) -> int:
        return len(self.time_labels)

    def regions(self) -> list[dict[str, slice]]:
        """Every time block (``config.time_chunk`` steps; the last may be shorter), as store regions."""
        return [{"time": s} for s in time_blocks(self.n_time, self.config.time_chunk)]

    def label(self, regions: Sequence[Mapping[str, slice]]) -> str:
        """``"2005-01..2005-12"``: the period that ``regions`` (consecutive blocks) cover."""
        start, stop = regions[0]["time"].start, regions[-1]["time"].stop
        return f"{self.time_labels[start]}..{self.time_labels[stop - 1]}"


@dataclass(frozen=True)
class RegridResult:
    """The three store URLs, and how many time blocks this run wrote (0 when everything was complete)."""

    coarse_url: str
    fine_url: str
    static_url: str
    blocks_written: int
    blocks_total: int

    def urls(self) -> dict[str, str]:
        return {"coarse": self.coarse_url, "fine": self.fine_url, "static": self.static_url}


# -- grids ----------------------------------------------------------------------------------------------
def _snap(value: float, step: float, origin: float, up: bool) -> float:
    """``value`` moved outwards (``up``: north/east) onto the lattice ``origin + k * step``."""
    k = (value - origin) / step
    k = math.ceil(k - 1e-9) if up else math.floor(k + 1e-9)
    return origin + k * step


def _to_convention(grid: Grid, convention: str | None) -> Grid:
    """``grid`` shifted by 360 deg into the source's longitude convention where it fits without a seam."""
    if convention == "0..360" and grid.west < 0 and grid.west + 360 >= 0 and grid.east + 360 <= 360 + 1e-9:
        return Grid(grid.south, grid.west + 360, grid.dlat, grid.dlon, grid.nlat, grid.nlon)
    if convention == "-180..180" and grid.east > 180 and grid.west - 360 >= -180 - 1e-9:
        return Grid(grid.south, grid.west - 360, grid.dlat, grid.dlon, grid.nlat, grid.nlon)
    return grid


def target_grids(cfg: RegridConfig, lon_convention: str | None = None) -> tuple[Grid, Grid]:
    """``(coarse, fine)`` grids: fine tiles ``cfg.region``; coarse covers it in whole coarse cells.

    The coarse cells lie on the global lattice ``(-90 + i * c, -180 + j * c)``, ``c`` =
    ``cfg.coarse_resolution``, so every source and region shares one unified coarse grid. Both grids are
    put in ``lon_convention`` ("-180..180" or "0..360") when the region fits in it without a seam.
    """
    region, c = cfg.region, cfg.coarse_resolution
    try:
        fine = Grid.from_region(region, cfg.resolution)
    except GridError as exc:
        raise RegridError(
            f"regrid.resolution {cfg.resolution:g} does not tile regrid.region: {exc}"
        ) from None
    south, north = (
        max(_snap(fine.south, c, -90.0, False), -90.0),
        min(_snap(fine.north, c, -90.0, True), 90.0),
    )
    if fine.is_global_lon:
        west, east = fine.west, fine.west + 360.0
    else:
        west, east = _snap(fine.west, c, -180.0, False), _snap(fine.east, c, -180.0, True)
    nlat, nlon = round((north - south) / c), min(round((east - west) / c), round(360.0 / c))
    if nlat < 2 or nlon < 2:
        raise RegridError(
            f"regrid.region (lat {region.lat_min:g}..{region.lat_max:g}, lon {region.lon_min:g}.."
            f"{region.lon_max:g}) spans only {nlat} x {nlon} cells of regrid.coarse_resolution "
            f"{c:g} deg; need at least 2 x 2 to interpolate from them: enlarge the region or lower coarse_resolution"
        )
    try:
        coarse = Grid(south, west, c, c, nlat, nlon)
    except GridError as exc:
        raise RegridError(f"regrid.coarse_resolution {c:g}: {exc}") from None
    return _to_convention(coarse, lon_convention), _to_convention(fine, lon_convention)


def _grid_label(grid: Grid) -> str:
    return f"{grid.dlat:g}deg.lat{grid.south:g}_{grid.north:g}.lon{grid.west:g}_{grid.east:g}"


# -- opening and checking the inputs ---------------------------------------------------------------------
def open_source(url: str, storage_options: dict[str, Any] | None = None, *, lazy: bool = True) -> xr.Dataset:
    """The store at ``url`` with cftime times; ``lazy=False`` gives lazily indexed numpy (no dask)."""
    try:
        return xr.open_zarr(
            url,
            storage_options=url_options(url, storage_options),
            decode_times=_TIME_CODER,
            chunks={} if lazy else None,
        )
    except (FileNotFoundError, KeyError, ValueError, OSError) as exc:
        raise RegridError(f"cannot open store {url}: {type(exc).__name__}: {exc}") from None


def _unit(units: Any) -> cf_units.Unit | None:
    try:
        return cf_units.Unit(str(units))
    except ValueError:
        return None


def _check_source(ds: xr.Dataset, url: str) -> tuple[str, ...]:
    """The time-dependent spatial variables of a complete, regular lat/lon source in CF canonical units."""
    check_regular_latlon(ds, f"source store {url}")
    status = ds.attrs.get("climrecon_status")
    if status is not None and status != "complete":
        raise RegridError(
            f"source store {url} is {status!r}, not complete: finish the stage that writes it (e.g. re-run ingest)"
        )
    if "time" not in ds.dims:
        raise RegridError(
            f"source store {url} has no 'time' dimension (dims {dict(ds.sizes)}); expected (time, lat, lon)"
        )
    variables = tuple(
        sorted(str(v) for v, x in ds.data_vars.items() if {"time", "lat", "lon"} <= set(x.dims))
    )
    if not variables:
        raise RegridError(
            f"source store {url} has no (time, lat, lon) variable (has {sorted(map(str, ds.data_vars))})"
        )
    for v in variables:
        spec = CMIP_VARIABLES.get(v)
        units = ds[v].attrs.get("units")
        if units is None:
            raise RegridError(f"source store {url}: variable {v!r} has no units attribute")
        if spec is not None and _unit(units) != cf_units.Unit(spec.units):
            raise RegridError(
                f"source store {url}: variable {v!r} is in {units!r}, expected the CF canonical "
                f"{spec.units!r}; run the ingest stage, which converts units"
            )
    return variables


def _check_static(ds: xr.Dataset, url: str) -> float:
    """Check the static store's units; returns the factor that puts sftlf in % (1 or 100)."""
    for v in ("orog", "sftlf"):
        if v not in ds.data_vars:
            raise RegridError(
                f"static store {url} has no variable {v!r} (has {sorted(map(str, ds.data_vars))})"
            )
    check_regular_latlon(ds, f"static store {url}")
    orog_units = ds["orog"].attrs.get("units")
    if orog_units is None or _unit(orog_units) != cf_units.Unit("m"):
        raise RegridError(f"static store {url}: variable 'orog' is in {orog_units!r}, expected 'm'")
    sftlf_units = _unit(ds["sftlf"].attrs.get("units"))
    if sftlf_units == cf_units.Unit("%"):
        return 1.0
    if sftlf_units == cf_units.Unit("1"):
        return 100.0
    raise RegridError(
        f"static store {url}: variable 'sftlf' is in {ds['sftlf'].attrs.get('units')!r}, expected '%' or '1'"
    )


def _check_inside(ds: xr.Dataset, grid: Grid, cfg: RegridConfig, what: str, url: str) -> None:
    try:
        check_target_in_domain(ds, grid.lat, grid.lon, f"{what} {url}")
    except RegridError:
        r = cfg.region
        lat_e, lon_e = lat_edges_from_centres(ds["lat"]), lon_edges_from_centres(ds["lon"])
        raise RegridError(
            f"regrid.region (lat {r.lat_min:g}..{r.lat_max:g}, lon {r.lon_min:g}..{r.lon_max:g}; {grid.describe()}) "
            f"does not fit inside the {what} {url}, whose domain is lat {lat_e[0]:g}..{lat_e[-1]:g}, lon "
            f"{lon_e[0]:g}..{lon_e[-1]:g}; choose a region inside it"
        ) from None


def _store_name(url: str, key: str) -> str:
    name = url.rstrip("/").rsplit("/", 1)[-1]
    name = name[: -len(".zarr")] if name.endswith(".zarr") else name
    return name[: -len(key) - 1] if key and name.endswith(f".{key}") else name


def _source_identity(ds: xr.Dataset, url: str) -> str:
    """The source's content key, or (a store not written by a stage) a key of its URL and extent."""
    key = ds.attrs.get("climrecon_key")
    if key:
        return str(key)
    extent = {d: int(n) for d, n in ds.sizes.items()}
    return content_key("foreign-store", url, extent, str(ds["time"].values[0]), str(ds["time"].values[-1]))


def plan_regrid(cfg: RegridConfig, source_url: str, storage: StorageConfig, static_url: str) -> RegridPlan:
    """Check the source and static stores and name the three output stores; writes nothing.

    Raises :class:`RegridError` (message naming the store, variable or config field) for a rotated or
    curvilinear source ("not supported yet"), an incomplete source, a region outside the source or
    static domain, source fields not in CF canonical units, ``orog`` not in m or ``sftlf`` not in % or 1.
    """
    options = resolve_storage_options(storage.options)
    src = open_source(source_url, options)
    variables = _check_source(src, source_url)
    coarse_grid, fine_grid = target_grids(cfg, src.attrs.get("lon_convention"))
    _check_inside(src, coarse_grid, cfg, "source store", source_url)
    static = open_source(static_url, options)
    scale = _check_static(static, static_url)
    _check_inside(static, fine_grid, cfg, "static store", static_url)
    _check_inside(static, coarse_grid, cfg, "static store (its coarse-grid view)", static_url)

    source_key = _source_identity(src, source_url)
    static_key_in = str(
        static.attrs.get("climrecon_key") or content_key("foreign-static", static_url, dict(static.sizes))
    )
    if static.attrs.get("climrecon_status", "complete") != "complete":
        raise RegridError(f"static store {static_url} is incomplete; finish building it first")
    name = _store_name(source_url, source_key)
    coarse_key = content_key(
        "regrid-coarse",
        REGRID_VERSION,
        source_key,
        variables,
        asdict(coarse_grid),
        cfg.time_chunk,
        cfg.zarr_format,
    )
    fine_key = content_key("regrid-fine", REGRID_VERSION, coarse_key, asdict(fine_grid), cfg.fine_method)
    static_key = content_key(
        "regrid-static",
        REGRID_VERSION,
        static_key_in,
        asdict(fine_grid),
        scale,
        cfg.zarr_format,
        STATIC_COARSE_VIEWS,
        asdict(coarse_grid),
    )
    time = src["time"]
    return RegridPlan(
        name=name,
        config=cfg,
        source_url=source_url,
        source_key=source_key,
        source_history=str(src.attrs.get("history", "")),
        variables=variables,
        time_labels=tuple(f"{t.year:04d}-{t.month:02d}" for t in time.values),
        coarse_grid=coarse_grid,
        fine_grid=fine_grid,
        coarse_url=store_url(
            storage.root, "regrid", name.split("."), f"coarse-{cfg.coarse_resolution:g}.{coarse_key}.zarr"
        ),
        coarse_key=coarse_key,
        fine_url=store_url(
            storage.root, "regrid", name.split("."), f"fine-{cfg.resolution:g}.{fine_key}.zarr"
        ),
        fine_key=fine_key,
        static_source_url=static_url,
        static_source_key=static_key_in,
        static_url=store_url(
            storage.root, "static", ["static"], f"{_grid_label(fine_grid)}.{static_key}.zarr"
        ),
        static_key=static_key,
        sftlf_scale=scale,
        time_encoding={
            "units": time.encoding.get("units", "days since 1850-01-01"),
            "calendar": time.encoding.get("calendar", time.values[0].calendar),
        },
    )


def default_sources(cfg: ClimReconConfig, source_url: str | None = None) -> tuple[str, str]:
    """``(source, static)`` store URLs for a run: explicit arguments and config first, then defaults.

    Source: ``source_url``, else ``regrid.source``, else the one store the ingest stage of the same
    config writes (several: :class:`RegridError` listing them). Static: ``regrid.static``, else the
    complete static store that the sample catalog build leaves in ``<sample dir>/static/``.
    """
    source = source_url or cfg.regrid.source
    if not source:
        from climrecon.tasks.ingest import plan_ingest

        catalog = cfg.ingest.catalog or str(cfg.sample_catalog())
        urls = [p.url for p in plan_ingest(cfg.ingest, catalog, cfg.storage)]
        if len(urls) != 1:
            raise RegridError(
                f"the ingest query matches {len(urls)} stores {urls}; choose one with regrid.source (or source_url)"
            )
        source = urls[0]
    static = cfg.regrid.static
    if not static:
        folder = cfg.sample_dir() / "static"
        found = sorted(folder.glob("static-5arcmin-*.zarr")) if folder.is_dir() else []
        complete = [p for p in found if (p / ".climrecon" / "complete.json").is_file()]
        if not complete:
            raise RegridError(
                f"no complete static-fields store in {folder}; build the sample catalog (`climrecon catalog "
                "build`) or set regrid.static to a store with orog [m] and sftlf [%]"
            )
        static = str(complete[-1])
    return source, static


# -- writing --------------------------------------------------------------------------------------------
def _static_window(static: xr.Dataset, grid: Grid) -> xr.Dataset:
    """The static cells around ``grid`` (plus a margin), when they are contiguous in the store."""
    lat, lon = np.asarray(static["lat"], float), np.asarray(static["lon"], float)
    dlon = float(np.median(np.diff(lon)))
    shift = 360.0 * round(((grid.west + grid.east) / 2 - (lon[0] + lon[-1]) / 2) / 360.0)
    west, east = grid.west - shift, grid.east - shift
    if west < lon[0] - dlon / 2 or east > lon[-1] + dlon / 2:
        return static  # the window crosses the store's seam: keep it whole
    i0, i1 = np.searchsorted(lat, [grid.south, grid.north])
    j0, j1 = np.searchsorted(lon, [west, east])
    m = _STATIC_MARGIN
    window = static.isel(lat=slice(max(i0 - m, 0), i1 + m), lon=slice(max(j0 - m, 0), j1 + m))
    return window if window.sizes["lat"] >= 2 and window.sizes["lon"] >= 2 else static


def write_static_on_grid(plan: RegridPlan, storage_options: dict[str, Any] | None = None) -> str:
    """Write ``orog``, ``orog_std``, ``sftlf`` and the ``<name>_coarse`` views on the fine grid unless that
    store is complete; its URL."""
    store = StageStore(plan.static_url, plan.static_key, dict(storage_options or {}))
    if store.is_complete():
        return plan.static_url
    static = open_source(plan.static_source_url, storage_options)[["orog", "sftlf"]]

    def window(grid: Grid) -> xr.Dataset:  # the source cells around ``grid``, sftlf in %
        cells = _static_window(static, grid)
        return cells.assign(sftlf=cells["sftlf"] * plan.sftlf_scale).load()

    with dask.config.set(scheduler="synchronous"):
        out = static_on_grid(
            window(plan.fine_grid), plan.fine_grid, name=f"static store {plan.static_source_url}"
        )
        views = coarse_static_on_fine(
            window(plan.coarse_grid), plan.coarse_grid, plan.fine_grid, STATIC_COARSE_VIEWS
        )
    for var in views.data_vars:
        out[var] = (
            views[var]
            .assign_coords(lat=out.lat, lon=out.lon)
            .assign_attrs(
                long_name=f"{out[str(var).removesuffix('_coarse')].attrs.get('long_name', var)} as the coarse grid sees it",
                units=out[str(var).removesuffix("_coarse")].attrs.get("units", ""),
                comment=f"area mean on the {plan.coarse_grid.dlat:g}-deg coarse grid, bilinear back to this grid",
            )
        )
    out.attrs.update(
        title="ClimRecon static fields on the fine target grid",
        grid=plan.fine_grid.describe(),
        Conventions="CF-1.8",
    )
    region = {"lat": slice(0, plan.fine_grid.nlat)}
    store.initialize(out.chunk(), zarr_format=plan.config.zarr_format)
    store.write_block(out, region)
    attrs = stage_attrs(
        "regrid_static",
        {"grid": asdict(plan.fine_grid), "sftlf_scale": plan.sftlf_scale},
        plan.static_key,
        str(static.attrs.get("history", "")),
        source=plan.static_source_url,
        source_key=plan.static_source_key,
    )
    store.finalize([region], attrs=attrs)
    return plan.static_url


def _template(
    plan: RegridPlan, grid: Grid, src: xr.Dataset, method: str
) -> tuple[xr.Dataset, dict[str, Any]]:
    """A dask-backed template of one output store (no data computed) and its encoding."""
    n, chunk = plan.n_time, plan.config.time_chunk
    coords = grid.to_dataset()
    ds = xr.Dataset(
        coords={"time": src["time"].variable.to_base_variable(), "lat": coords["lat"], "lon": coords["lon"]}
    )
    ds = ds.assign_coords(lat_bnds=coords["lat_bnds"], lon_bnds=coords["lon_bnds"])
    encoding: dict[str, Any] = {"time": {**plan.time_encoding, "dtype": "float64", "chunks": (chunk,)}}
    if "time_bnds" in src:
        # in memory, so the template holds the real bounds at once (like the ingest stage)
        ds["time_bnds"] = src["time_bnds"].variable.to_base_variable().load()
        encoding["time_bnds"] = {
            **plan.time_encoding,
            "dtype": "float64",
            "chunks": (chunk, ds.sizes["bnds"]),
        }
        ds["time"].attrs["bounds"] = "time_bnds"
    for v in plan.variables:
        empty = da.empty((n, grid.nlat, grid.nlon), chunks=(chunk, grid.nlat, grid.nlon), dtype=np.float32)
        attrs = {k: val for k, val in src[v].attrs.items() if k not in ("cell_measures",)}
        ds[v] = xr.DataArray(empty, dims=("time", "lat", "lon"), attrs=attrs)
        encoding[v] = {"dtype": "float32", "chunks": (chunk, grid.nlat, grid.nlon)}
    keep = {k: v for k, v in src.attrs.items() if not str(k).startswith("climrecon_") and k != "history"}
    ds.attrs = {**keep, "grid": grid.describe(), "regrid_method": method, "Conventions": "CF-1.8"}
    return ds.drop_encoding(), encoding


def _stores(plan: RegridPlan, storage_options: dict[str, Any] | None) -> tuple[StageStore, StageStore]:
    options = dict(storage_options or {})
    return StageStore(plan.coarse_url, plan.coarse_key, options), StageStore(
        plan.fine_url, plan.fine_key, options
    )


def _methods(plan: RegridPlan) -> tuple[str, str]:
    coarse = f"first-order conservative from {plan.source_url} to the unified {plan.config.coarse_resolution:g}-deg grid"
    fine = f"{plan.config.fine_method} from the {plan.config.coarse_resolution:g}-deg coarse grid ({plan.coarse_url})"
    return coarse, fine


def prepare_regrid(plan: RegridPlan, storage_options: dict[str, Any] | None = None) -> list[dict[str, slice]]:
    """Write the static store and the coarse/fine templates (once); the blocks missing in either store."""
    write_static_on_grid(plan, storage_options)
    coarse, fine = _stores(plan, storage_options)
    if coarse.is_complete() and fine.is_complete():
        return []
    src = open_source(plan.source_url, storage_options)
    for store, grid, method in zip(
        (coarse, fine), (plan.coarse_grid, plan.fine_grid), _methods(plan), strict=True
    ):
        if not store.is_complete():
            template, encoding = _template(plan, grid, src, method)
            store.initialize(template, encoding=encoding, zarr_format=plan.config.zarr_format)
    regions = plan.regions()
    missing = {str(r) for s in (coarse, fine) for r in s.pending(regions)}
    return [r for r in regions if str(r) in missing]


def _fine_from_coarse(coarse: xr.Dataset, plan: RegridPlan) -> xr.Dataset:
    if plan.config.fine_method == "bilinear":
        return coarse_on_fine(coarse, plan.fine_grid)
    return conservative(coarse, plan.fine_grid, name=f"coarse store {plan.coarse_url}")


def _step_bytes(src: xr.Dataset, variables: Sequence[str]) -> int:
    """Bytes of one time step of ``variables`` (lat x lon each) as stored in ``src``."""
    return sum(src.sizes["lat"] * src.sizes["lon"] * src[v].dtype.itemsize for v in variables)


def time_chunk_for(
    src: xr.Dataset, variables: Sequence[str], block_mb: float = 32.0, multiple: int = 12
) -> int:
    """The ``time_chunk`` whose blocks hold about ``block_mb`` MB of source data (``variables``), in whole
    ``multiple``s of steps (years of monthly data), at least ``multiple`` and at most the record's length
    rounded up to a ``multiple``.

    Per-block costs (two region writes, done markers, a graph per block) are fixed, so small blocks of a
    coarse source (12 months of 1-deg global data: 3 MB) are dominated by them; memory does not grow with
    the block, since :func:`regrid_blocks` reads it in pieces of the source's own chunks.
    """
    if block_mb <= 0 or multiple < 1:
        raise RegridError(f"time_chunk_for: need block_mb > 0 and multiple >= 1, got {block_mb}, {multiple}")
    steps = block_mb * 1e6 / max(_step_bytes(src, variables), 1)
    whole = max(1, int(steps // multiple))
    return multiple * min(whole, max(1, math.ceil(src.sizes["time"] / multiple)))


def read_steps(src: xr.Dataset, variables: Sequence[str], time_chunk: int) -> int:
    """Time steps read per piece of a block: the source's own time chunk (the smallest over
    ``variables``), at most ``time_chunk``; ``time_chunk`` for a source without chunk encoding."""
    chunks = []
    for v in variables:
        enc = (
            src[v].encoding.get("preferred_chunks", {}).get("time")
            or (src[v].encoding.get("chunks") or [None])[0]
        )
        if enc:
            chunks.append(int(enc))
    return max(1, min([time_chunk, *chunks]))


def _lazy_outputs(
    plan: RegridPlan, window: slice, storage_options: dict[str, Any] | None
) -> tuple[xr.Dataset, xr.Dataset, xr.Dataset]:
    """Source, coarse and fine fields over the time steps ``window`` as one lazy dask graph.

    ``window`` starts on a block boundary; dask chunks are pieces of :func:`read_steps` steps, so a block
    of ``time_chunk`` steps is read (and regridded) one source chunk at a time."""
    # lazily indexed (not dask) until chunked here: the pieces need not match the source's own chunks
    src = open_source(plan.source_url, storage_options, lazy=False)
    keep = [*plan.variables, *(["time_bnds"] if "time_bnds" in src else [])]
    read = read_steps(src, plan.variables, plan.config.time_chunk)
    src = src[keep].isel(time=window).chunk({"time": read, "lat": -1, "lon": -1})
    coarse = conservative(src, plan.coarse_grid, name=f"source store {plan.source_url}")
    return src, coarse, _fine_from_coarse(coarse, plan)


def regrid_blocks(
    plan: RegridPlan, regions: Sequence[Mapping[str, slice]], storage_options: dict[str, Any] | None = None
) -> list[list[str]]:
    """Regrid time blocks one after the other, writing each into the output stores that lack it.

    The regridding graph (library calls on lazy dask arrays) is built once per :data:`GRAPH_BLOCKS`
    blocks; per block, its source, coarse and fine fields are then computed together in this thread
    (dask's synchronous scheduler; the source is read in pieces of :func:`read_steps`, so one source
    chunk and the block's regridded fields are in memory at a time), a step that is NaN everywhere raises
    :class:`RegridError` naming the variable and time before anything of that block is written, and one
    region is written per store. Returns, per block, the URLs written (empty: it was already done).
    """
    storage_options = resolve_storage_options(storage_options)  # this process's secrets (a worker's own)
    coarse_store, fine_store = _stores(plan, storage_options)
    missing = {s.url: {str(r) for r in s.pending(regions)} for s in (coarse_store, fine_store)}
    todo = {
        str(dict(r)): [s for s in (coarse_store, fine_store) if str(dict(r)) in missing[s.url]]
        for r in regions
    }
    work = [dict(r) for r in regions if todo[str(dict(r))]]
    for i in range(0, len(work), GRAPH_BLOCKS):
        group = work[i : i + GRAPH_BLOCKS]
        start = group[0]["time"].start
        graph = _lazy_outputs(plan, slice(start, group[-1]["time"].stop), storage_options)
        for region in group:
            # one lease for the block of both stores, on the one written last: once it is done, both are
            lock = todo[str(region)][-1]
            if not lock.claim(region):  # written by a concurrent run of the same stores
                continue
            try:
                _regrid_one(plan, region, start, graph, todo[str(region)])
            finally:
                lock.release(region, default_owner())
    return [[s.url for s in todo[str(dict(r))]] for r in regions]


def _regrid_one(
    plan: RegridPlan, region: dict[str, slice], start: int, graph: tuple, stores: list[StageStore]
) -> None:
    """Compute one block of ``graph`` (built from time step ``start``) and write it into ``stores``."""
    coarse_store, fine_store = _stores_of(plan, stores)
    local = {"time": slice(region["time"].start - start, region["time"].stop - start)}
    src, coarse, fine = (ds.isel(local) for ds in graph)
    valid = src[list(plan.variables)].notnull().any(("lat", "lon"))
    # all-NaN target cells (a masked field) are NaN by design: no warning for their 0/0
    with dask.config.set(scheduler="synchronous"), np.errstate(invalid="ignore", divide="ignore"):
        valid, coarse, fine = dask.compute(valid, coarse, fine)
        if not all(bool(valid[v].all()) for v in plan.variables):
            check_time_slices(src.load(), f"source store {plan.source_url}")  # raises, naming the step
    for store, out in ((coarse_store, coarse), (fine_store, fine)):
        if store is not None:
            store.write_block(out.drop_vars(["lat_bnds", "lon_bnds"], errors="ignore"), region)


def _stores_of(plan: RegridPlan, stores: list[StageStore]) -> tuple[StageStore | None, StageStore | None]:
    by_url = {s.url: s for s in stores}
    return by_url.get(plan.coarse_url), by_url.get(plan.fine_url)


def regrid_block(
    plan: RegridPlan, region: Mapping[str, slice], storage_options: dict[str, Any] | None = None
) -> list[str]:
    """Regrid one time block into each output store that lacks it (:func:`regrid_blocks`); URLs written."""
    return regrid_blocks(plan, [region], storage_options)[0]


def run_blocks(
    plan: RegridPlan,
    regions: Sequence[Mapping[str, slice]],
    storage_options: dict[str, Any] | None = None,
    client: Any = None,
    blocks_per_future: int | None = None,
) -> int:
    """Run :func:`regrid_blocks` for ``regions``: in this process, or as Dask futures on ``client``.

    With a client, consecutive blocks are grouped ``blocks_per_future`` to a future (default: enough
    groups for two per worker), each group a separate future, so workers fill the stores side by side.
    Returns how many blocks wrote something. The first failing group's exception is raised (blocks
    already written keep their markers, so a re-run skips them).
    """
    regions = [dict(r) for r in regions]
    if client is None:
        return sum(bool(w) for w in regrid_blocks(plan, regions, storage_options))
    if not regions:
        return 0
    if blocks_per_future is None:
        n_workers = max(1, len(client.scheduler_info().get("workers", {})))
        blocks_per_future = math.ceil(len(regions) / (2 * n_workers))
    groups = [regions[i : i + blocks_per_future] for i in range(0, len(regions), blocks_per_future)]
    futures = [
        client.submit(
            regrid_blocks,
            plan,
            group,
            for_workers(storage_options),  # secrets stay in the environment (each worker has its own)
            pure=False,
            key=f"regrid-blocks-{plan.name}-{plan.label(group)}-{plan.coarse_key}",
        )
        for group in groups
    ]
    return sum(bool(w) for ws in client.gather(futures) for w in ws)


def finalize_regrid(plan: RegridPlan, storage_options: dict[str, Any] | None = None) -> RegridResult:
    """Mark the coarse and fine stores complete (every block written) with their provenance."""
    regions = plan.regions()
    cfg = plan.config
    common = {"source": plan.source_url, "source_key": plan.source_key, "static": plan.static_url}
    for store, grid, method in zip(
        _stores(plan, storage_options), (plan.coarse_grid, plan.fine_grid), _methods(plan), strict=True
    ):
        if store.is_complete():
            continue
        attrs = stage_attrs(
            "regrid", cfg, store.key, plan.source_history, **common, grid=grid.describe(), method=method
        )
        store.finalize(regions, attrs=attrs)
    return RegridResult(plan.coarse_url, plan.fine_url, plan.static_url, 0, len(regions))


def run_regrid(
    plan: RegridPlan, storage_options: dict[str, Any] | None = None, client: Any = None
) -> RegridResult:
    """Write (or finish) the static, coarse and fine stores of ``plan``; complete stores are left untouched."""
    pending = prepare_regrid(plan, storage_options)
    written = run_blocks(plan, pending, storage_options, client)
    result = finalize_regrid(plan, storage_options)
    return RegridResult(result.coarse_url, result.fine_url, result.static_url, written, result.blocks_total)
