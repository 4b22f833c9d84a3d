"""Evaluate stage: the perfect-model protocol, scored with every metric, for every method and factor.

Protocol (Vandal et al. / ZSSD / DPDM "perfect model"): take a fine truth, area-average it by each
``factor`` (:func:`climrecon.tasks.regrid.coarsen_blocks`), downscale the coarse field back to the fine grid
with every method through the one :class:`~climrecon.methods.baselines.Downscaler` interface, and compare with
the truth on HELD-OUT years only. Baselines are fitted on the training years (truth coarsened by the same
factor and the truth itself); the diffusion model was trained elsewhere on perfect-model pairs, and the
evaluation refuses a checkpoint whose recorded training or validation years overlap the held-out years.

Contract:
- :func:`run_evaluation` ``(ClimReconConfig) -> EvaluationResult``: tidy ``records``, one per
  method x factor x variable x ensemble size, each with every scalar of
  :func:`climrecon.tasks.metrics.evaluate_all` (mae, rmse, bias, acc, ssim, psnr, q99_error, crps, crps_fair,
  spread_skill_ratio, log_spectral_distance, wasserstein; NaN where a metric does not apply, e.g. the
  spread-skill ratio of one member); plus what the figures need (maps of the first scored month, power
  spectra, rank histograms) at the "figure factor" (the smallest factor an ensemble method serves, else
  the first factor).
- ACC anomalies are taken against the truth's monthly climatology of the TRAINING years.
- Inputs at each factor: the coarsened held-out truth, its bilinear view on the fine grid, and the static
  fields with the ``<name>_coarse`` views the methods need (``needs.static``), made through the same
  coarse grid. Member ``m`` of month ``t`` is the same field whatever the ensemble size, so the k-member
  ensemble is the first k of the largest.
- Writers: :func:`records_frame` (pandas), :func:`write_records_csv`, :func:`evaluation_document` /
  :func:`write_json`, :func:`markdown_report` (tables shaped like the papers: ZSSD's MAE/RMSE per factor
  per method; DPDM Table 1's RMSE/ACC/SSIM/PSNR per variable per method and ensemble size; the
  probabilistic and distributional scores), :func:`write_figures` (PNGs via :mod:`climrecon.tasks.plots`).
"""

from __future__ import annotations

import functools
import json
import math
import time as _time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import xarray as xr

from climrecon.catalogs.sample import STATIC_SOURCE_ID, SYNTHETIC_SOURCE_ID
from climrecon.config import ClimReconConfig, EvaluateConfig, MethodConfig, SamplerConfig
from climrecon.methods import Inputs, Method, MethodError, build
from climrecon.methods.features import perfect_model_coarse, with_coarse_static
from climrecon.storage import is_remote, public_url, resolve_storage_options
from climrecon.tasks import metrics, plots
from climrecon.tasks.grids import Grid
from climrecon.tasks.regrid import coarsen_blocks
from climrecon.tasks.training_data import open_truth, select_years, static_for_truth, time_stamps

__all__ = [
    "EvaluationError",
    "METRICS",
    "METRIC_LABELS",
    "MAP_REFERENCE",
    "EvaluationResult",
    "MethodFactory",
    "open_evaluation_truth",
    "evaluation_static_url",
    "heldout_months",
    "method_factory",
    "perfect_model_inputs",
    "spread_months",
    "use_threads",
    "heldout_inputs",
    "time_label",
    "run_evaluation",
    "records_frame",
    "write_records_csv",
    "evaluation_document",
    "write_json",
    "markdown_report",
    "write_figures",
    "output_directory",
]

METRIC_LABELS = {
    "mae": "MAE",
    "rmse": "RMSE",
    "bias": "bias",
    "acc": "ACC",
    "ssim": "SSIM",
    "psnr": "PSNR [dB]",
    "q99_error": "q99 error",
    "crps": "CRPS",
    "crps_fair": "fair CRPS",
    "spread_skill_ratio": "spread/skill",
    "log_spectral_distance": "LSD [dB]",
    "wasserstein": "W1",
}
METRICS = tuple(METRIC_LABELS)
MAP_REFERENCE = "bilinear"  # the one deterministic method drawn beside the truth and the ensembles' members
_TIME_CODER = xr.coders.CFDatetimeCoder(use_cftime=True)


class EvaluationError(ValueError):
    """The evaluation cannot run as configured; the message names the store, field or checkpoint at fault."""


# -- inputs --------------------------------------------------------------------------------------------------
def _catalog(cfg: ClimReconConfig) -> str:
    return cfg.evaluate.catalog or str(cfg.sample_catalog())


def _catalog_store(catalog: str, source_id: str, what: str) -> str:
    from climrecon.catalogs.esmcat import CatalogError, read_rows

    try:
        rows = read_rows(catalog)
    except (CatalogError, FileNotFoundError, OSError) as exc:
        raise EvaluationError(
            f"cannot read catalog {catalog} for the default {what} ({exc}); build it with "
            f"`climrecon catalog build-sample` or set evaluate.{what}"
        ) from None
    paths = sorted({r["path"] for r in rows if r.get("source_id") == source_id})
    if len(paths) != 1:
        raise EvaluationError(
            f"catalog {catalog} lists {len(paths)} store(s) for source_id {source_id!r}; set evaluate.{what}"
        )
    return paths[0].removeprefix("file://")


def open_evaluation_truth(
    cfg: ClimReconConfig, storage_options: dict[str, Any] | None = None
) -> tuple[xr.Dataset, dict[str, Any]]:
    """The fine truth (lazy; ``evaluate.variables`` only) and a description of where it came from.

    ``evaluate.truth``: a Zarr store (any URL) or a netCDF file (``.nc``); else ``evaluate.truth_query``
    run on ``evaluate.catalog`` (exactly one dataset must match); else the sample catalog's synthetic
    reanalysis.
    """
    ev = cfg.evaluate
    variables = cfg.evaluate_variables()
    if ev.truth and str(ev.truth).endswith((".nc", ".nc4", ".netcdf")):
        try:
            ds = xr.open_dataset(ev.truth, decode_times=_TIME_CODER, chunks={})
        except FileNotFoundError:
            raise EvaluationError(f"evaluate.truth: no netCDF file at {ev.truth}") from None
        source = {"truth": public_url(ev.truth), "how": "netCDF file"}
    elif ev.truth or not ev.truth_query:
        url = ev.truth or _catalog_store(_catalog(cfg), SYNTHETIC_SOURCE_ID, "truth")
        try:
            ds = open_truth(url, variables, storage_options)
        except ValueError as exc:
            raise EvaluationError(f"evaluate.truth: {exc}") from None
        source = {
            "truth": public_url(url),
            "how": "zarr store" if ev.truth else "sample catalog (synthetic reanalysis)",
        }
    else:
        from climrecon.catalogs.esmcat import CatalogError, open_datasets

        try:
            found = open_datasets(
                _catalog(cfg), storage_options=storage_options, **ev.truth_query.search_terms()
            )
        except CatalogError as exc:
            raise EvaluationError(f"evaluate.truth_query: {exc}") from None
        if len(found) != 1:
            raise EvaluationError(
                f"evaluate.truth_query matches {len(found)} datasets {sorted(found)} in {_catalog(cfg)}; "
                "narrow it to one"
            )
        ((key, ds),) = found.items()
        source = {
            "truth": key,
            "how": f"catalog query {ev.truth_query.search_terms()} in {public_url(_catalog(cfg))}",
        }
    missing = [v for v in variables if v not in ds.data_vars]
    if missing:
        raise EvaluationError(
            f"truth {source['truth']} lacks evaluate.variables {missing}; "
            f"it has {sorted(map(str, ds.data_vars))}"
        )
    source["synthetic"] = str(ds.attrs.get("synthetic", "false")).lower() == "true"
    source["title"] = str(ds.attrs.get("title", ""))
    return ds[variables], source


def evaluation_static_url(cfg: ClimReconConfig) -> str:
    """``evaluate.static``, or the global static store of the (sample) catalog."""
    return cfg.evaluate.static or _catalog_store(_catalog(cfg), STATIC_SOURCE_ID, "static")


def heldout_months(truth: xr.Dataset, ev: EvaluateConfig) -> xr.Dataset:
    """Every ``month_stride``-th month of the held-out years (all of them must be in the truth)."""
    held = select_years(truth, ev.heldout_years, "truth (evaluate.heldout_years)")
    return held.isel(time=slice(None, None, ev.month_stride))


@dataclass
class FactorData:
    """What the evaluation scores at one factor: the training and held-out truth (loaded float32) on a grid
    that tiles the factor, the static fields there (or None), the valid-cell mask (or None) and the time step."""

    train: xr.Dataset
    held: xr.Dataset
    grid: Grid
    static: xr.Dataset | None
    mask: xr.DataArray | None
    time_step: str = "month"


def evaluation_data(
    cfg: ClimReconConfig,
    variables: Sequence[str],
    storage_options: dict[str, Any] | None = None,
    *,
    with_static: bool = True,
) -> tuple[Callable[[int], FactorData], dict[str, Any]]:
    """``(data_at(factor), source)``: the truth split into training and held-out times at each factor.

    With a ``data:`` section (the user's own fine data, :mod:`climrecon.tasks.fine_data`): its ``train`` and
    ``heldout`` selections (every ``evaluate.month_stride``-th held-out step), cropped or padded to tile each
    factor (``data.domain``), its mask, its own static fields or the catalog's. Else ``evaluate.truth`` /
    ``truth_query`` / the sample's synthetic reanalysis, ``evaluate.train_years`` / ``heldout_years``; every
    factor must tile the grid."""
    ev = cfg.evaluate
    if cfg.data is not None:
        from climrecon.tasks.fine_data import FineDataError, fine_static, open_fine_data

        try:
            fine = open_fine_data(cfg.data, storage_options)
        except FineDataError as exc:
            raise EvaluationError(f"data: {exc}") from None
        missing = [v for v in variables if v not in fine.variables]
        if missing:
            raise EvaluationError(f"evaluate.variables {missing} are not in data.variables {fine.variables}")
        source = {"truth": fine.source.get("url", ""), "how": "data: section", "fine_data": fine.source}
        source["synthetic"] = str(fine.ds.attrs.get("synthetic", "false")).lower() == "true"
        source["title"] = str(fine.ds.attrs.get("title", ""))

        def at(factor: int) -> FactorData:
            try:
                here = fine.for_factor(factor)
                splits = here.splits(cfg.data)
                static = (
                    fine_static(here, cfg.data.static or evaluation_static_url(cfg), storage_options)
                    if with_static
                    else None
                )
            except FineDataError as exc:
                raise EvaluationError(f"data: {exc}") from None
            held = splits["heldout"].isel(time=slice(None, None, ev.month_stride))
            mask = None if bool(here.mask.all()) else here.mask
            return FactorData(
                splits["train"][list(variables)].astype("float32").load(),
                held[list(variables)].astype("float32").load(),
                here.grid,
                static,
                mask,
                here.time_step,
            )

        return functools.cache(at), source

    truth, source = open_evaluation_truth(cfg, storage_options)
    grid = Grid.from_dataset(truth, "truth")
    bad = [f for f in ev.factors if grid.nlat % f or grid.nlon % f]
    if bad:
        raise EvaluationError(
            f"evaluate.factors {bad} do not tile the truth grid "
            f"({grid.nlat} x {grid.nlon} cells of {grid.dlat:g} deg); use factors dividing both, or describe "
            "the truth in a data: section (data.domain: crop or pad)"
        )
    train = select_years(truth, ev.train_years, "truth (evaluate.train_years)").astype("float32").load()
    held = heldout_months(truth, ev).astype("float32").load()
    static = static_for_truth(evaluation_static_url(cfg), held, storage_options) if with_static else None
    shared = FactorData(train, held, grid, static, None)

    return (lambda factor: shared), source


MethodFactory = Callable[[int], Method | None]
"""``factory(factor)`` -> the Method to score at that factor (fitted there), or None where it does not apply."""


def method_factory(config: MethodConfig, sampler: SamplerConfig) -> MethodFactory:
    """The factory of a configured method: one instance for a pretrained method (only at the factors it
    serves), a fresh instance per factor for a fitted one."""
    try:
        shared = build(config, sampler)
    except MethodError as exc:
        raise EvaluationError(f"evaluate.methods {config.name!r}: {exc}") from None

    def factory(factor: int) -> Method | None:
        if shared.needs.factors and factor not in shared.needs.factors:
            return None
        return build(config, sampler) if shared.needs.fit else shared

    return factory


# -- the protocol --------------------------------------------------------------------------------------------
@dataclass
class EvaluationResult:
    """Records and figure data of one evaluation (see the module docstring)."""

    records: list[dict[str, Any]]
    config: dict[str, Any]
    source: dict[str, Any]
    fine_resolution: float
    units: dict[str, str]
    figure_factor: int
    months: list[str]
    timings: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    methods: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> describe()
    maps: dict[str, dict[str, xr.DataArray]] = field(default_factory=dict, repr=False)
    spreads: dict[str, xr.DataArray] = field(default_factory=dict, repr=False)
    spectra: dict[str, dict[str, xr.DataArray]] = field(default_factory=dict, repr=False)
    rank_histograms: dict[str, xr.DataArray] = field(default_factory=dict, repr=False)


def _label(method: str, members: int, stochastic: bool) -> str:
    return f"{method} (N={members})" if stochastic else method


def _check_unseen(name: str, description: Mapping[str, Any], held: xr.Dataset) -> None:
    """Refuse a trained method that saw any of the held-out time steps (its checkpoint's ``seen_periods``,
    or its years for checkpoints that record years only)."""
    runs = description.get("seen_periods") or ()
    if runs:
        shared = [t for t in time_stamps(held["time"].values) if any(a <= t <= b for a, b in runs)]
        if shared:
            raise EvaluationError(
                f"method {name} ({description.get('report', '')}) was trained/validated on {len(shared)} of the "
                f"held-out time steps (the first {_stamp(shared[0])}): its scores would not be out-of-sample"
            )
        return
    years = [t.year for t in held["time"].values]
    h0, h1 = min(years), max(years)
    for a, b in description.get("years_seen", ()):
        if a <= h1 and h0 <= b:
            raise EvaluationError(
                f"method {name} ({description.get('report', '')}) was trained/validated on years {a}-{b}, which "
                f"overlap the held-out years {h0}-{h1}: its scores would not be out-of-sample"
            )


def perfect_model_inputs(
    coarse: xr.Dataset,
    grid: Grid,
    static_fine: xr.Dataset | None,
    views: Sequence[str],
    *,
    time_step: str = "month",
    mask: xr.DataArray | None = None,
    truth_view: bool = True,
) -> Inputs:
    """Inputs of coarsened truth on ``grid``: the coarse fields, their bilinear view, the static fields plus
    the ``<name>_coarse`` views of ``views`` through the coarse grid (as training builds them), the time
    step and the valid-cell mask of the truth. ``truth_view``: the coarse fields are the truth's own view (a
    bias correction leaves them as they are); False for another source (a GCM) on the same path."""
    if static_fine is not None and views:
        static_fine = with_coarse_static(static_fine, Grid.from_dataset(coarse, "coarse input"), views)
    return Inputs.from_coarse(
        coarse, grid, static_fine, time_step=time_step, mask=mask, truth_view=truth_view
    )


def spread_months(n_available: int, n: int) -> np.ndarray:
    """``n`` month indices spread evenly over ``n_available`` (all of them if ``n >= n_available``)."""
    if n >= n_available:
        return np.arange(n_available)
    return np.unique(np.round(np.linspace(0, n_available - 1, n)).astype(int))


def use_threads(threads: int | None) -> None:
    """Set torch's CPU intra-op threads to ``threads`` (``None``: leave torch's own choice). Evaluation-like
    work takes ``evaluate.threads``: oversubscribed CPUs make multi-threaded small convolutions crawl."""
    if threads:
        torch.set_num_threads(threads)


def heldout_inputs(
    method: Method, truth_url: str, static_url: str, years: tuple[int, int], n_months: int | None
) -> tuple[xr.Dataset, Inputs]:
    """(truth, the method's inputs) for ``n_months`` months spread over ``years`` (``None``: every time step
    of those years), coarsened by the method's factor."""
    variables = list(method.describe()["variables"])
    truth = select_years(open_truth(truth_url, variables), years, f"truth store {truth_url}")
    available = truth.sizes["time"]
    n = available if n_months is None else n_months
    truth = truth.isel(time=spread_months(available, n)).astype("float32").load()
    (factor,) = method.needs.factors
    views = [n.removesuffix("_coarse") for n in method.needs.static if n.endswith("_coarse")]
    grid = Grid.from_dataset(truth, "truth")
    inputs = perfect_model_inputs(
        coarsen_blocks(truth, factor), grid, static_for_truth(static_url, truth), views
    )
    return truth, inputs


def data_section_inputs(
    method: Method,
    cfg: ClimReconConfig,
    split: str,
    n_steps: int | None,
    storage_options: dict[str, Any] | None = None,
) -> tuple[xr.Dataset, Inputs]:
    """(truth, the method's inputs) for ``n_steps`` time steps spread over the ``split`` selection
    (``"train"``, ``"validation"`` or ``"heldout"``) of ``cfg``'s ``data:`` section (``None``: all of them),
    as the evaluation builds them: the grid cropped or padded to tile the method's factor, the data's
    valid-cell mask, its own static fields or the catalog's. Raises EvaluationError naming the section when
    the split is not configured or the data cannot be read."""
    from climrecon.tasks.fine_data import FineDataError, fine_static, open_fine_data

    if cfg.data is None:
        raise EvaluationError("no data: section in the config")
    if getattr(cfg.data, split, None) is None:
        raise EvaluationError(
            f"data.{split} is not set: add it to the data: section, e.g. {split}: {{years: [2006, 2010]}} "
            "(time steps the checkpoint was not trained on and the evaluation does not score)"
        )
    variables = list(method.describe()["variables"])
    (factor,) = method.needs.factors
    try:
        here = open_fine_data(cfg.data, storage_options).for_factor(factor)
        missing = [v for v in variables if v not in here.variables]
        if missing:
            raise EvaluationError(
                f"the method's variables {missing} are not in data.variables {here.variables}"
            )
        steps = here.splits(cfg.data)[split]
        n = steps.sizes["time"] if n_steps is None else n_steps
        truth = steps[variables].isel(time=spread_months(steps.sizes["time"], n)).astype("float32").load()
        static = fine_static(here, cfg.data.static or evaluation_static_url(cfg), storage_options)
    except FineDataError as exc:
        raise EvaluationError(f"data: {exc}") from None
    views = [v.removesuffix("_coarse") for v in method.needs.static if v.endswith("_coarse")]
    inputs = perfect_model_inputs(
        perfect_model_coarse(truth, factor),
        here.grid,
        static,
        views,
        time_step=here.time_step,
        mask=None if bool(here.mask.all()) else here.mask,
    )
    return truth, inputs


def _stamp(t: int) -> str:
    """``YYYYMMDDHH`` -> ``YYYY-MM-DDTHH``."""
    return f"{t // 1_000_000:04d}-{t // 10_000 % 100:02d}-{t // 100 % 100:02d}T{t % 100:02d}"


def time_label(t: Any, time_step: str) -> str:
    """``t`` as the evaluation labels it: ``YYYY-MM``, ``YYYY-MM-DD`` for daily and ``YYYY-MM-DDTHH`` for hourly steps."""
    if time_step in ("day", "hour"):
        return f"{t.year:04d}-{t.month:02d}-{t.day:02d}" + (f"T{t.hour:02d}" if time_step == "hour" else "")
    return f"{t.year:04d}-{t.month:02d}"


def run_evaluation(
    cfg: ClimReconConfig,
    *,
    methods: Mapping[str, MethodFactory] | None = None,
    storage_options: dict[str, Any] | None = None,
    log: Callable[[str], None] | None = None,
) -> EvaluationResult:
    """The perfect-model protocol of ``cfg.evaluate`` (module docstring); ``methods`` replaces the
    configured methods by name -> factory (any :class:`~climrecon.methods.Method`), e.g. to score a new one."""
    ev = cfg.evaluate
    say = log or (lambda _msg: None)
    use_threads(ev.threads)
    variables = cfg.evaluate_variables()
    factories = (
        dict(methods) if methods is not None else {m.key: method_factory(m, cfg.sampler) for m in ev.methods}
    )
    cases = {(m, f): factory(f) for m, factory in factories.items() for f in ev.factors}
    needs_static = any(d is not None and d.needs.static for d in cases.values())
    t0 = _time.perf_counter()
    storage_options = resolve_storage_options(storage_options)  # this process's secrets (a worker's own)
    data_at, source = evaluation_data(cfg, variables, storage_options, with_static=needs_static)
    first = data_at(ev.factors[0])
    descriptions: dict[str, dict[str, Any]] = {}
    for (name, _), method in cases.items():
        if method is not None and name not in descriptions:
            descriptions[name] = method.describe()
            _check_unseen(name, descriptions[name], first.held)
    say(
        f"truth {source['truth']}: {first.train.sizes['time']} training steps, "
        f"{first.held.sizes['time']} held-out steps scored"
    )
    timings: list[dict[str, Any]] = [
        {"step": "load truth, climatology, static", "seconds": round(_time.perf_counter() - t0, 2)}
    ]
    grid = first.grid
    stochastic_factors = [f for (_, f), d in cases.items() if d is not None and d.needs.stochastic]
    figure_factor = min(stochastic_factors) if stochastic_factors else ev.factors[0]
    result = EvaluationResult(
        records=[],
        config=ev.model_dump(mode="json"),
        source=source,
        fine_resolution=grid.dlat,
        units={v: str(first.held[v].attrs.get("units", "")) for v in variables},
        figure_factor=figure_factor,
        months=[time_label(t, first.time_step) for t in first.held["time"].values],
        timings=timings,
        methods=descriptions,
    )
    for method in factories:
        skipped = [f"x{f}" for f in ev.factors if cases[method, f] is None]
        served = [f"x{f}" for f in ev.factors if cases[method, f] is not None]
        if skipped:
            why = f"it serves {', '.join(served)} only" if served else "it serves none of evaluate.factors"
            result.notes.append(f"{method}: not run at {', '.join(skipped)} ({why})")
    for factor in ev.factors:
        here = data_at(factor)
        train, held, static_fine = here.train, here.held, here.static
        # ACC anomalies against the training climatology; a calendar month the training times lack has none
        climatology = metrics.monthly_climatology(train).reindex(month=range(1, 13))
        coarse_train, coarse_held = perfect_model_coarse(train, factor), perfect_model_coarse(held, factor)
        active = {m: cases[m, factor] for m in factories if cases[m, factor] is not None}
        views = sorted(
            {
                n.removesuffix("_coarse")
                for d in active.values()
                for n in d.needs.static
                if n.endswith("_coarse")
            }
        )
        inputs = perfect_model_inputs(
            coarse_held, here.grid, static_fine, views, time_step=here.time_step, mask=here.mask
        )
        for method, downscaler in active.items():
            stochastic = downscaler.needs.stochastic
            sizes = sorted(ev.ensemble_sizes) if stochastic else [1]
            t_fit = _time.perf_counter()
            try:
                downscaler.fit(coarse_train, train)
                t_run = _time.perf_counter()
                fields = inputs.masked(downscaler.downscale(inputs, members=sizes[-1], seed=ev.seed)).load()
            except MethodError as exc:
                raise EvaluationError(f"{method} at x{factor}: {exc}") from None
            t_done = _time.perf_counter()
            names = [v for v in variables if v in fields.data_vars]
            for k in sizes:
                forecast = fields[names].isel(member=slice(0, k))
                scores = metrics.evaluate_all(forecast, held[names], climatology=climatology[names])
                for v in names:
                    row = {
                        m: float(scores[v].sel(metric=m)) if m in scores["metric"] else math.nan
                        for m in METRICS
                    }
                    result.records.append(
                        {
                            "method": method,
                            "factor": factor,
                            "coarse_resolution": here.grid.dlat * factor,
                            "variable": v,
                            "members": k,
                            "stochastic": stochastic,
                            **row,
                        }
                    )
            result.timings.append(
                {
                    "step": f"{method} x{factor}",
                    "fit_seconds": round(t_run - t_fit, 2),
                    "downscale_seconds": round(t_done - t_run, 2),
                    "members": sizes[-1],
                    "months": held.sizes["time"],
                }
            )
            say(
                f"{method} x{factor}: fit {t_run - t_fit:.1f} s, "
                f"downscale {t_done - t_run:.1f} s ({sizes[-1]} member(s))"
            )
            if factor == figure_factor:
                _keep_figure_data(result, method, fields, held, names, stochastic)
    return result


def _keep_figure_data(
    result: EvaluationResult,
    method: str,
    fields: xr.Dataset,
    held: xr.Dataset,
    names: Sequence[str],
    stochastic: bool,
) -> None:
    """Maps of the first scored month (truth, the bilinear reference, member 0 of each ensemble method and
    the ensemble spread), power spectra of every method, rank histograms of each ensemble."""
    label = _label(method, fields.sizes["member"], stochastic)
    for v in names:
        truth_v = held[v]
        maps = result.maps.setdefault(v, {"truth": truth_v.isel(time=0)})
        if stochastic or method == MAP_REFERENCE:
            maps[f"{method} (member 0)" if stochastic else method] = (
                fields[v].isel(member=0, time=0).assign_attrs(truth_v.attrs)
            )
        spectra = result.spectra.setdefault(v, {"truth": metrics.power_spectrum(truth_v)})
        spectra[label] = metrics.power_spectrum(fields[v].assign_attrs(truth_v.attrs))
        if stochastic and fields.sizes["member"] >= 2:
            result.spreads[v] = (
                fields[v]
                .isel(time=0)
                .std("member", ddof=1)
                .assign_attrs(units=truth_v.attrs.get("units", ""))
            )
            result.rank_histograms[v] = metrics.rank_histogram(fields[v], truth_v, seed=0)


# -- tables --------------------------------------------------------------------------------------------------
def records_frame(result: EvaluationResult) -> pd.DataFrame:
    """One row per method x factor x variable x members, every metric a column."""
    cols = ["method", "factor", "coarse_resolution", "variable", "members", "stochastic", *METRICS]
    return pd.DataFrame(result.records, columns=cols)


def write_records_csv(result: EvaluationResult, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    records_frame(result).to_csv(path, index=False, float_format="%.6g")
    return path


def _finite(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_finite(v) for v in x]
    return x


def evaluation_document(result: EvaluationResult) -> dict[str, Any]:
    """The JSON-able record of an evaluation: config, source, checkpoint, months, records (NaN -> null)."""
    return _finite(
        {
            "protocol": (
                "perfect model: fine truth area-averaged by each factor, downscaled back, "
                "scored on held-out years"
            ),
            "config": result.config,
            "source": result.source,
            "fine_resolution_deg": result.fine_resolution,
            "units": result.units,
            "months_scored": result.months,
            "figure_factor": result.figure_factor,
            "timings": result.timings,
            "notes": result.notes,
            "methods": result.methods,
            "records": result.records,
        }
    )


def write_json(result: EvaluationResult, path: str | Path, extra: Mapping[str, Any] | None = None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {**evaluation_document(result), **_finite(dict(extra or {}))}
    path.write_text(json.dumps(doc, indent=2, sort_keys=True, default=str) + "\n")
    return path


def _fmt(x: Any) -> str:
    """4 significant digits; an em dash for a missing or non-finite value."""
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "—"
    return f"{x:.4g}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], text_columns: int = 1) -> list[str]:
    """A Markdown table: the first ``text_columns`` left-aligned, the numbers right-aligned."""
    align = ["---"] * text_columns + ["---:"] * (len(header) - text_columns)
    out = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out


def _rows_order(df: pd.DataFrame) -> list[tuple[str, int]]:
    """(method, members) in config order: baselines, then each stochastic method by ensemble size."""
    seen = df[["method", "members"]].drop_duplicates()
    order = {m: i for i, m in enumerate(dict.fromkeys(df["method"]))}
    return sorted(
        ((m, int(k)) for m, k in seen.itertuples(index=False)), key=lambda mk: (order[mk[0]], mk[1])
    )


def markdown_report(result: EvaluationResult, title: str = "Perfect-model evaluation") -> str:
    """Markdown tables (module docstring); every number is a record value to 4 significant digits."""
    df = records_frame(result)
    stochastic = dict(zip(df["method"], df["stochastic"], strict=False))
    res = result.fine_resolution
    lines = [f"# {title}", ""]
    src = result.source
    kind = "SYNTHETIC reanalysis (not observations)" if src.get("synthetic") else "fine truth"
    cfg = result.config
    (t0, t1), (h0, h1) = cfg["train_years"], cfg["heldout_years"]
    truth = f"Truth: {kind} `{src.get('truth')}` ({src.get('how')}), {res:g}° grid"
    scored = f"{len(result.months)} held-out months ({result.months[0]} .. {result.months[-1]}"
    lines += [
        f"{truth}; variables {', '.join(result.units)}.",
        f"Baselines fitted on {t0}-{t1}; scored on {scored}, every {cfg['month_stride']}th of {h0}-{h1}).",
        "Deterministic scores of an ensemble are those of its mean; SSIM/PSNR/q99/LSD/W1 use every member.",
        "",
    ]
    if result.methods:
        lines += ["Methods:", "", *[f"- {d.get('report', name)}" for name, d in result.methods.items()], ""]
    factors = sorted(df["factor"].unique())
    # (a) ZSSD-style: MAE / RMSE per factor per method
    lines += ["## (a) MAE / RMSE by coarsening factor (ZSSD-style)", ""]
    for v in dict.fromkeys(df["variable"]):
        sub = df[df["variable"] == v]
        header = ["method"] + [f"x{f} ({f * res:g}°) {m}" for f in factors for m in ("MAE", "RMSE")]
        rows = []
        for method, k in _rows_order(sub):
            row = [_label(method, k, stochastic[method])]
            for f in factors:
                hit = sub[(sub["method"] == method) & (sub["members"] == k) & (sub["factor"] == f)]
                row += [_fmt(float(hit[m].iloc[0])) if len(hit) else "—" for m in ("mae", "rmse")]
            rows.append(row)
        lines += [f"**{v}** [{result.units.get(v, '')}]", "", *_table(header, rows), ""]
    # (b) DPDM Table-1 style and (c) probabilistic / distributional, per factor
    groups = {
        "(b) RMSE / ACC / SSIM / PSNR per variable and method (DPDM Table-1 style)": (
            "rmse",
            "acc",
            "ssim",
            "psnr",
        ),
        "(c) Probabilistic and distributional scores": (
            "crps",
            "crps_fair",
            "spread_skill_ratio",
            "q99_error",
            "log_spectral_distance",
            "wasserstein",
            "bias",
        ),
    }
    for heading, cols in groups.items():
        lines += [f"## {heading}", ""]
        for f in factors:
            sub = df[df["factor"] == f]
            header = ["variable", "method", "N"] + [METRIC_LABELS[m] for m in cols]
            rows = []
            for v in dict.fromkeys(sub["variable"]):
                for method, k in _rows_order(sub[sub["variable"] == v]):
                    hit = sub[
                        (sub["variable"] == v) & (sub["method"] == method) & (sub["members"] == k)
                    ].iloc[0]
                    rows.append([v, method, str(k)] + [_fmt(float(hit[m])) for m in cols])
            lines += [f"**x{f}** ({res:g}° from {f * res:g}°)", "", *_table(header, rows, text_columns=3), ""]
    units = ", ".join(f"{v} [{u}]" for v, u in result.units.items())
    lines += [
        (
            f"Units: MAE, RMSE, bias, CRPS, q99 error and W1 in the variable's units ({units}); "
            "ACC, SSIM, spread/skill unitless; PSNR and LSD in dB."
        ),
        "",
    ]
    if result.notes:
        lines += ["## Notes", "", *[f"- {n}" for n in result.notes], ""]
    return "\n".join(lines)


# -- figures -------------------------------------------------------------------------------------------------
def write_figures(result: EvaluationResult, directory: str | Path) -> list[Path]:
    """PNGs at the figure factor: per variable, maps (truth / methods / spread), power spectra and, for an
    ensemble, the rank histogram. Returns the paths written."""
    directory = Path(directory)
    f = result.figure_factor
    written = []
    for v, panels in result.maps.items():
        units = result.units.get(v, "")
        shown = {name: da.assign_attrs(units=units, long_name=v) for name, da in panels.items()}
        written.append(
            plots.plot_maps(
                shown,
                directory / f"maps_{v}_x{f}.png",
                spread=result.spreads.get(v),
                title=f"{v}, {result.months[0]}: truth and x{f} downscaled from "
                f"{f * result.fine_resolution:g}°",
            )
        )
    for v, spectra in result.spectra.items():
        shown = {
            name: p.assign_attrs(units=f"({result.units.get(v, '1')})^2 per Fourier mode")
            for name, p in spectra.items()
        }
        written.append(
            plots.plot_power_spectra(
                shown,
                directory / f"spectra_{v}_x{f}.png",
                title=f"{v} power spectra, x{f}, {len(result.months)} held-out months",
            )
        )
    for v, counts in result.rank_histograms.items():
        written.append(
            plots.plot_rank_histogram(
                counts,
                directory / f"rank_histogram_{v}_x{f}.png",
                title=f"{v}: rank of truth in the {counts.size - 1}-member ensemble (x{f})",
            )
        )
    return written


def output_directory(cfg: ClimReconConfig) -> Path:
    """``evaluate.output``, or ``<storage.root>/evaluate`` (tables and PNGs go to a local directory)."""
    if cfg.evaluate.output:
        return Path(cfg.evaluate.output)
    if is_remote(cfg.storage.root):
        raise EvaluationError(
            f"storage.root {public_url(cfg.storage.root)} is remote; "
            "set evaluate.output to a local directory for the tables and figures"
        )
    return Path(cfg.storage.root.removeprefix("file://")) / "evaluate"
