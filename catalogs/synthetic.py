"""Synthetic reanalysis: a labelled, offline stand-in for ERA5 monthly means (SYNTHETIC, not observations).

No high-resolution, many-month reanalysis can be had offline (see DATA.md), so the training prior of the
offline default is generated here: monthly-mean 2 m temperature ``tas`` [K], 10 m winds ``uas``/``vas``
[m s-1] and precipitation ``pr`` [kg m-2 s-1] on a regular, cell-centred lat/lon grid, driven by *real*
static fields (surface altitude ``orog`` [m] and land fraction ``sftlf`` [%]). Every field is the sum or
product of small, named terms below; their parameters live in :class:`SyntheticPhysics`, each with the
observation it was tuned to. The result is meant to have the *structure* a downscaling model must learn
(lapse rates, land-sea contrast, windward/leeward precipitation, red spatial spectra, persistence),
not to reproduce any real month.

Temperature (``tas``), per month with year fraction ``tau`` of the month centre:

* :func:`sea_level_temperature`: annual mean falling poleward, -0.45 K/deg over the (upwelling-cooled)
  ocean and -0.9 K/deg inland, inland 6.5 K warmer at 40N (sea-level-reduced station normals: San Diego,
  San Francisco, Seattle vs Phoenix, Denver, Salt Lake City, Helena); two harmonics of the seasonal cycle,
  half-range 2.5 K over the ocean (peak mid-August) to 13 K inland (peak mid-July). Land-sea contrast uses
  :func:`continentality`, ``sftlf`` smoothed over 150 km (a distance-to-coast proxy: 0.5 on the coast,
  ~0.8 130 km inland as at Sacramento, 1 deep inland).
* :func:`lapse_rate`: -6.5 K/km in the annual mean, -7.5 in July and -5.5 in January (winter inversions and
  cold pools weaken surface lapse rates; summer mixing steepens them), times ``max(orog, 0)``.
* :func:`warming_trend`: linear, 0.012 K/yr over ocean to 0.022 K/yr inland, zero in 1990 (about 1.3 K
  over 1961-2020 inland, in line with observed western-US warming).
* Large-scale anomalies: a unit-variance random field (Matern-like spectrum rolling off beyond 1000 km,
  AR(1) with phi = 0.5 month to month), half tied to the meridional wind anomaly (southerlies warm;
  correlation 0.5), scaled by a standard deviation of 0.7 K over the ocean up to 3.1 K inland in
  January and 1.3 K inland in July (monthly anomaly spread of coastal vs continental stations).
* Fine-scale anomalies: spectrum ``E(k) ~ k^-3`` for wavelengths below 400 km (phi = 0.3), 0.35 K scaled
  up over rough terrain; plus :func:`inversion_anomaly`, tied to terrain: in winter ridges are warmer and
  valleys colder than the lapse rate says, 3 K per km of relief relative to the surroundings (60 km),
  with a month-to-month lognormal strength (persistent, phi = 0.5).

Winds (``uas``, ``vas``):

* :func:`climatological_wind`: surface westerlies ``0.5 + U tanh((lat - lat0) / 7)`` with U = 4.5 m/s in
  January and 2.5 in July and the transition latitude 34N in winter, 40N in summer (trades/northeasterlies
  south of it); over the ocean a coast-parallel northerly of 3 m/s in summer (the California low-level jet)
  and a weak southerly in winter.
* Large-scale anomalies from a random streamfunction ``psi`` (spectrum rolling off beyond 1500 km, so the
  wind spectrum is ``k^-5`` below it; phi = 0.3): :func:`streamfunction_winds` gives ``u = -dpsi/dy``,
  ``v = dpsi/dx`` with spherical metric terms and centred differences, whose centred-difference divergence
  vanishes exactly, scaled to 2 m/s rms in January and 1 m/s in July. Monthly means average synoptic
  eddies out: what is left of the free-atmosphere anomaly is low-frequency, planetary-scale flow (about
  2 % of its variance at wavelengths under 440 km), while the fine structure of monthly-mean surface wind
  comes from the terrain terms below. (Generator 1 used a 1000 km roll-off and ``k^-3``, 29 % under
  440 km: sub-grid noise no predictor can know, which set the x8 Bayes floor at 0.45 x bilinear MAE;
  ``benchmarks/skill_floor.py`` computes that floor.)
* :func:`terrain_adjusted_wind`: the upslope component is removed in proportion ``s / (s + 0.01)`` of the
  slope ``s`` (flow turned along ridges instead of over them), speed-up over crests (+25 % per km of height
  above the 60 km surroundings), slow-down over subgrid-rough terrain (halved at 400 m subgrid standard
  deviation) and over land (-30 %, surface friction).

Precipitation (``pr``):

* :func:`background_precipitation`: a cool-season storm track (5 mm/day at its poleward flank, shifted from
  35N in January to 45N in July, 1.2 mm/day in summer), drier inland (-65 % at continentality 1), a North
  American monsoon (1.5 mm/day inland near 32N, peaking early August) and summer convection over high
  terrain (0.8 mm/day per 2 km).
* :func:`orographic_precipitation`: the linear model of Smith & Barstad (2004): the Fourier transform of
  the upslope vertical motion ``w = U . grad(h)`` for the month's steering wind (2 x the domain-mean
  surface wind, i.e. ~850 hPa), delayed by cloud conversion and fallout (1500 s each, inside the range
  Barstad & Smith 2005 fitted) and the vapour scale height (2500 m, moist stability 0.005 s-1), which
  enhances the windward side and leaves a rain shadow leeward. Terrain is smoothed over 30 km first (a
  month of varying flow does not resolve grid-scale ridges); the uplift sensitivity follows
  Clausius-Clapeyron from the month's mean sea-level temperature; scaled by a wet fraction of 0.3
  (precipitating flow occurs during part of the month only).
* The sum is floored at 15 % of the background, then multiplied by a lognormal anomaly
  ``exp(0.6 z - 0.18)`` (mean 1, CV ~0.65 as for monthly precipitation in the West), ``z`` correlated
  (-0.6) with the streamfunction (cyclonic months are wet) and otherwise a random field of its own
  (roll-off 600 km, phi = 0.2). Typical values: 0.1-1 mm/day in summer, 1-15 mm/day on windward ranges
  in winter.

Determinism: every random field is a truncated AR(1) filter over monthly innovations,
``a_t = c * sum_{k=0..K} phi^k eps_{t-k}`` with ``c`` making its variance exactly 1 and ``phi^K < 1e-6``,
where ``eps_m`` is white noise from ``numpy.random.default_rng(SeedSequence([seed, variable, term, m]))``
for the absolute month ``m = 12 * year + month - 1``, then filtered spatially by FFT (one month at a time,
on a grid padded to twice the domain so the periodic FFT does not wrap). A month's values depend only on
the seed, its date, the grid and the static fields: not on the chunking, nor on the span generated.

Grid: cell centres ``lat_min + (i + 1/2) * resolution`` (ascending), longitudes -180..180 (0..360 only when
the region crosses the antimeridian). Time: cftime month starts in the "standard" calendar with
``time_bnds``. Static fields are area-averaged (cos-latitude weighted block means) onto the grid, which
requires the static grid spacing to divide the resolution and its cells to tile the region exactly
(true for 5' data and 0.25 deg); anything else raises :class:`SyntheticStaticError`.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import cftime
import dask.array as da
import numpy as np
import xarray as xr
from scipy.ndimage import gaussian_filter

from climrecon.config import SyntheticConfig
from climrecon.stores import StageStore, content_key, time_blocks

__all__ = [
    "GENERATOR_VERSION",
    "PHYSICS",
    "VARIABLE_ATTRS",
    "SyntheticGrid",
    "SyntheticPhysics",
    "SyntheticStaticError",
    "synthetic_grid",
    "synthetic_time",
    "target_static",
    "static_fingerprint",
    "continentality",
    "sea_level_temperature",
    "lapse_rate",
    "warming_trend",
    "inversion_anomaly",
    "climatological_wind",
    "streamfunction_winds",
    "spherical_divergence",
    "terrain_adjusted_wind",
    "background_precipitation",
    "orographic_precipitation",
    "saturation_vapour_density",
    "persistent_random_field",
    "synthetic_reanalysis",
    "write_synthetic_reanalysis",
]

GENERATOR_VERSION = "climrecon-synthetic-2"
EARTH_RADIUS = 6.371e6  # m
SECONDS_PER_DAY = 86400.0
VARIABLES = ("tas", "uas", "vas", "pr")
JULY, JANUARY = 0.54, 0.04  # year fraction of mid-July and mid-January

VARIABLE_ATTRS = {
    "tas": {
        "standard_name": "air_temperature",
        "long_name": "synthetic near-surface air temperature",
        "units": "K",
    },
    "uas": {
        "standard_name": "eastward_wind",
        "long_name": "synthetic eastward near-surface wind",
        "units": "m s-1",
    },
    "vas": {
        "standard_name": "northward_wind",
        "long_name": "synthetic northward near-surface wind",
        "units": "m s-1",
    },
    "pr": {
        "standard_name": "precipitation_flux",
        "long_name": "synthetic precipitation",
        "units": "kg m-2 s-1",
    },
}


class SyntheticStaticError(ValueError):
    """The static fields given cannot drive the synthetic reanalysis on the requested grid."""


@dataclass(frozen=True)
class SyntheticPhysics:
    """Every tunable constant of the generator (units in the names; see the module docstring for sources)."""

    # temperature climatology
    t_ocean_40n_k: float = 287.0
    t_ocean_per_deg_k: float = -0.45
    t_inland_excess_40n_k: float = 6.5
    t_inland_excess_per_deg_k: float = -0.45
    amp_ocean_k: float = 2.5
    amp_inland_40n_k: float = 13.0
    amp_inland_per_deg_k: float = 0.15
    peak_ocean_yearfrac: float = 0.62
    peak_inland_yearfrac: float = 0.545
    second_harmonic_inland_k: float = 0.6
    continentality_km: float = 150.0
    lapse_rate_k_per_m: float = -6.5e-3
    lapse_rate_seasonal_k_per_m: float = -1.0e-3  # added in July, subtracted in January
    trend_ocean_k_per_yr: float = 0.012
    trend_inland_k_per_yr: float = 0.022
    trend_reference_year: float = 1990.0
    # temperature anomalies
    tas_large_sd_ocean_k: float = 0.7
    tas_large_sd_inland_summer_k: float = 0.6
    tas_large_sd_inland_winter_k: float = 2.4
    tas_large_rolloff_km: float = 1000.0
    tas_large_slope: float = 5.0
    tas_large_phi: float = 0.5
    tas_wind_correlation: float = 0.5
    tas_fine_sd_k: float = 0.35
    tas_fine_rough_m: float = 500.0  # subgrid orography std at which the fine-scale spread doubles
    tas_fine_rolloff_km: float = 400.0
    tas_fine_slope: float = 3.0
    tas_fine_phi: float = 0.3
    inversion_k_per_m: float = 3.0e-3
    relief_km: float = 60.0
    inversion_log_sd: float = 0.5
    inversion_phi: float = 0.5
    # winds
    westerly_offset_ms: float = 0.5
    westerly_ms: float = 3.5
    westerly_seasonal_ms: float = 1.0
    westerly_lat: float = 37.0
    westerly_lat_seasonal: float = 3.0
    westerly_width_deg: float = 7.0
    ocean_southerly_winter_ms: float = 1.0
    ocean_northerly_summer_ms: float = 3.0
    wind_anomaly_ms: float = 1.5
    wind_anomaly_seasonal_ms: float = 0.5
    wind_rolloff_km: float = 1500.0
    streamfunction_slope: float = 7.0  # psi ~ k^-7, wind ~ k^-5 below the roll-off
    wind_phi: float = 0.3
    blocking_slope: float = 0.01
    crest_speedup_per_km: float = 0.25
    roughness_m: float = 400.0
    land_friction: float = 0.3
    # precipitation (mm/day where named so)
    storm_winter_mm_day: float = 5.0
    storm_summer_mm_day: float = 1.2
    storm_lat: float = 40.0
    storm_lat_seasonal: float = 5.0
    storm_width_deg: float = 3.0
    storm_floor: float = 0.05
    inland_drying: float = 0.65
    monsoon_mm_day: float = 1.5
    monsoon_lat: float = 32.0
    monsoon_width_deg: float = 4.0
    monsoon_peak_yearfrac: float = 0.6
    monsoon_season_yearfrac: float = 0.07
    convective_mm_day_per_2km: float = 0.8
    steering_factor: float = 2.0
    uplift_sensitivity_factor: float = 0.8  # Gamma_m / gamma in Smith & Barstad's C_w
    vapour_scale_height_m: float = 2500.0
    moist_stability_per_s: float = 0.005
    conversion_time_s: float = 1500.0
    fallout_time_s: float = 1500.0
    orographic_smoothing_km: float = 30.0  # terrain scale resolved by a month of varying flow
    wet_fraction: float = 0.3
    pr_floor_fraction: float = 0.15
    pr_log_sd: float = 0.6
    pr_streamfunction_correlation: float = -0.6
    pr_rolloff_km: float = 600.0
    pr_slope: float = 4.0
    pr_phi: float = 0.2


PHYSICS = SyntheticPhysics()

# (variable index, term index) of each random stream in SeedSequence([seed, variable, term, month])
STREAMS = {
    "tas_large": (0, 0),
    "tas_fine": (0, 1),
    "tas_inversion": (0, 2),
    "streamfunction": (1, 0),
    "pr_anomaly": (3, 0),
}


# -- grid, time and static fields ------------------------------------------------------------------------
@dataclass(frozen=True)
class SyntheticGrid:
    """A regular cell-centred lat/lon grid; ``lat`` ascending, ``lon`` monotonic (degrees)."""

    lat: np.ndarray
    lon: np.ndarray
    resolution: float

    @property
    def shape(self) -> tuple[int, int]:
        return (self.lat.size, self.lon.size)

    @property
    def dy(self) -> float:
        """Meridional spacing [m]."""
        return EARTH_RADIUS * math.radians(self.resolution)

    @property
    def dx_mid(self) -> float:
        """Zonal spacing at the central latitude [m] (the local-Cartesian spacing of the spectral filters)."""
        return self.dy * math.cos(math.radians(float(self.lat.mean())))

    @property
    def padded_shape(self) -> tuple[int, int]:
        """FFT grid: twice the domain (even sizes), so periodic filtering never wraps across it."""
        return tuple(2 * n + 2 for n in self.shape)

    def crop(self, halo: int = 0) -> tuple[slice, slice]:
        """The domain (plus ``halo`` cells each side) inside the padded grid."""
        return tuple(
            slice((p - n) // 2 - halo, (p - n) // 2 + n + halo)
            for p, n in zip(self.padded_shape, self.shape, strict=True)
        )


def _cells(lo: float, hi: float, res: float, what: str) -> int:
    n = (hi - lo) / res
    if abs(n - round(n)) > 1e-6 or round(n) < 1:
        raise ValueError(
            f"synthetic.region {what} span {hi - lo} deg is not a whole number of cells of "
            f"synthetic.resolution={res}"
        )
    return int(round(n))


def synthetic_grid(cfg: SyntheticConfig) -> SyntheticGrid:
    """Cell centres covering ``cfg.region`` at ``cfg.resolution`` (lon -180..180 unless non-monotonic)."""
    r, res = cfg.region, cfg.resolution
    lat = r.lat_min + res * (np.arange(_cells(r.lat_min, r.lat_max, res, "latitude")) + 0.5)
    lon_max = r.lon_max if r.lon_max > r.lon_min else r.lon_max + 360.0
    lon = r.lon_min + res * (np.arange(_cells(r.lon_min, lon_max, res, "longitude")) + 0.5)
    wrapped = (lon + 180.0) % 360.0 - 180.0
    lon = wrapped if np.all(np.diff(wrapped) > 0) else lon % 360.0
    return SyntheticGrid(lat=lat, lon=lon, resolution=res)


def synthetic_time(cfg: SyntheticConfig) -> tuple[np.ndarray, np.ndarray]:
    """Month starts (cftime, "standard" calendar) from ``start_year`` through ``end_year``, and the
    absolute months ``12 * year + month - 1``."""
    months = np.arange(12 * cfg.start_year, 12 * (cfg.end_year + 1))
    times = np.array([cftime.datetime(m // 12, m % 12 + 1, 1, calendar="standard") for m in months])
    return times, months


def _month_start(m: int) -> cftime.datetime:
    return cftime.datetime(m // 12, m % 12 + 1, 1, calendar="standard")


def target_static(cfg: SyntheticConfig, static: xr.Dataset) -> xr.Dataset:
    """``orog`` [m], ``sftlf`` [%] and the subgrid orography spread ``orog_std`` [m] on the synthetic grid.

    Area-weighted (cos-latitude) block means of the static cells inside each target cell; the static
    grid must be regular with a spacing that divides ``cfg.resolution`` and cells aligned with the target
    cell edges, otherwise :class:`SyntheticStaticError`. Loads the (small) result into memory.
    """
    for name in ("orog", "sftlf"):
        if name not in static:
            raise SyntheticStaticError(
                f"static dataset has no variable {name!r} (found {sorted(static.data_vars)})"
            )
        if set(static[name].dims) != {"lat", "lon"}:
            raise SyntheticStaticError(
                f"static variable {name!r} must have dims (lat, lon), not {static[name].dims}"
            )
    grid = synthetic_grid(cfg)
    st = static[["orog", "sftlf"]]
    lon = st["lon"].values
    lon = (lon + 180.0) % 360.0 - 180.0 if grid.lon.min() < 0 else lon % 360.0
    st = st.assign_coords(lon=lon).sortby("lat").sortby("lon")
    res = cfg.resolution
    steps = {}
    for dim, centres in (("lat", grid.lat), ("lon", grid.lon)):
        coord = st[dim].values
        step = float(np.median(np.diff(coord)))
        factor = res / step
        if abs(factor - round(factor)) > 1e-3:
            raise SyntheticStaticError(
                f"static {dim} spacing {step:.6g} deg does not divide synthetic.resolution={res}: regrid "
                "the static fields first (this generator only block-averages)"
            )
        lo, hi = centres[0] - res / 2, centres[-1] + res / 2
        inside = (coord > lo + step * 1e-3) & (coord < hi - step * 1e-3)
        n_expected = int(round(factor)) * centres.size
        offset = (coord[inside][:1] - lo) / step - 0.5 if inside.any() else np.array([np.nan])
        if inside.sum() != n_expected or not abs(offset[0]) < 1e-2:
            raise SyntheticStaticError(
                f"static {dim} cells (spacing {step:.6g} deg) do not tile the target cells [{lo:g}, {hi:g}]: "
                f"found {int(inside.sum())} centres inside, expected {n_expected} starting half a cell "
                "from the edge (static fields must be cell-centred)"
            )
        st = st.isel({dim: np.flatnonzero(inside)})
        steps[dim] = int(round(factor))
    st = st.load().astype("float64")
    for name in ("orog", "sftlf"):
        if np.isnan(st[name].values).any():
            raise SyntheticStaticError(f"static variable {name!r} has missing values inside synthetic.region")
    weight = np.cos(np.deg2rad(st["lat"])) * xr.ones_like(st["orog"])

    def block_mean(x: xr.DataArray) -> xr.DataArray:
        coarse = lambda a: a.coarsen(lat=steps["lat"], lon=steps["lon"]).sum()  # noqa: E731
        return (coarse(x * weight) / coarse(weight)).assign_coords(lat=grid.lat, lon=grid.lon)

    orog = block_mean(st["orog"])
    spread = np.sqrt(np.maximum(block_mean(st["orog"] ** 2) - orog**2, 0.0))
    out = xr.Dataset(
        {
            "orog": orog.astype("float32").assign_attrs(
                standard_name="surface_altitude", units="m", long_name="surface altitude (area mean)"
            ),
            "sftlf": block_mean(st["sftlf"])
            .astype("float32")
            .assign_attrs(
                standard_name="land_area_fraction", units="%", long_name="land area fraction (area mean)"
            ),
            "orog_std": spread.astype("float32").assign_attrs(
                units="m", long_name="subgrid standard deviation of surface altitude"
            ),
        }
    )
    out["lat"].attrs.update(standard_name="latitude", units="degrees_north", axis="Y")
    out["lon"].attrs.update(standard_name="longitude", units="degrees_east", axis="X")
    return out


def static_fingerprint(target: xr.Dataset) -> str:
    """A short digest of the target-grid static fields that drive the generator."""
    h = hashlib.sha256()
    for name in ("orog", "sftlf", "orog_std"):
        h.update(np.ascontiguousarray(target[name].values, dtype="float32").tobytes())
    h.update(
        np.asarray(target["lat"].values, "float64").tobytes()
        + np.asarray(target["lon"].values, "float64").tobytes()
    )
    return h.hexdigest()[:16]


# -- geometry helpers -------------------------------------------------------------------------------------
def _smooth(field: np.ndarray, grid: SyntheticGrid, length_km: float) -> np.ndarray:
    sigma = (length_km * 1e3 / grid.dy, length_km * 1e3 / grid.dx_mid)
    return gaussian_filter(field, sigma, mode="nearest")


def _gradient(field: np.ndarray, grid: SyntheticGrid) -> tuple[np.ndarray, np.ndarray]:
    """(d/dx, d/dy) [per m] with the spherical metric (centred inside, one-sided at the edges)."""
    dfdy = np.gradient(field, grid.dy, axis=0)
    dfdx = np.gradient(field, grid.dy, axis=1) / np.cos(np.deg2rad(grid.lat))[:, None]
    return dfdx, dfdy


def _seasonal(tau: float, peak: float) -> float:
    """cos of the phase from ``peak`` (1 at the peak, -1 half a year later)."""
    return math.cos(2 * math.pi * (tau - peak))


def _summer(tau: float) -> float:
    """0 in mid-January, 1 in mid-July."""
    return 0.5 * (1.0 + _seasonal(tau, JULY))


# -- temperature terms ------------------------------------------------------------------------------------
def continentality(sftlf: np.ndarray, grid: SyntheticGrid, p: SyntheticPhysics = PHYSICS) -> np.ndarray:
    """Land fraction (0..1) smoothed over ``p.continentality_km``: 0 at sea, 0.5 on a coast, 1 far inland."""
    return np.clip(_smooth(np.asarray(sftlf, "float64") / 100.0, grid, p.continentality_km), 0.0, 1.0)


def sea_level_temperature(
    lat: np.ndarray, cont: np.ndarray, tau: float, p: SyntheticPhysics = PHYSICS
) -> np.ndarray:
    """Climatological sea-level temperature [K]: annual mean + two seasonal harmonics, by continentality."""
    dlat = lat - 40.0
    annual = (
        p.t_ocean_40n_k
        + p.t_ocean_per_deg_k * dlat
        + cont * (p.t_inland_excess_40n_k + p.t_inland_excess_per_deg_k * dlat)
    )
    inland_amp = p.amp_inland_40n_k + p.amp_inland_per_deg_k * dlat
    amp = p.amp_ocean_k + cont * (inland_amp - p.amp_ocean_k)
    peak = p.peak_ocean_yearfrac + cont * (p.peak_inland_yearfrac - p.peak_ocean_yearfrac)
    phase = 2 * np.pi * (tau - peak)
    return annual + amp * np.cos(phase) + cont * p.second_harmonic_inland_k * np.cos(2 * phase)


def lapse_rate(tau: float, p: SyntheticPhysics = PHYSICS) -> float:
    """Surface lapse rate [K m-1]: -6.5 K/km on the annual mean, steeper in July, weaker in January."""
    return p.lapse_rate_k_per_m + p.lapse_rate_seasonal_k_per_m * _seasonal(tau, JULY)


def warming_trend(decimal_year: float, cont: np.ndarray, p: SyntheticPhysics = PHYSICS) -> np.ndarray:
    """Linear warming [K] since ``p.trend_reference_year``, faster inland."""
    rate = p.trend_ocean_k_per_yr + cont * (p.trend_inland_k_per_yr - p.trend_ocean_k_per_yr)
    return rate * (decimal_year - p.trend_reference_year)


def inversion_anomaly(
    relief: np.ndarray, tau: float, strength: float, p: SyntheticPhysics = PHYSICS
) -> np.ndarray:
    """Winter cold pools [K]: ``relief`` (height above the 60 km surroundings, m) x a seasonal inversion rate.

    ``strength`` is a unit normal deviate of the month; the rate is lognormal around its mean.
    """
    s = p.inversion_log_sd
    return p.inversion_k_per_m * (1.0 - _summer(tau)) * math.exp(s * strength - 0.5 * s * s) * relief


# -- wind terms -------------------------------------------------------------------------------------------
def climatological_wind(
    lat: np.ndarray, cont: np.ndarray, tau: float, p: SyntheticPhysics = PHYSICS
) -> tuple[np.ndarray, np.ndarray]:
    """Seasonal surface westerlies by latitude, and coast-parallel meridional flow over the ocean [m s-1]."""
    speed = p.westerly_ms + p.westerly_seasonal_ms * _seasonal(tau, JANUARY)
    lat0 = p.westerly_lat + p.westerly_lat_seasonal * _seasonal(tau, JULY)
    u = p.westerly_offset_ms + speed * np.tanh((lat - lat0) / p.westerly_width_deg)
    summer = _summer(tau)
    v = (1.0 - cont) * (p.ocean_southerly_winter_ms * (1.0 - summer) - p.ocean_northerly_summer_ms * summer)
    return u, v


def streamfunction_winds(
    psi: np.ndarray, lat: np.ndarray, resolution: float
) -> tuple[np.ndarray, np.ndarray]:
    """Non-divergent winds ``u = -(1/a) dpsi/dphi``, ``v = (1/(a cos phi)) dpsi/dlambda``, centred.

    ``psi`` [m2 s-1] has one halo cell on each side of the (len(lat), nx) output grid.
    """
    d = EARTH_RADIUS * math.radians(resolution)
    coslat = np.cos(np.deg2rad(lat))[:, None]
    u = -(psi[2:, 1:-1] - psi[:-2, 1:-1]) / (2 * d)
    v = (psi[1:-1, 2:] - psi[1:-1, :-2]) / (2 * d * coslat)
    return u, v


def spherical_divergence(u: np.ndarray, v: np.ndarray, lat: np.ndarray, resolution: float) -> np.ndarray:
    """``(1/(a cos phi)) (du/dlambda + d(v cos phi)/dphi)`` (centred differences), interior [s-1]."""
    d = EARTH_RADIUS * math.radians(resolution)
    coslat = np.cos(np.deg2rad(lat))[:, None]
    vc = v * coslat
    dudl = (u[1:-1, 2:] - u[1:-1, :-2]) / (2 * d)
    dvdp = (vc[2:, 1:-1] - vc[:-2, 1:-1]) / (2 * d)
    return (dudl + dvdp) / coslat[1:-1]


def terrain_adjusted_wind(
    u: np.ndarray,
    v: np.ndarray,
    slope: tuple[np.ndarray, np.ndarray],
    relief: np.ndarray,
    orog_std: np.ndarray,
    land: np.ndarray,
    p: SyntheticPhysics = PHYSICS,
) -> tuple[np.ndarray, np.ndarray]:
    """Surface wind over terrain: blocked upslope component, crest speed-up, roughness and land friction.

    ``slope`` = (dh/dx, dh/dy); ``relief`` [m] height above the surroundings; ``orog_std`` [m] subgrid
    spread; ``land`` fraction 0..1.
    """
    hx, hy = slope
    s2 = hx * hx + hy * hy
    s = np.sqrt(s2)
    # remove the fraction s/(s+s0) of the component along grad(h): flow turned along the contours
    blocked = np.divide(u * hx + v * hy, s2, out=np.zeros_like(s2), where=s2 > 0) * s / (s + p.blocking_slope)
    u, v = u - blocked * hx, v - blocked * hy
    factor = 1.0 + p.crest_speedup_per_km * np.clip(relief, 0.0, 2000.0) / 1000.0
    factor = factor * (1.0 - p.land_friction * land) / (1.0 + orog_std / p.roughness_m)
    return u * factor, v * factor


# -- precipitation terms ----------------------------------------------------------------------------------
def saturation_vapour_density(t: float) -> float:
    """Saturation water-vapour density [kg m-3] at temperature ``t`` [K] (Bolton 1980 vapour pressure)."""
    e_s = 611.2 * math.exp(17.67 * (t - 273.15) / (t - 29.65))
    return e_s / (461.5 * t)


def background_precipitation(
    lat: np.ndarray, cont: np.ndarray, height: np.ndarray, tau: float, p: SyntheticPhysics = PHYSICS
) -> np.ndarray:
    """Large-scale precipitation [kg m-2 s-1]: seasonal storm track, inland drying, monsoon, convection."""
    summer = _summer(tau)
    track_lat = p.storm_lat + p.storm_lat_seasonal * _seasonal(tau, JULY)
    poleward = 1.0 / (1.0 + np.exp(-(lat - track_lat) / p.storm_width_deg))
    storm = p.storm_winter_mm_day * (1 - summer) + p.storm_summer_mm_day * summer
    storm = storm * (p.storm_floor + (1 - p.storm_floor) * poleward) * (1.0 - p.inland_drying * cont)
    dtau = (tau - p.monsoon_peak_yearfrac + 0.5) % 1.0 - 0.5
    monsoon = (
        p.monsoon_mm_day
        * math.exp(-((dtau / p.monsoon_season_yearfrac) ** 2))
        * np.exp(-(((lat - p.monsoon_lat) / p.monsoon_width_deg) ** 2))
        * cont
    )
    convective = p.convective_mm_day_per_2km * summer * cont * np.clip(height / 2000.0, 0.0, 1.5)
    return (storm + monsoon + convective) / SECONDS_PER_DAY


@dataclass(frozen=True)
class _OrographySpectrum:
    """The padded terrain transform and wavenumbers [rad m-1] for the Smith-Barstad model."""

    h_hat: np.ndarray
    kx: np.ndarray
    ky: np.ndarray
    crop: tuple[slice, slice]

    @classmethod
    def build(cls, height: np.ndarray, grid: SyntheticGrid) -> _OrographySpectrum:
        ny, nx = grid.shape
        py, px = grid.padded_shape
        pad = ((py - ny) // 2, (py - ny) - (py - ny) // 2), ((px - nx) // 2, (px - nx) - (px - nx) // 2)
        # ramp the terrain down to sea level across the padding, so the periodic transform sees no cliff
        padded = np.pad(height, pad, mode="linear_ramp", end_values=0.0)
        ky = 2 * np.pi * np.fft.fftfreq(py, grid.dy)[:, None]
        kx = 2 * np.pi * np.fft.fftfreq(px, grid.dx_mid)[None, :]
        return cls(np.fft.fft2(padded), kx, ky, grid.crop())


def orographic_precipitation(
    spectrum: _OrographySpectrum,
    wind: tuple[float, float],
    uplift_sensitivity: float,
    p: SyntheticPhysics = PHYSICS,
) -> np.ndarray:
    """Smith & Barstad (2004) linear orographic precipitation [kg m-2 s-1] (negative in rain shadows).

    ``P^ = C_w i sigma h^ / ((1 - i m H_w)(1 + i sigma tau_c)(1 + i sigma tau_f))`` with ``sigma = U k + V l``
    and vertical wavenumber ``m`` (propagating where sigma^2 < N_m^2, evanescent otherwise);
    ``uplift_sensitivity`` is ``C_w`` [kg m-3] and ``wind`` the uniform steering wind (U, V) [m s-1].
    """
    kx, ky = spectrum.kx, spectrum.ky
    sigma = wind[0] * kx + wind[1] * ky
    k2 = kx * kx + ky * ky
    sig2 = sigma * sigma
    ratio = np.divide(p.moist_stability_per_s**2 - sig2, sig2, out=np.zeros_like(sig2), where=sig2 > 0)
    m = np.where(ratio >= 0, np.sign(sigma) * np.sqrt(np.abs(ratio) * k2), 1j * np.sqrt(np.abs(ratio) * k2))
    transfer = (
        uplift_sensitivity
        * 1j
        * sigma
        / (
            (1 - 1j * m * p.vapour_scale_height_m)
            * (1 + 1j * sigma * p.conversion_time_s)
            * (1 + 1j * sigma * p.fallout_time_s)
        )
    )
    return np.fft.ifft2(transfer * spectrum.h_hat).real[spectrum.crop]


# -- random fields ----------------------------------------------------------------------------------------
def _truncation_lag(phi: float, tol: float = 1e-6) -> int:
    return 0 if phi <= 0 else int(math.ceil(math.log(tol) / math.log(phi)))


def _innovation(seed: int, stream: str, month: int, shape: tuple[int, ...]) -> np.ndarray:
    variable, term = STREAMS[stream]
    return np.random.default_rng(np.random.SeedSequence([seed, variable, term, int(month)])).standard_normal(
        shape
    )


def _persistent_noise(
    seed: int, stream: str, months: Sequence[int], shape: tuple[int, ...], phi: float
) -> np.ndarray:
    """Unit-variance white noise in space, truncated AR(1) in time: ``c sum_k phi^k eps_{m-k}`` per month."""
    months = np.asarray(months, dtype=np.int64)
    lag = _truncation_lag(phi)
    weights = phi ** np.arange(lag + 1) * math.sqrt((1 - phi**2) / (1 - phi ** (2 * lag + 2)))
    cache: dict[int, np.ndarray] = {}

    def eps(m: int) -> np.ndarray:
        if m not in cache:
            cache[m] = _innovation(seed, stream, m, shape)
        return cache[m]

    out = np.empty((months.size, *shape))
    for i, m in enumerate(months):
        acc = weights[0] * eps(int(m))
        for k in range(1, lag + 1):  # fixed order: identical bytes whatever the block
            acc = acc + weights[k] * eps(int(m) - k)
        out[i] = acc
    return out


def _spectral_amplitude(grid: SyntheticGrid, rolloff_km: float, slope: float) -> np.ndarray:
    """Full-grid FFT amplitude ``(1 + (k/k0)^2)^(-(slope+1)/4)``: 2D power ~ k^-(slope+1), i.e. isotropic
    spectrum ``E(k) ~ k^-slope`` at wavelengths below ``rolloff_km``; normalised so that filtered unit
    white noise has unit variance."""
    py, px = grid.padded_shape
    ky = np.fft.fftfreq(py, grid.dy)[:, None]
    kx = np.fft.fftfreq(px, grid.dx_mid)[None, :]
    amp = (1.0 + (np.hypot(kx, ky) * rolloff_km * 1e3) ** 2) ** (-(slope + 1) / 4)
    return amp / math.sqrt(float(np.mean(amp**2)))


def persistent_random_field(
    seed: int,
    stream: str,
    months: Sequence[int],
    grid: SyntheticGrid,
    phi: float,
    rolloff_km: float,
    slope: float,
    halo: int = 0,
) -> np.ndarray:
    """Unit-variance random fields (len(months), ny+2*halo, nx+2*halo): spectrum ``E(k) ~ k^-slope`` below
    ``rolloff_km``, lag-1 autocorrelation ``phi``; a month's field depends only on (seed, stream, month,
    grid)."""
    noise = _persistent_noise(seed, stream, months, grid.padded_shape, phi)
    amp = _spectral_amplitude(grid, rolloff_km, slope)[:, : grid.padded_shape[1] // 2 + 1]
    crop = grid.crop(halo)
    return (
        np.stack([np.fft.irfft2(np.fft.rfft2(n) * amp, s=n.shape)[crop] for n in noise])
        if len(noise)
        else np.empty((0, *noise.shape[1:]))
    )


def _streamfunction_scale(grid: SyntheticGrid, p: SyntheticPhysics) -> float:
    """rms of one centred-difference wind component of the unit-variance streamfunction field [m-1]."""
    py, px = grid.padded_shape
    amp = _spectral_amplitude(grid, p.wind_rolloff_km, p.streamfunction_slope)
    kx = 2 * np.pi * np.fft.fftfreq(px, grid.dx_mid)[None, :]
    ky = 2 * np.pi * np.fft.fftfreq(py, grid.dy)[:, None]
    var_x = np.mean(amp**2 * (np.sin(kx * grid.dx_mid) / grid.dx_mid) ** 2)
    var_y = np.mean(amp**2 * (np.sin(ky * grid.dy) / grid.dy) ** 2)
    return math.sqrt(0.5 * (var_x + var_y))


# -- one block of months ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Drivers:
    """Target-grid static inputs of the generator (small; shipped with every block task)."""

    grid: SyntheticGrid
    orog: np.ndarray
    sftlf: np.ndarray
    orog_std: np.ndarray
    seed: int
    variables: tuple[str, ...]
    physics: SyntheticPhysics = field(default=PHYSICS)


def _generate_block(months: np.ndarray, drivers: _Drivers) -> np.ndarray:
    """All requested variables for ``months`` (absolute month indices): (variable, time, lat, lon) float32."""
    p, grid, seed = drivers.physics, drivers.grid, drivers.seed
    lat = np.broadcast_to(grid.lat[:, None], grid.shape)
    height = np.maximum(drivers.orog.astype("float64"), 0.0)
    land = drivers.sftlf.astype("float64") / 100.0
    cont = continentality(drivers.sftlf, grid, p)
    relief = height - _smooth(height, grid, p.relief_km)
    slope = _gradient(_smooth(height, grid, 0.5 * grid.dy / 1e3), grid)
    orog_std = drivers.orog_std.astype("float64")
    spectrum = _OrographySpectrum.build(_smooth(height, grid, p.orographic_smoothing_km), grid)
    psi_scale = _streamfunction_scale(grid, p)

    months = np.asarray(months, dtype=np.int64)
    tas_large = persistent_random_field(
        seed, "tas_large", months, grid, p.tas_large_phi, p.tas_large_rolloff_km, p.tas_large_slope
    )
    tas_fine = persistent_random_field(
        seed, "tas_fine", months, grid, p.tas_fine_phi, p.tas_fine_rolloff_km, p.tas_fine_slope
    )
    inversion = _persistent_noise(seed, "tas_inversion", months, (1,), p.inversion_phi)[:, 0]
    psi = persistent_random_field(
        seed, "streamfunction", months, grid, p.wind_phi, p.wind_rolloff_km, p.streamfunction_slope, halo=1
    )
    pr_noise = persistent_random_field(
        seed, "pr_anomaly", months, grid, p.pr_phi, p.pr_rolloff_km, p.pr_slope
    )

    out = np.empty((len(drivers.variables), months.size, *grid.shape), dtype=np.float32)
    for i, m in enumerate(months):
        year, month = divmod(int(m), 12)
        tau = (month + 0.5) / 12.0
        # winds: climatology + non-divergent anomaly (unit rms per component before scaling)
        u1, v1 = streamfunction_winds(psi[i], grid.lat, grid.resolution)
        u1, v1 = u1 / psi_scale, v1 / psi_scale
        spread = p.wind_anomaly_ms + p.wind_anomaly_seasonal_ms * _seasonal(tau, JANUARY)
        u_clim, v_clim = climatological_wind(lat, cont, tau, p)
        u_free, v_free = u_clim + spread * u1, v_clim + spread * v1
        uas, vas = terrain_adjusted_wind(u_free, v_free, slope, relief, orog_std, land, p)
        # temperature
        winter = 1.0 - _summer(tau)
        sd_large = p.tas_large_sd_ocean_k + cont * (
            p.tas_large_sd_inland_summer_k
            + (p.tas_large_sd_inland_winter_k - p.tas_large_sd_inland_summer_k) * winter
        )
        rho = p.tas_wind_correlation
        large = sd_large * (rho * v1 + math.sqrt(1 - rho * rho) * tas_large[i])
        fine = p.tas_fine_sd_k * (1.0 + orog_std / p.tas_fine_rough_m) * tas_fine[i]
        sea_level = (
            sea_level_temperature(lat, cont, tau, p) + warming_trend(year + tau, cont, p) + large + fine
        )
        tas = sea_level + lapse_rate(tau, p) * height + inversion_anomaly(relief, tau, float(inversion[i]), p)
        # precipitation: background + orographic (steering wind, Clausius-Clapeyron), lognormal anomaly
        background = background_precipitation(lat, cont, height, tau, p)
        steering = (p.steering_factor * float(np.mean(u_free)), p.steering_factor * float(np.mean(v_free)))
        c_w = p.uplift_sensitivity_factor * saturation_vapour_density(float(np.mean(sea_level)))
        orographic = p.wet_fraction * orographic_precipitation(spectrum, steering, c_w, p)
        deterministic = np.maximum(background + orographic, p.pr_floor_fraction * background)
        rho = p.pr_streamfunction_correlation
        z = rho * psi[i][1:-1, 1:-1] + math.sqrt(1 - rho * rho) * pr_noise[i]
        pr = deterministic * np.exp(p.pr_log_sd * z - 0.5 * p.pr_log_sd**2)
        fields = {"tas": tas, "uas": uas, "vas": vas, "pr": pr}
        for j, name in enumerate(drivers.variables):
            out[j, i] = fields[name]
    return out


# -- the dataset ------------------------------------------------------------------------------------------
def _drivers(cfg: SyntheticConfig, target: xr.Dataset) -> _Drivers:
    if cfg.seed < 0:
        raise ValueError(f"synthetic.seed must be a non-negative integer, got {cfg.seed}")
    variables = tuple(dict.fromkeys(cfg.variables))
    if not variables:
        raise ValueError("synthetic.variables is empty: name at least one of tas, uas, vas, pr")
    return _Drivers(
        grid=synthetic_grid(cfg),
        orog=target["orog"].values,
        sftlf=target["sftlf"].values,
        orog_std=target["orog_std"].values,
        seed=int(cfg.seed),
        variables=variables,
    )


def _store_key(cfg: SyntheticConfig, target: xr.Dataset) -> str:
    """Identity of the output: config, static fields used, generator version and physics constants."""
    return content_key(
        "synthetic-reanalysis", cfg, static_fingerprint(target), GENERATOR_VERSION, asdict(PHYSICS)
    )


def _build(cfg: SyntheticConfig, target: xr.Dataset) -> xr.Dataset:
    drivers = _drivers(cfg, target)
    grid = drivers.grid
    times, months = synthetic_time(cfg)
    key = _store_key(cfg, target)
    month_blocks = da.from_array(months, chunks=cfg.chunk_months, name=f"synthetic-months-{key}")
    stacked = da.map_blocks(
        _generate_block,
        month_blocks,
        drivers=drivers,
        new_axis=[0, 2, 3],
        chunks=((len(drivers.variables),), month_blocks.chunks[0], (grid.shape[0],), (grid.shape[1],)),
        dtype=np.float32,
        meta=np.empty((0, 0, 0, 0), np.float32),
        name=f"synthetic-reanalysis-{key}",
    )
    bounds = np.array([[_month_start(int(m)), _month_start(int(m) + 1)] for m in months])
    ds = xr.Dataset(coords={"time": ("time", times), "lat": ("lat", grid.lat), "lon": ("lon", grid.lon)})
    ds["time"].attrs.update(standard_name="time", axis="T", bounds="time_bnds")
    ds["lat"].attrs.update(standard_name="latitude", units="degrees_north", axis="Y")
    ds["lon"].attrs.update(standard_name="longitude", units="degrees_east", axis="X")
    ds["time_bnds"] = (("time", "bnds"), bounds)
    for j, name in enumerate(drivers.variables):
        attrs = dict(VARIABLE_ATTRS[name], cell_methods="time: mean", synthetic="true")
        ds[name] = xr.DataArray(stacked[j], dims=("time", "lat", "lon"), attrs=attrs)
    for name in ("orog", "sftlf"):
        ds[name] = target[name].assign_attrs(comment="static field that drove the synthetic reanalysis")
    ds.attrs = {
        "title": "ClimRecon synthetic reanalysis (SYNTHETIC, not observations)",
        "synthetic": "true",
        "source": (
            f"{GENERATOR_VERSION}: climrecon.catalogs.synthetic, a statistical-physical generator driven by "
            "real static fields"
        ),
        "references": (
            "Method summary: sea-level temperature climatology by latitude and continentality + seasonal "
            "lapse rate + linear trend + AR(1) large-scale and k^-3 fine-scale anomalies + winter inversions;"
            " westerlies + non-divergent streamfunction anomalies with terrain blocking/speed-up/roughness; "
            "precipitation = storm track/monsoon/convection background + Smith & Barstad (2004, J. Atmos. "
            "Sci. 61, 1377) linear orographic model, lognormal anomalies. Full description: the "
            "climrecon.catalogs.synthetic module docstring."
        ),
        "comment": "Generated data for offline training and tests. Do not use as observations.",
        "seed": int(cfg.seed),
        "synthetic_config": json.dumps(cfg.model_dump(mode="json"), sort_keys=True),
        "synthetic_physics": json.dumps(asdict(PHYSICS), sort_keys=True),
        "calendar": "standard",
        "history": f"generated by climrecon.catalogs.synthetic.synthetic_reanalysis ({GENERATOR_VERSION})",
        "Conventions": "CF-1.8",
    }
    return ds


def synthetic_reanalysis(cfg: SyntheticConfig, static: xr.Dataset) -> xr.Dataset:
    """The synthetic reanalysis for ``cfg`` driven by ``static`` (``orog`` [m], ``sftlf`` [%]); lazy.

    Returns ``cfg.variables`` as dask arrays (time, lat, lon) float32 chunked ``{time: cfg.chunk_months}``
    (lat/lon whole), nothing computed; ``time`` = cftime month starts in the "standard" calendar with
    ``time_bnds``; plus the target-grid ``orog``/``sftlf`` that drove it (in memory). Static fields are
    area-averaged by cos-latitude-weighted block means, so the static spacing must divide
    ``cfg.resolution`` with cells aligned to the target cells (:class:`SyntheticStaticError` otherwise).
    Same seed and static fields give identical bytes for any ``chunk_months``.
    """
    return _build(cfg, target_static(cfg, static))


def _encoding(ds: xr.Dataset, cfg: SyntheticConfig) -> dict[str, dict]:
    units = "days since 1850-01-01"
    enc: dict[str, dict] = {
        "time": {"units": units, "calendar": "standard", "dtype": "float64", "chunks": (cfg.chunk_months,)},
        "time_bnds": {
            "units": units,
            "calendar": "standard",
            "dtype": "float64",
            "chunks": (cfg.chunk_months, 2),
        },
    }
    for name in cfg.variables:
        enc[name] = {"dtype": "float32", "chunks": (cfg.chunk_months, ds.sizes["lat"], ds.sizes["lon"])}
    return enc


def write_synthetic_reanalysis(
    cfg: SyntheticConfig, static: xr.Dataset, url: str, storage_options: dict | None = None
) -> str:
    """Write the synthetic reanalysis to a Zarr store at ``url`` block by block; returns ``url``.

    Keyed by ``content_key("synthetic-reanalysis", cfg, static fingerprint, generator version, physics)``;
    a complete store with that key is left as it is, an interrupted one is filled where blocks are missing,
    a store with another key is never overwritten (:class:`climrecon.stores.StoreStateError`). One block of
    ``cfg.chunk_months`` months is generated and held in memory at a time.
    """
    target = target_static(cfg, static)
    store = StageStore(url, _store_key(cfg, target), dict(storage_options or {}))
    if store.is_complete():
        return url
    ds = _build(cfg, target)
    store.initialize(ds, encoding=_encoding(ds, cfg))
    regions = [{"time": s} for s in time_blocks(ds.sizes["time"], cfg.chunk_months)]
    timed = [name for name, v in ds.data_vars.items() if "time" in v.dims]
    for region in store.pending(regions):
        store.write_block(ds[timed].isel(region).compute(), region)
    store.finalize(regions, attrs={"static_fingerprint": static_fingerprint(target)})
    return url
