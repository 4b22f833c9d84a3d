"""Skill metrics for downscaled fields and ensembles against a gridded truth.

Contract:
- Inputs are ``xr.DataArray``s or ``xr.Dataset``s (then every metric is computed per data variable of
  the forecast, which the truth must also hold) with dims ``(time, lat, lon)``; a forecast ensemble adds a
  ``member`` dim, which the truth never has. Forecast and truth must share ``lat``/``lon`` (and ``time``
  where both have it) values; a mismatch raises :class:`MetricError` naming the variable and coordinate.
- Area means are latitude-weighted with ``cos(lat)`` (:func:`latitude_weights`) wherever a metric
  averages over ``lat``/``lon``; image metrics (SSIM, PSNR, spectra) treat each map as a plain image.
- ``dim=None`` means "reduce over every dim of the truth" (a scalar per variable); deterministic scores
  given an ensemble keep its ``member`` dim (one score per member): pass :func:`ensemble_mean` for the
  ensemble-mean score, as :func:`evaluate_all` does.
- Which library computes what: MAE/RMSE/bias -> xskillscore (``mae``/``rmse``/``me``); CRPS ->
  xskillscore.crps_ensemble (fair CRPS -> scores.probability.crps_for_ensemble(method="fair"));
  Wasserstein-1 -> scipy.stats.wasserstein_distance; weighted means -> xarray ``.weighted``. Written here,
  because no installed library fits: ACC (uncentred, WeatherBench2 convention, with a month-of-year
  climatology), SSIM (scikit-image is not a dependency; same Gaussian-window formulation), PSNR, the 99th
  percentile error, the spread-skill ratio with its finite-ensemble correction, the rank histogram
  (xskillscore's breaks ties with the unseeded global NumPy RNG), and the radially averaged power spectrum
  with the log-spectral distance.
- Missing values (ocean or missing cells): a NaN in the truth marks a cell/time that is not scored; every
  forecast-truth metric uses only the points where the truth is not NaN (a static land-sea mask or any other
  pattern), whatever the forecast holds there. Area means renormalise the cos(lat) weights over the valid
  cells; SSIM and PSNR use the valid cells of each map (see :func:`ssim`); spectra need whole rectangles, so
  the invalid cells of a map are filled with the mean of its valid cells first (see :func:`power_spectrum`).
  A NaN forecast where the truth is valid is an error (:class:`MetricError` naming the variable and the
  count; raised when the score is computed, for dask inputs): a method must not leave holes. A map (or a
  whole input) with no valid cell gives NaN, not an error; scores averaged over maps (ACC, SSIM, PSNR) skip
  such maps. Without any NaN every score is exactly what it was before masks were supported.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from collections.abc import Callable, Hashable, Sequence
from typing import Literal

import numpy as np
import scipy.ndimage
import scipy.stats
import xarray as xr
import xskillscore as xs

__all__ = [
    "MetricError",
    "MEMBER_DIM",
    "latitude_weights",
    "ensemble_mean",
    "monthly_climatology",
    "anomalies",
    "mae",
    "rmse",
    "bias",
    "pattern_correlation",
    "acc",
    "ssim",
    "psnr",
    "q99_error",
    "crps",
    "spread_skill_ratio",
    "rank_histogram",
    "power_spectrum",
    "log_spectral_distance",
    "wasserstein",
    "evaluate_all",
]

MEMBER_DIM = "member"
_SPATIAL = ("lat", "lon")
_EARTH_RADIUS_KM = 6371.0
# SSIM constants of Wang et al. (2004), as in scikit-image's gaussian_weights=True mode.
_SSIM_SIGMA, _SSIM_TRUNCATE, _SSIM_K1, _SSIM_K2 = 1.5, 3.5, 0.01, 0.03
_SSIM_RADIUS = int(_SSIM_TRUNCATE * _SSIM_SIGMA + 0.5)  # 5 -> an 11 x 11 window

Field = xr.DataArray | xr.Dataset


class MetricError(ValueError):
    """Forecast and truth cannot be compared as asked; the message names the variable and what is wrong."""


# -- helpers -----------------------------------------------------------------------------------------
def latitude_weights(lat: xr.DataArray) -> xr.DataArray:
    """``cos(lat)`` normalised to mean 1 over the given latitudes (dims ``(lat,)``), >= 0 at the poles."""
    w = np.cos(np.deg2rad(lat.astype(float))).clip(min=0.0)
    return (w / w.mean()).rename("latitude_weights")


def ensemble_mean(forecast: Field) -> Field:
    """Mean over ``member`` (returned unchanged when there is no member dim)."""
    return forecast.mean(MEMBER_DIM) if MEMBER_DIM in forecast.dims else forecast


def monthly_climatology(ds: Field) -> Field:
    """Mean per month of year: dims ``(month, lat, lon)`` with ``month`` 1..12 (only the months present)."""
    return ds.groupby("time.month").mean("time")


def anomalies(ds: Field, climatology: Field) -> Field:
    """``ds`` minus ``climatology``: per month of year when it has a ``month`` dim, else broadcast."""
    if "month" in climatology.dims:
        missing = sorted(
            set(np.unique(ds["time"].dt.month.values).tolist()) - set(climatology["month"].values.tolist())
        )
        if missing:
            raise MetricError(
                f"climatology has no month(s) {missing}, which the data has; expected months 1..12"
            )
        return (ds.groupby("time.month") - climatology).drop_vars("month")
    return ds - climatology


def _per_variable(fn: Callable[..., xr.DataArray]) -> Callable[..., Field]:
    """Let a (forecast, truth) DataArray metric take Datasets: one result per forecast data variable.

    Every pair is checked first (:func:`_check_pair`), the truth is put on the forecast's coordinates and a
    forecast NaN where the truth is valid raises :class:`MetricError` (lazily for dask-backed results).
    """
    metric = fn.__name__

    def score(forecast: xr.DataArray, truth: xr.DataArray, *args, **kwargs) -> xr.DataArray:
        _check_pair(forecast, truth, metric)
        truth = _on_forecast_coords(truth, forecast)
        name = forecast.name or truth.name or "field"
        holes = (forecast.isnull() & truth.notnull()).sum()
        lazy = holes.chunks is not None
        if not lazy:
            _raise_on_holes(int(holes), metric, name)
        with _quiet_masked():
            result = fn(forecast, truth, *args, **kwargs)
        if not lazy:
            return result
        if result.chunks is None:  # computed already: check now
            _raise_on_holes(int(holes.compute()), metric, name)
            return result
        return _guarded(result, holes, metric, name)

    @functools.wraps(fn)
    def wrapper(forecast: Field, truth: Field, *args, **kwargs):
        if isinstance(forecast, xr.Dataset):
            if not isinstance(truth, xr.Dataset):
                raise MetricError(f"{fn.__name__}: forecast is a Dataset, so truth must be one too")
            out = {}
            for var in _data_vars(forecast):
                if var not in truth.data_vars:
                    raise MetricError(
                        f"{fn.__name__}: truth has no variable {var!r}; "
                        f"it has {sorted(map(str, truth.data_vars))}"
                    )
                out[var] = score(forecast[var], truth[var], *args, **kwargs)
            return xr.Dataset(out)
        if isinstance(truth, xr.Dataset):
            raise MetricError(f"{fn.__name__}: forecast is a DataArray, so truth must be one too")
        return score(forecast, truth, *args, **kwargs)

    return wrapper


@contextlib.contextmanager
def _quiet_masked():
    """Silence NumPy's warnings about cells with no valid value (they score NaN by design)."""
    with warnings.catch_warnings():
        for message in ("All-NaN slice encountered", "Mean of empty slice"):
            warnings.filterwarnings("ignore", message=message, category=RuntimeWarning)
        yield


def _on_forecast_coords(truth: xr.DataArray, forecast: xr.DataArray) -> xr.DataArray:
    """``truth`` with the forecast's lat/lon/time values (equal within 1e-6, see :func:`_check_pair`), so
    that masking with ``where`` and arithmetic never align away cells whose coordinates differ by rounding."""
    new = {
        d: forecast[d].variable
        for d in (*_SPATIAL, "time")
        if d in truth.indexes and d in forecast.indexes and not truth.indexes[d].equals(forecast.indexes[d])
    }
    return truth.assign_coords(new) if new else truth


def _raise_on_holes(count: int, metric: str, name: Hashable) -> None:
    if count > 0:
        raise MetricError(
            f"{metric}: forecast {name!r} is NaN at {count} point(s) (time, member, lat, lon) where the "
            "truth is valid; only cells that are NaN in the truth may be NaN in the forecast"
        )


def _guarded(result: xr.DataArray, holes: xr.DataArray, metric: str, name: Hashable) -> xr.DataArray:
    """The lazy ``result`` unchanged, but computing it raises :class:`MetricError` if ``holes`` > 0."""

    def check(values: np.ndarray, count: np.ndarray) -> np.ndarray:
        _raise_on_holes(int(count), metric, name)
        return values

    return xr.apply_ufunc(
        check,
        result,
        holes.variable,
        dask="parallelized",
        output_dtypes=[result.dtype],
        keep_attrs=True,
    )


def _valid_only(forecast: xr.DataArray, truth: xr.DataArray) -> xr.DataArray:
    """``forecast`` with NaN wherever the truth is NaN (broadcast over members); unchanged values elsewhere."""
    return forecast.where(truth.notnull())


def _data_vars(ds: xr.Dataset) -> list[Hashable]:
    """The gridded variables (those with lat and lon), skipping bounds."""
    return [v for v in ds.data_vars if set(_SPATIAL) <= set(ds[v].dims) and not str(v).endswith("_bnds")]


def _check_pair(forecast: xr.DataArray, truth: xr.DataArray, metric: str) -> None:
    name = forecast.name or truth.name or "field"
    if MEMBER_DIM in truth.dims:
        raise MetricError(
            f"{metric}: truth {name!r} has a {MEMBER_DIM!r} dim; only the forecast may be an ensemble"
        )
    for dim in (*_SPATIAL, "time"):
        if dim in truth.dims and dim not in forecast.dims:
            raise MetricError(f"{metric}: forecast {name!r} lacks the {dim!r} dim that the truth has")
        if dim not in truth.dims:
            continue
        f, t = forecast[dim].values, truth[dim].values
        same = f.shape == t.shape and (
            np.allclose(f, t, atol=1e-6) if np.issubdtype(f.dtype, np.number) else bool((f == t).all())
        )
        if not same:
            raise MetricError(
                f"{metric}: forecast and truth {name!r} differ in {dim!r} ({f.size} vs {t.size} values, "
                f"{f[:1]}..{f[-1:]} vs {t[:1]}..{t[-1:]}); regrid/select them onto the same {dim} first"
            )


def _reduce_dims(truth: xr.DataArray, dim: str | Sequence[str] | None) -> list[str]:
    if dim is None:
        return [str(d) for d in truth.dims]
    return [dim] if isinstance(dim, str) else list(dim)


def _single_chunk(da: xr.DataArray, dims: Sequence[str]) -> xr.DataArray:
    """Dask arrays rechunked to one chunk along ``dims`` (xskillscore and quantile need core dims whole)."""
    if da.chunks is None:
        return da
    return da.chunk({d: -1 for d in dims if d in da.dims})


def _weights(like: xr.DataArray, dims: Sequence[str]) -> xr.DataArray | None:
    """cos-lat weights broadcast to exactly the reduced ``dims`` of ``like`` (None if lat is not reduced)."""
    if "lat" not in dims:
        return None
    template = like.isel({d: 0 for d in like.dims if d not in dims}, drop=True)
    return (latitude_weights(like["lat"]) * xr.ones_like(template, dtype=float)).transpose(*template.dims)


def _weighted_mean(da: xr.DataArray, dims: Sequence[str]) -> xr.DataArray:
    w = latitude_weights(da["lat"]) if "lat" in dims else xr.ones_like(da["lat"], dtype=float)
    return da.weighted(w).mean(dims)


def _sample_dims(forecast: xr.DataArray) -> list[str]:
    return [d for d in ("time", MEMBER_DIM) if d in forecast.dims]


def _data_range(truth: xr.DataArray, data_range: float | None) -> float:
    if data_range is not None:
        return float(data_range)
    if not bool(truth.notnull().any()):
        return float("nan")  # no valid cell: every map scores NaN
    rng = float(truth.max() - truth.min())
    if not np.isfinite(rng) or rng <= 0:
        raise MetricError(f"truth {truth.name!r} is constant (range {rng}); pass data_range explicitly")
    return rng


def _maps(da: xr.DataArray) -> np.ndarray:
    """All (lat, lon) maps of ``da`` as a float64 array ``(n_maps, nlat, nlon)`` (NaN kept)."""
    values = np.asarray(da.transpose(..., *_SPATIAL).values, dtype=np.float64)
    return values.reshape(-1, da.sizes["lat"], da.sizes["lon"])


def _mean_over_maps(per_map: np.ndarray) -> float:
    """Mean of per-map scores, skipping maps with no valid cell (NaN); NaN when no map has one."""
    if not np.isnan(per_map).any():
        return float(per_map.mean())
    return float(per_map[~np.isnan(per_map)].mean()) if (~np.isnan(per_map)).any() else float("nan")


# -- deterministic scores (xskillscore) ------------------------------------------------------------------
@_per_variable
def mae(
    forecast: xr.DataArray, truth: xr.DataArray, *, dim: str | Sequence[str] | None = None
) -> xr.DataArray:
    """Latitude-weighted mean absolute error (xskillscore.mae), units of the variable."""
    dims = _reduce_dims(truth, dim)
    forecast, truth = _single_chunk(forecast, dims), _single_chunk(truth, dims)
    return xs.mae(forecast, truth, dim=dims, weights=_weights(truth, dims), skipna=True)


@_per_variable
def rmse(
    forecast: xr.DataArray, truth: xr.DataArray, *, dim: str | Sequence[str] | None = None
) -> xr.DataArray:
    """Latitude-weighted root mean squared error sqrt(mean w (f - t)^2) (xskillscore.rmse)."""
    dims = _reduce_dims(truth, dim)
    forecast, truth = _single_chunk(forecast, dims), _single_chunk(truth, dims)
    return xs.rmse(forecast, truth, dim=dims, weights=_weights(truth, dims), skipna=True)


@_per_variable
def bias(
    forecast: xr.DataArray, truth: xr.DataArray, *, dim: str | Sequence[str] | None = None
) -> xr.DataArray:
    """Latitude-weighted mean error, forecast minus truth (xskillscore.me): positive = forecast too high."""
    dims = _reduce_dims(truth, dim)
    forecast, truth = _single_chunk(forecast, dims), _single_chunk(truth, dims)
    return xs.me(forecast, truth, dim=dims, weights=_weights(truth, dims), skipna=True)


@_per_variable
def pattern_correlation(
    forecast: xr.DataArray, truth: xr.DataArray, *, dim: str | Sequence[str] = _SPATIAL
) -> xr.DataArray:
    """Latitude-weighted Pearson correlation over ``dim`` (default the map; xskillscore.pearson_r),
    centred on each map's own mean: how well the forecast's spatial pattern matches, whatever its bias."""
    dims = _reduce_dims(truth, dim)
    forecast, truth = _single_chunk(forecast, dims), _single_chunk(truth, dims)
    return xs.pearson_r(forecast, truth, dim=dims, weights=_weights(truth, dims), skipna=True)


@_per_variable
def acc(forecast: xr.DataArray, truth: xr.DataArray, climatology: xr.DataArray) -> xr.DataArray:
    """Anomaly correlation coefficient, uncentred, per map, averaged over time (WeatherBench2 convention).

    ACC_t = sum_ij w_i f'_tij t'_tij / sqrt(sum w f'^2 * sum w t'^2), with anomalies f' = f - C, t' = t - C
    against ``climatology`` C (per month of year when it has a ``month`` dim, see :func:`monthly_climatology`,
    which should come from training years only) and w = cos(lat); the result is the mean of ACC_t over time.
    Sums run over the cells where the truth anomaly is valid (truth and climatology not NaN); a map with
    none gives NaN and is left out of the time mean.
    """
    if isinstance(climatology, xr.Dataset):
        climatology = climatology[truth.name]
    fa, ta = anomalies(forecast, climatology), anomalies(truth, climatology)
    fa = _valid_only(fa, ta)
    w = latitude_weights(truth["lat"])
    num = (w * fa * ta).sum(_SPATIAL)
    den = np.sqrt((w * fa**2).sum(_SPATIAL) * (w * ta**2).sum(_SPATIAL))
    return (num / den).mean("time")


# -- image metrics ---------------------------------------------------------------------------------------
def _ssim_maps(
    x: np.ndarray, y: np.ndarray, data_range: float, valid: np.ndarray | None = None
) -> np.ndarray:
    """Mean SSIM of each map pair in ``(n, nlat, nlon)`` stacks (Wang et al. 2004, Gaussian window).

    With a boolean ``valid`` stack (None: every cell), local statistics are normalised convolutions
    blur(a * m) / blur(m) over the valid cells and the SSIM map is averaged over the valid centres only (NaN
    for a map without one); values at invalid cells are ignored.
    """
    c1, c2 = (_SSIM_K1 * data_range) ** 2, (_SSIM_K2 * data_range) ** 2
    r = _SSIM_RADIUS  # average only where the whole window lies inside the map (as scikit-image does)

    def blur(a: np.ndarray) -> np.ndarray:  # Gaussian-weighted local mean within each map
        return scipy.ndimage.gaussian_filter(
            a, sigma=(0, _SSIM_SIGMA, _SSIM_SIGMA), truncate=_SSIM_TRUNCATE, mode="reflect"
        )

    if valid is None:
        mu_x, mu_y = blur(x), blur(y)
        var_x, var_y, cov = blur(x * x) - mu_x**2, blur(y * y) - mu_y**2, blur(x * y) - mu_x * mu_y
        s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
        return s[:, r:-r, r:-r].mean(axis=(1, 2))
    x, y = np.where(valid, x, 0.0), np.where(valid, y, 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):  # windows with no valid cell: never averaged
        norm = blur(valid.astype(np.float64))

        def local_mean(a: np.ndarray) -> np.ndarray:
            return blur(a) / norm

        mu_x, mu_y = local_mean(x), local_mean(y)
        var_x, var_y = local_mean(x * x) - mu_x**2, local_mean(y * y) - mu_y**2
        cov = local_mean(x * y) - mu_x * mu_y
        s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
        centre = valid[:, r:-r, r:-r]
        return np.where(centre, s[:, r:-r, r:-r], 0.0).sum(axis=(1, 2)) / centre.sum(axis=(1, 2))


@_per_variable
def ssim(forecast: xr.DataArray, truth: xr.DataArray, *, data_range: float | None = None) -> xr.DataArray:
    """Structural similarity, per (lat, lon) map, averaged over time (and members); 1 = identical.

    The standard Gaussian-window SSIM of Wang et al. (2004), as scikit-image's ``structural_similarity(...,
    gaussian_weights=True, sigma=1.5, use_sample_covariance=False)``: 11 x 11 window (sigma 1.5 cells),
    K1 = 0.01, K2 = 0.03, averaged over the cells whose window lies inside the map (maps need >= 11 x 11).
    ``data_range`` L defaults to max(truth) - min(truth) over the whole truth array (all times), stored in
    the result's attrs. Masked truth (NaN cells): local means, variances and covariances are normalised
    Gaussian convolutions over the valid cells, blur(x m) / blur(m) with m the validity mask, and the SSIM map
    is averaged over the windows whose centre is valid (and which lie inside the map); forecast values at
    invalid cells do not count. Without NaN this is exactly the standard SSIM. A map with no valid centre
    gives NaN and is left out of the mean over maps.
    """
    if min(truth.sizes["lat"], truth.sizes["lon"]) < 2 * _SSIM_RADIUS + 1:
        raise MetricError(
            f"ssim: maps of {truth.name!r} are {truth.sizes['lat']} x {truth.sizes['lon']}; "
            "SSIM needs >= 11 x 11"
        )
    L = _data_range(truth, data_range)
    t = _maps(truth.broadcast_like(forecast).transpose(*forecast.dims))
    valid = ~np.isnan(t)
    per_map = _ssim_maps(_maps(forecast), t, L, None if valid.all() else valid)
    return xr.DataArray(
        _mean_over_maps(per_map), attrs={"data_range": L, "description": "mean SSIM over maps"}
    )


@_per_variable
def psnr(forecast: xr.DataArray, truth: xr.DataArray, *, data_range: float | None = None) -> xr.DataArray:
    """Peak signal-to-noise ratio [dB], 10 log10(L^2 / MSE) per (lat, lon) map (unweighted), then averaged.

    ``data_range`` L as in :func:`ssim` (max - min of the whole truth). A map with zero error gives inf.
    The MSE of a map is over its valid cells (truth not NaN); a map with none gives NaN and is skipped.
    """
    L = _data_range(truth, data_range)
    mse = ((forecast - truth) ** 2).mean(_SPATIAL)
    with np.errstate(divide="ignore"):
        per_map = 10 * np.log10(L**2 / mse)
    return per_map.mean().assign_attrs(data_range=L, units="dB")


# -- distributions -------------------------------------------------------------------------------------
@_per_variable
def q99_error(
    forecast: xr.DataArray,
    truth: xr.DataArray,
    *,
    q: float = 0.99,
    mode: Literal["per_cell", "pooled"] = "per_cell",
) -> xr.DataArray:
    """Error of the ``q`` (99th) percentile, |q99(forecast) - q99(truth)|, units of the variable.

    ``mode="per_cell"`` (default): the percentile over time (and members, pooled) at every grid cell, then the
    latitude-weighted mean over cells of |difference| -- the extreme-value climatology map error used for
    downscaling (we could not check the DPDM paper's exact wording offline; this is the stricter reading).
    ``mode="pooled"``: the percentile of all values (time, member, lat, lon) pooled, each cell counted once
    (no area weighting), then |difference|. Percentiles use NumPy's linear interpolation. Only points where
    the truth is valid count, for the forecast too (its values where the truth is NaN are dropped); a cell
    with no valid time is left out of the per-cell mean (the weights renormalised over the others).
    """
    forecast = _valid_only(forecast, truth)
    forecast, truth = _single_chunk(forecast, forecast.dims), _single_chunk(truth, truth.dims)
    if mode == "per_cell":
        qf = forecast.quantile(q, dim=_sample_dims(forecast), skipna=True).drop_vars("quantile")
        qt = truth.quantile(q, dim="time", skipna=True).drop_vars("quantile")
        return _weighted_mean(abs(qf - qt), list(_SPATIAL))
    if mode == "pooled":
        return abs(forecast.quantile(q, skipna=True) - truth.quantile(q, skipna=True)).drop_vars("quantile")
    raise MetricError(f"q99_error: mode must be 'per_cell' or 'pooled', got {mode!r}")


@_per_variable
def wasserstein(forecast: xr.DataArray, truth: xr.DataArray) -> xr.DataArray:
    """Wasserstein-1 distance between the pooled value distributions (scipy.stats.wasserstein_distance).

    Every (time, member, lat, lon) value is one sample, weighted by cos(lat); only points where the truth is
    valid count (forecast values where the truth is NaN are dropped). Units of the variable; 0 when the two
    distributions are identical; NaN when the truth has no valid point.
    """

    def samples(da: xr.DataArray) -> tuple[np.ndarray, np.ndarray]:
        values = np.asarray(da.values, dtype=np.float64).ravel()
        w = np.asarray(latitude_weights(da["lat"]).broadcast_like(da).transpose(*da.dims).values).ravel()
        ok = np.isfinite(values)
        return values[ok], w[ok]

    (f, wf), (t, wt) = samples(_valid_only(forecast, truth)), samples(truth)
    if t.size == 0:
        return xr.DataArray(np.nan)
    return xr.DataArray(scipy.stats.wasserstein_distance(f, t, u_weights=wf, v_weights=wt))


# -- ensembles -------------------------------------------------------------------------------------------
def _require_members(forecast: xr.DataArray, metric: str, minimum: int = 1) -> int:
    if MEMBER_DIM not in forecast.dims:
        raise MetricError(
            f"{metric}: forecast {forecast.name!r} has no {MEMBER_DIM!r} dim; it needs an ensemble"
        )
    m = forecast.sizes[MEMBER_DIM]
    if m < minimum:
        raise MetricError(
            f"{metric}: forecast {forecast.name!r} has {m} member(s); it needs at least {minimum}"
        )
    return m


@_per_variable
def crps(
    forecast: xr.DataArray, truth: xr.DataArray, *, dim: str | Sequence[str] | None = None, fair: bool = False
) -> xr.DataArray:
    """Continuous ranked probability score of the ensemble, latitude-weighted mean (units of the variable).

    ``fair=False``: the empirical-CDF CRPS, xskillscore.crps_ensemble (properscoring's estimator).
    ``fair=True``: the fair (unbiased for finite ensembles) CRPS of Ferro (2014),
    scores.probability.crps_for_ensemble(method="fair"): mean|x_i - y| - sum_ij |x_i - x_j| / (2 M (M - 1)).
    Points where the truth is NaN have no CRPS and are left out of the (renormalised) weighted mean.
    """
    _require_members(forecast, "crps", minimum=2 if fair else 1)
    dims = _reduce_dims(truth, dim)
    forecast, truth = _single_chunk(forecast, [*dims, MEMBER_DIM]), _single_chunk(truth, dims)
    if not fair:
        return xs.crps_ensemble(
            truth, forecast, member_dim=MEMBER_DIM, dim=dims, weights=_weights(truth, dims)
        )
    from scores.probability import crps_for_ensemble

    per_point = crps_for_ensemble(forecast, truth, MEMBER_DIM, method="fair", preserve_dims=list(truth.dims))
    return _weighted_mean(per_point, dims)


@_per_variable
def spread_skill_ratio(
    forecast: xr.DataArray, truth: xr.DataArray, *, dim: str | Sequence[str] | None = None
) -> xr.DataArray:
    """sqrt((M + 1) / M) * spread / RMSE(ensemble mean); ~1 for a calibrated ensemble, < 1 under-dispersive.

    spread = sqrt(latitude-weighted mean of the unbiased (ddof=1) ensemble variance); RMSE of the ensemble
    mean is latitude-weighted over the same dims. The factor corrects for a finite ensemble of M members
    (Fortin et al. 2014): for members and truth drawn from one distribution E[(mean - y)^2] = (M+1)/M var.
    Spread and skill are both averaged over the points where the truth is valid.
    """
    m = _require_members(forecast, "spread_skill_ratio", minimum=2)
    dims = _reduce_dims(truth, dim)
    spread = np.sqrt(_weighted_mean(_valid_only(forecast.var(MEMBER_DIM, ddof=1), truth), dims))
    skill = np.sqrt(_weighted_mean((forecast.mean(MEMBER_DIM) - truth) ** 2, dims))
    return np.sqrt((m + 1) / m) * spread / skill


@_per_variable
def rank_histogram(forecast: xr.DataArray, truth: xr.DataArray, *, seed: int = 0) -> xr.DataArray:
    """Counts of the truth's rank among the M members, dims ``(rank,)`` with rank 0..M (M + 1 bins).

    rank = #(members < truth) + a uniform draw from 0..#(members == truth), so ties are broken at random
    with ``numpy.random.default_rng(seed)`` (deterministic). Points where the truth is NaN are skipped (a NaN
    member where the truth is valid is a MetricError). A calibrated ensemble gives a flat histogram; an
    under-dispersive one a U shape.
    """
    m = _require_members(forecast, "rank_histogram")
    f = np.asarray(forecast.transpose(..., MEMBER_DIM).values)
    t = np.asarray(
        truth.broadcast_like(forecast.isel({MEMBER_DIM: 0}, drop=True))
        .transpose(*[d for d in forecast.dims if d != MEMBER_DIM])
        .values
    )
    ok = np.isfinite(t) & np.isfinite(f).all(axis=-1)  # a NaN member at a valid point raised already
    f, t = f[ok], t[ok]
    below = (f < t[:, None]).sum(axis=-1)
    ties = (f == t[:, None]).sum(axis=-1)
    rank = below + np.floor(np.random.default_rng(seed).random(t.shape) * (ties + 1)).astype(int)
    counts = np.bincount(rank, minlength=m + 1)
    return xr.DataArray(
        counts,
        dims="rank",
        coords={"rank": np.arange(m + 1)},
        name=forecast.name,
        attrs={"description": f"rank histogram of the truth among {m} members", "seed": seed},
    )


# -- spectra ---------------------------------------------------------------------------------------------
def power_spectrum(
    field: xr.DataArray, *, units: Literal["cycles_per_cell", "cycles_per_km"] = "cycles_per_cell"
) -> xr.DataArray:
    """Radially averaged 2-D power spectrum of every (lat, lon) map, averaged over all maps (time, member).

    Each map (its mean removed, treated as a periodic planar image, no taper) gives
    P(kx, ky) = |FFT(x)|^2 / (nlat * nlon), so white noise of variance s^2 has P = s^2 at every wavenumber
    and sum(P) = nlat * nlon * variance (Parseval). P is then averaged (not summed) over annuli of width dk
    centred on k_n = n * dk, n = 1 .. up to the smaller Nyquist wavenumber, with dk the larger of the two
    fundamental wavenumbers: the result is the isotropic 2-D spectral density, so a field whose 2-D power
    falls as |k|^-3 has slope -3 (the isotropic 1-D spectrum E(k) = 2 pi k P(k) would have slope -2).
    Wavenumber ``units``: "cycles_per_cell" (grid spacing 1; Nyquist 0.5) or "cycles_per_km" (dy = dlat
    * pi R / 180, dx = dlon * pi R / 180 * cos(mean lat), R = 6371 km: a small-region approximation).

    Masked maps (NaN cells, e.g. ocean): the FFT needs the whole rectangle, so each map's NaN cells are filled
    with the mean of its valid cells first; the spectrum of a masked map is that of the mean-filled map (the
    valid cells' anomalies, zero elsewhere, so masking lowers the power and the mask's edges add some).
    Maps with no valid cell are left out of the average (attr ``n_maps`` counts those used); with none left
    the spectrum is NaN.
    """
    name = field.name or "field"
    maps = _maps(field)
    missing = np.isnan(maps)
    if missing.any():
        maps = maps[~missing.all(axis=(1, 2))]
        missing = np.isnan(maps)
        fill = np.nanmean(maps, axis=(1, 2), keepdims=True) if len(maps) else 0.0
        maps = np.where(missing, fill, maps)
    maps = maps - maps.mean(axis=(1, 2), keepdims=True)
    ny, nx = maps.shape[1:]
    if min(ny, nx) < 4:
        raise MetricError(f"power_spectrum: maps of {name!r} are {ny} x {nx}; need at least 4 x 4 cells")
    if units == "cycles_per_cell":
        dy = dx = 1.0
    elif units == "cycles_per_km":
        lat, lon = np.asarray(field["lat"], float), np.asarray(field["lon"], float)
        deg_km = np.pi * _EARTH_RADIUS_KM / 180.0
        dy = float(np.mean(np.diff(lat))) * deg_km
        dx = float(np.mean(np.diff(lon))) * deg_km * float(np.cos(np.deg2rad(lat.mean())))
    else:
        raise MetricError(
            f"power_spectrum: units must be 'cycles_per_cell' or 'cycles_per_km', got {units!r}"
        )
    if maps.shape[0] == 0:
        power = np.full((ny, nx), np.nan)
    else:
        power = (np.abs(np.fft.fft2(maps)) ** 2).mean(axis=0) / (ny * nx)
    ky, kx = np.fft.fftfreq(ny, d=dy), np.fft.fftfreq(nx, d=dx)
    k = np.hypot(*np.meshgrid(ky, kx, indexing="ij"))
    dk = max(1.0 / (ny * dy), 1.0 / (nx * dx))
    n_bins = int(np.floor(min(0.5 / dy, 0.5 / dx) / dk + 1e-9))
    index = np.rint(k / dk).astype(int).ravel()
    keep = (index >= 1) & (index <= n_bins)
    sums = np.bincount(index[keep], weights=power.ravel()[keep], minlength=n_bins + 1)[1:]
    counts = np.bincount(index[keep], minlength=n_bins + 1)[1:]
    wavenumber = dk * np.arange(1, n_bins + 1)
    label = units.replace("_", " ")
    return xr.DataArray(
        sums / counts,
        dims="wavenumber",
        name=name,
        coords={"wavenumber": ("wavenumber", wavenumber, {"units": label, "long_name": "radial wavenumber"})},
        attrs={
            "long_name": f"radially averaged power spectrum of {name}",
            "units": _squared(field.attrs.get("units", "1")) + " per Fourier mode",
            "wavenumber_units": label,
            "n_maps": maps.shape[0],
        },
    )


def _squared(units: str) -> str:
    return f"({units})^2" if " " in units else f"{units}^2"


@_per_variable
def log_spectral_distance(
    forecast: xr.DataArray,
    truth: xr.DataArray,
    *,
    units: Literal["cycles_per_cell", "cycles_per_km"] = "cycles_per_cell",
) -> xr.DataArray:
    """Log-spectral distance [dB]: sqrt(mean_k (10 log10(P_forecast(k) / P_truth(k)))^2) over wavenumbers.

    P are :func:`power_spectrum` results (forecast averaged over time and members, truth over time); 0 when
    the spectra agree; a forecast with twice the power at every k gives 10 log10 2 = 3.01 dB. With masked
    truth the forecast is masked at the same points (its own values there dropped), so both spectra are of
    mean-filled maps with the same holes; NaN when the truth has no valid cell.
    """
    pf = power_spectrum(_valid_only(forecast, truth), units=units)
    pt = power_spectrum(truth, units=units)
    ratio_db = 10 * np.log10(pf.values / pt.values)
    return xr.DataArray(np.sqrt(np.mean(ratio_db**2)), attrs={"units": "dB"})


# -- everything ------------------------------------------------------------------------------------------
def evaluate_all(forecast: Field, truth: Field, *, climatology: Field | None = None) -> xr.Dataset:
    """Every applicable scalar metric per variable: a Dataset of the forecast's variables along ``metric``.

    Accuracy of the (ensemble-mean) forecast: mae, rmse, bias, acc (only with a ``climatology``). Realism of
    the samples (every member counts): ssim and psnr (mean over maps; ssim only for maps >= 11 x 11),
    q99_error (per cell), log_spectral_distance [dB], wasserstein. Ensembles (a ``member`` dim): crps and,
    with >= 2 members, crps_fair (the ensemble-size-unbiased CRPS) and spread_skill_ratio. ``.to_dataframe()`` gives a metric x variable table.
    Masked truth (NaN cells) is scored on its valid points only (see the module docstring); each variable's
    attrs hold ``valid_fraction``, the fraction of the truth's (time, lat, lon) points that are not NaN.
    """
    if isinstance(forecast, xr.DataArray):
        name = forecast.name or "field"
        forecast = forecast.to_dataset(name=name)
        truth = truth.to_dataset(name=name) if isinstance(truth, xr.DataArray) else truth
    if isinstance(climatology, xr.DataArray):
        climatology = climatology.to_dataset(name=climatology.name or next(iter(_data_vars(forecast))))
    mean = ensemble_mean(forecast)
    results: dict[Hashable, dict[str, float]] = {}
    valid_fraction: dict[Hashable, float] = {}
    for var in _data_vars(forecast):
        if var not in truth.data_vars:
            raise MetricError(
                f"evaluate_all: truth has no variable {var!r}; it has {sorted(map(str, truth.data_vars))}"
            )
        f, fm, t = forecast[var], mean[var], truth[var]
        row: dict[str, xr.DataArray] = {"mae": mae(fm, t), "rmse": rmse(fm, t), "bias": bias(fm, t)}
        if climatology is not None:
            row["acc"] = acc(fm, t, climatology[var])
        if min(t.sizes["lat"], t.sizes["lon"]) >= 2 * _SSIM_RADIUS + 1:
            row["ssim"] = ssim(f, t)
        row["psnr"] = psnr(f, t)
        row["q99_error"] = q99_error(f, t)
        row["log_spectral_distance"] = log_spectral_distance(f, t)
        row["wasserstein"] = wasserstein(f, t)
        if MEMBER_DIM in f.dims:
            row["crps"] = crps(f, t)
            if f.sizes[MEMBER_DIM] >= 2:
                row["crps_fair"] = crps(f, t, fair=True)
                row["spread_skill_ratio"] = spread_skill_ratio(f, t)
        with _quiet_masked():  # dask-backed scores are computed here
            results[var] = {k: float(v) for k, v in row.items()}
        valid_fraction[var] = float(t.notnull().mean())
    metrics = list(dict.fromkeys(k for row in results.values() for k in row))
    data = {
        var: ("metric", [row.get(m, np.nan) for m in metrics], {"valid_fraction": valid_fraction[var]})
        for var, row in results.items()
    }
    return xr.Dataset(
        data,
        coords={"metric": metrics},
        attrs={"description": "climrecon evaluate_all: latitude-weighted scores, forecast vs truth"},
    )
