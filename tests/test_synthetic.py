"""The synthetic reanalysis: lazy, chunking-independent, seeded, physically shaped, labelled, resumable."""

from __future__ import annotations

import cftime
import dask
import numpy as np
import pytest
import xarray as xr
import zarr
from dask.callbacks import Callback

from climrecon.catalogs import synthetic as S
from climrecon.config import SyntheticConfig
from climrecon.stores import StoreStateError

STATIC_STEP = 1.0 / 12.0  # 5 arc-minutes, like the real static fields


def _static(lat0=30.0, lat1=50.0, lon0=-125.0, lon1=-105.0, ridge_height=2500.0) -> xr.Dataset:
    """Analytic 5' static fields: ocean west of a wavy coast, a Sierra-like ridge, a Rockies-like plateau."""
    lat = np.arange(lat0 + STATIC_STEP / 2, lat1, STATIC_STEP)
    lon = np.arange(lon0 + STATIC_STEP / 2, lon1, STATIC_STEP)
    la, lo = np.meshgrid(lat, lon, indexing="ij")
    coast = -122.0 + 1.5 * np.sin(np.deg2rad(la) * 12.0)
    land = lo > coast
    ridge = ridge_height * np.exp(-(((lo - (coast + 3.0)) / 0.6) ** 2))
    plateau = 2000.0 * np.exp(-(((lo + 109.0) / 2.5) ** 2 + ((la - 42.0) / 5.0) ** 2))
    hills = 300.0 * (1 + np.sin(la * 5.0) * np.cos(lo * 4.0))
    orog = np.where(land, ridge + plateau + hills, 0.0)
    return xr.Dataset(
        {
            "orog": (("lat", "lon"), orog.astype("float32")),
            "sftlf": (("lat", "lon"), (100.0 * land).astype("float32")),
        },
        coords={"lat": lat, "lon": lon},
    )


CFG = SyntheticConfig(resolution=0.5, start_year=2000, end_year=2001, chunk_months=12, seed=11)


@pytest.fixture(scope="module")
def static() -> xr.Dataset:
    return _static()


@pytest.fixture(scope="module")
def two_years(static) -> xr.Dataset:
    return S.synthetic_reanalysis(CFG, static).compute()


@pytest.fixture(scope="module")
def ten_years(static) -> xr.Dataset:
    cfg = CFG.model_copy(update={"start_year": 1991, "end_year": 2000, "variables": ["tas", "pr"]})
    return S.synthetic_reanalysis(cfg, static).compute()


def test_grid_and_time_follow_the_conventions():
    grid = S.synthetic_grid(SyntheticConfig())
    assert grid.shape == (80, 80)
    np.testing.assert_allclose(grid.lat[[0, -1]], [30.125, 49.875])
    np.testing.assert_allclose(grid.lon[[0, -1]], [-124.875, -105.125])
    east = S.synthetic_grid(
        SyntheticConfig(region={"lat_min": 0, "lat_max": 1, "lon_min": 235, "lon_max": 240}, resolution=1)
    )
    np.testing.assert_allclose(east.lon, [-124.5, -123.5, -122.5, -121.5, -120.5])
    with pytest.raises(ValueError, match="whole number of cells"):
        S.synthetic_grid(SyntheticConfig(resolution=0.3))
    times, months = S.synthetic_time(CFG)
    assert times[0] == cftime.datetime(2000, 1, 1, calendar="standard") and len(times) == 24
    assert months[0] == 12 * 2000


def test_build_is_lazy_and_chunked(static):
    class Count(Callback):
        calls = 0

        def _start(self, dsk):
            Count.calls += 1

    with Count():
        ds = S.synthetic_reanalysis(CFG.model_copy(update={"chunk_months": 5}), static)
    assert Count.calls == 0
    for name in CFG.variables:
        assert isinstance(ds[name].data, dask.array.Array)
        assert ds[name].data.chunks == ((5, 5, 5, 5, 4), (40,), (40,))
        assert ds[name].dtype == np.float32 and ds[name].dims == ("time", "lat", "lon")
    assert ds.time_bnds.shape == (24, 2)
    assert ds.time_bnds.values[0, 1] == ds.time.values[1]
    assert ds.time_bnds.values[-1, 1] == cftime.datetime(2002, 1, 1, calendar="standard")
    assert ds.time.values[0].calendar == "standard"
    assert {"orog", "sftlf"} <= set(ds.data_vars)
    assert ds.lat.values[0] < ds.lat.values[-1]


def test_identical_bytes_for_any_chunking_and_span(static, two_years):
    five = S.synthetic_reanalysis(CFG.model_copy(update={"chunk_months": 5}), static).compute()
    later = S.synthetic_reanalysis(
        CFG.model_copy(update={"start_year": 2001, "chunk_months": 7}), static
    ).compute()
    for name in CFG.variables:
        assert five[name].values.tobytes() == two_years[name].values.tobytes()
        assert later[name].values.tobytes() == two_years[name].isel(time=slice(12, None)).values.tobytes()


def test_seed_changes_the_anomalies(static, two_years):
    other = S.synthetic_reanalysis(CFG.model_copy(update={"seed": 12, "end_year": 2000}), static).compute()
    for name in CFG.variables:
        a, b = two_years[name].isel(time=slice(0, 12)).values, other[name].values
        assert not np.array_equal(a, b)
    a, b = two_years.tas.isel(time=slice(0, 12)).values, other.tas.values
    assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.9  # same climatology, different weather
    assert np.abs(a - b).mean() > 0.5


def test_lapse_rate_recovered_over_land(static, two_years):
    grid = S.synthetic_grid(CFG)
    cont = S.continentality(two_years.sftlf.values, grid)
    land = two_years.sftlf.values > 99
    mean = two_years.tas.mean("time").values
    lat = np.broadcast_to(grid.lat[:, None], grid.shape)
    predictors = np.column_stack([two_years.orog.values[land], lat[land], cont[land], np.ones(land.sum())])
    coef, *_ = np.linalg.lstsq(predictors, mean[land], rcond=None)
    assert -7.5e-3 < coef[0] < -4.5e-3, f"recovered lapse rate {coef[0] * 1e3:.2f} K/km"
    assert coef[1] < 0  # colder poleward


def test_seasonal_cycle_and_land_sea_contrast(two_years):
    land = two_years.sftlf > 99
    sea = two_years.sftlf < 1
    month = two_years.time.dt.month
    jan, jul = (
        two_years.tas.where(month == 1, drop=True).mean("time"),
        two_years.tas.where(month == 7, drop=True).mean("time"),
    )
    amplitude = jul - jan
    assert float(amplitude.where(land).mean()) > 12.0
    assert 0.0 < float(amplitude.where(sea).mean()) < float(amplitude.where(land).mean()) / 2
    assert 270.0 < float(two_years.tas.mean()) < 300.0


def test_month_to_month_persistence(ten_years):
    tas = ten_years.tas.mean(["lat", "lon"])
    anomaly = (tas.groupby("time.month") - tas.groupby("time.month").mean()).values
    lag1 = np.corrcoef(anomaly[:-1], anomaly[1:])[0, 1]
    assert lag1 > 0.25, lag1


def test_fine_scale_spectrum_slope():
    grid = S.synthetic_grid(SyntheticConfig())
    p = S.PHYSICS
    fields = S.persistent_random_field(
        3, "tas_fine", np.arange(24000, 24012), grid, p.tas_fine_phi, p.tas_fine_rolloff_km, p.tas_fine_slope
    )
    assert fields.shape == (12, *grid.shape) and 0.8 < fields.std() < 1.2
    window = np.outer(np.hanning(grid.shape[0]), np.hanning(grid.shape[1]))
    power = np.mean([np.abs(np.fft.fft2((f - f.mean()) * window)) ** 2 for f in fields], axis=0)
    k = np.hypot(
        np.fft.fftfreq(grid.shape[0], grid.dy / 1e3)[:, None],
        np.fft.fftfreq(grid.shape[1], grid.dx_mid / 1e3)[None, :],
    )
    edges = np.linspace(0, 0.5 / (grid.dy / 1e3), 25)
    bins = np.digitize(k.ravel(), edges)
    centre = np.array([k.ravel()[bins == i].mean() for i in range(1, len(edges))])
    spectrum = np.array([power.ravel()[bins == i].sum() for i in range(1, len(edges))])  # isotropic E(k)
    fit = (centre >= 1 / 250) & (centre <= 1 / 60)
    slope = np.polyfit(np.log(centre[fit]), np.log(spectrum[fit]), 1)[0]
    assert -3.4 < slope < -2.4, slope


def test_precipitation_is_positive_realistic_and_orographic(ten_years):
    pr_mm = ten_years.pr.values * S.SECONDS_PER_DAY
    assert np.isfinite(pr_mm).all() and (pr_mm > 0).all()
    assert 0.3 < pr_mm.mean() < 5.0
    assert np.percentile(pr_mm, 99.9) < 60.0 and np.percentile(pr_mm, 1) < 0.2
    winter = ten_years.pr.where(ten_years.time.dt.month.isin([12, 1, 2]), drop=True).mean("time")
    summer = ten_years.pr.where(ten_years.time.dt.month.isin([6, 7, 8]), drop=True).mean("time")
    assert float(winter.sel(lat=slice(40, 50)).mean()) > 2 * float(summer.sel(lat=slice(40, 50)).mean())
    # windward (west) slope of the ridge vs its lee, along the coast 3 degrees inland, at 38-46N
    grid = S.synthetic_grid(CFG)
    rows = (grid.lat > 38) & (grid.lat < 46)
    coast = -122.0 + 1.5 * np.sin(np.deg2rad(grid.lat[rows]) * 12.0)
    w = winter.values[rows]
    windward = [w[i, np.argmin(abs(grid.lon - (c + 2.3)))] for i, c in enumerate(coast)]
    leeward = [w[i, np.argmin(abs(grid.lon - (c + 3.7)))] for i, c in enumerate(coast)]
    assert np.mean(windward) > 1.5 * np.mean(leeward)


def test_winds_streamfunction_part_is_non_divergent(two_years):
    grid = S.synthetic_grid(SyntheticConfig())
    psi = S.persistent_random_field(5, "streamfunction", [24000], grid, 0.3, 1000.0, 5.0, halo=1)[0] * 1e6
    u, v = S.streamfunction_winds(psi, grid.lat, grid.resolution)
    div = S.spherical_divergence(u, v, grid.lat, grid.resolution)
    shear = np.abs(np.diff(u, axis=1)).mean() / grid.dy
    assert np.abs(div).max() < 1e-9 * shear
    assert np.std(u) > 0 and np.std(v) > 0
    speed = np.hypot(two_years.uas, two_years.vas)
    assert 0.5 < float(speed.mean()) < 8.0 and float(speed.max()) < 30.0
    # surface friction: winds weaker over land than over the ocean
    assert float(speed.where(two_years.sftlf > 99).mean()) < float(speed.where(two_years.sftlf < 1).mean())


def test_attributes_label_it_synthetic(two_years):
    assert two_years.attrs["title"] == "ClimRecon synthetic reanalysis (SYNTHETIC, not observations)"
    assert two_years.attrs["synthetic"] == "true" and two_years.attrs["seed"] == 11
    assert "Smith & Barstad" in two_years.attrs["references"]
    for name in CFG.variables:
        attrs = two_years[name].attrs
        assert attrs["long_name"].startswith("synthetic ") and attrs["cell_methods"] == "time: mean"
        assert attrs["units"] == S.VARIABLE_ATTRS[name]["units"] and attrs["standard_name"]
    assert two_years.orog.attrs["standard_name"] == "surface_altitude"


def test_write_round_trips_and_rerun_skips(static, two_years, tmp_path, monkeypatch):
    url = str(tmp_path / "synthetic.zarr")
    assert S.write_synthetic_reanalysis(CFG, static, url) == url
    out = xr.open_zarr(url, decode_times=xr.coders.CFDatetimeCoder(use_cftime=True))
    assert out.attrs["climrecon_status"] == "complete" and out.attrs["synthetic"] == "true"
    assert out.tas.encoding["chunks"] == (12, 40, 40)
    for name in [*CFG.variables, "orog", "sftlf"]:
        np.testing.assert_array_equal(out[name].values, two_years[name].values)
    assert out.time.values[0] == cftime.datetime(2000, 1, 1, calendar="standard")
    assert out.time_bnds.values[-1, 1] == cftime.datetime(2002, 1, 1, calendar="standard")
    assert len(list((tmp_path / "synthetic.zarr" / ".climrecon" / "done").iterdir())) == 2

    def fail(*args, **kwargs):
        raise AssertionError("a complete store must not be regenerated")

    monkeypatch.setattr(S, "_generate_block", fail)
    assert S.write_synthetic_reanalysis(CFG, static, url) == url
    monkeypatch.undo()
    with pytest.raises(StoreStateError, match="refusing to overwrite"):
        S.write_synthetic_reanalysis(CFG, _static(ridge_height=1000.0), url)
    assert zarr.open_group(url, mode="r").attrs["static_fingerprint"] == S.static_fingerprint(
        S.target_static(CFG, static)
    )


def test_bad_static_fields_are_named(static):
    with pytest.raises(S.SyntheticStaticError, match="'sftlf'"):
        S.synthetic_reanalysis(CFG, static.drop_vars("sftlf"))
    shifted = static.assign_coords(lat=static.lat + STATIC_STEP / 2)
    with pytest.raises(S.SyntheticStaticError, match="do not tile"):
        S.synthetic_reanalysis(CFG, shifted)
    with pytest.raises(S.SyntheticStaticError, match="does not divide"):
        S.synthetic_reanalysis(CFG.model_copy(update={"resolution": 0.4}), static)
    holes = static.copy()
    holes["orog"] = holes.orog.where(holes.lat < 45)
    with pytest.raises(S.SyntheticStaticError, match="missing values"):
        S.synthetic_reanalysis(CFG, holes)
