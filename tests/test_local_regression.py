"""Local regression baseline: recovers a known per-cell linear response, chooses its ridge by leave-one-out,
handles short records and missing cells, and refuses what it cannot do with messages naming the problem."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr

from climrecon import methods
from climrecon.methods import Inputs, Method
from climrecon.methods.baselines import BaselineError, DeltaDownscaler
from climrecon.methods.local_regression import LocalRegressionDownscaler, _loo_ridge
from climrecon.tasks import regrid
from climrecon.tasks.grids import Grid

FINE = Grid(30.0, -120.0, 0.5, 0.5, 20, 24)  # 5 x 6 coarse cells of 2 deg
COARSE = FINE.coarsened(4)
YEARS = 20
TRAIN, HELD = slice("1990-01", "2005-12"), slice("2006-01", None)
NOISE = 0.05


def _containing(n_coarse: int, n_fine: int) -> np.ndarray:
    return np.arange(n_fine) // (n_fine // n_coarse)


@pytest.fixture(scope="module")
def toy() -> dict:
    """Coarse tas = seasonal cycle + random anomalies; fine tas = bilinear + a monthly residual pattern +
    g(cell) x the anomaly of the cell's own coarse cell + h(cell) x the anomaly of the coarse cell to its east
    + small noise: the conditional mean is linear in the neighbourhood, with coefficients that vary by cell."""
    rng = np.random.default_rng(1)
    times = xr.date_range("1990-01-01", periods=12 * YEARS, freq="MS", use_cftime=False)
    month = times.month.values
    season = 8 * np.cos(2 * np.pi * (month - 7) / 12)
    anomaly = rng.normal(0, 2.0, (times.size, COARSE.nlat, COARSE.nlon))
    c_tas = 285 + season[:, None, None] + anomaly
    coarse = xr.Dataset(
        {"tas": (("time", "lat", "lon"), c_tas, {"units": "K"})},
        coords={"time": times, "lat": COARSE.lat, "lon": COARSE.lon},
    )
    c_pr = np.exp(rng.normal(-11, 0.3, c_tas.shape))
    coarse["pr"] = (("time", "lat", "lon"), c_pr, {"units": "kg m-2 s-1"})
    iy, ix = _containing(COARSE.nlat, FINE.nlat), _containing(COARSE.nlon, FINE.nlon)
    east = np.minimum(ix + 1, COARSE.nlon - 1)
    g = 1.0 + 0.8 * np.sin(np.arange(FINE.nlat))[:, None] * np.cos(np.arange(FINE.nlon))[None, :]
    h = 0.5 * np.cos(np.arange(FINE.nlat) / 3)[:, None] * np.ones(FINE.nlon)[None, :]
    pattern = (
        np.cos(np.arange(FINE.nlat) / 4)[None, :, None]
        * np.cos(2 * np.pi * np.arange(12) / 12)[:, None, None]
    )
    bil = regrid.bilinear(coarse, FINE)
    tas = (
        bil["tas"].values
        + pattern[month - 1] * np.ones(FINE.nlon)
        + g * anomaly[:, iy][:, :, ix]
        + h * anomaly[:, iy][:, :, east]
        + rng.normal(0, NOISE, (times.size, FINE.nlat, FINE.nlon))
    )
    fine = xr.Dataset(
        {
            "tas": (("time", "lat", "lon"), tas, {"units": "K"}),
            "pr": (
                ("time", "lat", "lon"),
                np.maximum(bil["pr"].values * (1 + 0.2 * g), 0),
                {"units": "kg m-2 s-1"},
            ),
        },
        coords={"time": times, "lat": FINE.lat, "lon": FINE.lon},
    )
    return {"coarse": coarse, "fine": fine, "g": g, "h": h}


def _fit(toy, **kw) -> LocalRegressionDownscaler:
    return LocalRegressionDownscaler(**kw).fit(toy["coarse"].sel(time=TRAIN), toy["fine"].sel(time=TRAIN))


def _mae(out: xr.Dataset, truth: xr.Dataset, var: str = "tas") -> float:
    return float(abs(out[var].isel(member=0, drop=True) - truth[var]).mean())


def test_recovers_a_per_cell_linear_response_and_beats_the_delta(toy) -> None:
    method = _fit(toy, halo=1, predictors={"tas": ["tas"], "pr": ["pr"]})
    assert isinstance(method, Method)
    held = Inputs.from_coarse(toy["coarse"].sel(time=HELD), FINE, None)
    out = method.downscale(held, members=2)
    truth = toy["fine"].sel(time=HELD)
    assert out["tas"].dims == ("member", "time", "lat", "lon") and out["tas"].dtype == np.float32
    assert (out["tas"].isel(member=0) == out["tas"].isel(member=1)).all()
    assert out.attrs["downscaling_method"] == "local_regression" and out["tas"].attrs["units"] == "K"
    # the fitted weights: the own coarse cell (centre of the 3 x 3) = g, the eastern neighbour = h
    model = method.model
    scale = model.coarse_scale["tas"]
    w = model.weights["tas"] / scale  # per kelvin of coarse anomaly
    interior = (slice(4, 16), slice(4, 16))  # away from the edge, where the repeated edge cell aliases
    np.testing.assert_allclose(w[..., 4][interior], toy["g"][interior], atol=0.02)
    np.testing.assert_allclose(w[..., 5][interior], toy["h"][interior], atol=0.02)
    error = _mae(out, truth)
    delta = DeltaDownscaler().fit(toy["coarse"].sel(time=TRAIN), toy["fine"].sel(time=TRAIN))
    assert error < 1.5 * NOISE * np.sqrt(2 / np.pi) * 1.2  # the noise's own MAE is 0.04
    assert error < 0.1 * _mae(delta.downscale(held), truth)
    assert model.ridge["tas"] <= 1e-3  # leave-one-out picks little shrinkage for a clean linear signal
    assert (out["pr"] >= 0).all()


def test_leave_one_out_is_exact() -> None:
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(30, 4)), rng.normal(size=(30, 2))
    alpha = 0.1
    sse = _loo_ridge(x, y, [alpha])
    brute = 0.0
    for i in range(30):
        keep = np.arange(30) != i
        # the held-out fit uses the same penalty lambda = alpha * n (n of the full sample)
        w = np.linalg.solve(x[keep].T @ x[keep] + alpha * 30 * np.eye(4), x[keep].T @ y[keep])
        brute += float(((y[i] - x[i] @ w) ** 2).sum())
    assert sse[0] == pytest.approx(brute, rel=1e-9)


def test_short_records_missing_cells_and_determinism(toy) -> None:
    coarse, fine = toy["coarse"], toy["fine"]
    mask = np.zeros((FINE.nlat, FINE.nlon), bool)
    mask[:3, :5] = True  # never valid: an ocean
    sometimes = fine["tas"].copy()
    sometimes.values[::7, 10, 10] = np.nan  # a cell missing at some steps: fitted on the others
    masked = fine.assign(tas=sometimes.where(~mask))
    method = LocalRegressionDownscaler().fit(coarse.sel(time=TRAIN), masked.sel(time=TRAIN))
    out = method.downscale(Inputs.from_coarse(coarse.sel(time=HELD), FINE, None))
    values = out["tas"].isel(member=0).values
    assert np.isnan(values[:, mask]).all() and np.isfinite(values[:, ~mask]).all()
    again = LocalRegressionDownscaler().fit(coarse.sel(time=TRAIN), masked.sel(time=TRAIN))
    np.testing.assert_array_equal(
        again.downscale(Inputs.from_coarse(coarse.sel(time=HELD), FINE, None))["tas"], out["tas"]
    )
    # one year of nine months (fewer steps than predictors): pooled climatologies, still better than the delta and bilinear
    nine = slice("1990-01", "1990-09")
    short = LocalRegressionDownscaler().fit(coarse.sel(time=nine), fine.sel(time=nine))
    later = Inputs.from_coarse(coarse.sel(time=slice("1991-01", "1991-10")), FINE, None)
    got = short.downscale(later)
    assert np.isfinite(got["tas"]).all() and got.attrs["pooled_months"]
    bilinear = regrid.bilinear(coarse.sel(time=slice("1991-01", "1991-10")), FINE)
    truth = fine.sel(time=slice("1991-01", "1991-10"))
    delta = DeltaDownscaler().fit(coarse.sel(time=nine), fine.sel(time=nine)).downscale(later)
    assert _mae(got, truth) < min(_mae(delta, truth), float(abs(bilinear["tas"] - truth["tas"]).mean()))


def test_registered_and_refuses_what_it_cannot_do(toy) -> None:
    method = methods.build({"name": "local_regression", "halo": 1}, None)
    assert isinstance(method, LocalRegressionDownscaler) and method.halo == 1
    assert "local_regression" in methods.METHODS
    with pytest.raises(BaselineError, match="call fit"):
        method.downscale(Inputs.from_coarse(toy["coarse"], FINE, None))
    with pytest.raises(BaselineError, match=r"predictors given for \['psl'\]"):
        _fit(toy, predictors={"psl": ["tas"]})
    with pytest.raises(BaselineError, match=r"predictor variable\(s\) \['uas'\]"):
        _fit(toy, predictors={"tas": ["uas"]})
    fitted = _fit(toy)
    with pytest.raises(BaselineError, match=r"lacks predictor variable\(s\) \['pr'\]"):
        fitted.downscale(Inputs.from_coarse(toy["coarse"][["tas"]].sel(time=HELD), FINE, None))
    with pytest.raises(BaselineError, match="not the grid fitted on"):
        fitted.downscale(
            Inputs.from_coarse(toy["coarse"].sel(time=HELD), Grid(30.0, -120.0, 1.0, 1.0, 10, 12), None)
        )
    with pytest.raises(BaselineError, match="paired training steps"):
        LocalRegressionDownscaler().fit(toy["coarse"].isel(time=[0]), toy["fine"].isel(time=[0]))
