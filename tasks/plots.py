"""PNG figures of evaluation results: map comparisons, power spectra, rank histograms.

Contract: every function takes xarray results (maps, :func:`climrecon.tasks.metrics.power_spectrum` outputs,
:func:`climrecon.tasks.metrics.rank_histogram` counts), writes one PNG of exactly ``figsize * dpi`` pixels
to ``path`` (parent folders created) and returns that path. Figures are built on matplotlib's Agg canvas
directly (no pyplot state), so they are safe in Dask workers and threads; each takes well under a second.
Axis and colour-bar labels carry the variable's ``units`` attribute. Map figures use matplotlib's
constrained layout with each colour bar attached to its own panel(s) and long labels wrapped to the panel
height, so no label, colour bar or title runs into a neighbouring panel (tests/test_plots.py measures it).
"""

from __future__ import annotations

import textwrap
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import xarray as xr
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from climrecon.storage import url_options

__all__ = [
    "plot_cost_curves",
    "plot_loss_curve",
    "PlotError",
    "ensemble_figure",
    "ensemble_maps",
    "maps_figure",
    "plot_maps",
    "plot_power_spectra",
    "plot_rank_histogram",
    "point_series",
]


class PlotError(ValueError):
    """Data cannot be drawn as asked; the message names the panel or series at fault."""


def _label(da: xr.DataArray, fallback: str) -> str:
    name = da.attrs.get("long_name") or da.name or fallback
    units = da.attrs.get("units")
    return f"{name} [{units}]" if units else str(name)


def _wrapped(label: str, height_in: float, fontsize: float = 10.0) -> str:
    """``label`` on lines short enough to run along a vertical colour bar of a panel ``height_in`` inches
    tall (about 0.6 em per character), its trailing ``[units]`` never split."""
    head, sep, units = label.rpartition(" [")
    if sep:
        label = head + " [" + units.replace(" ", "\u00a0")  # no-break spaces: textwrap keeps units whole
    width = max(12, int(0.75 * height_in * 72 / (0.6 * fontsize)))
    return textwrap.fill(label, width=width, break_long_words=False, break_on_hyphens=False)


def _save(fig: Figure, path: str | Path, dpi: int) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=dpi, format="png")  # no bbox_inches="tight": the size stays figsize * dpi
    return path


def _map2d(da: xr.DataArray, panel: str) -> xr.DataArray:
    extra = [d for d in da.dims if d not in ("lat", "lon")]
    if extra or set(da.dims) != {"lat", "lon"}:
        raise PlotError(
            f"map panel {panel!r} has dims {da.dims}; select one (lat, lon) map first, "
            "e.g. .isel(time=0, member=0)"
        )
    return da.transpose("lat", "lon")


def plot_maps(
    panels: Mapping[str, xr.DataArray],
    path: str | Path,
    *,
    spread: xr.DataArray | None = None,
    title: str | None = None,
    cmap: str = "viridis",
    symmetric: bool = False,
    panel_size: tuple[float, float] = (3.6, 3.0),
    dpi: int = 100,
) -> Path:
    """Side-by-side (lat, lon) maps, e.g. ``{"truth": t, "bilinear": b, "model": m}``, one colour scale.

    The shared scale spans the min..max of all panels (``symmetric``: -m..m with m the largest absolute
    value, for anomalies on a diverging ``cmap``), with one colour bar labelled "name [units]" (from the
    first panel's attrs). An optional ensemble ``spread`` map is drawn last on its own scale and colour bar.
    Figure size: (number of panels) * ``panel_size`` inches at ``dpi``. The figure is :func:`maps_figure`.
    """
    fig = maps_figure(
        panels, spread=spread, title=title, cmap=cmap, symmetric=symmetric, panel_size=panel_size, dpi=dpi
    )
    return _save(fig, path, dpi)


def maps_figure(
    panels: Mapping[str, xr.DataArray],
    *,
    spread: xr.DataArray | None = None,
    title: str | None = None,
    cmap: str = "viridis",
    symmetric: bool = False,
    panel_size: tuple[float, float] = (3.6, 3.0),
    dpi: int = 100,
) -> Figure:
    """The figure :func:`plot_maps` saves (arguments as there), laid out by matplotlib's constrained layout:
    the shared colour bar is attached to the map panels, the spread's to the spread panel, each with its
    label wrapped to the panel height, so labels, colour bars and the title never overlap."""
    if not panels:
        raise PlotError("plot_maps: no panels given; pass e.g. {'truth': map, 'model': map}")
    maps = {name: _map2d(da, name) for name, da in panels.items()}
    if spread is not None:
        spread = _map2d(spread, "spread")
    values = np.concatenate([np.asarray(m.values, float).ravel() for m in maps.values()])
    if not np.isfinite(values).any():
        raise PlotError("plot_maps: every panel is all-NaN")
    vmin, vmax = float(np.nanmin(values)), float(np.nanmax(values))
    if symmetric:
        vmax = max(abs(vmin), abs(vmax))
        vmin = -vmax
    n = len(maps) + (spread is not None)
    fig = Figure(figsize=(panel_size[0] * n, panel_size[1]), dpi=dpi, layout="constrained")
    fig.get_layout_engine().set(w_pad=4 / 72, h_pad=4 / 72, wspace=0.04)  # 4 pt around every panel
    axes = fig.subplots(1, n, squeeze=False)[0]
    first = next(iter(maps.values()))
    mesh = None
    for ax, (name, m) in zip(axes, maps.items(), strict=False):
        mesh = ax.pcolormesh(m["lon"], m["lat"], m.values, vmin=vmin, vmax=vmax, cmap=cmap, shading="nearest")
        ax.set_title(name)
    label = _wrapped(_label(first, "value"), panel_size[1])
    fig.colorbar(mesh, ax=list(axes[: len(maps)]), shrink=0.9, pad=0.03, label=label)
    if spread is not None:
        ax = axes[-1]
        s = ax.pcolormesh(spread["lon"], spread["lat"], spread.values, cmap="magma", shading="nearest")
        ax.set_title("spread")
        units = spread.attrs.get("units") or first.attrs.get("units")
        label = _wrapped(f"spread [{units}]" if units else "spread", panel_size[1])
        fig.colorbar(s, ax=ax, shrink=0.9, pad=0.03, label=label)
    mean_lat = float(np.mean(first["lat"]))
    for ax in axes:
        ax.set_aspect(1.0 / max(np.cos(np.deg2rad(mean_lat)), 0.1))
        ax.set_xlabel("longitude [degrees_east]")
    axes[0].set_ylabel("latitude [degrees_north]")
    if title:
        fig.suptitle(title, fontsize="large")
    return fig


def plot_power_spectra(
    spectra: Mapping[str, xr.DataArray],
    path: str | Path,
    *,
    title: str | None = None,
    figsize: tuple[float, float] = (6.0, 4.5),
    dpi: int = 100,
) -> Path:
    """Radially averaged power spectra of several methods, log-log; a "truth" entry is drawn in black."""
    if not spectra:
        raise PlotError("plot_power_spectra: no spectra given; pass e.g. {'truth': power_spectrum(t), ...}")
    fig = Figure(figsize=figsize, layout="constrained")
    ax = fig.subplots()
    for name, p in spectra.items():
        if p.dims != ("wavenumber",):
            raise PlotError(
                f"plot_power_spectra: {name!r} has dims {p.dims}; "
                "expected ('wavenumber',) from metrics.power_spectrum"
            )
        style = (
            {"color": "black", "linewidth": 2.2, "zorder": 3}
            if name.lower() == "truth"
            else {"linewidth": 1.4}
        )
        ax.loglog(p["wavenumber"], p.values, label=name, **style)
    first = next(iter(spectra.values()))
    ax.set_xlabel(f"wavenumber [{first['wavenumber'].attrs.get('units', 'cycles per cell')}]")
    ax.set_ylabel(f"power [{first.attrs.get('units', 'arbitrary')}]")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    ax.set_title(title or "radially averaged power spectrum")
    return _save(fig, path, dpi)


def plot_rank_histogram(
    counts: xr.DataArray,
    path: str | Path,
    *,
    title: str | None = None,
    figsize: tuple[float, float] = (5.0, 3.5),
    dpi: int = 100,
) -> Path:
    """Relative frequency of each rank 0..M with the flat 1 / (M + 1) line a calibrated ensemble follows."""
    if counts.dims != ("rank",) or counts.size < 2:
        raise PlotError(
            f"plot_rank_histogram: expected counts with dims ('rank',) and >= 2 bins, "
            f"got {counts.dims} {counts.shape}"
        )
    total = float(counts.sum())
    if total <= 0:
        raise PlotError("plot_rank_histogram: the histogram is empty (all counts are 0)")
    fig = Figure(figsize=figsize, layout="constrained")
    ax = fig.subplots()
    ranks = np.asarray(counts["rank"]) if "rank" in counts.coords else np.arange(counts.size)
    ax.bar(ranks, counts.values / total, width=0.9, color="tab:blue", label="observed")
    ax.axhline(1.0 / counts.size, color="black", linestyle="--", label=f"flat: 1/{counts.size}")
    ax.set_xlabel(f"rank of truth among {counts.size - 1} members")
    ax.set_ylabel("relative frequency")
    ax.legend(loc="upper center")
    ax.set_title(title or f"rank histogram{f' of {counts.name}' if counts.name else ''}")
    return _save(fig, path, dpi)


def ensemble_maps(
    aggregate_url: str, directory: str | Path, *, storage_options: dict | None = None, time_index: int = 0
) -> Path | None:
    """PNG of the first variable's ensemble mean and spread at ``time_index`` of an aggregate store.

    Reads only that month (``<var>_mean`` and ``<var>_std``); returns None when the store has no
    ``*_mean`` variable. The file is ``<directory>/<var>_mean_spread.png`` (:func:`ensemble_figure`).
    """
    ds = xr.open_zarr(aggregate_url, storage_options=url_options(aggregate_url, storage_options))
    means = sorted(str(v) for v in ds.data_vars if str(v).endswith("_mean"))
    if not means:
        return None
    name = means[0][: -len("_mean")]
    month = ds.isel(time=time_index)
    stamp = str(month.time.values)[:7]
    fig = ensemble_figure(
        month[f"{name}_mean"],
        month[f"{name}_std"],
        name=name,
        stamp=stamp,
        members=ds.attrs.get("ensemble_size", "?"),
    )
    return _save(fig, Path(directory) / f"{name}_mean_spread.png", ENSEMBLE_DPI)


def point_series(
    aggregate_url: str,
    directory: str | Path,
    *,
    storage_options: dict | None = None,
    lat: float | None = None,
    lon: float | None = None,
    figsize: tuple[float, float] = (9.2, 3.4),
    dpi: int = 100,
) -> Path | None:
    """PNG of the first variable's ensemble mean +- spread at one cell (default: the domain's centre) over the
    store's whole period, with its 12-step running mean when there are more than 36 steps.

    Reads one cell of ``<var>_mean`` and ``<var>_std``; None when the store has no ``*_mean`` variable.
    The file is ``<directory>/<var>_point_series.png``."""
    ds = xr.open_zarr(
        aggregate_url,
        storage_options=url_options(aggregate_url, storage_options),
        decode_times=xr.coders.CFDatetimeCoder(use_cftime=True),
    )
    means = sorted(str(v) for v in ds.data_vars if str(v).endswith("_mean"))
    if not means:
        return None
    name = means[0][: -len("_mean")]
    here = {
        "lat": float(ds["lat"].values[ds.sizes["lat"] // 2]) if lat is None else lat,
        "lon": float(ds["lon"].values[ds.sizes["lon"] // 2]) if lon is None else lon,
    }
    cell = ds[[f"{name}_mean", f"{name}_std"]].sel(here, method="nearest").load()
    years = np.array([t.year + (t.month - 0.5) / 12 for t in cell["time"].values])
    mean, std = cell[f"{name}_mean"].values, cell[f"{name}_std"].values
    units = cell[f"{name}_mean"].attrs.get("units", "")
    fig = Figure(figsize=figsize, layout="constrained")
    ax = fig.subplots()
    ax.fill_between(years, mean - std, mean + std, color="tab:blue", alpha=0.25, lw=0, label="+- 1 spread")
    ax.plot(years, mean, color="tab:blue", lw=0.6, label="ensemble mean")
    if mean.size > 36:
        running = np.convolve(mean, np.ones(12) / 12, mode="valid")
        ax.plot(years[11:], running, color="black", lw=1.2, label="12-step running mean")
    ax.set_xlabel("year")
    ax.set_ylabel(f"{name} ({units})" if units else name)
    ax.legend(loc="upper left", ncols=3, fontsize=8)
    ax.set_title(
        f"{name} at {float(cell['lat']):.2f}N {float(cell['lon']):.2f}E: {mean.size} steps, "
        f"{ds.attrs.get('ensemble_size', '?')} members"
    )
    return _save(fig, Path(directory) / f"{name}_point_series.png", dpi)


ENSEMBLE_PANEL = (4.6, 3.8)  # inches per panel of the ensemble figure: 9.2 x 3.8 in, 920 x 380 px
ENSEMBLE_DPI = 100


def ensemble_figure(
    mean: xr.DataArray, spread: xr.DataArray, *, name: str, stamp: str, members: int | str
) -> Figure:
    """Ensemble mean and spread maps of one month side by side, each with its own colour bar labelled with
    the units, titled "<name>, <stamp>: ensemble mean and spread of <members> members"."""
    return maps_figure(
        {f"{name} ensemble mean": mean},
        spread=spread,
        title=f"{name}, {stamp}: ensemble mean and spread of {members} members",
        panel_size=ENSEMBLE_PANEL,
        dpi=ENSEMBLE_DPI,
    )


def fine_scale_maps(
    time_means: Mapping[str, xr.Dataset],
    factor: int,
    variable: str,
    path: str | Path,
    *,
    months: int,
    units: str = "",
) -> Path:
    """PNG of the fine scale of time means of ``variable`` (a time mean minus its ``factor x factor`` block
    means, :func:`climrecon.tasks.added_value.split_scales`), one panel per entry of ``time_means`` (e.g.
    ``climatologies(...).time_means``: truth, downscaled, interpolated); ``months`` for the title."""
    from climrecon.tasks.added_value import split_scales

    panels = {}
    for name, mean in time_means.items():
        fine = split_scales(mean[[variable]], factor)[1][variable]
        panels[name] = fine.assign_attrs(long_name=f"{variable} fine scale", units=units)
    return plot_maps(
        panels,
        path,
        cmap="RdBu_r",
        symmetric=True,
        title=f"{variable}: time mean over {months} month(s) minus its {factor} x {factor}-cell block means",
    )


def plot_loss_curve(losses: list[float], path: str | Path, title: str = "training loss") -> Path:
    """Per-step loss (faint) and its 50-step running mean, log scale, as a PNG (Agg canvas, no pyplot)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig = Figure(figsize=(6.4, 4.0))
    ax = fig.add_subplot()
    y = np.asarray(losses, dtype=float)
    steps = np.arange(1, y.size + 1)
    ax.plot(steps, y, color="0.75", lw=0.6, label="per step")
    if y.size >= 50:
        ax.plot(steps[49:], np.convolve(y, np.ones(50) / 50, mode="valid"), color="C0", label="50-step mean")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("EDM loss")
    ax.set_title(title)
    ax.legend()
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=100, format="png")
    return path


def plot_cost_curves(
    curves: Mapping[str, Mapping[str, list[tuple[float, float]]]],
    path: str | Path,
    *,
    xlabel: str = "network evaluations per member (NFE)",
    title: str = "",
    dpi: int = 100,
) -> Path:
    """One panel per score (``curves[score][family] = [(cost, value), ...]``), each family a line with
    markers against a log-2 cost axis (e.g. a sampler family's NFE-vs-CRPS curve); single points (a
    distilled sampler) are drawn as stars."""
    if not curves:
        raise PlotError("plot_cost_curves: no scores to draw")
    fig = Figure(figsize=(4.0 * len(curves), 3.6), layout="constrained")
    axes = fig.subplots(1, len(curves), squeeze=False)[0]
    for ax, (score, families) in zip(axes, curves.items(), strict=True):
        for i, (family, points) in enumerate(families.items()):
            pts = sorted(points)
            x, y = [p[0] for p in pts], [p[1] for p in pts]
            style = {"marker": "*", "markersize": 12, "ls": "none"} if len(pts) == 1 else {"marker": "o"}
            ax.plot(x, y, color=f"C{i}", label=family, **style)
        ax.set_xscale("log", base=2)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(score)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    return _save(fig, path, dpi)
