"""A reconstruction against fine truth: does the downscaled climatology add value over interpolation?

A reconstruction driven by a free-running GCM cannot match the truth month by month (its weather is its
own), so its skill is judged on climatologies over the months both share (the "added value" analysis of
Di Luca et al. 2012, Clim. Dyn.): the time mean of the ensemble mean against the time mean of the truth,
whole and split into

* the large scale: block means over the run's coarse cells (``factor x factor`` fine cells), which the
  GCM sets and downscaling should leave alone (its bias there is the GCM's), and
* the fine scale: the time mean minus its block means, i.e. what the coarse grid cannot carry (lapse
  rates, land-sea contrast, terrain-steered winds): the part downscaling exists to add.

Each is scored for the downscaled ensemble mean and for the interpolated input (the regridded fine
store: the GCM's coarse field, bilinearly interpolated) with latitude-weighted bias, RMSE and pattern
correlation (:mod:`climrecon.tasks.metrics`). Month-matched MAE is reported too, labelled as meaningful
only when the run's source is the truth itself (a perfect-model or reanalysis-driven run).

Public API: :func:`score_reconstruction` (everything the reconstruct flow scores, as plain data and
files), :func:`reconstruction_truth`, :func:`matching_truth` (truth on the reconstruction's months and grid),
:func:`split_scales`, :func:`climatologies` (every input read once), :func:`added_value_records`,
:func:`added_value_markdown`, and
:func:`reconstruction_fields` (the three inputs from the store URLs of a run).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import dask
import numpy as np
import xarray as xr

from climrecon.storage import url_options
from climrecon.tasks import metrics
from climrecon.tasks.regrid import coarsen_blocks

__all__ = [
    "AddedValueError",
    "reconstruction_truth",
    "score_reconstruction",
    "matching_truth",
    "split_scales",
    "Climatologies",
    "climatologies",
    "added_value_records",
    "added_value_markdown",
    "reconstruction_fields",
]

_SPATIAL = ("lat", "lon")


class AddedValueError(ValueError):
    """The truth cannot be compared with the reconstruction; the message says which store and what is wrong."""


def _year_months(times: Any) -> list[tuple[int, int]]:
    return [(int(t.year), int(t.month)) for t in np.asarray(times).ravel()]


def matching_truth(
    truth: xr.Dataset, like: xr.Dataset, variables: Sequence[str], truth_name: str
) -> xr.Dataset:
    """``truth[variables]`` on the months (matched by year and month, whatever the calendars) and the
    lat/lon cells of ``like``, with ``like``'s time coordinate.

    Raises :class:`AddedValueError` naming ``truth_name`` when a variable is missing, no month is shared,
    or the truth does not have every cell of ``like``'s grid (within 1e-6 of a cell width).
    """
    missing = [v for v in variables if v not in truth.data_vars]
    if missing:
        raise AddedValueError(
            f"truth {truth_name} lacks {missing}; it has {sorted(map(str, truth.data_vars))}"
        )
    position = {ym: i for i, ym in enumerate(_year_months(truth["time"].values))}
    wanted = _year_months(like["time"].values)
    shared = [i for i, ym in enumerate(wanted) if ym in position]
    if not shared:
        span = (
            f"{wanted[0][0]}-{wanted[0][1]:02d}..{wanted[-1][0]}-{wanted[-1][1]:02d}"
            if wanted
            else "no months"
        )
        raise AddedValueError(f"truth {truth_name} shares no month with the reconstruction ({span})")
    out = truth[list(variables)].isel(time=[position[wanted[i]] for i in shared])
    for dim in _SPATIAL:
        step = float(np.abs(np.diff(like[dim].values)).min()) if like.sizes[dim] > 1 else 1.0
        try:
            out = out.sel({dim: like[dim].values}, method="nearest", tolerance=1e-6 * step)
        except KeyError:
            raise AddedValueError(
                f"truth {truth_name} does not have the reconstruction's {dim} cells "
                f"({like[dim].values[0]:.4f}..{like[dim].values[-1]:.4f}, {like.sizes[dim]} cells); "
                "regrid the truth onto the fine grid first"
            ) from None
        out = out.assign_coords({dim: like[dim].values})
    return out.assign_coords(time=like["time"].values[shared])


def split_scales(field: xr.Dataset, factor: int) -> tuple[xr.Dataset, xr.Dataset]:
    """``(large, fine)`` with ``large + fine == field`` on the cells covered by whole ``factor x factor``
    blocks (the remainder rows/columns at the north/east end are dropped): ``large`` is the area-weighted
    block mean broadcast back to the fine cells, ``fine`` the rest."""
    n = {d: field.sizes[d] // factor * factor for d in _SPATIAL}
    if min(n.values()) == 0:
        raise AddedValueError(f"the domain {dict(field.sizes)} is smaller than one {factor} x {factor} block")
    field = field.isel({d: slice(0, n[d]) for d in _SPATIAL})
    coarse = coarsen_blocks(field, factor)
    large = coarse.isel({d: np.arange(n[d]) // factor for d in _SPATIAL}).assign_coords(
        {d: field[d].values for d in _SPATIAL}
    )
    return large, field - large


def _finite(x: Any) -> float | None:
    value = float(x)
    return value if np.isfinite(value) else None


@dataclass(frozen=True)
class Climatologies:
    """What the scores need, computed in one pass: the time mean of each input (keys ``truth``,
    ``downscaled``, ``interpolated``; no time dimension) and the month-matched MAE of the two methods."""

    time_means: dict[str, xr.Dataset]
    monthly_mae: dict[str, xr.Dataset]
    months: int
    units: dict[str, str]


METHODS = ("downscaled", "interpolated")


def climatologies(ensemble_mean: xr.Dataset, interpolated: xr.Dataset, truth: xr.Dataset) -> Climatologies:
    """Time means and monthly MAE of the three inputs (sharing ``time``, ``lat``, ``lon``; use
    :func:`matching_truth` for the truth) in a single ``dask.compute``, so each store is read once."""
    variables = list(truth.data_vars)
    inputs = {"downscaled": ensemble_mean[variables], "interpolated": interpolated[variables]}
    lazy_means = {"truth": truth.mean("time"), **{m: ds.mean("time") for m, ds in inputs.items()}}
    lazy_mae = {m: metrics.mae(ds, truth) for m, ds in inputs.items()}
    means, mae = dask.compute(lazy_means, lazy_mae)
    return Climatologies(
        time_means=means,
        monthly_mae=mae,
        months=int(truth.sizes["time"]),
        units={str(v): str(truth[v].attrs.get("units", "")) for v in variables},
    )


def added_value_records(clim: Climatologies, factor: int) -> list[dict[str, Any]]:
    """One record per (variable, method, scale) with ``bias``, ``rmse`` and ``pattern_correlation`` of the
    time means, and ``monthly_mae`` (month-matched, whole field; meaningful for perfect-model runs only).

    Methods are ``downscaled`` (the ensemble mean) and ``interpolated``; scales ``whole``, ``large`` and
    ``fine`` (:func:`split_scales` with ``factor``).
    """
    truth_mean = clim.time_means["truth"]
    truth_scales = dict(zip(("large", "fine"), split_scales(truth_mean, factor), strict=True))
    records = []
    for method in METHODS:
        mean = clim.time_means[method]
        scales = {
            "whole": (mean, truth_mean),
            **{
                s: (f, truth_scales[s])
                for s, f in zip(("large", "fine"), split_scales(mean, factor), strict=True)
            },
        }
        for variable in truth_mean.data_vars:
            for scale, (forecast, reference) in scales.items():
                f, r = forecast[variable], reference[variable]
                records.append(
                    {
                        "variable": str(variable),
                        "method": method,
                        "scale": scale,
                        "months": clim.months,
                        "bias": _finite(metrics.bias(f, r)),
                        "rmse": _finite(metrics.rmse(f, r)),
                        # None where a map is constant (e.g. the fine scale of a block-constant field)
                        "pattern_correlation": _finite(metrics.pattern_correlation(f, r)),
                        "monthly_mae": _finite(clim.monthly_mae[method][variable])
                        if scale == "whole"
                        else None,
                        "units": clim.units[str(variable)],
                    }
                )
    return records


def added_value_markdown(records: Sequence[dict[str, Any]], truth_name: str, factor: int) -> str:
    """The records as Markdown: per variable and scale, downscaled vs interpolated side by side."""
    months = records[0]["months"] if records else 0
    lines = [
        "# Reconstruction vs truth",
        "",
        f"Truth: `{truth_name}`, {months} shared month(s). Time means of the ensemble mean (downscaled) and of "
        f"the interpolated input; `large` = {factor} x {factor}-cell block means (set by the driving model), "
        "`fine` = the rest (what downscaling adds). Monthly MAE is month-matched: meaningful only when the "
        "run's source is the truth itself.",
        "",
        "| variable | scale | RMSE downscaled | RMSE interpolated | corr downscaled | corr interpolated "
        "| bias downscaled | monthly MAE downscaled | monthly MAE interpolated |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    by_key = {(r["variable"], r["scale"], r["method"]): r for r in records}

    def fmt(x: float | None) -> str:
        return "" if x is None else f"{x:.3g}"

    for variable in dict.fromkeys(r["variable"] for r in records):
        for scale in ("whole", "large", "fine"):
            d, i = by_key[(variable, scale, "downscaled")], by_key[(variable, scale, "interpolated")]
            lines.append(
                f"| {variable} [{d['units']}] | {scale} | {fmt(d['rmse'])} | {fmt(i['rmse'])} "
                f"| {fmt(d['pattern_correlation'])} | {fmt(i['pattern_correlation'])} | {fmt(d['bias'])} "
                f"| {fmt(d['monthly_mae'])} | {fmt(i['monthly_mae'])} |"
            )
    return "\n".join(lines) + "\n"


def _open(url: str, storage_options: dict[str, Any] | None, what: str) -> xr.Dataset:
    try:
        return xr.open_zarr(
            url,
            storage_options=url_options(url, storage_options),
            decode_times=xr.coders.CFDatetimeCoder(use_cftime=True),
        )
    except (FileNotFoundError, KeyError) as exc:
        raise AddedValueError(f"no {what} at {url} ({type(exc).__name__})") from None


def reconstruction_fields(
    aggregate_url: str,
    fine_url: str,
    truth: xr.Dataset,
    truth_name: str,
    storage_options: dict[str, Any] | None = None,
) -> tuple[xr.Dataset, xr.Dataset, xr.Dataset]:
    """``(ensemble_mean, interpolated, truth)`` of a run on the months it shares with ``truth`` (lazy):
    the ensemble means ``<v>_mean`` of its aggregate store, the interpolated input of its regridded fine
    store, and the truth on their grid, for the variables of the aggregate store that the truth has
    (:class:`AddedValueError` if none). Feed them to :func:`climatologies`."""
    aggregate = _open(aggregate_url, storage_options, "aggregate store")
    fine = _open(fine_url, storage_options, "regridded fine store")
    variables = [v for v in fine.data_vars if f"{v}_mean" in aggregate.data_vars and v in truth.data_vars]
    if not variables:
        raise AddedValueError(
            f"truth {truth_name} has none of the reconstructed variables "
            f"{sorted(str(v)[:-5] for v in aggregate.data_vars if str(v).endswith('_mean'))}"
        )
    ensemble_mean = xr.Dataset({v: aggregate[f"{v}_mean"] for v in variables})
    reference = matching_truth(truth, ensemble_mean, variables, truth_name)
    ensemble_mean = ensemble_mean.sel(time=reference["time"].values)
    interpolated = matching_truth(fine, ensemble_mean, variables, fine_url)
    return ensemble_mean, interpolated, reference


def reconstruction_truth(
    cfg: Any, storage_options: dict[str, Any] | None = None
) -> tuple[Any, str, bool] | None:
    """(lazy truth, its name, configured explicitly?) or None when the run has no truth to compare with."""
    from climrecon.tasks.evaluate import EvaluationError, open_evaluation_truth

    if cfg.data is not None:  # the user's own fine data: what the run is judged against
        from climrecon.tasks.fine_data import FineDataError, open_fine_data

        try:
            fine = open_fine_data(cfg.data, storage_options)
        except FineDataError as exc:
            raise ValueError(f"data: {exc}") from None
        wanted = cfg.ingest.query.variable_id or fine.variables
        wanted = [wanted] if isinstance(wanted, str) else wanted
        return fine.ds[[v for v in wanted if v in fine.variables]], fine.source.get("url", "data:"), True
    explicit = bool(cfg.evaluate.truth or cfg.evaluate.truth_query)
    if not explicit and cfg.ingest.catalog is not None:
        return None  # the sample catalog's truth only judges runs made on the sample catalog
    wanted = cfg.ingest.query.variable_id or cfg.evaluate_variables()
    wanted = [wanted] if isinstance(wanted, str) else wanted
    variables = [v for v in wanted if v in cfg.evaluate_variables()]
    ev = cfg.evaluate.model_copy(update={"variables": variables})
    try:
        truth, source = open_evaluation_truth(cfg.model_copy(update={"evaluate": ev}), storage_options)
    except EvaluationError:
        if explicit:
            raise
        return None
    return truth, source["truth"], explicit


def score_reconstruction(
    aggregate_url: str,
    fine_url: str,
    cfg: Any,
    storage_options: dict[str, Any] | None = None,
    log: Any = None,
) -> dict[str, Any] | None:
    """Score one reconstruction (``cfg``: its ClimReconConfig) against fine truth: ``{"records", "markdown",
    "png_base64", <files>}`` with the tables also written under ``<storage.root>/evaluate/`` for a local root;
    None (logged) when there is no truth or it shares no month or cell with the run, unless the truth was
    configured explicitly, in which case that is an error. Leaves no temporary file behind."""
    import base64
    import json
    import tempfile
    from pathlib import Path

    from climrecon.storage import is_remote, public_url
    from climrecon.tasks.plots import fine_scale_maps

    say = log or (lambda _msg: None)
    found = reconstruction_truth(cfg, storage_options)
    if found is None:
        say("no fine truth for this run (set evaluate.truth to score it)")
        return None
    truth, name, explicit = found
    factor = round(cfg.regrid.coarse_resolution / cfg.regrid.resolution)
    try:
        clim = climatologies(*reconstruction_fields(aggregate_url, fine_url, truth, name, storage_options))
        records = added_value_records(clim, factor)
    except AddedValueError as exc:
        if explicit:
            raise
        say(f"not scored: {exc}")
        return None
    markdown = added_value_markdown(records, name, factor)
    variable = next(iter(clim.time_means["truth"].data_vars))
    with tempfile.TemporaryDirectory(prefix="climrecon-skill-") as tmp:
        png = fine_scale_maps(
            clim.time_means,
            factor,
            variable,
            Path(tmp) / "fine.png",
            months=clim.months,
            units=clim.units[str(variable)],
        ).read_bytes()
    out: dict[str, Any] = {
        "records": records,
        "markdown": markdown,
        "png_base64": base64.b64encode(png).decode(),
    }
    if not is_remote(cfg.storage.root):
        from climrecon.tasks.evaluate import output_directory

        directory = output_directory(cfg)
        directory.mkdir(parents=True, exist_ok=True)
        stem = Path(aggregate_url.rstrip("/")).name.removesuffix(".zarr")
        files = {
            "markdown_file": directory / f"{stem}.skill.md",
            "json_file": directory / f"{stem}.skill.json",
            "png_file": directory / f"{stem}.skill.png",
        }
        files["png_file"].write_bytes(png)
        caption = "fine scale of the time mean: truth, downscaled, interpolated"
        files["markdown_file"].write_text(f"{markdown}\n![{caption}]({files['png_file'].name})\n")
        files["json_file"].write_text(
            json.dumps(
                {"aggregate": public_url(aggregate_url), "truth": name, "factor": factor, "records": records},
                indent=1,
            )
            + "\n"
        )
        out.update({k: str(v) for k, v in files.items()})
    return out
