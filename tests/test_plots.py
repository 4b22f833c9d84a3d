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
