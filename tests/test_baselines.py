"""Baselines: the shared Downscaler interface, bilinear = regrid.bilinear, QM/BCSD preserve what they must."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr

from climrecon.methods import Inputs, Method
from climrecon.methods import baselines as B
from climrecon.tasks import regrid
from climrecon.tasks.grids import Grid

inputs_of = Inputs.from_coarse  # what a stage hands a method: coarse fields + their view on the target grid
FINE = Grid(30.0, -120.0, 0.5, 0.5, 16, 20)  # 4 x 5 coarse cells of 2 deg
FACTOR = 4
YEARS = 16
TRAIN = slice("1990-01", "2001-12")  # 12 training years, 4 held out


@pytest.fixture(scope="module")
def data() -> dict[str, xr.Dataset]:
    """A fine 'truth' (seasonal cycle + orographic pattern + noise), its block mean, and a biased 'GCM'."""
    rng = np.random.default_rng(0)
    times = xr.date_range("1990-01-01", periods=12 * YEARS, freq="MS", calendar="360_day", use_cftime=True)
    month = np.asarray([t.month for t in times])
    season = 10 * np.cos(2 * np.pi * (month - 7) / 12)[:, None, None]
    pattern = 3 * np.sin(np.deg2rad(FINE.lat * 40))[:, None] * np.cos(np.deg2rad(FINE.lon * 30))[None, :]
    tas = 285 + season + pattern + rng.normal(0, 1.5, (times.size, FINE.nlat, FINE.nlon))
    pr = (
        rng.gamma(2.0, 1e-5, tas.shape)
        * (1 + 0.5 * np.cos(2 * np.pi * month / 12))[:, None, None]
        * (1 + pattern / 6)
    )
    bnds = np.stack(
        [np.asarray(times), np.asarray(list(times[1:]) + [times[-1] + (times[-1] - times[-2])])], -1
    )
    fine = xr.Dataset(
        {
            "tas": (
                ("time", "lat", "lon"),
                tas.astype("float32"),
                {"units": "K", "standard_name": "air_temperature"},
            ),
            "pr": (("time", "lat", "lon"), pr.astype("float32"), {"units": "kg m-2 s-1"}),
            "time_bnds": (("time", "bnds"), bnds),
        },
        coords={"time": times, "lat": FINE.lat, "lon": FINE.lon},
    )
    coarse = regrid.coarsen_blocks(fine, FACTOR)
    gcm = coarse.assign(
        tas=(1.3 * (coarse.tas - 285) + 287).astype("float32"), pr=(1.6 * coarse.pr).astype("float32")
    )
    return {"fine": fine, "coarse": coarse, "gcm": gcm}


def _quantiles_by_month(da: xr.DataArray) -> xr.DataArray:
    return da.groupby("time.month").quantile([0.05, 0.25, 0.5, 0.75, 0.95], dim="time")


def test_every_baseline_is_a_downscaler_with_the_shared_output(data) -> None:
    for method in (B.BilinearDownscaler(), B.QuantileMappingDownscaler(), B.BCSDDownscaler()):
        assert isinstance(method, Method)
        fitted = method.fit(data["gcm"].sel(time=TRAIN), data["fine"].sel(time=TRAIN))
        assert fitted is method
        out = method.downscale(inputs_of(data["gcm"], FINE), members=3, seed=5)
        assert out["tas"].dims == ("member", "time", "lat", "lon") and out["tas"].dtype == np.float32
        assert out.sizes["member"] == 3 and out.sizes["time"] == 12 * YEARS
        np.testing.assert_allclose(out["lat"], FINE.lat) and np.testing.assert_allclose(out["lon"], FINE.lon)
        assert out["tas"].attrs["units"] == "K" and out["pr"].attrs["units"] == "kg m-2 s-1"
        assert "time_bnds" in out and out.attrs["downscaling_method"] == method.name
        assert (out["tas"].isel(member=0) == out["tas"].isel(member=2)).all()  # deterministic baselines
        assert np.isfinite(out["tas"]).all() and (out["pr"] >= 0).all()


def test_bilinear_baseline_equals_regrid_bilinear(data) -> None:
    out = B.BilinearDownscaler().downscale(inputs_of(data["gcm"], FINE), members=2)
    expected = regrid.bilinear(data["gcm"], FINE)
    for var in ("tas", "pr"):
        for m in range(2):
            xr.testing.assert_equal(out[var].isel(member=m, drop=True), expected[var])
    # a dataset with lat/lon is as good a target as a Grid
    xr.testing.assert_equal(
        B.BilinearDownscaler().downscale(inputs_of(data["gcm"], data["fine"]))["tas"],
        out["tas"].isel(member=[0]),
    )


def test_empirical_quantile_mapping_by_hand() -> None:
    def ds(values, name, start="2000-01-01"):  # one value per year, same in each of 2 x 2 cells
        v = np.asarray(values, float)
        times = xr.date_range(start, periods=v.size, freq="12MS", calendar="noleap", use_cftime=True)
        return xr.Dataset(
            {name: (("time", "lat", "lon"), v[:, None, None] * np.ones((1, 2, 2)))},
            coords={"time": times, "lat": [0.0, 1.0], "lon": [0.0, 1.0]},
        )

    for name in ("tas", "pr"):  # 4 Januaries: every training value is a quantile node
        qm = B.EmpiricalQuantileMapping().fit(ds([1, 2, 3, 4], name), ds([10, 20, 30, 40], name))
        got = qm.adjust(ds([1.0, 2.5, 4.0, 0.5, 5.0], name))[name].isel(lat=0, lon=0).values
        if name == "tas":  # inside: linear between nodes; outside: the end difference (+9 below, +36 above)
            np.testing.assert_allclose(got, [10.0, 25.0, 40.0, 9.5, 41.0])
        else:  # pr: outside, the end ratio multiplies (x10 below, x10 above)
            np.testing.assert_allclose(got, [10.0, 25.0, 40.0, 5.0, 50.0])
    tied = B.EmpiricalQuantileMapping().fit(ds([1, 2, 2, 4], "tas"), ds([10, 20, 30, 40], "tas"))
    np.testing.assert_allclose(tied.adjust(ds([2.0, 3.0], "tas"))["tas"].isel(lat=0, lon=0), [25.0, 35.0])
    with pytest.raises(B.BaselineError, match=r"month\(s\) \[2\]"):
        qm.adjust(ds([1.0], "pr", start="2000-02-01"))


def test_quantile_mapping_reproduces_fine_quantiles_on_training_years(data) -> None:
    gcm, fine = data["gcm"].sel(time=TRAIN), data["fine"].sel(time=TRAIN)
    out = (
        B.QuantileMappingDownscaler().fit(gcm, fine).downscale(inputs_of(gcm, FINE)).isel(member=0, drop=True)
    )
    raw = regrid.bilinear(gcm[["tas", "pr"]].astype("float64"), FINE)
    for var in ("tas", "pr"):
        got, want = _quantiles_by_month(out[var]), _quantiles_by_month(fine[var])
        # equal values of the interpolated model cannot be split apart: skip tied cells (none in float64)
        tied = (
            raw[var]
            .groupby("time.month")
            .map(
                lambda g: xr.apply_ufunc(
                    lambda a: (np.diff(np.sort(a, axis=-1), axis=-1) == 0).any(-1),
                    g,
                    input_core_dims=[["time"]],
                )
            )
        )
        assert float(tied.mean()) < 0.01
        np.testing.assert_allclose(
            got.where(~tied), want.where(~tied), rtol=2e-6, atol=1e-6 * float(abs(want).max())
        )
    assert float(abs(_quantiles_by_month(raw["tas"]) - _quantiles_by_month(fine["tas"])).mean()) > 1.0


def test_bcsd_bias_correction_matches_coarse_reference_and_fine_climatology(data) -> None:
    gcm, fine = data["gcm"].sel(time=TRAIN), data["fine"].sel(time=TRAIN)
    bcsd = B.BCSDDownscaler().fit(gcm, fine)
    reference = bcsd.coarse_reference(fine)
    xr.testing.assert_allclose(reference[["tas", "pr"]], data["coarse"].sel(time=TRAIN)[["tas", "pr"]])
    corrected = bcsd.bias_correct(gcm)
    for var in ("tas", "pr"):
        got, want = _quantiles_by_month(corrected[var]), _quantiles_by_month(reference[var])
        np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-6 * float(abs(want).max()))
    # spatial disaggregation onto the fine climatology: the training-period monthly means are the fine ones
    out = bcsd.downscale(inputs_of(gcm, FINE)).isel(member=0, drop=True)
    for var in ("tas", "pr"):
        got = out[var].groupby("time.month").mean("time")
        want = fine[var].groupby("time.month").mean("time")
        np.testing.assert_allclose(got, want, rtol=1e-5)


def test_bcsd_on_a_coarse_grid_that_is_not_a_block_coarsening(data) -> None:
    coarse_grid = Grid(30.0, -120.0, 8 / 3, 2.5, 3, 4)  # 0.5-deg cells do not tile 8/3-deg ones
    gcm = regrid.conservative(data["gcm"], coarse_grid).sel(time=TRAIN)
    fine = data["fine"].sel(time=TRAIN)
    bcsd = B.BCSDDownscaler().fit(gcm, fine)
    reference = bcsd.coarse_reference(fine)
    xr.testing.assert_allclose(reference[["tas"]], regrid.conservative(fine, coarse_grid)[["tas"]])
    got, want = _quantiles_by_month(bcsd.bias_correct(gcm)["tas"]), _quantiles_by_month(reference["tas"])
    np.testing.assert_allclose(got, want, rtol=2e-6)
    assert bcsd.downscale(inputs_of(gcm, FINE))["tas"].notnull().all()


def test_bias_corrected_baselines_beat_bilinear_on_held_out_years(data) -> None:
    test = slice("2002-01-01", None)
    gcm, fine = data["gcm"], data["fine"]
    truth_clim = fine["tas"].sel(time=test).groupby("time.month").mean("time")
    errors = {}
    for method in (B.BilinearDownscaler(), B.QuantileMappingDownscaler(), B.BCSDDownscaler()):
        method.fit(gcm.sel(time=TRAIN), fine.sel(time=TRAIN))
        out = method.downscale(inputs_of(gcm.sel(time=test), FINE)).isel(member=0, drop=True)
        errors[method.name] = float(abs(out["tas"].groupby("time.month").mean("time") - truth_clim).mean())
    assert errors["qm"] < 0.5 * errors["bilinear"] and errors["bcsd"] < 0.5 * errors["bilinear"]


def test_errors_name_the_problem(data) -> None:
    gcm, fine = data["gcm"], data["fine"]
    with pytest.raises(B.BaselineError, match="call fit"):
        B.BCSDDownscaler().downscale(inputs_of(gcm, FINE))
    qm = B.QuantileMappingDownscaler().fit(gcm.sel(time=TRAIN), fine.sel(time=TRAIN))
    with pytest.raises(B.BaselineError, match="not the grid fitted on"):
        qm.downscale(inputs_of(gcm, Grid(30.0, -120.0, 1.0, 1.0, 8, 10)))
    summer_only = gcm.sel(time=gcm.time.dt.month.isin([6, 7, 8]))
    bcsd = B.BCSDDownscaler().fit(
        summer_only.sel(time=TRAIN), fine.sel(time=fine.time.dt.month.isin([6, 7, 8])).sel(time=TRAIN)
    )
    with pytest.raises(B.BaselineError, match=r"month\(s\) \[1, 2, 3, 4, 5, 9, 10, 11, 12\]"):
        bcsd.downscale(inputs_of(gcm, FINE))
    with pytest.raises(B.BaselineError, match="none in common"):
        B.BCSDDownscaler().fit(gcm[["tas"]], fine[["pr"]])
    with pytest.raises(B.BaselineError, match="members must be >= 1"):
        B.BilinearDownscaler().downscale(inputs_of(gcm, FINE), members=0)


def test_dask_inputs_give_the_same_result_lazily(data) -> None:
    gcm, fine = data["gcm"].chunk(time=48), data["fine"].chunk(time=48)
    for method in (B.QuantileMappingDownscaler(), B.BCSDDownscaler()):
        lazy = method.fit(gcm.sel(time=TRAIN), fine.sel(time=TRAIN)).downscale(inputs_of(gcm, FINE))
        assert lazy["tas"].chunks is not None
        eager = (
            type(method)()
            .fit(data["gcm"].sel(time=TRAIN), data["fine"].sel(time=TRAIN))
            .downscale(inputs_of(data["gcm"], FINE))
        )
        xr.testing.assert_allclose(lazy[["tas", "pr"]].compute(), eager[["tas", "pr"]], rtol=1e-6)
