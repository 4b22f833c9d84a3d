"""Metrics against hand-computed cases, reference libraries and synthetic ensembles of known calibration."""

from __future__ import annotations

import numpy as np
import properscoring
import pytest
import scipy.ndimage
import scipy.stats
import xarray as xr

from climrecon.tasks import metrics as M

W0, W60 = 1.0, 0.5  # cos(0 deg), cos(60 deg): the two rows of the hand-computed grid


def field(
    values, lat=(0.0, 60.0), lon=None, name="tas", units="K", member=False, start="2000-01-01"
) -> xr.DataArray:
    """A float64 (time, lat, lon) or (member, time, lat, lon) DataArray on a noleap monthly axis."""
    values = np.asarray(values, dtype=np.float64)
    dims = ("member", "time", "lat", "lon") if member else ("time", "lat", "lon")
    shape = dict(zip(dims, values.shape, strict=True))
    coords = {
        "time": xr.date_range(start, periods=shape["time"], freq="MS", calendar="noleap", use_cftime=True),
        "lat": np.asarray(lat, float)
        if len(lat) == shape["lat"]
        else np.linspace(lat[0], lat[1], shape["lat"]),
        "lon": np.asarray(lon, float) if lon is not None else np.arange(shape["lon"], dtype=float),
    }
    if member:
        coords["member"] = np.arange(shape["member"])
    return xr.DataArray(
        values, dims=dims, coords={d: coords[d] for d in dims}, name=name, attrs={"units": units}
    )


# -- deterministic scores ------------------------------------------------------------------------------
def test_mae_rmse_bias_by_hand() -> None:
    truth = field(np.zeros((1, 2, 2)))
    forecast = field([[[1.0, 3.0], [2.0, -2.0]]])  # row lat=0: errors 1, 3; row lat=60: 2, -2
    total = 2 * W0 + 2 * W60
    assert float(M.mae(forecast, truth)) == pytest.approx((W0 * 4 + W60 * 4) / total)  # 8/3
    assert float(M.rmse(forecast, truth)) == pytest.approx(np.sqrt((W0 * 10 + W60 * 8) / total))  # sqrt(14/3)
    assert float(M.bias(forecast, truth)) == pytest.approx((W0 * 4 + W60 * 0) / total)  # 4/3
    per_time = M.rmse(forecast, truth, dim=["lat", "lon"])
    assert per_time.dims == ("time",)


def test_pattern_correlation_by_hand_per_map() -> None:
    rng = np.random.default_rng(0)
    truth = field(rng.standard_normal((2, 2, 3)))
    forecast = field(rng.standard_normal((2, 2, 3)))
    r = M.pattern_correlation(forecast, truth)
    assert r.dims == ("time",)
    w = np.repeat([[W0], [W60]], 3, axis=1).ravel()
    for t in range(2):
        f, o = forecast.values[t].ravel(), truth.values[t].ravel()
        fa, oa = f - np.average(f, weights=w), o - np.average(o, weights=w)
        expected = np.sum(w * fa * oa) / np.sqrt(np.sum(w * fa**2) * np.sum(w * oa**2))
        assert float(r[t]) == pytest.approx(expected)
    assert np.allclose(M.pattern_correlation(2 * truth + 5, truth), 1.0)  # blind to bias and amplitude


def test_scores_per_variable_and_per_member() -> None:
    rng = np.random.default_rng(1)
    truth = field(rng.normal(size=(3, 4, 5)))
    ens = field(rng.normal(size=(2, 3, 4, 5)), member=True)
    out = M.mae(ens.to_dataset(), truth.to_dataset())
    assert isinstance(out, xr.Dataset) and out["tas"].dims == ("member",)
    for m in range(2):
        err = np.abs(ens.values[m] - truth.values)
        w = np.cos(np.deg2rad(truth.lat.values))[None, :, None] * np.ones_like(err)
        assert float(out["tas"][m]) == pytest.approx((err * w).sum() / w.sum())


def test_mismatched_inputs_name_the_problem() -> None:
    truth = field(np.zeros((1, 2, 2)))
    shifted = truth.assign_coords(lat=[1.0, 61.0])
    with pytest.raises(M.MetricError, match="'lat'"):
        M.rmse(shifted, truth)
    with pytest.raises(M.MetricError, match="truth has no variable 'tas'"):
        M.mae(truth.to_dataset(), truth.rename("pr").to_dataset())
    with pytest.raises(M.MetricError, match="needs an ensemble"):
        M.crps(truth, truth)


def test_acc_by_hand_and_with_monthly_climatology() -> None:
    # one map, zero climatology: ACC = sum w f t / sqrt(sum w f^2 sum w t^2)
    t = np.array([[[1.0, -1.0], [2.0, 0.0]]])
    f = np.array([[[1.0, 0.0], [1.0, 1.0]]])
    w = np.array([[W0, W0], [W60, W60]])
    expected = (w * f[0] * t[0]).sum() / np.sqrt((w * f[0] ** 2).sum() * (w * t[0] ** 2).sum())
    clim = xr.zeros_like(field(t).isel(time=0, drop=True))
    assert float(M.acc(field(f), field(t), clim)) == pytest.approx(expected)
    # monthly climatology from the truth: ACC is invariant to scaling anomalies, and -1 for negated ones
    rng = np.random.default_rng(2)
    truth = field(rng.normal(size=(24, 3, 4)) + 10 * np.arange(24)[:, None, None] % 12)
    climatology = M.monthly_climatology(truth)
    assert climatology.sizes["month"] == 12
    anom = M.anomalies(truth, climatology)
    assert float(M.acc(truth, truth, climatology)) == pytest.approx(1.0)
    assert float(
        M.acc(climatology.sel(month=truth.time.dt.month).drop_vars("month") + 3 * anom, truth, climatology)
    ) == pytest.approx(1.0)
    assert float(
        M.acc(climatology.sel(month=truth.time.dt.month).drop_vars("month") - anom, truth, climatology)
    ) == pytest.approx(-1.0)
    with pytest.raises(M.MetricError, match="no month"):
        M.acc(truth, truth, climatology.sel(month=[1, 2]))


# -- image metrics -------------------------------------------------------------------------------------
def _ssim_brute_force(x: np.ndarray, y: np.ndarray, L: float) -> float:
    """Mean SSIM over cells whose 11 x 11 Gaussian (sigma 1.5) window fits in the map, by explicit sums."""
    k = np.exp(-0.5 * (np.arange(-5, 6) / 1.5) ** 2)
    g = np.outer(k, k) / np.outer(k, k).sum()
    c1, c2 = (0.01 * L) ** 2, (0.03 * L) ** 2
    vals = []
    for i in range(5, x.shape[0] - 5):
        for j in range(5, x.shape[1] - 5):
            px, py = x[i - 5 : i + 6, j - 5 : j + 6], y[i - 5 : i + 6, j - 5 : j + 6]
            mx, my = (g * px).sum(), (g * py).sum()
            vx, vy = (g * px**2).sum() - mx**2, (g * py**2).sum() - my**2
            cov = (g * px * py).sum() - mx * my
            vals.append((2 * mx * my + c1) * (2 * cov + c2) / ((mx**2 + my**2 + c1) * (vx + vy + c2)))
    return float(np.mean(vals))


def test_ssim_by_hand_and_against_explicit_windows() -> None:
    # constant maps a, b: only the luminance term is left, (2ab + C1) / (a^2 + b^2 + C1)
    a, b, L = 2.0, 3.0, 10.0
    c1 = (0.01 * L) ** 2
    got = M.ssim(
        field(np.full((1, 12, 12), b), lat=(0, 11)), field(np.full((1, 12, 12), a), lat=(0, 11)), data_range=L
    )
    assert float(got) == pytest.approx((2 * a * b + c1) / (a**2 + b**2 + c1))
    rng = np.random.default_rng(3)
    t = scipy.ndimage.gaussian_filter(rng.normal(size=(2, 16, 18)), (0, 2, 2))
    f = t + 0.3 * rng.normal(size=t.shape)
    truth, forecast = field(t, lat=(0, 15)), field(f, lat=(0, 15))
    L = float(t.max() - t.min())
    expected = np.mean([_ssim_brute_force(f[i], t[i], L) for i in range(2)])
    result = M.ssim(forecast, truth)
    assert float(result) == pytest.approx(expected, rel=1e-9)
    assert result.attrs["data_range"] == pytest.approx(L)
    assert float(M.ssim(truth, truth)) == pytest.approx(1.0)
    with pytest.raises(M.MetricError, match="11 x 11"):
        M.ssim(field(np.zeros((1, 4, 4))), field(np.ones((1, 4, 4))))


def test_psnr_by_hand() -> None:
    t = np.arange(2 * 3 * 4, dtype=float).reshape(2, 3, 4)  # range L = 23
    result = M.psnr(field(t + 1.0, lat=(0, 2)), field(t, lat=(0, 2)))  # MSE = 1 on every map
    assert float(result) == pytest.approx(20 * np.log10(23.0))
    maps_mse = np.array([1.0, 4.0])
    f = t + np.sqrt(maps_mse)[:, None, None]
    assert float(M.psnr(field(f, lat=(0, 2)), field(t, lat=(0, 2)), data_range=10.0)) == pytest.approx(
        np.mean(10 * np.log10(100.0 / maps_mse))
    )


# -- distributions ---------------------------------------------------------------------------------------
def test_q99_error_per_cell_and_pooled() -> None:
    rng = np.random.default_rng(4)
    t = rng.normal(size=(50, 2, 3))
    truth = field(t)
    assert float(M.q99_error(field(t + 2.0), truth)) == pytest.approx(2.0)
    f = rng.normal(size=(50, 2, 3)) * 2.0
    q_f, q_t = np.quantile(f, 0.99, axis=0), np.quantile(t, 0.99, axis=0)
    w = np.array([W0, W60])[:, None] * np.ones((2, 3))
    assert float(M.q99_error(field(f), truth)) == pytest.approx((w * np.abs(q_f - q_t)).sum() / w.sum())
    assert float(M.q99_error(field(f), truth, mode="pooled")) == pytest.approx(
        abs(np.quantile(f, 0.99) - np.quantile(t, 0.99))
    )


def test_wasserstein_by_hand() -> None:
    truth = field(np.zeros((1, 2, 2)))
    forecast = field([[[1.0, 1.0], [0.0, 0.0]]])  # the lat=0 row (weight 1 of 1.5 per column) moves by 1
    assert float(M.wasserstein(forecast, truth)) == pytest.approx(W0 / (W0 + W60))
    rng = np.random.default_rng(5)
    t = rng.normal(size=(10, 3, 4))
    assert float(M.wasserstein(field(t + 0.7), field(t))) == pytest.approx(0.7)


# -- ensembles -----------------------------------------------------------------------------------------
def test_crps_matches_properscoring_and_fair_formula() -> None:
    rng = np.random.default_rng(6)
    truth = field(rng.normal(size=(4, 3, 5)))
    ens = field(rng.normal(size=(7, 4, 3, 5)), member=True)
    w = np.cos(np.deg2rad(truth.lat.values))[None, :, None] * np.ones(truth.shape)
    ref = properscoring.crps_ensemble(truth.values, np.moveaxis(ens.values, 0, -1))
    assert float(M.crps(ens, truth)) == pytest.approx((ref * w).sum() / w.sum(), rel=1e-10)
    x, y, m = ens.values, truth.values, ens.sizes["member"]
    fair = np.abs(x - y).mean(0) - np.abs(x[:, None] - x[None]).sum((0, 1)) / (2 * m * (m - 1))
    assert float(M.crps(ens, truth, fair=True)) == pytest.approx((fair * w).sum() / w.sum(), rel=1e-10)


def _ensemble(member_scale: float, members: int = 10, seed: int = 7):
    """Truth ~ N(mu, 1); members ~ N(mu, member_scale^2): calibrated when member_scale == 1."""
    rng = np.random.default_rng(seed)
    mu = rng.normal(size=(100, 8, 8)) * 3
    truth = field(mu + rng.normal(size=mu.shape), lat=(30, 50))
    ens = field(mu + member_scale * rng.normal(size=(members, *mu.shape)), lat=(30, 50), member=True)
    return ens, truth


def test_spread_skill_ratio_calibrated_and_underdispersive() -> None:
    calibrated = float(M.spread_skill_ratio(*_ensemble(1.0, members=5)))
    assert calibrated == pytest.approx(1.0, abs=0.03)
    assert float(M.spread_skill_ratio(*_ensemble(0.4))) < 0.6
    # the finite-ensemble factor: with M = 2 the uncorrected ratio would be sqrt(2/3) ~ 0.82
    assert float(M.spread_skill_ratio(*_ensemble(1.0, members=2))) == pytest.approx(1.0, abs=0.04)


def test_rank_histogram_flat_u_shaped_and_seeded_ties() -> None:
    flat = M.rank_histogram(*_ensemble(1.0))
    assert flat.dims == ("rank",) and flat.sizes["rank"] == 11 and int(flat.sum()) == 6400
    assert np.abs(flat.values / flat.values.mean() - 1).max() < 0.15
    u = M.rank_histogram(*_ensemble(0.3)).values
    assert min(u[0], u[-1]) > 4 * u[3:8].max()
    # by hand: members (1, 2, 3), truth 2.5 -> rank 2; truth 0 -> rank 0; truth 9 -> rank 3
    ens = field(np.array([1.0, 2.0, 3.0])[:, None, None, None] * np.ones((3, 3, 1, 1)), lat=(0,), member=True)
    hand = M.rank_histogram(ens, field(np.array([2.5, 0.0, 9.0])[:, None, None], lat=(0,)))
    assert hand.values.tolist() == [1, 0, 1, 1]
    # ties: every member equals the truth -> ranks uniform over 0..M, deterministic per seed
    tied = field(np.zeros((4, 2000, 1, 1)), lat=(0,), member=True)
    h1 = M.rank_histogram(tied, tied.isel(member=0, drop=True), seed=1)
    assert np.abs(h1.values / 400 - 1).max() < 0.2
    assert (
        h1.values.tolist() == M.rank_histogram(tied, tied.isel(member=0, drop=True), seed=1).values.tolist()
    )
    assert (
        h1.values.tolist() != M.rank_histogram(tied, tied.isel(member=0, drop=True), seed=2).values.tolist()
    )


# -- spectra -------------------------------------------------------------------------------------------
def _slope(p: xr.DataArray, first_bin: int = 3) -> float:
    k, v = p["wavenumber"].values[first_bin:], p.values[first_bin:]
    return float(np.polyfit(np.log(k), np.log(v), 1)[0])


def test_power_spectrum_white_noise_flat_and_power_law() -> None:
    rng = np.random.default_rng(8)
    noise = rng.normal(scale=2.0, size=(16, 64, 64))
    white = M.power_spectrum(field(noise, lat=(0, 63)))
    assert white["wavenumber"].values[0] == pytest.approx(1 / 64) and white["wavenumber"].values[
        -1
    ] == pytest.approx(0.5)
    assert np.abs(white.values / 4.0 - 1).max() < 0.25  # P = variance at every k
    assert abs(_slope(white)) < 0.1
    ky, kx = np.fft.fftfreq(64), np.fft.fftfreq(64)
    k = np.hypot(*np.meshgrid(ky, kx, indexing="ij"))
    amp = np.where(k > 0, k, 1.0) ** -1.5 * (k > 0)  # |k|^-1.5 amplitude -> |k|^-3 power
    red = np.fft.ifft2(np.fft.fft2(noise) * amp).real
    assert _slope(M.power_spectrum(field(red, lat=(0, 63)))) == pytest.approx(-3.0, abs=0.15)


def test_power_spectrum_sinusoid_and_km_units() -> None:
    y, x = np.meshgrid(np.arange(32), np.arange(32), indexing="ij")
    wave = 3.0 * np.cos(2 * np.pi * 4 * x / 32)[None]
    p = M.power_spectrum(field(wave, lat=(0, 31)))
    peak = int(np.argmax(p.values))
    assert p["wavenumber"].values[peak] == pytest.approx(4 / 32)
    assert np.delete(p.values, peak).max() < 1e-20
    # Parseval: the annulus holds all the power, sum(P) = n * variance = 1024 * 4.5
    annulus = np.rint(np.hypot(*np.meshgrid(np.fft.fftfreq(32), np.fft.fftfreq(32), indexing="ij")) * 32) == 4
    assert float(p.max()) * annulus.sum() == pytest.approx(1024 * 4.5)
    # km: 0.5 deg at the equator is ~55.6 km; 16 cells -> fundamental 1/(16 * 55.6) cycles per km
    km = M.power_spectrum(
        field(np.random.default_rng(0).normal(size=(1, 16, 16)), lat=(-3.75, 3.75), lon=np.arange(16) * 0.5),
        units="cycles_per_km",
    )
    dy = 0.5 * np.pi * 6371 / 180
    assert km["wavenumber"].values[0] == pytest.approx(1 / (16 * dy), rel=0.01)
    assert km["wavenumber"].attrs["units"] == "cycles per km"


def test_log_spectral_distance_by_hand() -> None:
    rng = np.random.default_rng(9)
    t = field(rng.normal(size=(3, 16, 16)), lat=(0, 15))
    assert float(M.log_spectral_distance(t, t)) == pytest.approx(0.0)
    assert float(M.log_spectral_distance(np.sqrt(2) * t, t)) == pytest.approx(10 * np.log10(2))


# -- all at once ---------------------------------------------------------------------------------------
def test_evaluate_all_ensemble_and_deterministic() -> None:
    ens, truth = _ensemble(1.0, members=4)
    ds_e, ds_t = ens.isel(time=slice(0, 24)).to_dataset(), truth.isel(time=slice(0, 24)).to_dataset()
    ds_e["pr"], ds_t["pr"] = np.exp(ds_e["tas"] / 5), np.exp(ds_t["tas"] / 5)
    table = M.evaluate_all(ds_e, ds_t, climatology=M.monthly_climatology(ds_t))
    assert set(table.data_vars) == {"tas", "pr"}
    expected = {
        "mae",
        "rmse",
        "bias",
        "acc",
        "psnr",
        "q99_error",
        "log_spectral_distance",
        "wasserstein",
        "crps",
        "crps_fair",
        "spread_skill_ratio",
    }
    assert set(table["metric"].values) == expected  # 8 x 8 maps: no SSIM
    # the fair CRPS is the empirical one less mean|x_i - x_j| / 2M (M = 4): smaller, by the ensemble's spread
    assert float(table["tas"].sel(metric="crps_fair")) == pytest.approx(
        float(M.crps(ds_e["tas"], ds_t["tas"], fair=True))
    )
    assert float(table["tas"].sel(metric="crps_fair")) < float(table["tas"].sel(metric="crps"))
    assert np.isfinite(table.to_dataframe().values).all()
    assert float(table["tas"].sel(metric="rmse")) == pytest.approx(
        float(M.rmse(ds_e["tas"].mean("member"), ds_t["tas"]))
    )
    det = M.evaluate_all(ds_t["tas"].rename("tas"), ds_t["tas"])
    assert "crps" not in det["metric"].values and "acc" not in det["metric"].values
    assert float(det["tas"].sel(metric="rmse")) == 0.0 and float(
        det["tas"].sel(metric="wasserstein")
    ) == pytest.approx(0.0)


def test_evaluate_all_on_dask_equals_eager() -> None:
    ens, truth = _ensemble(1.0, members=3)
    ens, truth = ens.isel(time=slice(0, 24)).to_dataset(), truth.isel(time=slice(0, 24)).to_dataset()
    eager = M.evaluate_all(ens, truth, climatology=M.monthly_climatology(truth))
    lazy = M.evaluate_all(
        ens.chunk(time=6, lat=4), truth.chunk(time=6, lat=4), climatology=M.monthly_climatology(truth)
    )
    xr.testing.assert_allclose(lazy, eager)


# -- masked truth (ocean / missing cells) ------------------------------------------------------------------
# Scores of _smooth_case() computed with the metrics module BEFORE masks were supported (pre-mask values):
# every no-NaN score must stay exactly what it was.
PRE_MASK_VALUES = {
    "mae": 0.20300680345517816,
    "rmse": 0.25417890213864414,
    "bias": 0.10481664124970598,
    "pattern_correlation": 0.9592894615031691,  # mean over maps
    "acc": 0.9231283446243571,
    "ssim": 0.6833627849954053,
    "psnr": 24.02798142109071,
    "q99_error": 0.4462103314052815,
    "q99_pooled": 0.27906393657201534,
    "wasserstein": 0.11334785368955705,
    "crps": 0.17938414082021004,
    "crps_fair": 0.10346835226115281,
    "spread_skill_ratio": 1.8344137635779865,
    "log_spectral_distance": 3.898882963875727,
    "power_sum": 15.754651920872304,  # sum over wavenumbers of power_spectrum(truth)
}
PRE_MASK_RANK_HISTOGRAM = [1190, 2305, 1550, 331]


def _smooth_case() -> tuple[xr.DataArray, xr.DataArray]:
    """A smooth 24 x 14 x 16 truth around 280 K and a 3-member ensemble (noise 0.4 K, bias 0.1 K)."""
    rng = np.random.default_rng(42)
    t = scipy.ndimage.gaussian_filter(rng.normal(size=(24, 14, 16)), (0, 2, 2)) * 5 + 280
    ens = t[None] + 0.4 * rng.normal(size=(3, *t.shape)) + 0.1
    return field(ens, lat=(30, 56), member=True), field(t, lat=(30, 56))


def _all_scores(ens: xr.DataArray, truth: xr.DataArray) -> dict[str, float]:
    clim = M.monthly_climatology(truth)
    fm = ens.mean("member")
    scores = {
        "mae": M.mae(fm, truth),
        "rmse": M.rmse(fm, truth),
        "bias": M.bias(fm, truth),
        "pattern_correlation": M.pattern_correlation(fm, truth).mean(),
        "acc": M.acc(fm, truth, clim),
        "ssim": M.ssim(ens, truth),
        "psnr": M.psnr(ens, truth),
        "q99_error": M.q99_error(ens, truth),
        "q99_pooled": M.q99_error(ens, truth, mode="pooled"),
        "wasserstein": M.wasserstein(ens, truth),
        "crps": M.crps(ens, truth),
        "crps_fair": M.crps(ens, truth, fair=True),
        "spread_skill_ratio": M.spread_skill_ratio(ens, truth),
        "log_spectral_distance": M.log_spectral_distance(ens, truth),
        "power_sum": M.power_spectrum(truth).sum(),
    }
    return {k: float(v) for k, v in scores.items()}


def _static_mask(shape=(14, 16), seed=12) -> np.ndarray:
    """A blobby 'ocean' mask over ~30% of the cells (True = invalid)."""
    smooth = scipy.ndimage.gaussian_filter(np.random.default_rng(seed).normal(size=shape), 2)
    return smooth > np.quantile(smooth, 0.7)


def _masked_case():
    ens, truth = _smooth_case()
    mask = _static_mask()
    return ens, truth.where(~mask), mask


def test_no_nan_scores_equal_pre_mask_values_exactly() -> None:
    ens, truth = _smooth_case()
    # equal to rounding: summation order inside scipy/numpy may differ between builds (one CI run differed by
    # 3e-17 on the Wasserstein distance, a fresh install by 2.6e-13 relative on SSIM's convolutions)
    assert _all_scores(ens, truth) == pytest.approx(PRE_MASK_VALUES, rel=1e-11, abs=0)
    assert M.rank_histogram(ens, truth).values.tolist() == PRE_MASK_RANK_HISTOGRAM
    table = M.evaluate_all(ens.to_dataset(), truth.to_dataset(), climatology=M.monthly_climatology(truth))
    for metric in ("mae", "rmse", "bias", "acc", "ssim", "psnr", "q99_error", "wasserstein", "crps"):
        assert float(table["tas"].sel(metric=metric)) == pytest.approx(PRE_MASK_VALUES[metric], rel=1e-13)
    assert table["tas"].attrs["valid_fraction"] == 1.0


def _cos_weights(truth: xr.DataArray) -> np.ndarray:
    return np.broadcast_to(np.cos(np.deg2rad(truth.lat.values))[:, None], truth.shape[-2:])


def test_masked_deterministic_scores_equal_weighted_means_over_valid_cells() -> None:
    ens, truth, mask = _masked_case()
    assert 0.25 < mask.mean() < 0.35
    fm = ens.mean("member")
    valid = np.broadcast_to(~mask, truth.shape)
    w = np.broadcast_to(_cos_weights(truth), truth.shape)[valid]
    err = (fm.values - truth.values)[valid]
    assert float(M.mae(fm, truth)) == pytest.approx(np.sum(w * np.abs(err)) / w.sum(), rel=1e-12)
    assert float(M.rmse(fm, truth)) == pytest.approx(np.sqrt(np.sum(w * err**2) / w.sum()), rel=1e-12)
    assert float(M.bias(fm, truth)) == pytest.approx(np.sum(w * err) / w.sum(), rel=1e-12)
    # coordinates equal within 1e-6 (accepted as the same grid): no cell is aligned away by the masking
    nudged = truth.assign_coords(lat=truth.lat + 1e-9)
    assert float(M.mae(fm, nudged)) == pytest.approx(np.sum(w * np.abs(err)) / w.sum(), rel=1e-12)
    assert float(M.q99_error(ens, nudged)) == float(M.q99_error(ens, truth))
    per_member = M.mae(ens, truth)
    for m in range(3):
        e = np.abs(ens.values[m] - truth.values)[valid]
        assert float(per_member[m]) == pytest.approx(np.sum(w * e) / w.sum(), rel=1e-12)
    r = M.pattern_correlation(fm, truth)
    wm = _cos_weights(truth)[~mask]
    for t in (0, 13):
        f, o = fm.values[t][~mask], truth.values[t][~mask]
        fa, oa = f - np.average(f, weights=wm), o - np.average(o, weights=wm)
        expected = np.sum(wm * fa * oa) / np.sqrt(np.sum(wm * fa**2) * np.sum(wm * oa**2))
        assert float(r[t]) == pytest.approx(expected, rel=1e-10)


@pytest.mark.filterwarnings("ignore:Mean of empty slice")
def test_masked_acc_equals_sums_over_valid_cells() -> None:
    ens, truth, mask = _masked_case()
    fm = ens.mean("member")
    clim = M.monthly_climatology(truth)
    months = truth.time.dt.month.values
    c = np.stack([np.nanmean(truth.values[months == mo], axis=0) for mo in months])
    w = _cos_weights(truth)[~mask]
    per_map = []
    for t in range(truth.sizes["time"]):
        fa, ta = (fm.values[t] - c[t])[~mask], (truth.values[t] - c[t])[~mask]
        per_map.append(np.sum(w * fa * ta) / np.sqrt(np.sum(w * fa**2) * np.sum(w * ta**2)))
    assert float(M.acc(fm, truth, clim)) == pytest.approx(np.mean(per_map), rel=1e-10)


def _ssim_brute_force_masked(x: np.ndarray, y: np.ndarray, L: float, valid: np.ndarray) -> float:
    """Mean SSIM over valid centres whose 11 x 11 window fits in the map, Gaussian weights renormalised over
    the valid cells of each window, by explicit sums."""
    k = np.exp(-0.5 * (np.arange(-5, 6) / 1.5) ** 2)
    g = np.outer(k, k)
    c1, c2 = (0.01 * L) ** 2, (0.03 * L) ** 2
    vals = []
    for i in range(5, x.shape[0] - 5):
        for j in range(5, x.shape[1] - 5):
            if not valid[i, j]:
                continue
            gm = g * valid[i - 5 : i + 6, j - 5 : j + 6]
            gm = gm / gm.sum()
            px = np.where(gm > 0, x[i - 5 : i + 6, j - 5 : j + 6], 0.0)
            py = np.where(gm > 0, y[i - 5 : i + 6, j - 5 : j + 6], 0.0)
            mx, my = (gm * px).sum(), (gm * py).sum()
            vx, vy = (gm * px**2).sum() - mx**2, (gm * py**2).sum() - my**2
            cov = (gm * px * py).sum() - mx * my
            vals.append((2 * mx * my + c1) * (2 * cov + c2) / ((mx**2 + my**2 + c1) * (vx + vy + c2)))
    return float(np.mean(vals))


def test_masked_ssim_is_normalised_convolution_over_valid_centres() -> None:
    rng = np.random.default_rng(13)
    t = scipy.ndimage.gaussian_filter(rng.normal(size=(2, 18, 20)), (0, 2, 2))
    f = t + 0.3 * rng.normal(size=t.shape)
    mask = _static_mask((18, 20), seed=14)
    truth, forecast = field(np.where(mask, np.nan, t), lat=(0, 17)), field(f, lat=(0, 17))
    L = float(np.nanmax(truth.values) - np.nanmin(truth.values))
    expected = np.mean([_ssim_brute_force_masked(f[i], t[i], L, ~mask) for i in range(2)])
    assert float(M.ssim(forecast, truth)) == pytest.approx(expected, rel=1e-9)
    # the masked route with an empty mask is the standard SSIM
    full = M._ssim_maps(f, t, 1.7)
    assert np.allclose(M._ssim_maps(f, t, 1.7, np.ones(t.shape, bool)), full, rtol=0, atol=1e-12)
    assert float(M.ssim(truth, truth)) == pytest.approx(1.0)
    # a map with no valid cell is NaN and left out of the mean over maps
    holed = truth.copy(data=truth.values.copy())
    holed[1] = np.nan
    assert float(M.ssim(forecast, holed, data_range=L)) == pytest.approx(
        _ssim_brute_force_masked(f[0], t[0], L, ~mask), rel=1e-9
    )


def test_masked_psnr_over_valid_cells_per_map() -> None:
    ens, truth, mask = _masked_case()
    L = float(np.nanmax(truth.values) - np.nanmin(truth.values))
    mse = ((ens.values - truth.values) ** 2)[..., ~mask].mean(-1)  # (member, time)
    assert float(M.psnr(ens, truth)) == pytest.approx(np.mean(10 * np.log10(L**2 / mse)), rel=1e-12)


def test_masked_distribution_scores_use_valid_points_only() -> None:
    ens, truth, mask = _masked_case()
    e, t = ens.values[..., ~mask], truth.values[..., ~mask]  # (member, time, cell), (time, cell)
    w = _cos_weights(truth)[~mask]
    q_f = np.quantile(e.reshape(-1, e.shape[-1]), 0.99, axis=0)
    q_t = np.quantile(t, 0.99, axis=0)
    assert float(M.q99_error(ens, truth)) == pytest.approx(np.sum(w * np.abs(q_f - q_t)) / w.sum(), rel=1e-12)
    assert float(M.q99_error(ens, truth, mode="pooled")) == pytest.approx(
        abs(np.quantile(e, 0.99) - np.quantile(t, 0.99)), rel=1e-12
    )
    expected = scipy.stats.wasserstein_distance(
        e.ravel(),
        t.ravel(),
        u_weights=np.broadcast_to(w, e.shape).ravel(),
        v_weights=np.broadcast_to(w, t.shape).ravel(),
    )
    assert float(M.wasserstein(ens, truth)) == pytest.approx(expected, rel=1e-12)


def test_masked_ensemble_scores_use_valid_points_only() -> None:
    ens, truth, mask = _masked_case()
    e, t = ens.values[..., ~mask], truth.values[..., ~mask]
    w = np.broadcast_to(_cos_weights(truth)[~mask], t.shape)
    ref = properscoring.crps_ensemble(t, np.moveaxis(e, 0, -1))
    assert float(M.crps(ens, truth)) == pytest.approx((ref * w).sum() / w.sum(), rel=1e-10)
    m = e.shape[0]
    fair = np.abs(e - t).mean(0) - np.abs(e[:, None] - e[None]).sum((0, 1)) / (2 * m * (m - 1))
    assert float(M.crps(ens, truth, fair=True)) == pytest.approx((fair * w).sum() / w.sum(), rel=1e-10)
    spread = np.sqrt((w * e.var(0, ddof=1)).sum() / w.sum())
    skill = np.sqrt((w * (e.mean(0) - t) ** 2).sum() / w.sum())
    assert float(M.spread_skill_ratio(ens, truth)) == pytest.approx(
        np.sqrt(4 / 3) * spread / skill, rel=1e-10
    )
    ranks = (e < t).sum(0).ravel()  # continuous values: no ties
    hist = M.rank_histogram(ens, truth)
    assert hist.values.tolist() == np.bincount(ranks, minlength=m + 1).tolist()
    assert int(hist.sum()) == t.size


def test_masked_spectra_are_those_of_mean_filled_maps() -> None:
    ens, truth, mask = _masked_case()
    t = truth.values
    filled_t = np.where(mask, np.nanmean(t, axis=(1, 2), keepdims=True), t)
    xr.testing.assert_allclose(M.power_spectrum(truth), M.power_spectrum(truth.copy(data=filled_t)))
    e = np.where(mask, np.nan, ens.values)  # the forecast is masked like the truth, then mean-filled
    filled_e = np.where(mask, np.nanmean(e, axis=(2, 3), keepdims=True), e)
    expected = M.log_spectral_distance(ens.copy(data=filled_e), truth.copy(data=filled_t))
    assert float(M.log_spectral_distance(ens, truth)) == pytest.approx(float(expected), rel=1e-12)
    # a map with no valid cell is left out of the average; none at all gives NaN
    holed = truth.copy(data=t.copy())
    holed[0] = np.nan
    spectrum = M.power_spectrum(holed)
    assert spectrum.attrs["n_maps"] == 23
    xr.testing.assert_allclose(
        spectrum.drop_attrs(), M.power_spectrum(truth.isel(time=slice(1, None))).drop_attrs()
    )
    assert np.isnan(M.power_spectrum(truth * np.nan).values).all()


def test_forecast_values_at_masked_cells_do_not_matter() -> None:
    ens, truth, mask = _masked_case()
    junk = ens.where(~mask, 1e6)
    holes = ens.where(~mask)
    clim = M.monthly_climatology(truth)
    a, b, c = _all_scores(ens, truth), _all_scores(junk, truth), _all_scores(holes, truth)
    for name in a:
        if name == "power_sum":
            continue
        assert np.isfinite(a[name]), name
        assert b[name] == pytest.approx(a[name], rel=1e-12, abs=1e-14), name
        assert c[name] == pytest.approx(a[name], rel=1e-12, abs=1e-14), name
    tables = [
        M.evaluate_all(f.to_dataset(), truth.to_dataset(), climatology=clim.to_dataset())
        for f in (ens, junk, holes)
    ]
    assert np.isfinite(tables[0]["tas"].values).all()
    assert set(tables[0]["metric"].values) >= {
        "ssim",
        "acc",
        "crps",
        "spread_skill_ratio",
        "log_spectral_distance",
    }
    for other in tables[1:]:
        xr.testing.assert_allclose(other, tables[0], rtol=1e-12)
    assert tables[0]["tas"].attrs["valid_fraction"] == pytest.approx(1 - mask.mean())


def test_time_varying_nans_and_maps_with_no_valid_cell() -> None:
    ens, truth = _smooth_case()
    rng = np.random.default_rng(15)
    missing = rng.random(truth.shape) < 0.1
    missing[3] = True  # one map entirely missing
    truth = truth.where(~missing)
    fm = ens.mean("member")
    valid = ~missing
    w = np.broadcast_to(_cos_weights(truth), truth.shape)
    err = np.abs(fm.values - truth.values)
    assert float(M.mae(fm, truth)) == pytest.approx(np.sum((w * err)[valid]) / w[valid].sum(), rel=1e-12)
    per_time = M.mae(fm, truth, dim=["lat", "lon"])
    assert np.isnan(per_time[3]) and np.isfinite(per_time.drop_isel(time=3)).all()
    # per cell: the forecast's quantile over the same (time, member) points as the truth's
    e = np.where(valid, ens.values, np.nan)
    q_f = np.nanquantile(e.reshape(-1, *truth.shape[1:]), 0.99, axis=0)
    q_t = np.nanquantile(truth.values, 0.99, axis=0)
    wc = _cos_weights(truth)
    assert float(M.q99_error(ens, truth)) == pytest.approx(
        np.sum(wc * np.abs(q_f - q_t)) / wc.sum(), rel=1e-12
    )
    table = M.evaluate_all(ens.to_dataset(), truth.to_dataset(), climatology=M.monthly_climatology(truth))
    assert np.isfinite(table["tas"].values).all()
    # a whole variable without a valid cell: NaN scores, no error
    empty = M.evaluate_all(ens.to_dataset(), (truth * np.nan).to_dataset())
    assert np.isnan(empty["tas"].values).all() and empty["tas"].attrs["valid_fraction"] == 0.0


def test_nan_forecast_where_truth_is_valid_raises() -> None:
    ens, truth, mask = _masked_case()
    hole = (0, 5) + tuple(int(i[0]) for i in np.nonzero(~mask))  # member 0, time 5, a valid cell
    bad = ens.copy(data=ens.values.copy())
    bad[hole] = np.nan
    for metric in (M.mae, M.crps, M.ssim, M.psnr, M.q99_error, M.wasserstein, M.rank_histogram):
        with pytest.raises(M.MetricError, match=r"'tas' is NaN at 1 point"):
            metric(bad, truth)
    with pytest.raises(M.MetricError, match=r"rmse: forecast 'tas' is NaN at 1 point"):
        M.rmse(bad.isel(member=0), truth)
    with pytest.raises(M.MetricError, match="'tas'"):
        M.evaluate_all(bad.to_dataset(), truth.to_dataset())
    # dask: raised when the (lazy) score is computed
    lazy = M.mae(bad.chunk(time=6), truth.chunk(time=6))
    with pytest.raises(M.MetricError, match=r"mae: forecast 'tas' is NaN at 1 point"):
        lazy.compute()
    ok = M.mae(ens.chunk(time=6), truth.chunk(time=6))
    assert ok.chunks is not None  # still lazy: the check did not compute the inputs
    np.testing.assert_allclose(ok.values, M.mae(ens, truth).values, rtol=1e-12)


def test_masked_dask_equals_eager() -> None:
    ens, truth, _ = _masked_case()
    clim = M.monthly_climatology(truth)
    eager = M.evaluate_all(ens.to_dataset(), truth.to_dataset(), climatology=clim.to_dataset())
    lazy = M.evaluate_all(
        ens.to_dataset().chunk(time=6, lat=7),
        truth.to_dataset().chunk(time=6, lat=7),
        climatology=clim.to_dataset(),
    )
    xr.testing.assert_allclose(lazy, eager)
