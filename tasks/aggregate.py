"""Aggregate stage: a downscaled member store -> ensemble statistics as one CF Zarr store, with provenance.

Input (the downscale stage's contract): a complete :class:`~climrecon.stores.StageStore` at
``<root>/downscale/<source>.<experiment>.<member_id>.<method>.<key>.zarr`` holding float32 variables
(tas, uas, vas, maybe pr) with dims ``(member, time, lat, lon)``, coords ``member`` 0..N-1, cftime
``time`` with ``time_bnds``, ``lat``/``lon``, and attrs ``climrecon_key``, ``history``,
``climrecon_downscale_config`` and ``climrecon_provenance`` (JSON).

Output: ``<root>/aggregate/<source>.<experiment>.<member_id>.<method>.<key>.zarr``, key =
``content_key("aggregate", AGGREGATE_VERSION, member key, config)``; for every variable ``v``:

==================  ===============================  ========================================================
variable            dims                             meaning (CF)
==================  ===============================  ========================================================
``v_mean``          (time, lat, lon)                 ensemble mean; ``cell_methods: realization: mean``
``v_std``           (time, lat, lon)                 ensemble standard deviation, sample estimator with
                                                     ddof=1 (N-1 denominator); ``realization:
                                                     standard_deviation``
``v_quantile``      (quantile, time, lat, lon)       ensemble quantiles, numpy's default "linear" method
                                                     (Hyndman & Fan type 7); coordinate ``quantile`` (units 1)
``v_exceedance``    (v_threshold, time, lat, lon)    P(v > threshold) = fraction of members above it, units
                                                     ``1``; coordinate ``v_threshold`` in v's units
``v`` (optional)    (member, time, lat, lon)         the members themselves (``include_members``)
==================  ===============================  ========================================================

CF choices: mean and std keep the variable's ``standard_name`` and units (CF 7.3: a statistic over an axis
is described by ``cell_methods``, not a new name), with ``realization`` (the CF standard name of the
ensemble-member axis) as the cell-methods name since the member dimension is reduced away; the upstream
``cell_methods`` (e.g. ``time: mean``) come first, in order of application. CF Appendix E has no quantile
or percentile method ("median" covers q=0.5 only), so quantile variables keep the standard_name and
upstream cell_methods, and the statistic is carried by the ``quantile`` coordinate variable
(``long_name: quantile of the ensemble distribution``) and the ``long_name``; inventing "realization:
percentile" would make CF checkers fail. An exceedance probability is not the variable, so it gets no
standard_name (CF has none for probabilities), units ``1``, ``cell_methods: realization: mean`` (the
probability is the ensemble mean of the indicator ``v > t``) and a ``v_threshold`` coordinate carrying
the variable's standard_name, units and ``spp_relative_to_threshold: greater_than`` (the IMPROVER
convention). Thresholds differ per variable (K for tas, m s-1 for uas), hence one coordinate per
variable instead of a shared ``threshold``. Coordinates carry bounds: ``time_bnds`` (from the member
store), ``lat_bnds``/``lon_bnds`` (copied, or cell edges from regular centres). A NaN in any member
makes every statistic NaN at that cell and time.

Chunking (for readers): ``time_chunk`` steps (default 120 months) by equal lat/lon tiles of about 1 MB
(:func:`spatial_chunks`; whole maps when they fit), quantile and threshold one per chunk. Measured with
``benchmarks/aggregate.py`` on S3 (moto on 127.0.0.1, 2 busy cores): 80 x 80 cells, 40 years (480
months) of ``tas_mean``, fresh ``xr.open_zarr`` per read, median of 5 (benchmarks/results/aggregate.json):

=================================  ===================  ==================================
chunks (time, lat, lon)            one map (a month)    one point over 40 years
=================================  ===================  ==================================
(12, 80, 80)                       0.110 / 0.147 s      0.557 / 0.640 s (40 chunks)
(120, 80, 80)                      0.115 / 0.139 s      0.162 / 0.184 s (4 chunks of 3 MB)
(120, 40, 40)  <- chosen           0.105 / 0.208 s      0.108 / 0.239 s (4 chunks of 0.8 MB)
=================================  ===================  ==================================

(two runs, the second on a busier machine). Year-long chunks make a point series 3.5-5x slower (40
requests) for no gain on maps. Between whole-map and tiled decade chunks the two runs disagree: at 80 x
80 the difference is within the noise of a shared machine. Tiles win as the grid grows: a whole-map
decade chunk of a 1000 x 1000 grid is 480 MB, and one point series would read 4 of them; ~1 MB tiles
keep a point read at 4 small requests and a map at a few concurrent ones on any grid.
A write block is one output chunk (a time block x one spatial tile). Inside it the members are read
``READ_STEPS`` months at a time in latitude bands sized by ``memory_budget`` (every band holds all
members of a few rows), so memory does not grow with the number of years, the chunk length, the grid
size or the number of members (benchmark: 10 y / 1 y peak RSS 1.07 at the default 120-month chunks).

Contract: :func:`plan_aggregate` checks the member store (complete, dims, thresholds) and writes nothing;
:func:`prepare_aggregate` writes the template once and returns the missing blocks;
:func:`aggregate_block` reduces one block and writes it as a chunk-aligned region (Dask futures via
:func:`run_blocks`); :func:`finalize_aggregate` writes ``<store>/provenance.json`` (W3C PROV-JSON),
provenance attributes and the complete marker; :func:`run_aggregate` chains them and, given a catalog
URL, records the store in the output catalog. A complete store is never rewritten.
"""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import dask.array as da
import numpy as np
import xarray as xr

from climrecon.config import AggregateConfig
from climrecon.provenance import (
    prov_document,
    prov_summary,
    stage_attrs,
    stage_record,
    utc_now,
    write_prov_document,
)
from climrecon.storage import (
    for_workers,
    redact,
    resolve_storage_options,
    safe_name,
    store_url,
    url_options,
)
from climrecon.stores import StageStore, content_key, default_owner, time_blocks
from climrecon.tasks.grids import lat_edges_from_centres, lon_edges_from_centres

__all__ = [
    "AGGREGATE_VERSION",
    "STATISTICS",
    "AggregateError",
    "AggregatePlan",
    "ensemble_statistics",
    "spatial_chunks",
    "plan_aggregate",
    "prepare_aggregate",
    "aggregate_block",
    "run_blocks",
    "finalize_aggregate",
    "run_aggregate",
]

AGGREGATE_VERSION = 1  # bump when what the stage computes changes, so old stores are not reused
STATISTICS = ("mean", "std", "quantile", "exceedance", "members")
READ_STEPS = 12  # time steps of members read at once inside a block (memory does not grow with the chunk)
MEMORY_BUDGET = (
    32 * 2**20
)  # bytes of member data one latitude band may hold (measured: benchmarks/aggregate.py)
CHUNK_BYTES = 2**20  # target size of one output chunk (float32)
_TIME_CODER = xr.coders.CFDatetimeCoder(use_cftime=True)
_PROV_OBJECT = "provenance.json"
log = logging.getLogger(__name__)


class AggregateError(ValueError):
    """A member store or aggregate config is unusable; the message names the store, variable or field."""


def ensemble_statistics(
    x: np.ndarray, quantiles: Sequence[float], thresholds: Sequence[float] = ()
) -> dict[str, np.ndarray]:
    """Statistics over axis 0 (members) of ``x``; every result float32, shape ``x.shape[1:]`` (with a
    leading quantile / threshold axis for those two).

    mean and std (ddof=1) are accumulated in float64; quantiles by linear interpolation between order
    statistics (numpy "linear", Hyndman & Fan type 7); exceedance = fraction of members with x > t.
    A NaN in any member gives NaN in every statistic at that point.
    """
    if x.shape[0] < 2:
        raise AggregateError(f"need at least 2 members for a spread, got {x.shape[0]}")
    nan = np.isnan(x).any(axis=0)
    out = {
        "mean": x.mean(axis=0, dtype=np.float64).astype(np.float32),
        "std": x.std(axis=0, ddof=1, dtype=np.float64).astype(np.float32),
        "quantile": np.quantile(x, np.asarray(quantiles, dtype=np.float64), axis=0).astype(np.float32),
    }
    if len(thresholds):
        t = np.asarray(thresholds, dtype=x.dtype).reshape((-1,) + (1,) * (x.ndim - 1))
        prob = (x[None] > t[:, None]).mean(axis=1, dtype=np.float64).astype(np.float32)
        out["exceedance"] = np.where(nan, np.float32(np.nan), prob)
    return out


# -- the plan ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AggregatePlan:
    """Everything a worker needs to aggregate one member store (picklable, no secrets)."""

    member_url: str
    member_key: str
    config: AggregateConfig
    url: str
    key: str
    identity: dict[str, str]  # source_id, experiment_id, member_id, method
    variables: tuple[str, ...]
    n_member: int
    time_labels: tuple[str, ...]  # "YYYY-MM" per step
    grid_shape: tuple[int, int]  # (n_lat, n_lon)
    started: str = field(default_factory=utc_now)

    @property
    def n_time(self) -> int:
        return len(self.time_labels)

    @property
    def name(self) -> str:
        i = self.identity
        return f"{i['source_id']}.{i['experiment_id']}.{i['member_id']}.{i['method']}"

    @property
    def period(self) -> str:
        """``YYYYMM-YYYYMM``: first and last month covered."""
        return f"{self.time_labels[0].replace('-', '')}-{self.time_labels[-1].replace('-', '')}"

    def regions(self) -> list[dict[str, slice]]:
        """Write blocks: one output chunk each (time block x spatial tile), so memory is bounded by a chunk."""
        ny, nx = self.grid_shape
        ty, tx = spatial_chunks(self.config.time_chunk, ny, nx)
        return [
            {"time": t, "lat": y, "lon": x}
            for t in time_blocks(self.n_time, self.config.time_chunk)
            for y in time_blocks(ny, ty)
            for x in time_blocks(nx, tx)
        ]

    def label(self, regions: Sequence[Mapping[str, slice]]) -> str:
        start, stop = regions[0]["time"].start, regions[-1]["time"].stop
        return f"{self.time_labels[start]}..{self.time_labels[stop - 1]}"


def _open(url: str, storage_options: dict[str, Any] | None, what: str, lazy: bool = True) -> xr.Dataset:
    try:
        return xr.open_zarr(
            url,
            storage_options=url_options(url, storage_options),
            decode_times=_TIME_CODER,
            chunks={} if lazy else None,
        )
    except (FileNotFoundError, KeyError, ValueError, OSError) as exc:
        raise AggregateError(f"cannot open {what} {url}: {type(exc).__name__}: {exc}") from None


def _identity(url: str, key: str, attrs: Mapping[str, Any]) -> dict[str, str]:
    """source_id, experiment_id, member_id, method: from the store name, else from its attributes."""
    name = url.rstrip("/").rsplit("/", 1)[-1].removesuffix(".zarr").removesuffix(f".{key}")
    parts = name.split(".")
    fields = ("source_id", "experiment_id", "member_id", "method")
    if len(parts) == 4 and all(parts):
        return {f: safe_name(p) for f, p in zip(fields, parts, strict=True)}
    found = {f: attrs.get(f) or attrs.get(f"climrecon_{f}") for f in fields}
    if all(found.values()):
        return {k: safe_name(v) for k, v in found.items()}
    raise AggregateError(
        f"member store {url}: cannot tell source/experiment/member/method: its name is not "
        "<source>.<experiment>.<member_id>.<method>.<key>.zarr and its attributes lack "
        f"{[f for f, v in found.items() if not v]}"
    )


def plan_aggregate(
    member_url: str, cfg: AggregateConfig, root: str, storage_options: dict[str, Any] | None = None
) -> AggregatePlan:
    """Check the member store and name the output store under ``<root>/aggregate/``; writes nothing.

    Raises :class:`AggregateError` for a store that is missing, incomplete (no complete marker with its
    key), not (member, time, lat, lon), with fewer than 2 members, or for thresholds naming a variable
    the store does not have.
    """
    ds = _open(member_url, storage_options, "member store")
    key = ds.attrs.get("climrecon_key")
    if not key:
        raise AggregateError(
            f"member store {member_url} has no climrecon_key attribute: it was not written by a "
            "climrecon stage (StageStore); aggregate only complete downscale outputs"
        )
    status = ds.attrs.get("climrecon_status")
    if (
        status != "complete"
        or not StageStore(member_url, str(key), dict(storage_options or {})).is_complete()
    ):
        raise AggregateError(
            f"member store {member_url} is incomplete (status {status!r}, no .climrecon/complete.json for key "
            f"{key}): finish the downscale run that writes it (a re-run fills the missing blocks), then aggregate"
        )
    variables = tuple(
        sorted(str(v) for v, x in ds.data_vars.items() if x.dims == ("member", "time", "lat", "lon"))
    )
    if not variables:
        raise AggregateError(
            f"member store {member_url} has no variable with dims (member, time, lat, lon); "
            f"has { ({str(v): x.dims for v, x in ds.data_vars.items()}) }"
        )
    if ds.sizes["member"] < 2:
        raise AggregateError(
            f"member store {member_url} holds {ds.sizes['member']} member(s); a spread needs >= 2"
        )
    unknown = sorted(set(cfg.thresholds) - set(variables))
    if unknown:
        raise AggregateError(
            f"aggregate.thresholds names {unknown}, which member store {member_url} lacks "
            f"(it has {list(variables)})"
        )
    for v in variables:
        if "units" not in ds[v].attrs:
            raise AggregateError(f"member store {member_url}: variable {v!r} has no units attribute")
    identity = _identity(member_url, str(key), ds.attrs)
    out_key = content_key("aggregate", AGGREGATE_VERSION, str(key), cfg)
    name = ".".join(identity[f] for f in ("source_id", "experiment_id", "member_id", "method"))
    return AggregatePlan(
        member_url=member_url,
        member_key=str(key),
        config=cfg,
        url=store_url(root, "aggregate", name.split("."), f"{out_key}.zarr"),
        key=out_key,
        identity=identity,
        variables=variables,
        n_member=int(ds.sizes["member"]),
        time_labels=tuple(f"{t.year:04d}-{t.month:02d}" for t in ds["time"].values),
        grid_shape=(int(ds.sizes["lat"]), int(ds.sizes["lon"])),
    )


# -- the template ------------------------------------------------------------------------------------------
def _cell_methods(upstream: str | None, method: str) -> str:
    return f"{upstream} {method}" if upstream else method


def _bounds(ds: xr.Dataset, name: str) -> np.ndarray:
    if f"{name}_bnds" in ds.variables:
        return np.asarray(ds[f"{name}_bnds"].values, dtype=np.float64)
    edges = (lat_edges_from_centres if name == "lat" else lon_edges_from_centres)(ds[name].values)
    return np.stack([edges[:-1], edges[1:]], axis=-1)


def _coords(plan: AggregatePlan, src: xr.Dataset) -> xr.Dataset:
    """time (+time_bnds), lat/lon with bounds, quantile, one threshold coordinate per variable, member."""
    cfg = plan.config
    lat = xr.Variable(
        "lat",
        src["lat"].values,
        {**src["lat"].attrs, "units": "degrees_north", "standard_name": "latitude", "bounds": "lat_bnds"},
    )
    lon = xr.Variable(
        "lon",
        src["lon"].values,
        {**src["lon"].attrs, "units": "degrees_east", "standard_name": "longitude", "bounds": "lon_bnds"},
    )
    coords: dict[str, Any] = {
        "time": src["time"].variable.to_base_variable(),
        "lat": lat,
        "lon": lon,
        "lat_bnds": (("lat", "bnds"), _bounds(src, "lat")),
        "lon_bnds": (("lon", "bnds"), _bounds(src, "lon")),
        "quantile": (
            "quantile",
            np.asarray(cfg.quantiles, dtype=np.float64),
            {
                "units": "1",
                "long_name": "quantile of the ensemble distribution",
                "comment": "linear interpolation between order statistics of the members (Hyndman & Fan type 7)",
            },
        ),
    }
    for v, values in cfg.thresholds.items():
        attrs = {k: src[v].attrs[k] for k in ("standard_name", "units") if k in src[v].attrs}
        coords[f"{v}_threshold"] = (
            f"{v}_threshold",
            np.asarray(values, dtype=np.float32),
            {
                **attrs,
                "long_name": f"threshold of {v}",
                "spp_relative_to_threshold": "greater_than",
            },
        )
    if cfg.include_members:
        coords["member"] = (
            "member",
            src["member"].values,
            {"standard_name": "realization", "long_name": "ensemble member"},
        )
    out = xr.Dataset(coords=coords)
    out["time"].attrs["bounds"] = "time_bnds"
    return out


def spatial_chunks(
    time_chunk: int, n_lat: int, n_lon: int, target_bytes: int = CHUNK_BYTES
) -> tuple[int, int]:
    """Rows and columns per chunk: equal tiles of about ``target_bytes`` float32 with ``time_chunk`` steps.

    Whole maps when they fit (80 x 80 at 12 months); otherwise the fewest equal tiles that do (80 x 80 at
    120 months: 40 x 40), so a point series reads ``n_time / time_chunk`` small chunks on any grid size.
    """
    side = max(1, int((target_bytes / (4 * time_chunk)) ** 0.5))

    def tile(n: int) -> int:
        pieces = -(-n // side)
        return -(-n // pieces)

    return tile(n_lat), tile(n_lon)


def _template(plan: AggregatePlan, src: xr.Dataset) -> tuple[xr.Dataset, dict[str, Any]]:
    """A dask-backed template (nothing computed) and its encoding: one chunk per time block and map."""
    cfg, n, tc = plan.config, plan.n_time, plan.config.time_chunk
    ds = _coords(plan, src)
    ny, nx = spatial_chunks(tc, ds.sizes["lat"], ds.sizes["lon"])
    n_lat, n_lon = ds.sizes["lat"], ds.sizes["lon"]
    time_enc = {k: src["time"].encoding[k] for k in ("units", "calendar") if k in src["time"].encoding}
    encoding: dict[str, Any] = {"time": {**time_enc, "dtype": "float64", "chunks": (tc,)}}
    if "time_bnds" in src:
        ds["time_bnds"] = src["time_bnds"].variable.to_base_variable().load()  # real bounds in the template
        encoding["time_bnds"] = {**time_enc, "dtype": "float64", "chunks": (tc, ds.sizes["bnds"])}

    def empty(*lead: int) -> da.Array:
        return da.empty((*lead, n, n_lat, n_lon), chunks=(*(1 for _ in lead), tc, ny, nx), dtype=np.float32)

    for v in plan.variables:
        a = src[v].attrs
        base = {k: a[k] for k in ("standard_name", "units") if k in a}
        long = a.get("long_name", v)
        size = f"{plan.n_member} members"
        stats = {
            f"{v}_mean": (
                ("time", "lat", "lon"),
                empty(),
                {
                    **base,
                    "long_name": f"ensemble mean of {long}",
                    "statistic": "mean",
                    "cell_methods": _cell_methods(
                        a.get("cell_methods"), f"realization: mean (comment: {size})"
                    ),
                },
            ),
            f"{v}_std": (
                ("time", "lat", "lon"),
                empty(),
                {
                    **base,
                    "long_name": f"ensemble standard deviation of {long}",
                    "statistic": "std",
                    "cell_methods": _cell_methods(
                        a.get("cell_methods"),
                        "realization: standard_deviation (comment: "
                        f"sample estimator with N-1 denominator, ddof=1, {size})",
                    ),
                },
            ),
            f"{v}_quantile": (
                ("quantile", "time", "lat", "lon"),
                empty(len(cfg.quantiles)),
                {
                    **base,
                    "long_name": f"ensemble quantiles of {long} ({size}); see coordinate quantile",
                    "statistic": "quantile",
                    **({"cell_methods": a["cell_methods"]} if "cell_methods" in a else {}),
                },
            ),
        }
        if v in cfg.thresholds:
            stats[f"{v}_exceedance"] = (
                (f"{v}_threshold", "time", "lat", "lon"),
                empty(len(cfg.thresholds[v])),
                {
                    "units": "1",
                    "long_name": f"probability of {a.get('standard_name', v)} above threshold "
                    f"(fraction of {size} with {v} > {v}_threshold)",
                    "statistic": "exceedance",
                    "cell_methods": _cell_methods(
                        a.get("cell_methods"),
                        f"realization: mean (comment: of the indicator {v} > {v}_threshold over {size})",
                    ),
                },
            )
        if cfg.include_members:
            stats[v] = (("member", "time", "lat", "lon"), empty(plan.n_member), {**a, "statistic": "members"})
        for name, (dims, data, attrs) in stats.items():
            ds[name] = xr.DataArray(data, dims=dims, attrs={**attrs, "variable_id": v})
            encoding[name] = {"dtype": "float32", "chunks": data.chunksize}
    keep = {k: val for k, val in src.attrs.items() if not str(k).startswith("climrecon_") and k != "history"}
    ds.attrs = {
        **keep,
        **{f: plan.identity[f] for f in ("source_id", "experiment_id", "member_id")},
        "downscaling_method": plan.identity["method"],
        "title": f"ClimRecon ensemble statistics of {plan.name} ({plan.n_member} members)",
        "ensemble_size": plan.n_member,
        "period": plan.period,
        "Conventions": "CF-1.8",
        "climrecon_stage": "aggregate",
    }
    return ds.drop_encoding(), encoding


def _store(plan: AggregatePlan, storage_options: dict[str, Any] | None) -> StageStore:
    return StageStore(plan.url, plan.key, dict(storage_options or {}))


def prepare_aggregate(
    plan: AggregatePlan, storage_options: dict[str, Any] | None = None
) -> list[dict[str, slice]]:
    """Write the output template once; the time blocks still missing ([] when the store is complete)."""
    store = _store(plan, storage_options)
    if store.is_complete():
        log.info("aggregate store %s is complete; nothing to do", plan.url)
        return []
    src = _open(plan.member_url, storage_options, "member store", lazy=False)  # coords read here, not on Dask
    template, encoding = _template(plan, src)
    if store.initialize(template, encoding=encoding, zarr_format=plan.config.zarr_format):
        log.info("aggregate store %s: template written (%d blocks)", plan.url, len(plan.regions()))
    return store.pending(plan.regions())


# -- writing -----------------------------------------------------------------------------------------------
def _lat_band(plan: AggregatePlan, n_time: int, ny: int, nx: int, budget: int) -> int:
    """Rows per band so that one band of all members (float32, plus one float64 temporary) fits ``budget``."""
    per_row = plan.n_member * n_time * nx * (4 + 8)
    return int(max(1, min(ny, budget // max(per_row, 1))))


def aggregate_block(
    plan: AggregatePlan,
    region: Mapping[str, slice],
    storage_options: dict[str, Any] | None = None,
    memory_budget: int = MEMORY_BUDGET,
) -> bool:
    """Reduce one block (time block x spatial tile) over members and write it (one output chunk); False if done.

    Reads the block in latitude bands of all members (each band at most ~``memory_budget`` bytes);
    the statistics of the whole block (no member axis) are assembled in memory and written at once.
    With ``include_members`` the members are copied one member chunk at a time before the block's
    done marker is written, so an interrupted block is redone whole.
    """
    storage_options = resolve_storage_options(storage_options)  # this process's secrets (a worker's own)
    store = _store(plan, storage_options)
    if not store.pending([region]) or not store.claim(region):  # done, or written by a concurrent run
        return False
    try:
        _aggregate_block(plan, region, store, storage_options, memory_budget)
    finally:
        store.release(region, default_owner())
    return True


def _aggregate_block(
    plan: AggregatePlan,
    region: Mapping[str, slice],
    store: StageStore,
    storage_options: dict[str, Any] | None,
    memory_budget: int,
) -> None:
    cfg, t = plan.config, region["time"]
    src = _open(plan.member_url, storage_options, "member store", lazy=False).isel(
        lat=region["lat"], lon=region["lon"]
    )
    ny, nx, nt = src.sizes["lat"], src.sizes["lon"], t.stop - t.start
    steps = min(nt, READ_STEPS)  # statistics are per time step: read a few steps at a time
    band = _lat_band(plan, steps, ny, nx, memory_budget)
    out = xr.Dataset(coords={"time": src["time"].isel(time=t).variable.to_base_variable()})
    for v in plan.variables:
        var = src[v].isel(time=t)
        thresholds = cfg.thresholds.get(v, [])
        stats = {
            "mean": np.empty((nt, ny, nx), np.float32),
            "std": np.empty((nt, ny, nx), np.float32),
            "quantile": np.empty((len(cfg.quantiles), nt, ny, nx), np.float32),
            **({"exceedance": np.empty((len(thresholds), nt, ny, nx), np.float32)} if thresholds else {}),
        }
        for t0 in range(0, nt, steps):
            times = slice(t0, min(t0 + steps, nt))
            for i0 in range(0, ny, band):
                rows = slice(i0, min(i0 + band, ny))
                x = np.asarray(var.isel(time=times, lat=rows).values, dtype=np.float32)
                for name, value in ensemble_statistics(x, cfg.quantiles, thresholds).items():
                    stats[name][..., times, rows, :] = value
        dims = {
            "mean": ("time", "lat", "lon"),
            "std": ("time", "lat", "lon"),
            "quantile": ("quantile", "time", "lat", "lon"),
            "exceedance": (f"{v}_threshold", "time", "lat", "lon"),
        }
        for name, value in stats.items():
            out[f"{v}_{name}"] = (dims[name], value)
        if cfg.include_members:
            for m in range(plan.n_member):
                one = xr.Dataset(
                    {v: (("member", "time", "lat", "lon"), var.isel(member=slice(m, m + 1)).values)}
                )
                one.to_zarr(
                    plan.url,
                    region={"member": slice(m, m + 1), **region},
                    mode="r+",
                    storage_options=url_options(plan.url, storage_options),
                )
    store.write_block(out, dict(region))
    log.info("aggregate %s %s written", plan.name, plan.label([region]))


def _block_key(region: Mapping[str, slice]) -> str:
    return "_".join(f"{d}{s.start}-{s.stop}" for d, s in sorted(region.items()))


def run_blocks(
    plan: AggregatePlan,
    regions: Sequence[Mapping[str, slice]],
    storage_options: dict[str, Any] | None = None,
    client: Any = None,
) -> int:
    """:func:`aggregate_block` for ``regions``, here or one Dask future each on ``client``; blocks written."""
    if client is None:
        return sum(aggregate_block(plan, r, storage_options) for r in regions)
    futures = [
        client.submit(
            aggregate_block,
            plan,
            dict(r),
            for_workers(storage_options),  # secrets stay in the environment (each worker has its own)
            pure=False,
            key=f"aggregate-block-{plan.key}-{_block_key(r)}",
        )
        for r in regions
    ]
    return sum(bool(w) for w in client.gather(futures))


# -- provenance and completion -----------------------------------------------------------------------------
def _json_attr(value: Any) -> Any:
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


def _upstream_record(plan: AggregatePlan, attrs: Mapping[str, Any]) -> dict[str, Any]:
    """The member store's own lineage record, completed with what its attributes say (redacted)."""
    prov = _json_attr(attrs.get("climrecon_provenance"))
    record = dict(prov) if isinstance(prov, Mapping) else ({"recorded": prov} if prov else {})
    record.setdefault("stage", "downscale")
    record.setdefault("store", plan.member_url)
    record.setdefault("content_key", plan.member_key)
    for attr, name in (
        ("climrecon_downscale_config", "config"),
        ("climrecon_code_version", "code_version"),
        ("climrecon_completed", "ended"),
    ):
        if attr in attrs and name not in record:
            record[name] = _json_attr(attrs[attr])
    return redact(record)


def finalize_aggregate(plan: AggregatePlan, storage_options: dict[str, Any] | None = None) -> str:
    """Write ``<store>/provenance.json``, the provenance attributes and the complete marker; the URL.

    Attributes: ``history`` (the member store's, plus one line), ``climrecon_aggregate_config``,
    ``climrecon_source``/``climrecon_source_key``, ``climrecon_provenance`` (this stage's lineage record,
    upstream records nested inside), ``climrecon_prov_document`` (the PROV-JSON object's name) and the
    :func:`~climrecon.provenance.prov_summary` (lineage, counts, Prefect flow runs).
    """
    store = _store(plan, storage_options)
    if store.is_complete():
        return plan.url
    src_attrs = _open(plan.member_url, storage_options, "member store").attrs
    record = stage_record(
        "aggregate",
        store=plan.url,
        key=plan.key,
        config=plan.config,
        started=plan.started,
        inputs=[{"store": plan.member_url, "content_key": plan.member_key}],
        upstream=_upstream_record(plan, src_attrs),
        ensemble_size=plan.n_member,
        statistics=[s for s in STATISTICS if s != "members" or plan.config.include_members],
    )
    doc = prov_document(record)
    write_prov_document(plan.url, doc, storage_options, name=_PROV_OBJECT)
    attrs = stage_attrs(
        "aggregate",
        plan.config,
        plan.key,
        str(src_attrs.get("history", "")),
        source=plan.member_url,
        source_key=plan.member_key,
    )
    attrs.update(
        {
            "climrecon_provenance": json.dumps(record, sort_keys=True),
            "climrecon_prov_document": _PROV_OBJECT,
            "date_created": record["ended"],
            **prov_summary(doc),
        }
    )
    with warnings.catch_warnings():
        # provenance.json sits inside the store on purpose; zarr notes it is not a node of the hierarchy
        warnings.filterwarnings("ignore", message=r"Object at provenance\.json is not recognized")
        store.finalize(plan.regions(), attrs=attrs)
    log.info("aggregate store %s complete", plan.url)
    return plan.url


def run_aggregate(
    plan: AggregatePlan,
    storage_options: dict[str, Any] | None = None,
    client: Any = None,
    catalog: str | None = None,
) -> str:
    """Write (or finish) the plan's store, then record it in the output catalog at ``catalog`` if given."""
    pending = prepare_aggregate(plan, storage_options)
    run_blocks(plan, pending, storage_options, client)
    url = finalize_aggregate(plan, storage_options)
    if catalog:
        from climrecon.catalogs.output_catalog import add_to_output_catalog

        add_to_output_catalog(catalog, url, storage_options)
    return url
