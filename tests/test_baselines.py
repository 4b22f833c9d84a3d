"""Baselines: the shared Downscaler interface, bilinear = regrid.bilinear, delta/QM/BCSD preserve what they
must, short records pool neighbouring months, missing cells stay missing."""

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
    for method in (
        B.BilinearDownscaler(),
        B.DeltaDownscaler(),
        B.QuantileMappingDownscaler(),
        B.BCSDDownscaler(),
    ):
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
    # February borrows January (the nearest training month); July, six months away, is not fitted
    np.testing.assert_allclose(
        qm.adjust(ds([2.5], "pr", start="2000-02-01"))["pr"].isel(lat=0, lon=0), [25.0]
    )
    with pytest.raises(B.BaselineError, match=r"month\(s\) \[7\]"):
        qm.adjust(ds([1.0], "pr", start="2000-07-01"))


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
    for method in (
        B.BilinearDownscaler(),
        B.DeltaDownscaler(),
        B.QuantileMappingDownscaler(),
        B.BCSDDownscaler(),
    ):
        method.fit(gcm.sel(time=TRAIN), fine.sel(time=TRAIN))
        out = method.downscale(inputs_of(gcm.sel(time=test), FINE)).isel(member=0, drop=True)
        errors[method.name] = float(abs(out["tas"].groupby("time.month").mean("time") - truth_clim).mean())
    assert errors["qm"] < 0.5 * errors["bilinear"] and errors["bcsd"] < 0.5 * errors["bilinear"]
    assert errors["delta"] < 0.5 * errors["bilinear"]


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
    # Mar-May and Sep-Nov lie within 3 months of the summer: they borrow it; December to February do not
    with pytest.raises(B.BaselineError, match=r"month\(s\) \[1, 2, 12\]"):
        bcsd.downscale(inputs_of(gcm, FINE))
    with pytest.raises(B.BaselineError, match="none in common"):
        B.BCSDDownscaler().fit(gcm[["tas"]], fine[["pr"]])
    with pytest.raises(B.BaselineError, match="members must be >= 1"):
        B.BilinearDownscaler().downscale(inputs_of(gcm, FINE), members=0)


def test_dask_inputs_give_the_same_result_lazily(data) -> None:
    gcm, fine = data["gcm"].chunk(time=48), data["fine"].chunk(time=48)
    for method in (B.DeltaDownscaler(), B.QuantileMappingDownscaler(), B.BCSDDownscaler()):
        lazy = method.fit(gcm.sel(time=TRAIN), fine.sel(time=TRAIN)).downscale(inputs_of(gcm, FINE))
        assert lazy["tas"].chunks is not None
        eager = (
            type(method)()
            .fit(data["gcm"].sel(time=TRAIN), data["fine"].sel(time=TRAIN))
            .downscale(inputs_of(data["gcm"], FINE))
        )
        xr.testing.assert_allclose(lazy[["tas", "pr"]].compute(), eager[["tas", "pr"]], rtol=1e-6)


# -- delta, short records, missing cells ------------------------------------------------------------------
HELD = slice("2002-01-01", None)
NEIGHBOURS = {m: ((m - 2) % 12 + 1, m, m % 12 + 1) for m in range(1, 13)}  # January: (12, 1, 2)


def _by_month(da: xr.DataArray, field: np.ndarray) -> xr.DataArray:
    """``field`` (12, lat, lon) picked by the calendar month of each time step of ``da``."""
    return da.copy(data=field[da["time"].dt.month.values - 1])


def test_delta_recovers_a_known_monthly_residual_and_ratio(data) -> None:
    gcm = data["gcm"]
    bil = regrid.bilinear(gcm[["tas", "pr"]].astype("float64"), FINE)
    rng = np.random.default_rng(3)
    shift, ratio = (
        rng.normal(0, 2, (12, FINE.nlat, FINE.nlon)),
        rng.uniform(0.5, 2, (12, FINE.nlat, FINE.nlon)),
    )
    fine = xr.Dataset(
        {
            "tas": (bil["tas"] + _by_month(bil["tas"], shift)).assign_attrs(units="K"),
            "pr": (bil["pr"] * _by_month(bil["pr"], ratio)).assign_attrs(units="kg m-2 s-1"),
        }
    )
    delta = B.DeltaDownscaler().fit(gcm.sel(time=TRAIN), fine.sel(time=TRAIN))
    assert delta.pooled_months == {}
    np.testing.assert_allclose(delta.residual["tas"].transpose("month", "lat", "lon"), shift, atol=1e-9)
    np.testing.assert_allclose(delta.residual["pr"].transpose("month", "lat", "lon"), ratio, rtol=1e-9)
    out = delta.downscale(inputs_of(gcm.sel(time=HELD), FINE)).isel(member=0, drop=True)
    for var in ("tas", "pr"):  # new times: bilinear + the month's residual IS the fine field
        np.testing.assert_allclose(out[var], fine[var].sel(time=HELD), rtol=1e-6)
    assert out["tas"].attrs["units"] == "K" and "pooled_months" not in out.attrs
    assert float(abs(out["tas"] - bil["tas"].sel(time=HELD)).mean()) > 1.0  # far from plain bilinear


def test_delta_ratio_keeps_pr_non_negative_where_bilinear_dips_below_zero(data) -> None:
    # a dry western column next to a wet one: bilinear extrapolates below zero at the western edge
    pr = data["gcm"]["pr"].copy()
    pr[:, :, 0], pr[:, :, 1] = 0.0, 5 * pr[:, :, 1]
    gcm = data["gcm"].assign(pr=pr)
    bil = regrid.bilinear(gcm[["pr"]].astype("float64"), FINE)["pr"]
    assert float(bil.min()) < 0
    delta = B.DeltaDownscaler().fit(gcm.sel(time=TRAIN), data["fine"].sel(time=TRAIN))
    ratio = delta.residual["pr"]
    assert float(ratio.min()) >= 0
    # the ratio of means at one wet cell, by hand; 1 where the bilinear mean is <= 0
    fine_jan = data["fine"]["pr"].sel(time=TRAIN).isel(lat=5, lon=8)
    bil_jan = bil.sel(time=TRAIN).isel(lat=5, lon=8)
    jan = fine_jan["time"].dt.month == 1
    want = float(fine_jan.where(jan).astype("float64").sum() / bil_jan.where(jan).sum())
    assert float(ratio.sel(month=1).isel(lat=5, lon=8)) == pytest.approx(want, rel=1e-12)
    mean_bil = bil.sel(time=TRAIN).groupby("time.month").mean("time")
    assert (ratio.where(mean_bil <= 0) == 1).sum() == (mean_bil <= 0).sum() > 0
    out = delta.downscale(inputs_of(gcm.sel(time=HELD), FINE)).isel(member=0, drop=True)["pr"]
    below = bil.sel(time=HELD) < 0
    assert int(below.sum()) > 0 and (out.where(below) == 0).sum() == below.sum()
    assert float(out.min()) == 0.0 and bool(np.isfinite(out).all())


def test_a_one_year_record_pools_neighbouring_months(data) -> None:
    one = slice("1990-01", "1990-12")
    gcm, fine = data["gcm"].sel(time=one), data["fine"].sel(time=one)
    winter = gcm["time"].dt.month.isin([12, 1, 2]).values
    delta = B.DeltaDownscaler().fit(gcm, fine)
    qm = B.QuantileMappingDownscaler().fit(gcm, fine)
    bcsd = B.BCSDDownscaler().fit(gcm, fine)
    assert delta.pooled_months == qm.mapping.pooled_months == bcsd.mapping.pooled_months == NEIGHBOURS
    # January: the mean residual of December, January and February
    bil = regrid.bilinear(gcm[["tas"]].astype("float64"), FINE)["tas"]
    want = (fine["tas"].astype("float64") - bil)[winter].mean("time")
    np.testing.assert_allclose(delta.residual["tas"].sel(month=1), want, rtol=1e-12)
    # three values in each window: the quantile nodes are the sorted Dec, Jan, Feb values of each cell
    nodes = np.sort(fine["tas"].values[winter].astype("float64"), axis=0)
    np.testing.assert_allclose(qm.mapping.reference_quantiles["tas"].sel(month=1), nodes, rtol=1e-12)
    assert qm.mapping.reference_quantiles.sizes["quantile"] == 3
    held = data["gcm"].sel(time=HELD)
    truth = data["fine"]["tas"].sel(time=HELD).groupby("time.month").mean("time")
    raw = regrid.bilinear(held[["tas"]], FINE)["tas"].groupby("time.month").mean("time")
    for method in (delta, qm, bcsd):
        out = method.downscale(inputs_of(held, FINE)).isel(member=0, drop=True)
        assert bool(np.isfinite(out["tas"]).all() and np.isfinite(out["pr"]).all())
        if method is not bcsd:  # BCSD's interpolated pr ratio may extrapolate below 0 at the domain edge
            assert bool((out["pr"] >= 0).all())
        assert out.attrs["pooled_months"].startswith("1: [12, 1, 2]; 2: [1, 2, 3]; ")
        error = float(abs(out["tas"].groupby("time.month").mean("time") - truth).mean())
        # still corrects most of the GCM's bias (bilinear: 2.4 K; delta 0.9, qm 1.1, bcsd 1.3 K from one year)
        assert error < 0.6 * float(abs(raw - truth).mean()), method.name


def test_quantile_mapping_is_unchanged_where_every_month_has_two_values(data) -> None:
    two = slice("1990-01", "1991-12")
    gcm, fine = data["gcm"].sel(time=two), data["fine"].sel(time=two)
    qm = B.QuantileMappingDownscaler().fit(gcm, fine)
    assert qm.mapping.pooled_months == {}
    model = regrid.bilinear(gcm[["tas", "pr"]].astype("float64"), FINE)
    month = gcm["time"].dt.month.values
    held = data["gcm"].sel(time=HELD)
    x = regrid.bilinear(held[["tas", "pr"]].astype("float64"), FINE)
    out = qm.downscale(inputs_of(held, FINE)).isel(member=0, drop=True)
    for var in ("tas", "pr"):  # per-month quantiles and mapping as without pooling, to the byte
        want = np.empty(x[var].shape)
        for m in range(1, 13):
            q_model = np.quantile(model[var].values[month == m], [0.25, 0.75], axis=0, method="hazen")
            q_ref = np.quantile(
                fine[var].values[month == m].astype("float64"), [0.25, 0.75], axis=0, method="hazen"
            )
            assert qm.mapping.model_quantiles[var].sel(month=m).values.tobytes() == q_model.tobytes()
            assert qm.mapping.reference_quantiles[var].sel(month=m).values.tobytes() == q_ref.tobytes()
            sel = held["time"].dt.month.values == m
            mapped = B._map_quantiles(
                np.moveaxis(x[var].values[sel], 0, -1),
                np.moveaxis(q_model, 0, -1),
                np.moveaxis(q_ref, 0, -1),
                var in B.MULTIPLICATIVE_VARIABLES,
            )
            want[sel] = np.moveaxis(mapped, -1, 0)
        assert out[var].values.tobytes() == want.astype(np.float32).tobytes()
    # one thin month (a January dropped) pools its neighbours; every other month keeps its bytes
    keep = gcm["time"][1:]
    thin = B.EmpiricalQuantileMapping().fit(model.sel(time=keep), fine.sel(time=keep)[["tas", "pr"]])
    assert thin.pooled_months == {1: (12, 1, 2)}
    for m in range(2, 13):
        for q in ("model_quantiles", "reference_quantiles"):
            a, b = getattr(thin, q)["tas"].sel(month=m), getattr(qm.mapping, q)["tas"].sel(month=m)
            assert a.values.tobytes() == b.values.tobytes()
    pooled = np.isin(month[1:], [12, 1, 2])
    q_jan = np.quantile(model["tas"].values[1:][pooled], [0.25, 0.75], axis=0, method="hazen")
    np.testing.assert_array_equal(
        thin.model_quantiles["tas"].sel(month=1), q_jan
    )  # 5 values: Dec x2, Jan, Feb x2


def test_missing_cells_stay_missing_and_do_not_spread(data) -> None:
    mask = np.zeros((FINE.nlat, FINE.nlon), bool)
    mask[:3, :6] = True  # parts of coarse cells (a coast)
    mask[8:12, 12:16] = True  # one whole coarse cell: NaN in the coarsened truth too
    fine = data["fine"].assign(tas=data["fine"]["tas"].where(~mask), pr=data["fine"]["pr"].where(~mask))
    coarsened = regrid.coarsen_blocks(fine, FACTOR)
    assert int(coarsened["tas"].isel(time=0).isnull().sum()) == 1
    # regrid.bilinear spreads a NaN coarse cell over its whole stencil; the baselines' bilinear does not
    assert (
        int(regrid.bilinear(coarsened[["tas"]], FINE)["tas"].isel(time=0).isnull().sum())
        > mask[8:12, 12:16].sum()
    )
    for coarse in (data["gcm"], coarsened):
        for method in (B.DeltaDownscaler(), B.QuantileMappingDownscaler(), B.BCSDDownscaler()):
            out = method.fit(coarse.sel(time=TRAIN), fine.sel(time=TRAIN)).downscale(
                inputs_of(coarse.sel(time=HELD), FINE)
            )
            for var in ("tas", "pr"):
                values = out[var].isel(member=0).values
                assert np.isnan(values[:, mask]).all(), (method.name, var)
                assert np.isfinite(values[:, ~mask]).all(), (method.name, var)
    # delta and QM work cell by cell: on the cells with data, masking others changes nothing
    for kind in (B.DeltaDownscaler, B.QuantileMappingDownscaler):
        held = inputs_of(data["gcm"].sel(time=HELD), FINE)
        masked = kind().fit(data["gcm"].sel(time=TRAIN), fine.sel(time=TRAIN)).downscale(held)
        full = kind().fit(data["gcm"].sel(time=TRAIN), data["fine"].sel(time=TRAIN)).downscale(held)
        np.testing.assert_array_equal(masked["tas"].values[..., ~mask], full["tas"].values[..., ~mask])


def test_bilinear_skipna_is_bilinear_on_complete_stencils_and_renormalises_gaps(data) -> None:
    coarse = data["coarse"][["tas"]].isel(time=slice(0, 3))
    holed = coarse.assign(
        tas=coarse["tas"].where((coarse["lat"] != coarse["lat"][1]) | (coarse["lon"] != coarse["lon"][2]))
    )
    plain, skip = regrid.bilinear(holed, FINE)["tas"], B._bilinear_skipna(holed, FINE)["tas"]
    complete = plain.notnull()
    assert int((~complete).isel(time=0).sum()) > 0 and bool(skip.notnull().all())
    assert skip.where(complete).values.tobytes() == plain.values.tobytes()
    flat = B._bilinear_skipna(holed.assign(tas=holed["tas"] * 0 + 7.0), FINE)["tas"]  # renormalised: stays 7
    np.testing.assert_allclose(flat, 7.0, rtol=1e-6)
    assert (
        B._bilinear_skipna(coarse, FINE)["tas"].values.tobytes()
        == regrid.bilinear(coarse, FINE)["tas"].values.tobytes()
    )


def test_months_never_seen_raise_and_one_value_cannot_be_pooled(data) -> None:
    q1 = slice("1990-01", "1990-03")  # January to March of one year
    gcm, fine = data["gcm"].sel(time=q1), data["fine"].sel(time=q1)
    july = inputs_of(data["gcm"].sel(time=slice("1995-07-01", "1995-07-30")), FINE)
    for method in (B.DeltaDownscaler(), B.QuantileMappingDownscaler(), B.BCSDDownscaler()):
        method.fit(gcm, fine)
        pooled = (
            method.pooled_months if isinstance(method, B.DeltaDownscaler) else method.mapping.pooled_months
        )
        # Jan-Mar pool thin neighbours; absent months within 3 months of the data borrow the nearest
        # (Apr-Jun from Feb-Mar, Oct-Dec from Jan-Feb); July and August-September lie further: not fitted
        assert pooled == {
            1: (1, 2),
            2: (1, 2, 3),
            3: (2, 3),
            4: (2, 3),
            5: (2, 3),
            6: (2, 3),
            10: (1, 2),
            11: (1, 2),
            12: (1, 2),
        }
        held_out = method.downscale(inputs_of(data["gcm"].sel(time="1995-11"), FINE))
        assert bool(np.isfinite(held_out["tas"]).all())
        out = method.downscale(inputs_of(data["gcm"].sel(time="1995-02"), FINE))
        assert bool(np.isfinite(out["tas"]).all())
        with pytest.raises(
            B.BaselineError, match=r"month\(s\) \[7\] occur in the data but not in the training"
        ):
            method.downscale(july)
    for kind in (B.DeltaDownscaler, B.QuantileMappingDownscaler):
        with pytest.raises(
            B.BaselineError, match=r"need >= 2 training values per month of year, got 1 even pool"
        ):
            kind().fit(gcm.isel(time=[0]), fine.isel(time=[0]))
    # per_month=False: one all-time mean residual, so July is served by the January-March mean
    delta = B.DeltaDownscaler(per_month=False).fit(gcm, fine)
    bil = regrid.bilinear(gcm[["tas"]].astype("float64"), FINE)["tas"]
    mean = (fine["tas"].astype("float64") - bil).mean("time")
    np.testing.assert_allclose(delta.residual["tas"], mean, rtol=1e-12)
    got = delta.downscale(july).isel(member=0, time=0)["tas"]
    want = (
        regrid.bilinear(data["gcm"][["tas"]].sel(time="1995-07").astype("float64"), FINE)["tas"].isel(time=0)
        + mean
    )
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_delta_is_registered_and_refuses_what_it_cannot_do(data) -> None:
    from climrecon import methods

    built = methods.build({"name": "delta", "per_month": False, "min_values": 3})
    assert isinstance(built, B.DeltaDownscaler) and (built.per_month, built.min_values) == (False, 3)
    assert built.describe()["config"] == {"name": "delta", "label": None, "per_month": False, "min_values": 3}
    assert built.needs.fit and built.needs.coarse and not built.needs.stochastic
    gcm, fine = data["gcm"].sel(time=TRAIN), data["fine"].sel(time=TRAIN)
    with pytest.raises(B.BaselineError, match="call fit"):
        B.DeltaDownscaler().downscale(inputs_of(gcm, FINE))
    with pytest.raises(B.BaselineError, match="share no time step"):
        B.DeltaDownscaler().fit(gcm.sel(time="1990"), fine.sel(time="1991"))
    delta = B.DeltaDownscaler().fit(gcm, fine)
    with pytest.raises(B.BaselineError, match="not the grid fitted on"):
        delta.downscale(inputs_of(gcm, Grid(30.0, -120.0, 1.0, 1.0, 8, 10)))
    with pytest.raises(B.BaselineError, match="coarse input is not on the grid fitted on"):
        delta.downscale(inputs_of(regrid.coarsen_blocks(fine, 2), FINE))
