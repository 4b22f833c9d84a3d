"""Downscale stage: a regridded GCM store -> an N-member high-resolution ensemble, by the configured method.

Input: the regrid stage's *fine* store (the coarse field bilinearly put on the fine grid), its *static* store
on the same grid (``orog``, ``orog_std``, ``sftlf`` and their ``<name>_coarse`` views) and its *coarse*
store. Output: one :class:`~climrecon.stores.StageStore` at
``<root>/downscale/<source>.<experiment>.<member_id>.<label>.<key>.zarr`` holding the method's variables as
float32 ``(member, time, lat, lon)``, chunks ``member=1, time=time_chunk``, lat/lon whole; coords ``member``
(0..N-1), ``time`` (cftime month starts in the source's calendar) + ``time_bnds``, ``lat``, ``lon``;
attributes ``climrecon_key``, ``history``, ``climrecon_downscale_config`` (JSON) and, once complete,
``climrecon_provenance`` (JSON, :func:`climrecon.provenance.stage_record`).

The stage knows no method: it builds :class:`~climrecon.methods.Inputs` from the stores and calls the
method the ``method:`` section names (:func:`climrecon.methods.build`), exactly as the evaluation does.
Work is cut into :class:`WorkUnit` s of ``months_per_unit`` steps x ``members_per_unit`` members, each one
chunk-aligned region with its own done marker. A window method (``Needs.time_halo``) reads ``halo`` input
steps of context on each side of its unit (clipped to the store) and writes only the unit's own steps, so
its bytes depend on the configured unit length, never on the number of workers; a method that returns finer
steps than its input (``Needs.refine``, e.g. monthly members of an annual input) gets a member store on that
finer axis (month starts with bounds), each unit's region ``refine`` x its input steps. :func:`sample_unit` (pinned to GPU workers when there are
any) reads the unit's inputs and calls ``method.downscale(inputs, members, seed)``; :func:`write_unit` (any
worker) writes the region, then its marker. A method that is fitted (QM, BCSD: ``needs.fit``) is fitted
once per worker process on the training years of ``train.truth`` (default: the sample catalog's
reanalysis), coarsened onto the input's coarse grid.

Determinism: the method's own contract (diffusion methods: member m of month t from
``seed_for(seed, year * 12 + month - 1, m)``, fixed-shape network calls), so the bytes written do not
depend on unit sizes, the number of workers or which worker ran a unit (bitwise on CPU; on CUDA up to the
determinism of the GPU kernels). The store key is ``content_key("downscale", DOWNSCALE_VERSION, fine key,
static key, *method.identity(members, seed), time_chunk, zarr_format)`` (+ the fit data's key).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time as _time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import dask
import dask.array as da
import numpy as np
import xarray as xr

from climrecon.config import ClimReconConfig, DownscaleConfig, MethodConfig, SamplerConfig
from climrecon.methods import (
    Inputs,
    Method,
    MethodError,
    build,
    gridded_variables,
    month_index,
    month_starts,
    time_index,
)
from climrecon.provenance import hardware, stage_attrs, stage_record, utc_now
from climrecon.storage import (
    for_workers,
    public_url,
    resolve_storage_options,
    safe_name,
    store_url,
    url_options,
)
from climrecon.stores import StageStore, content_key
from climrecon.tasks.grids import Grid, GridError

__all__ = [
    "DOWNSCALE_VERSION",
    "DownscaleError",
    "DownscalePlan",
    "UnitReport",
    "WorkUnit",
    "finalize_downscale",
    "historical_fit_stores",
    "store_identity",
    "month_index",
    "plan_downscale",
    "prepare_downscale",
    "run_downscale",
    "run_units",
    "sample_unit",
    "unit_inputs",
    "write_unit",
]

DOWNSCALE_VERSION = 1  # bump when what the stage computes changes, so old stores are not reused

_TIME_CODER = xr.coders.CFDatetimeCoder(use_cftime=True)


class DownscaleError(ValueError):
    """Inputs, method or config cannot be downscaled together; the message names the one at fault."""


# -- units ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class WorkUnit:
    """A block of time steps x members: one chunk-aligned region of the member store."""

    time: slice  # of the INPUT time steps
    member: slice
    period: str  # "1990-01..1990-12"
    refine: int = 1  # output steps per input step (12: monthly members of annual input)

    @property
    def label(self) -> str:
        """``"1990-01..1990-12 m0-7"``: the readable name of the unit (task names, messages)."""
        return f"{self.period} m{self.member.start}-{self.member.stop - 1}"

    @property
    def region(self) -> dict[str, slice]:
        """The unit's region of the member store (output time steps)."""
        return {
            "member": self.member,
            "time": slice(self.time.start * self.refine, self.time.stop * self.refine),
        }

    @property
    def size(self) -> int:
        """Items (output time steps x members) in the unit."""
        return (self.time.stop - self.time.start) * self.refine * (self.member.stop - self.member.start)


# -- the plan ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class UnitReport:
    """What one unit did: where it sampled, on which device, for how long."""

    label: str
    items: int
    worker: str | None
    device: str
    sample_seconds: float
    written: bool = False
    hardware: dict[str, Any] = field(default_factory=dict)
    note: str = ""  # e.g. "written by another run": the unit was skipped


@dataclass(frozen=True)
class FitData:
    """Where a fitted method's training pairs come from: fine truth and training years, or the ``data:``
    section (the user's own fine data and its ``train`` selection, as JSON: no secrets)."""

    truth_url: str
    years: tuple[int, int] | str
    key: str
    data: dict[str, Any] | None = None


@dataclass(frozen=True)
class DownscalePlan:
    """Everything a worker needs for one member store (picklable, no secrets)."""

    name: str  # "<source>.<experiment>.<member_id>.<label>"
    config: DownscaleConfig
    method: MethodConfig
    sampler: SamplerConfig
    description: dict[str, Any]  # method.describe()
    fit: FitData | None
    variables: tuple[str, ...]
    fine_url: str
    fine_key: str
    static_url: str
    static_key: str
    coarse_url: str | None
    coarse_key: str | None
    time_labels: tuple[str, ...]
    out_url: str
    out_key: str
    identity: dict[str, str]
    upstream: dict[str, Any]
    started: str
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])  # owner of this run's unit leases
    time_step: str = "month"  # of the fine store's times (time features and seeds)
    mask: np.ndarray | None = None  # (lat, lon) bool valid cells of the data: section's fine data, or None
    refine: int = 1  # output time steps per input step (the method's Needs.refine, e.g. 12 for year -> month)
    halo: int = 0  # input time steps of context read on each side of a unit (the method's Needs.time_halo)
    fit_coarse_url: str | None = (
        None  # what a bias correction is fitted on, when not the input's own coarse store
    )

    @property
    def n_time(self) -> int:
        return len(self.time_labels)

    def units(self) -> list[WorkUnit]:
        """Every work unit, time-major: blocks of months_per_unit input steps (the last may be shorter) x
        members. The blocks are fixed by the config alone (never by the number of workers): a window method's
        bytes depend on where a unit starts."""
        cfg = self.config
        out = []
        for t0 in range(0, self.n_time, cfg.months_per_unit):
            t = slice(t0, min(t0 + cfg.months_per_unit, self.n_time))
            period = f"{self.time_labels[t.start]}..{self.time_labels[t.stop - 1]}"
            for m0 in range(0, cfg.members, cfg.members_per_unit):
                members = slice(m0, min(m0 + cfg.members_per_unit, cfg.members))
                out.append(WorkUnit(t, members, period, self.refine))
        return out


def _open(url: str, storage_options: dict[str, Any] | None, what: str) -> xr.Dataset:
    try:
        ds = xr.open_zarr(
            url, storage_options=url_options(url, storage_options), decode_times=_TIME_CODER, chunks=None
        )
    except (FileNotFoundError, KeyError, ValueError, OSError) as exc:
        raise DownscaleError(f"cannot open the {what} {url}: {type(exc).__name__}: {exc}") from None
    status = ds.attrs.get("climrecon_status", "complete")
    if status != "complete":
        raise DownscaleError(f"the {what} {url} is {status!r}, not complete: finish the regrid stage first")
    return ds


def _identity(fine: xr.Dataset, fine_url: str) -> dict[str, str]:
    """``source_id``, ``experiment_id`` and ``member_id`` of a regridded store: its attributes, else its name
    (``<source>.<experiment>.<member>...zarr``), made safe for a store name."""
    wanted = ("source_id", "experiment_id", "member_id")
    ident = {f: str(fine.attrs[f]) for f in wanted if fine.attrs.get(f)}
    if len(ident) < 3:
        parts = fine_url.rstrip("/").rsplit("/", 1)[-1].split(".")
        if len(parts) < 4:
            raise DownscaleError(
                f"cannot tell source/experiment/member of {fine_url}: it has no source_id/experiment_id/member_id "
                "attributes and its name is not <source>.<experiment>.<member_id>...zarr"
            )
        ident = {**dict(zip(wanted, parts[:3], strict=True)), **ident}
    return {k: safe_name(v) for k, v in ident.items()}


def _method_inputs(fine: xr.Dataset, static: xr.Dataset, coarse: xr.Dataset | None, fine_url: str) -> Inputs:
    gridded = [v for v in gridded_variables(fine) if "time" in fine[v].dims]
    try:
        grid = Grid.from_dataset(fine, f"fine store {fine_url}")
    except GridError as exc:
        raise DownscaleError(str(exc)) from None
    if coarse is not None:
        coarse = coarse[gridded_variables(coarse)]
    return Inputs(coarse_on_fine=fine[gridded], grid=grid, coarse=coarse, static=static)


def _fit_data(cfg: ClimReconConfig, storage_options: dict[str, Any] | None) -> FitData:
    from climrecon.tasks.training_data import default_truth_url, open_truth

    if cfg.data is not None:
        data = cfg.data.model_dump(mode="json")
        where = cfg.data.path or "data.query"
        return FitData(str(where), cfg.data.train.describe(), content_key("fine-data", data), data)

    try:
        url = default_truth_url(cfg)
        truth = open_truth(url, [], storage_options)
    except (FileNotFoundError, ValueError) as exc:
        raise DownscaleError(
            f"method {cfg.method.name!r} is fitted on fine truth (train.truth): {exc}"
        ) from None
    key = str(truth.attrs.get("climrecon_key") or content_key("foreign-truth", url, dict(truth.sizes)))
    return FitData(url, tuple(cfg.train.train_years), key)


def plan_downscale(
    cfg: ClimReconConfig,
    fine_url: str,
    static_url: str,
    coarse_url: str | None = None,
    storage_options: dict[str, Any] | None = None,
    fit_coarse_url: str | None = None,
) -> DownscalePlan:
    """Check the inputs against the method (``method.validate`` on the lazy stores) and name the member
    store; writes nothing. ``fit_coarse_url`` (default ``downscale.fit_coarse``): the coarse store a bias
    correction is fitted on instead of the input's own (the same model's historical run, on the same grid).
    Raises :class:`DownscaleError` naming the store, or the method's message."""
    ds_cfg = cfg.downscale
    fine = _open(fine_url, storage_options, "regridded fine store")
    static = _open(static_url, storage_options, "static store")
    coarse = _open(coarse_url, storage_options, "regridded coarse store") if coarse_url else None
    for c in ("lat", "lon"):
        if static.sizes.get(c) != fine.sizes[c] or not np.allclose(
            static[c].values, fine[c].values, atol=1e-6
        ):
            raise DownscaleError(
                f"the static store {static_url} is not on the grid of the fine store {fine_url} ({c}: "
                f"{static.sizes.get(c)} vs {fine.sizes[c]} cells); use the static store the same regrid run wrote"
            )
    time_step = _time_step(fine["time"].values)
    inputs = dataclasses.replace(_method_inputs(fine, static, coarse, fine_url), time_step=time_step)
    try:
        method = build(cfg.method, cfg.sampler)
        method.validate(inputs)
    except MethodError as exc:
        raise DownscaleError(f"{fine_url}: {exc}") from None
    description = method.describe()
    fit = _fit_data(cfg, storage_options) if method.needs.fit else None
    out_step, refine = method.needs.output_step(time_step)
    halo = math.ceil(method.needs.time_halo / refine)
    # what the method returns of this input (a prior guided by a tas-only GCM returns tas only)
    variables = tuple(v for v in description.get("variables") or inputs.variables if v in inputs.variables)

    fine_key = str(fine.attrs.get("climrecon_key") or content_key("foreign-fine", fine_url, dict(fine.sizes)))
    static_key = str(
        static.attrs.get("climrecon_key") or content_key("foreign-static", static_url, dict(static.sizes))
    )
    coarse_key = None if coarse is None else str(coarse.attrs.get("climrecon_key", ""))
    times = fine["time"].values
    try:
        time_index(times, time_step)  # every label seedable (year >= 0, one per step)
    except MethodError as exc:
        raise DownscaleError(f"{fine_url}: {exc}") from None
    label = str(description.get("label", cfg.method.name))
    identity = {**_identity(fine, fine_url), "method": safe_name(label)}
    parts = [*method.identity(ds_cfg.members, ds_cfg.seed), ds_cfg.time_chunk, ds_cfg.zarr_format]
    if fit is not None:
        parts += [fit.key, fit.years if isinstance(fit.years, str) else list(fit.years)]
    fit_coarse_url = fit_coarse_url or ds_cfg.fit_coarse
    if fit_coarse_url and method.needs.fit_model:  # another store's fields define the correction: its key too
        parts.append(_fit_coarse_key(fit_coarse_url, coarse, storage_options))
    else:
        fit_coarse_url = None
    if time_step != "month":
        parts.append(time_step)
    if halo or refine > 1:  # what a unit reads and writes; new keys only for the methods that use them
        parts += [{"halo": halo, "refine": refine, "months_per_unit": ds_cfg.months_per_unit}]
    mask = _data_mask(cfg, Grid.from_dataset(fine, "fine store"), storage_options)
    if mask is not None:
        parts.append(hashlib.sha256(np.packbits(mask).tobytes()).hexdigest())
    key = content_key("downscale", DOWNSCALE_VERSION, fine_key, static_key, *parts)
    name = ".".join(identity[f] for f in ("source_id", "experiment_id", "member_id", "method"))
    upstream_record = fine.attrs.get("climrecon_provenance")
    try:
        upstream = json.loads(upstream_record) if upstream_record else None
    except ValueError:
        upstream = None
    upstream = upstream or {
        "stage": "regrid",
        "store": public_url(fine_url),
        "content_key": fine_key,
        "history": str(fine.attrs.get("history", "")),
    }
    return DownscalePlan(
        name=name,
        config=ds_cfg,
        method=cfg.method,
        sampler=cfg.sampler,
        description=description,
        fit=fit,
        variables=variables,
        fine_url=fine_url,
        fine_key=fine_key,
        static_url=static_url,
        static_key=static_key,
        coarse_url=coarse_url,
        coarse_key=coarse_key,
        fit_coarse_url=fit_coarse_url,
        time_labels=tuple(f"{t.year:04d}-{t.month:02d}" for t in times),
        out_url=store_url(cfg.storage.root, "downscale", name.split("."), f"{key}.zarr"),
        out_key=key,
        identity=identity,
        upstream=upstream,
        started=utc_now(),
        time_step=time_step,
        mask=mask,
        refine=refine,
        halo=halo,
    )


# -- the store ------------------------------------------------------------------------------------------------
def _store(plan: DownscalePlan, storage_options: dict[str, Any] | None) -> StageStore:
    return StageStore(plan.out_url, plan.out_key, dict(storage_options or {}))


def _template(plan: DownscalePlan, fine: xr.Dataset) -> tuple[xr.Dataset, dict[str, Any]]:
    cfg = plan.config
    if plan.refine > 1:
        fine = _monthly_axis(fine)
    n_m, n_t, n_y, n_x = cfg.members, fine.sizes["time"], fine.sizes["lat"], fine.sizes["lon"]
    time_var = fine["time"].variable.to_base_variable()
    coords = {
        "member": (
            "member",
            np.arange(n_m, dtype=np.int64),
            {"long_name": "ensemble member", "standard_name": "realization"},
        ),
        "time": time_var,
        "lat": fine["lat"].variable,
        "lon": fine["lon"].variable,
    }
    ds = xr.Dataset(coords=coords)
    enc_time = {k: fine["time"].encoding[k] for k in ("units", "calendar") if k in fine["time"].encoding}
    encoding: dict[str, Any] = {"time": {**enc_time, "dtype": "float64", "chunks": (cfg.time_chunk,)}}
    if "time_bnds" in fine:
        ds["time_bnds"] = fine["time_bnds"].variable.to_base_variable().load()
        encoding["time_bnds"] = {**enc_time, "dtype": "float64", "chunks": (cfg.time_chunk, ds.sizes["bnds"])}
        ds["time"].attrs["bounds"] = "time_bnds"
    for b in ("lat_bnds", "lon_bnds"):
        if b in fine.variables:
            ds = ds.assign_coords({b: fine[b].variable.load()})
    for v in plan.variables:
        empty = da.empty((n_m, n_t, n_y, n_x), chunks=(1, cfg.time_chunk, n_y, n_x), dtype=np.float32)
        attrs = {k: fine[v].attrs[k] for k in ("units", "standard_name", "long_name") if k in fine[v].attrs}
        ds[v] = xr.DataArray(empty, dims=("member", "time", "lat", "lon"), attrs=attrs)
        encoding[v] = {"dtype": "float32", "chunks": (1, cfg.time_chunk, n_y, n_x)}
    ds.attrs = {
        **plan.identity,
        "title": f"ClimRecon downscaled ensemble of {plan.name} ({n_m} members)",
        "Conventions": "CF-1.8",
        **stage_attrs(
            "downscale",
            cfg,
            plan.out_key,
            str(fine.attrs.get("history", "")),
            method=plan.method.model_dump(mode="json"),
            sampler=plan.sampler.model_dump(mode="json"),
        ),
    }
    return ds, encoding


def _monthly_axis(fine: xr.Dataset) -> xr.Dataset:
    """``fine``'s coordinates with a monthly time axis (the 12 months of each annual step) and its bounds."""
    starts = month_starts(fine["time"].values)
    ends = np.array([type(t)(t.year + (t.month == 12), t.month % 12 + 1, 1) for t in starts], dtype=object)
    out = fine.drop_vars(["time_bnds"], errors="ignore").isel(
        time=np.repeat(np.arange(fine.sizes["time"]), 12)
    )
    out = out.assign_coords(time=("time", starts, fine["time"].attrs))
    out["time"].encoding = {
        k: fine["time"].encoding[k] for k in ("units", "calendar") if k in fine["time"].encoding
    }
    return out.assign(time_bnds=(("time", "bnds"), np.stack([starts, ends], axis=1)))


def prepare_downscale(plan: DownscalePlan, storage_options: dict[str, Any] | None = None) -> list[WorkUnit]:
    """Write the member store's template (once); the units without a done marker."""
    store = _store(plan, storage_options)
    if store.is_complete():
        return []
    template, encoding = _template(plan, _open(plan.fine_url, storage_options, "regridded fine store"))
    store.initialize(template, encoding=encoding, zarr_format=plan.config.zarr_format)  # no-op if there
    units = plan.units()
    pending = {str(r) for r in store.pending([u.region for u in units])}
    return [u for u in units if str(u.region) in pending]


# -- units ----------------------------------------------------------------------------------------------------
_METHODS: dict[str, Method] = {}  # per worker process: plan key -> built (and fitted) method


def _method(plan: DownscalePlan, storage_options: dict[str, Any] | None) -> Method:
    """The plan's method, built (and fitted, for a fitted method) once per worker process."""
    method = _METHODS.get(plan.out_key)
    if method is None:
        method = build(plan.method, plan.sampler)
        planned = (plan.description.get("checkpoint") or {}).get("sha256")
        here = (method.describe().get("checkpoint") or {}).get("sha256")
        if planned != here:  # e.g. another file at the same path on this worker's host
            raise MethodError(
                f"the checkpoint this worker loaded ({here}) is not the one the run was planned with "
                f"({planned}): install the same file on every worker host"
            )
        if plan.fit is not None:
            # read the fit data here with local threads: inside a Dask worker a .load() would otherwise go
            # through the cluster, queued behind the units the workers are sampling
            with dask.config.set(scheduler="threads"):
                coarse_train, fine_train = _fit_pairs(plan, storage_options)
                if method.needs.fit_model:
                    model_train = _model_train(plan, fine_train, storage_options)
                    method.fit(coarse_train, fine_train, model_train=model_train)  # type: ignore[call-arg]
                else:
                    method.fit(coarse_train, fine_train)
        while len(_METHODS) >= 2:  # a worker serves one store at a time; keep the last two
            _METHODS.pop(next(iter(_METHODS)))
        _METHODS[plan.out_key] = method
    return method


def _fit_pairs(plan: DownscalePlan, storage_options: dict[str, Any] | None) -> tuple[xr.Dataset, xr.Dataset]:
    """(coarse_train, fine_train): the truth's training years on the target grid and on the input's coarse grid."""
    from climrecon.methods.features import coarse_view
    from climrecon.tasks.training_data import open_truth, select_years

    fit = plan.fit
    fine = _open(plan.fine_url, storage_options, "regridded fine store")
    variables = list(plan.variables)
    try:
        truth = (
            _fit_truth(fit, variables, storage_options)
            if fit.data is not None
            else (
                select_years(
                    open_truth(fit.truth_url, variables, storage_options),
                    fit.years,
                    f"truth store {fit.truth_url} (train.train_years)",
                )
                .astype("float32")
                .load()
            )
        )
        target = Grid.from_dataset(fine, "fine store")
        truth = _on_target_cells(truth, target)
        if truth is None:
            raise DownscaleError(
                f"the fitting truth {fit.truth_url} does not hold the target grid {target.describe()}'s cells: give "
                "train.truth on the grid the regrid stage writes (or one that contains it)"
            )
        truth = truth.assign_coords(lat=fine["lat"].values, lon=fine["lon"].values)
        coarse_grid = Grid.from_dataset(
            _open(plan.coarse_url, storage_options, "regridded coarse store"), "coarse store"
        )
        return coarse_view(truth, coarse_grid), truth
    except (ValueError, GridError) as exc:
        if isinstance(exc, DownscaleError):
            raise
        raise DownscaleError(f"fitting {plan.method.name} for {plan.name}: {exc}") from None


def _on_target_cells(truth: xr.Dataset, target: Grid) -> xr.Dataset | None:
    """``truth`` on ``target``'s cells: itself when on the same grid, the target's cells of it when the target is
    a part of its grid (a reconstruction over a sub-region of the truth's domain), else None."""
    have = Grid.from_dataset(truth, "truth")
    if have.same_cells(target):
        return truth
    tolerance = 1e-3 * min(have.dlat, target.dlat)
    try:
        part = truth.sel(lat=target.lat, lon=target.lon, method="nearest", tolerance=tolerance)
    except KeyError:
        return None
    return part if Grid.from_dataset(part, "truth").same_cells(target) else None


def _fit_coarse_key(url: str, coarse: xr.Dataset | None, storage_options: dict[str, Any] | None) -> str:
    """The content key of the store a bias correction is fitted on, after checking it is on the input's coarse
    grid (the mapping is per coarse cell)."""
    fit = _open(url, storage_options, "coarse store to fit the bias correction on (downscale.fit_coarse)")
    if coarse is None:
        raise DownscaleError(
            f"downscale.fit_coarse {url} is given but the run has no coarse store of its own"
        )
    have, want = Grid.from_dataset(fit, url), Grid.from_dataset(coarse, "coarse store")
    if not have.same_cells(want):
        raise DownscaleError(
            f"downscale.fit_coarse {url} is on {have.describe()}, the input's coarse store on {want.describe()}: "
            "fit on the same model's run regridded by the same config"
        )
    return str(fit.attrs.get("climrecon_key") or content_key("foreign-coarse", url, dict(fit.sizes)))


def store_identity(url: str, storage_options: dict[str, Any] | None = None) -> dict[str, str]:
    """:func:`_identity` of a regridded store (as the member store is named) and its ``frequency`` (or
    ``table_id``): what pairs a scenario with its historical run."""
    ds = _open(url, storage_options, "regridded store")
    return {
        **_identity(ds, url),
        "frequency": str(ds.attrs.get("frequency") or ds.attrs.get("table_id") or ""),
    }


def historical_fit_stores(stores: Mapping[str, Mapping[str, str]]) -> dict[str, str]:
    """For each coarse store URL of ``stores`` (URL -> its :func:`store_identity`) that is not a historical run,
    the coarse store of the same model, member and frequency's ``historical`` run among them: what the scenario's
    bias correction is fitted on (a scenario does not cover the training years). Stores without a historical
    counterpart are left out (they fit on their own years)."""

    def same(ident: Mapping[str, str]) -> tuple[str | None, ...]:
        return tuple(ident.get(k) for k in ("source_id", "member_id", "frequency"))

    historical = {same(i): url for url, i in stores.items() if i.get("experiment_id") == "historical"}
    return {
        url: historical[same(i)]
        for url, i in stores.items()
        if i.get("experiment_id") != "historical" and same(i) in historical
    }


def _model_train(
    plan: DownscalePlan, fine_train: xr.Dataset, storage_options: dict[str, Any] | None
) -> xr.Dataset:
    """The coarse model's fields over the years of the fit data (what a bias correction maps from): the input's
    own coarse store, or ``plan.fit_coarse_url`` (the same model's historical run)."""
    source = plan.fit_coarse_url or plan.coarse_url
    coarse = _open(source, storage_options, "regridded coarse store")
    years = [t.year for t in fine_train["time"].values]
    first, last = min(years), max(years)
    have = np.array([t.year for t in coarse["time"].values])
    keep = np.flatnonzero((have >= first) & (have <= last))
    if not len(keep):
        raise DownscaleError(
            f"{plan.name}: {plan.method.name}'s bias correction is fitted on the coarse input's own fields over the "
            "years the training truth covers "
            f"({first}-{last}), but {source} covers {have.min()}-{have.max()}: downscale a run that covers them, "
            "give downscale.fit_coarse (the coarse store of the same model's historical run; the reconstruct flow "
            "does so when the query has it), or set method.bias_correction: false"
        )
    variables = [v for v in plan.variables if v in coarse.data_vars]
    return coarse[variables].isel(time=keep).astype("float32").load()


def _time_step(times: np.ndarray) -> str:
    """The time step of a store's labels (month unless the spacing says day, hour or year)."""
    from climrecon.tasks.fine_data import FineDataError, infer_time_step

    try:
        return str(infer_time_step(times)[0])
    except FineDataError:
        return "month"


def _data_mask(cfg: ClimReconConfig, grid: Grid, storage_options: dict[str, Any] | None) -> np.ndarray | None:
    """The valid cells of the ``data:`` section's fine data on ``grid`` (its cells must lie on the data's
    grid), or None without a data section or without masked cells there: what the stage masks its outputs
    with, so a reconstruction over a coast has the user's ocean cells NaN like their data."""
    if cfg.data is None:
        return None
    from climrecon.tasks.fine_data import FineDataError, open_fine_data

    try:
        fine = open_fine_data(cfg.data, storage_options)
    except FineDataError as exc:
        raise DownscaleError(f"data: {exc}") from None
    try:
        mask = fine.mask.sel(lat=grid.lat, lon=grid.lon, method="nearest", tolerance=1e-3 * grid.dlat)
    except KeyError:
        raise DownscaleError(
            f"the target grid {grid.describe()} is not on the fine data's grid ({fine.grid.describe()}): set "
            "regrid.region and regrid.resolution to the data's"
        ) from None
    values = np.asarray(mask.values, dtype=bool)
    return None if values.all() else values


def _fit_truth(fit: FitData, variables: list[str], storage_options: dict[str, Any] | None) -> xr.Dataset:
    """The ``data:`` section's training times of ``variables`` (loaded float32)."""
    from climrecon.config import FineDataConfig
    from climrecon.tasks.fine_data import FineDataError, open_fine_data

    cfg = FineDataConfig.model_validate(fit.data)
    try:
        fine = open_fine_data(cfg, storage_options)
        missing = [v for v in variables if v not in fine.variables]
        if missing:
            raise DownscaleError(
                f"the fine data (data:) lack {missing} to fit on; they have {fine.variables}"
            )
        return fine.select(cfg.train, "data.train")[variables].astype("float32").load()
    except FineDataError as exc:
        raise DownscaleError(f"fitting on the fine data (data:): {exc}") from None


def _worker_address() -> str | None:
    try:
        from distributed import get_worker

        return get_worker().address
    except (ImportError, ValueError):
        return None


def unit_inputs(plan: DownscalePlan, unit: WorkUnit, storage_options: dict[str, Any] | None = None) -> Inputs:
    """The unit's :class:`~climrecon.methods.Inputs`, loaded: its time steps of the fine (and coarse) store,
    with ``plan.halo`` steps of context on each side where the store has them (:func:`read_span`), and the
    static fields."""
    span = read_span(plan, unit)
    fine = _open(plan.fine_url, storage_options, "regridded fine store").isel(time=span)
    static = _open(plan.static_url, storage_options, "static store")
    coarse = None
    if plan.coarse_url:
        coarse = _open(plan.coarse_url, storage_options, "regridded coarse store").isel(time=span).load()
    inputs = _method_inputs(fine.load(), static.load(), coarse, plan.fine_url)
    mask = None
    if plan.mask is not None:
        mask = xr.DataArray(plan.mask, dims=("lat", "lon"), coords={"lat": fine["lat"], "lon": fine["lon"]})
    return dataclasses.replace(inputs, time_step=plan.time_step, mask=mask)


def read_span(plan: DownscalePlan, unit: WorkUnit) -> slice:
    """The input time steps a unit reads: its own and ``plan.halo`` on each side, clipped to the store."""
    return slice(max(0, unit.time.start - plan.halo), min(plan.n_time, unit.time.stop + plan.halo))


def core(plan: DownscalePlan, unit: WorkUnit) -> slice:
    """The unit's own OUTPUT time steps within the output of its read span (what it writes)."""
    first = (unit.time.start - read_span(plan, unit).start) * plan.refine
    return slice(first, first + (unit.time.stop - unit.time.start) * plan.refine)


def sample_unit(
    plan: DownscalePlan, unit: WorkUnit, storage_options: dict[str, Any] | None = None
) -> tuple[dict[str, np.ndarray] | None, UnitReport]:
    """Downscale every (member, time) item of ``unit``: ``{variable: (member, time, lat, lon) float32}`` + report.

    The unit's lease is taken first (:meth:`~climrecon.stores.StageStore.lease`): while another run samples
    the same unit this waits, and when that run has written it meanwhile the unit is skipped (fields None,
    the report says so)."""
    t0 = _time.perf_counter()
    storage_options = resolve_storage_options(storage_options)  # this process's secrets (a worker's own)
    if not _store(plan, storage_options).claim(unit.region, plan.run_id, plan.config.lease_seconds):
        report = UnitReport(
            unit.label,
            unit.size,
            _worker_address(),
            "-",
            _time.perf_counter() - t0,
            note="written by another run",
        )
        return None, report
    try:
        method = _method(plan, storage_options)
        inputs = unit_inputs(plan, unit, storage_options)
        result = inputs.masked(
            method.downscale(
                inputs, members=range(unit.member.start, unit.member.stop), seed=plan.config.seed
            )
        )
    except MethodError as exc:
        _store(plan, storage_options).release(unit.region, plan.run_id)
        raise DownscaleError(
            f"{plan.name} {unit.label}: {exc} (stores {plan.fine_url}, {plan.static_url})"
        ) from None
    except BaseException:
        _store(plan, storage_options).release(unit.region, plan.run_id)  # a retry or another run may take it
        raise
    result = result.isel(time=core(plan, unit))  # halo steps are context, never written
    fields = {
        v: np.ascontiguousarray(result[v].transpose("member", "time", "lat", "lon").values, dtype=np.float32)
        for v in plan.variables
    }
    device = str(getattr(method, "device", "cpu"))
    report = UnitReport(
        unit.label, unit.size, _worker_address(), device, _time.perf_counter() - t0, hardware=hardware()
    )
    return fields, report


def write_unit(
    plan: DownscalePlan,
    unit: WorkUnit,
    sampled: tuple[dict[str, np.ndarray], UnitReport],
    storage_options: dict[str, Any] | None = None,
) -> UnitReport:
    """Write a sampled unit into its region of the member store, then its done marker."""
    fields, report = sampled
    if fields is None:  # written by another run meanwhile
        return report
    block = xr.Dataset({v: (("member", "time", "lat", "lon"), a) for v, a in fields.items()})
    store = _store(plan, resolve_storage_options(storage_options))  # this process's secrets
    store.write_block(block, unit.region)
    store.release(unit.region, plan.run_id)
    return UnitReport(**{**report.__dict__, "written": True})


def run_units(
    plan: DownscalePlan,
    units: Sequence[WorkUnit],
    storage_options: dict[str, Any] | None = None,
    client: Any = None,
    resources: Mapping[str, float] | None = None,
    on_done: Callable[[UnitReport], None] | None = None,
) -> list[UnitReport]:
    """Sample and write ``units``: in this process, or on ``client`` (sampling with ``resources``, e.g.
    ``{"GPU": 1}`` to pin it to GPU workers; writing anywhere). ``on_done`` is called as each unit finishes.
    Units already done are skipped; the first failure is raised (finished units keep their markers)."""
    pending = {str(r) for r in _store(plan, storage_options).pending([u.region for u in units])}
    todo = [u for u in units if str(u.region) in pending]
    reports: list[UnitReport] = []
    if client is None:
        for unit in todo:
            reports.append(write_unit(plan, unit, sample_unit(plan, unit, storage_options), storage_options))
            if on_done:
                on_done(reports[-1])
        return reports
    from distributed import as_completed

    futures = [submit_unit(client, plan, u, storage_options, resources) for u in todo]
    for fut in as_completed(futures):
        reports.append(fut.result())
        if on_done:
            on_done(reports[-1])
    return reports


def submit_unit(
    client: Any,
    plan: DownscalePlan,
    unit: WorkUnit,
    storage_options: dict[str, Any] | None = None,
    resources: Mapping[str, float] | None = None,
) -> Any:
    """Dask futures of one unit: sampling (with ``resources``) then writing (anywhere); the write's future."""
    tag = f"{plan.name}-{unit.label.replace(' ', '-')}-{plan.out_key}-{os.urandom(4).hex()}"
    options = for_workers(storage_options)  # secrets stay in the environment (each worker has its own)
    sampled = client.submit(
        sample_unit,
        plan,
        unit,
        options,
        resources=dict(resources) if resources else None,
        pure=False,
        key=f"downscale-sample-{tag}",
    )
    return client.submit(write_unit, plan, unit, sampled, options, pure=False, key=f"downscale-write-{tag}")


def finalize_downscale(
    plan: DownscalePlan, storage_options: dict[str, Any] | None = None, reports: Sequence[UnitReport] = ()
) -> str:
    """Mark the member store complete (every unit written) with its provenance record; its URL."""
    store = _store(plan, storage_options)
    if store.is_complete():
        return plan.out_url
    workers = {}
    for r in reports:
        workers.setdefault(
            f"{r.worker or 'local'} {r.device}",
            {"worker": r.worker, "device": r.device, "hardware": r.hardware},
        )
    inputs = [
        {"store": public_url(plan.fine_url), "content_key": plan.fine_key, "role": "coarse on fine grid"},
        {"store": public_url(plan.static_url), "content_key": plan.static_key, "role": "static"},
    ]
    if plan.coarse_url:
        inputs.append(
            {"store": public_url(plan.coarse_url), "content_key": plan.coarse_key, "role": "coarse"}
        )
    if plan.fit_coarse_url:
        inputs.append({"store": public_url(plan.fit_coarse_url), "role": "bias correction fitted on"})
    fitted = None
    if plan.fit is not None:  # what the fitted method learned (e.g. a bias correction), when it says
        fitted = getattr(_method(plan, storage_options), "fitted", lambda: None)()
    record = stage_record(
        "downscale",
        store=public_url(plan.out_url),
        key=plan.out_key,
        config=plan.config,
        started=plan.started,
        inputs=inputs,
        upstream=plan.upstream,
        checkpoint=plan.description.get("checkpoint"),
        method={k: v for k, v in plan.description.items() if k != "checkpoint"},
        base_seed=plan.config.seed,
        seeds=plan.description.get("seeds", "deterministic"),
        workers=list(workers.values()),
        units_this_run=len(reports),
        **({"fitted": fitted} if fitted else {}),
        sample_seconds_this_run=round(sum(r.sample_seconds for r in reports), 3),
    )
    store.finalize(
        [u.region for u in plan.units()], attrs={"climrecon_provenance": json.dumps(record, sort_keys=True)}
    )
    return plan.out_url


def run_downscale(
    plan: DownscalePlan,
    storage_options: dict[str, Any] | None = None,
    client: Any = None,
    resources: Mapping[str, float] | None = None,
) -> tuple[str, list[UnitReport]]:
    """Write (or finish) the member store of ``plan``: template, pending units, finalize. URL + reports."""
    pending = prepare_downscale(plan, storage_options)
    reports = run_units(plan, pending, storage_options, client, resources)
    return finalize_downscale(plan, storage_options, reports), reports
