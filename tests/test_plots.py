"""Plots write non-empty PNGs of exactly figsize * dpi pixels, and refuse data they cannot draw."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr
from PIL import Image

from climrecon.tasks import metrics as M
from climrecon.tasks import plots as P


def _map(values: np.ndarray, name: str = "tas", units: str = "K") -> xr.DataArray:
    lat, lon = np.linspace(30, 50, values.shape[0]), np.linspace(-125, -100, values.shape[1])
    return xr.DataArray(
        values, dims=("lat", "lon"), coords={"lat": lat, "lon": lon}, name=name, attrs={"units": units}
    )


def _check_png(path, size: tuple[int, int]) -> None:
    assert path.exists() and path.stat().st_size > 5_000
    with Image.open(path) as img:
        assert img.format == "PNG" and img.size == size
        pixels = np.asarray(img.convert("L"), dtype=float)
    assert pixels.std() > 10  # something was drawn, not a blank canvas


def test_plot_maps(tmp_path) -> None:
    rng = np.random.default_rng(0)
    truth = _map(280 + rng.normal(size=(20, 25)).cumsum(1))
    panels = {"truth": truth, "bilinear": truth + 1, "model": truth - 1}
    path = P.plot_maps(
        panels,
        tmp_path / "maps" / "tas.png",
        spread=_map(rng.random((20, 25))),
        title="tas, Jan 2015",
        panel_size=(3.0, 2.5),
        dpi=80,
    )
    _check_png(path, (int(4 * 3.0 * 80), int(2.5 * 80)))
    with pytest.raises(P.PlotError, match="'model' has dims"):
        P.plot_maps({"model": truth.expand_dims(time=2)}, tmp_path / "bad.png")


def test_plot_power_spectra(tmp_path) -> None:
    rng = np.random.default_rng(1)
    fields = xr.DataArray(
        rng.normal(size=(3, 32, 32)),
        dims=("time", "lat", "lon"),
        coords={"lat": np.arange(32.0), "lon": np.arange(32.0)},
        name="tas",
        attrs={"units": "K"},
    )
    spectra = {
        "truth": M.power_spectrum(fields),
        "bilinear": M.power_spectrum(fields.rolling(lon=3, center=True).mean().fillna(0)),
    }
    path = P.plot_power_spectra(spectra, tmp_path / "spectra.png", figsize=(5, 4), dpi=90)
    _check_png(path, (450, 360))
    with pytest.raises(P.PlotError, match="expected \\('wavenumber',\\)"):
        P.plot_power_spectra({"truth": fields.isel(time=0)}, tmp_path / "bad.png")


def test_plot_rank_histogram(tmp_path) -> None:
    counts = xr.DataArray([30, 12, 10, 11, 28], dims="rank", coords={"rank": np.arange(5)}, name="tas")
    path = P.plot_rank_histogram(counts, tmp_path / "rank.png")
    _check_png(path, (500, 350))
    with pytest.raises(P.PlotError, match="empty"):
        P.plot_rank_histogram(counts * 0, tmp_path / "bad.png")


def test_fine_scale_maps(tmp_path) -> None:
    rng = np.random.default_rng(1)
    months = [_map(280 + rng.normal(size=(16, 24))).expand_dims(time=[t]) for t in range(3)]
    truth = xr.concat(months, "time").to_dataset()
    means = {
        "truth": truth.mean("time"),
        "downscaled": truth.mean("time") + 0.1,
        "interpolated": truth.isel(time=0),
    }
    path = P.fine_scale_maps(means, 4, "tas", tmp_path / "fine.png", months=3, units="K")
    _check_png(path, (int(3 * 3.6 * 100), int(3.0 * 100)))


def _layout_boxes(fig) -> dict[str, object]:
    """Window extents (pixels) of every map panel (with its title, ticks and axis labels), every colour bar
    (with its label and offset text), each colour bar's label on its own, and the figure title."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.text import Text

    FigureCanvasAgg(fig)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    boxes: dict[str, object] = {}
    for i, ax in enumerate(fig.axes):
        if ax.get_label() == "<colorbar>":
            boxes[f"colorbar {i}"] = ax.get_tightbbox(renderer)
            boxes[f"colorbar {i} label"] = ax.yaxis.label.get_window_extent(renderer)
        else:
            boxes[f"panel {ax.get_title()}"] = ax.get_tightbbox(renderer)
    title = fig.get_suptitle()
    (text,) = [t for t in fig.findobj(Text) if t.get_text() == title and t.get_figure() is fig]
    boxes["title"] = text.get_window_extent(renderer)
    return boxes


def _overlap(a, b) -> float:
    """Overlapping area of two boxes in px^2 (0 when they only touch)."""
    return max(0.0, min(a.x1, b.x1) - max(a.x0, b.x0)) * max(0.0, min(a.y1, b.y1) - max(a.y0, b.y0))


def _assert_nothing_overlaps(fig) -> dict[str, object]:
    boxes = _layout_boxes(fig)
    width, height = fig.bbox.width, fig.bbox.height
    for name, box in boxes.items():  # inside the canvas: nothing cut off at an edge
        assert box.x0 >= -0.5 and box.y0 >= -0.5 and box.x1 <= width + 0.5 and box.y1 <= height + 0.5, (
            name,
            box,
        )
    names = list(boxes)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            if a.split(" label")[0] == b.split(" label")[0]:
                continue  # a colour bar and its own label: the label is part of that colour bar's box
            assert _overlap(boxes[a], boxes[b]) < 1.0, (a, boxes[a], b, boxes[b])
    return boxes


def _ensemble_month(name: str, units: str, scale: float, long_name: str) -> tuple[xr.DataArray, xr.DataArray]:
    rng = np.random.default_rng(2)
    mean = _map((280 + rng.normal(size=(40, 50)).cumsum(1)) * scale, f"{name}_mean", units)
    spread = _map(rng.random((40, 50)) * scale, f"{name}_std", units)
    mean.attrs["long_name"] = f"ensemble mean of {long_name}"
    spread.attrs["long_name"] = f"ensemble standard deviation of {long_name}"
    return mean, spread


@pytest.mark.parametrize(
    "name, units, scale, long_name",
    [("tas", "K", 1.0, "Near-Surface Air Temperature"), ("pr", "kg m-2 s-1", 1e-7, "Precipitation")],
)
def test_ensemble_figure_lays_out_panels_colour_bars_and_title_without_overlap(
    name, units, scale, long_name
) -> None:
    mean, spread = _ensemble_month(name, units, scale, long_name)
    fig = P.ensemble_figure(mean, spread, name=name, stamp="2015-01", members=16)
    boxes = _assert_nothing_overlaps(fig)
    panels = sorted((k for k in boxes if k.startswith("panel")), key=lambda k: boxes[k].x0)
    bars = sorted(
        (k for k in boxes if k.startswith("colorbar") and "label" not in k), key=lambda k: boxes[k].x0
    )
    assert panels == [f"panel {name} ensemble mean", "panel spread"] and len(bars) == 2
    # left to right: mean panel, its colour bar (label included), a gap, the spread panel, its colour bar
    assert boxes[panels[0]].x1 < boxes[bars[0]].x0 < boxes[bars[0]].x1 < boxes[panels[1]].x0 - 10
    assert boxes[f"{bars[0]} label"].x1 < boxes[panels[1]].x0  # the reported bug: the label ran into it
    assert boxes[panels[1]].x1 < boxes[bars[1]].x0
    assert all(boxes["title"].y0 > boxes[k].y1 for k in (*panels, *bars))  # the title sits above everything
    labels = [ax.get_ylabel() for ax in fig.axes if ax.get_label() == "<colorbar>"]
    assert [label.replace("\n", " ").replace("\u00a0", " ") for label in labels] == [
        f"ensemble mean of {long_name} [{units}]",
        f"spread [{units}]",
    ]
    assert fig.get_suptitle() == f"{name}, 2015-01: ensemble mean and spread of 16 members"
    title = next(
        t for t in fig.findobj(lambda a: hasattr(a, "get_text") and a.get_text() == fig.get_suptitle())
    )
    assert title.get_fontsize() >= 12


def test_maps_figure_with_many_panels_and_long_labels_keeps_them_apart() -> None:
    rng = np.random.default_rng(3)
    truth = _map(280 + rng.normal(size=(20, 25)).cumsum(1))
    truth.attrs["long_name"] = "near-surface air temperature, time mean over the held-out months"
    panels = {"truth": truth, "bilinear": truth + 1, "dpdm": truth - 1}
    fig = P.maps_figure(
        panels, spread=_map(rng.random((20, 25))), title="tas, 2015-01: truth and x8 downscaled"
    )
    boxes = _assert_nothing_overlaps(fig)
    assert sum(k.startswith("panel") for k in boxes) == 4 and sum(k.endswith("label") for k in boxes) == 2
    assert fig.bbox.width == 4 * 3.6 * 100 and fig.bbox.height == 3.0 * 100


def test_ensemble_maps_writes_the_figure_of_an_aggregate_store(tmp_path) -> None:
    mean, spread = _ensemble_month("tas", "K", 1.0, "Near-Surface Air Temperature")
    times = xr.date_range("2015-01-01", periods=2, freq="MS", calendar="noleap", use_cftime=True)
    store = xr.Dataset(
        {
            "tas_mean": mean.expand_dims(time=times),
            "tas_std": spread.expand_dims(time=times),
        },
        attrs={"ensemble_size": 16},
    )
    store.to_zarr(tmp_path / "agg.zarr")
    path = P.ensemble_maps(str(tmp_path / "agg.zarr"), tmp_path / "maps")
    assert path == tmp_path / "maps" / "tas_mean_spread.png"
    _check_png(path, (920, 380))
    assert P.ensemble_maps(str(tmp_path / "agg.zarr"), tmp_path / "none", time_index=1).exists()


def test_point_series_draws_one_cells_mean_and_spread_over_the_whole_period(tmp_path) -> None:
    mean, spread = _ensemble_month("tas", "K", 1.0, "Near-Surface Air Temperature")
    times = xr.date_range("1860-01-01", periods=48, freq="MS", calendar="360_day", use_cftime=True)
    store = xr.Dataset(
        {
            "tas_mean": mean.expand_dims(time=times) + xr.DataArray(np.arange(48.0), dims="time"),
            "tas_std": spread.expand_dims(time=times),
        },
        attrs={"ensemble_size": 2},
    )
    store.to_zarr(tmp_path / "agg.zarr")
    path = P.point_series(str(tmp_path / "agg.zarr"), tmp_path / "series")
    assert path == tmp_path / "series" / "tas_point_series.png"
    _check_png(path, (920, 340))
    assert P.point_series(str(tmp_path / "agg.zarr"), tmp_path / "s2", lat=float(mean.lat[0])).exists()
    store[["tas_std"]].to_zarr(tmp_path / "nomean.zarr")
    assert P.point_series(str(tmp_path / "nomean.zarr"), tmp_path / "s3") is None
