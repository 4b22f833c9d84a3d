"""The user's own fine data: opening, renaming, snapping, masking, tiling, time splits and time features.

The main case is what users bring: one year of DAILY 0.25-deg data over a coastal box (36-44.25N,
10W-10.25E: Iberia, the Bay of Biscay, the western Mediterranean and north Africa; 33 x 81 cells, which does
not tile 8), with ERA5-style names (latitude/longitude, latitude descending), odd variable names (t2m_max in
K, precip in kg m-2 s-1), NaN over the ocean, coordinates jittered by 7e-15 deg, as netCDF without time_bnds.
The land fraction is the real ETOPO5/GLOBE one of the sample catalog's static store when it is built
(block means of its 5' cells), else a synthetic coastline.
"""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import cftime
import dask.array
import numpy as np
import pytest
import xarray as xr
from test_training_data import write_tiny_stores

from climrecon.config import (
    CatalogQuery,
    ClimReconConfig,
    ConfigError,
    FineDataConfig,
    FineVariable,
    TimeSelection,
    load_config,
)
from climrecon.methods.base import month_index
from climrecon.methods.features import time_of_year as monthly_time_of_year
from climrecon.tasks.fine_data import (
    DAILY_INDEX_BASE,
    FineDataError,
    fine_static,
    hour_of_day,
    infer_time_step,
    open_fine_data,
    snap_coordinates,
    time_index,
    time_of_year,
)
from climrecon.tasks.grids import Grid

NLAT, NLON, STEP = 33, 81, 0.25
SOUTH, WEST = 36.0, -10.0
JITTER = 7e-15
TRAIN = TimeSelection(dates=("2001-01-01", "2001-09-30"))
HELDOUT = TimeSelection(dates=("2001-10-01", "2001-12-31"))
VARIABLES = {"tasmax": {"source": "t2m_max"}, "pr": {"source": "precip", "transform": "log1p"}}


def regular_lat() -> np.ndarray:
    return SOUTH + (np.arange(NLAT) + 0.5) * STEP


def regular_lon() -> np.ndarray:
    return WEST + (np.arange(NLON) + 0.5) * STEP


def _sample_static_url() -> str | None:
    """The sample catalog's global 5' static store (real ETOPO5/GLOBE), if it has been built."""
    from climrecon.catalogs.esmcat import read_rows
    from climrecon.catalogs.sample import STATIC_SOURCE_ID

    try:
        rows = read_rows(ClimReconConfig().sample_catalog())
    except (OSError, ValueError):
        return None
    paths = sorted({r["path"] for r in rows if r["source_id"] == STATIC_SOURCE_ID})
    path = paths[0].removeprefix("file://") if paths else None
    return path if path and Path(path).exists() else None


@pytest.fixture(scope="module")
def static_5min(tmp_path_factory) -> tuple[str, str]:
    """(URL of a 5' static store around the box with a 1-deg margin, "real" | "synthetic")."""
    url = str(tmp_path_factory.mktemp("static") / "static-box.zarr")
    sample = _sample_static_url()
    if sample is not None:
        from climrecon.catalogs.static import open_static_fields

        box = open_static_fields(sample)[["orog", "sftlf"]]
        box = box.sel(
            lat=slice(SOUTH - 1, SOUTH + NLAT * STEP + 1), lon=slice(WEST - 1, WEST + NLON * STEP + 1)
        )
        box.load().to_zarr(url, mode="w")
        return url, "real"
    res = 1 / 12
    lat = np.arange(SOUTH - 1 + res / 2, SOUTH + NLAT * STEP + 1, res)
    lon = np.arange(WEST - 1 + res / 2, WEST + NLON * STEP + 1, res)
    la, lo = np.meshgrid(lat, lon, indexing="ij")
    land = (lo > -9.0 + 1.5 * np.sin(la)) & (la < 43.5 - 0.1 * lo) | (la < 37.0)
    orog = np.where(land, 300.0 + 1500.0 * np.exp(-(((la - 40.5) / 1.5) ** 2 + ((lo + 4) / 3) ** 2)), 0.0)
    xr.Dataset(
        {"orog": (("lat", "lon"), orog.astype("float32")), "sftlf": (("lat", "lon"), 100.0 * land)},
        coords={"lat": lat, "lon": lon},
    ).to_zarr(url, mode="w")
    return url, "synthetic"


@pytest.fixture(scope="module")
def land_fraction(static_5min) -> tuple[np.ndarray, np.ndarray]:
    """(sftlf [%], orog [m]) of the 0.25-deg cells: plain means of their 3 x 3 5' cells, shape (33, 81)."""
    box = xr.open_zarr(static_5min[0]).sel(
        lat=slice(SOUTH, SOUTH + NLAT * STEP), lon=slice(WEST, WEST + NLON * STEP)
    )
    assert box.sizes == {"lat": 3 * NLAT, "lon": 3 * NLON}
    means = box.coarsen(lat=3, lon=3).mean().load()
    return means["sftlf"].values, means["orog"].values


def daily_fields(land: np.ndarray, orog: np.ndarray, times: list, seed: int = 1) -> dict[str, np.ndarray]:
    """t2m_max [K] and precip [kg m-2 s-1, >= 0] on the regular grid (ascending lat), NaN over the ocean."""
    rng = np.random.default_rng(seed)
    doy = np.array([t.dayofyr for t in times], float)[:, None, None]
    t2m = (
        290.0
        + 9.0 * np.cos(2 * np.pi * (doy - 200) / 365)
        - 0.0065 * orog
        + rng.normal(0, 1.0, (len(times), NLAT, NLON))
    )
    wet = rng.random((len(times), NLAT, NLON)) < 0.35
    precip = np.where(wet, rng.gamma(0.6, 6e-5, wet.shape), 0.0)
    ocean = land < 50.0
    return {
        "t2m_max": np.where(ocean, np.nan, t2m).astype("float32"),
        "precip": np.where(ocean, np.nan, precip).astype("float32"),
    }


def user_dataset(fields: dict[str, np.ndarray], times: list, lat: np.ndarray, lon: np.ndarray) -> xr.Dataset:
    """ERA5-style: latitude/longitude names, latitude DESCENDING, units attributes, no bounds."""
    return xr.Dataset(
        {
            "t2m_max": (("time", "latitude", "longitude"), fields["t2m_max"][:, ::-1], {"units": "K"}),
            "precip": (("time", "latitude", "longitude"), fields["precip"][:, ::-1], {"units": "kg m-2 s-1"}),
        },
        coords={
            "time": ("time", times),
            "latitude": ("latitude", lat[::-1], {"units": "degrees_north"}),
            "longitude": ("longitude", lon, {"units": "degrees_east"}),
        },
        attrs={"title": "test daily maxima"},
    )


def days(year: int = 2001, n: int = 365) -> list:
    first = cftime.DatetimeGregorian(year, 1, 1)
    return [first + timedelta(days=k) for k in range(n)]


def write_netcdf(ds: xr.Dataset, path: Path) -> str:
    encoding = {"time": {"units": "days since 2001-01-01", "calendar": "standard"}}
    ds.to_netcdf(path, encoding=encoding)
    return str(path)


@pytest.fixture(scope="module")
def daily(tmp_path_factory, land_fraction) -> dict:
    """The user's daily netCDF: its path, the true (ascending) fields, the land fraction."""
    land, orog = land_fraction
    times = days()
    fields = daily_fields(land, orog, times)
    jitter = JITTER * np.where(np.arange(max(NLAT, NLON)) % 2, 1.0, -1.0)
    lat, lon = regular_lat() + jitter[:NLAT], regular_lon() - jitter[:NLON]
    assert not np.array_equal(lat, regular_lat()) and not np.array_equal(lon, regular_lon())
    path = write_netcdf(
        user_dataset(fields, times, lat, lon), tmp_path_factory.mktemp("daily") / "tmax_pr_2001.nc"
    )
    with xr.open_dataset(path) as check:
        assert "time_bnds" not in check.variables and "bnds" not in check.dims
    return {"path": path, "fields": fields, "land": land >= 50.0, "times": times}


def daily_config(path: str, **kwargs) -> FineDataConfig:
    return FineDataConfig(
        **{"path": path, "variables": VARIABLES, "train": TRAIN, "heldout": HELDOUT, **kwargs}
    )


@pytest.fixture(scope="module")
def fine(daily):
    return open_fine_data(daily_config(daily["path"]))


# -- the daily coastal case ----------------------------------------------------------------------------------
def test_daily_netcdf_is_renamed_float32_lazy_and_daily(fine, daily):
    assert fine.variables == ["tasmax", "pr"]
    for v in ("tasmax", "pr"):
        assert fine.ds[v].dtype == np.float32 and fine.ds[v].dims == ("time", "lat", "lon")
        assert isinstance(fine.ds[v].data, dask.array.Array), "variables stay lazy"
    assert fine.ds["tasmax"].attrs["units"] == "K" and fine.ds.attrs["title"] == "test daily maxima"
    assert (fine.time_step, fine.step_hours) == ("day", 24.0)
    assert fine.transforms == {"tasmax": "identity", "pr": "log1p"}
    times = fine.ds["time"].values
    assert len(times) == 365 and isinstance(times[0], cftime.datetime)
    assert (times[0].isoformat(), times[-1].isoformat()) == ("2001-01-01T00:00:00", "2001-12-31T00:00:00")
    # values are the user's, in ascending latitude (the file's were descending)
    np.testing.assert_array_equal(fine.ds["tasmax"].values, daily["fields"]["t2m_max"])
    np.testing.assert_array_equal(fine.ds["pr"].values, daily["fields"]["precip"])
    assert float(fine.ds["pr"].min()) >= 0.0
    assert fine.source["renamed"] == {"t2m_max": "tasmax", "precip": "pr"}
    assert fine.source["renamed_coordinates"] == {"latitude": "lat", "longitude": "lon"}
    assert fine.source["lat_reversed"] is True
    assert fine.source["variables"]["pr"] == {"source": "precip", "transform": "log1p", "units": "kg m-2 s-1"}
    assert (fine.source["how"], fine.source["where"]) == ("netCDF file", daily["path"])
    json.dumps(fine.source)  # JSON-able provenance


def test_the_mask_is_the_nan_pattern_of_the_ocean(fine, daily):
    land = daily["land"]
    assert 0 < (~land).sum() < land.size, "the box has both ocean and land cells"
    assert fine.mask.dtype == bool and fine.mask.dims == ("lat", "lon")
    np.testing.assert_array_equal(fine.mask.values, land)
    np.testing.assert_array_equal(fine.mask.values, np.isfinite(daily["fields"]["t2m_max"][0]))
    assert fine.source["masked_cells"] == int((~land).sum())
    assert fine.source["partially_missing_cells"] == 0
    assert fine.source["mask"].startswith("auto")
    assert np.isnan(fine.ds["pr"].values[:, ~land]).all() and np.isfinite(fine.ds["pr"].values[:, land]).all()


def test_coordinates_are_snapped_exactly_onto_the_regular_grid(fine):
    assert fine.grid == Grid(SOUTH, WEST, STEP, STEP, NLAT, NLON)
    np.testing.assert_array_equal(fine.ds["lat"].values, regular_lat())  # bitwise
    np.testing.assert_array_equal(fine.ds["lon"].values, regular_lon())
    np.testing.assert_array_equal(fine.mask["lat"].values, fine.grid.lat)
    snap = fine.source["snap"]
    assert 5e-15 < snap["max_offset_deg"] < 1e-14, snap
    assert snap["max_offset_cells"] == pytest.approx(snap["max_offset_deg"] / STEP)


def test_snap_coordinates_reports_the_worst_offset():
    lat = regular_lat().copy()
    lat[4] += 0.003 * STEP  # within the default 0.01 cells
    ds = xr.Dataset(coords={"lat": lat, "lon": regular_lon()})
    out, grid, offset = snap_coordinates(ds, 0.01)
    assert grid == Grid(SOUTH, WEST, STEP, STEP, NLAT, NLON)
    np.testing.assert_array_equal(out["lat"].values, grid.lat)
    assert offset == pytest.approx(0.003 * STEP, rel=1e-9)
    with pytest.raises(FineDataError, match=r"lat\[4\] = .* is 0\.00075 deg \(0\.003 cells\)"):
        snap_coordinates(ds, 0.001, name="my.nc")


def test_for_factor_crops_or_pads_at_the_north_east_end(fine, daily):
    assert fine.for_factor(3) is fine, "33 x 81 already tiles 3"
    crop = fine.for_factor(8)
    assert (crop.grid.nlat, crop.grid.nlon) == (32, 80) and crop.ds["tasmax"].shape == (365, 32, 80)
    assert (crop.grid.south, crop.grid.west, crop.grid.north, crop.grid.east) == (36.0, -10.0, 44.0, 10.0)
    np.testing.assert_array_equal(crop.ds["lat"].values, regular_lat()[:32])
    np.testing.assert_array_equal(crop.ds["tasmax"].values, daily["fields"]["t2m_max"][:, :32, :80])
    np.testing.assert_array_equal(crop.mask.values, daily["land"][:32, :80])
    assert crop.source["domain"] == {
        "rule": "crop",
        "factor": 8,
        "side": "north/east",
        "lat_rows": -1,
        "lon_cols": -1,
    }
    crop.grid.coarsened(8)  # tiles: no error

    pad = open_fine_data(daily_config(daily["path"], domain="pad")).for_factor(8)
    assert (pad.grid.nlat, pad.grid.nlon) == (40, 88) and pad.ds["pr"].shape == (365, 40, 88)
    assert (pad.grid.north, pad.grid.east) == (46.0, 12.0)
    np.testing.assert_array_equal(pad.ds["lat"].values, Grid(SOUTH, WEST, STEP, STEP, 40, 88).lat)
    assert not pad.mask.values[NLAT:, :].any() and not pad.mask.values[:, NLON:].any(), (
        "padded cells are masked"
    )
    np.testing.assert_array_equal(pad.mask.values[:NLAT, :NLON], daily["land"])
    assert (
        np.isnan(pad.ds["tasmax"].values[:, NLAT:, :]).all()
        and np.isnan(pad.ds["tasmax"].values[:, :, NLON:]).all()
    )
    np.testing.assert_array_equal(pad.ds["tasmax"].values[:, :NLAT, :NLON], daily["fields"]["t2m_max"])
    assert pad.source["masked_cells"] == 40 * 88 - int(daily["land"].sum())
    assert pad.source["domain"]["lat_rows"] == 7 and pad.source["domain"]["lon_cols"] == 7


def test_splits_by_dates_have_the_right_days(fine):
    parts = fine.splits(daily_config("unused.nc"))
    assert sorted(parts) == ["heldout", "train"]
    assert parts["train"].sizes["time"] == 273 and parts["heldout"].sizes["time"] == 92
    assert parts["train"]["time"].values[-1].isoformat() == "2001-09-30T00:00:00"
    assert parts["heldout"]["time"].values[0].isoformat() == "2001-10-01T00:00:00"
    with_validation = FineDataConfig(
        path="unused.nc",
        variables=VARIABLES,
        train=TimeSelection(dates=("2001-01", "2001-08")),
        validation=TimeSelection(dates=("2001-09-01", "2001-09-30T23")),
        heldout=HELDOUT,
    )
    parts = fine.splits(with_validation)
    assert [parts[k].sizes["time"] for k in ("train", "validation", "heldout")] == [243, 30, 92]


def test_overlapping_selections_are_refused_naming_the_shared_time(fine):
    with pytest.raises(ValueError, match=r"train \(dates 2001-01-01\.\.2001-10-01\) overlaps heldout"):
        daily_config("x.nc", train=TimeSelection(dates=("2001-01-01", "2001-10-01")))
    with pytest.raises(ValueError, match=r"validation \(years 2001-2001\) overlaps heldout"):
        daily_config("x.nc", validation=TimeSelection(years=(2001, 2001)))
    # a config that skipped validation still cannot train on held-out days once the data are open
    sneaky = daily_config("x.nc").model_copy(
        update={"heldout": TimeSelection(dates=("2001-09-29", "2001-12-31"))}
    )
    with pytest.raises(FineDataError, match=r"share 2 time step\(s\), the first 2001-09-29T00:00:00"):
        fine.splits(sneaky)


def test_every_and_offset_pick_the_right_days(fine):
    picked = fine.select(TimeSelection(dates=("2001-03", "2001-03"), every=5, offset=2))
    assert [t.day for t in picked["time"].values] == [3, 8, 13, 18, 23, 28]
    assert {t.month for t in picked["time"].values} == {3}
    every_week = fine.select(TimeSelection(every=7))
    assert every_week.sizes["time"] == 53 and every_week["time"].values[1].dayofyr == 8
    with pytest.raises(
        FineDataError, match=r"heldout \(years 2005-2006\) selects no time step .*365 day step"
    ):
        fine.select(TimeSelection(years=(2005, 2006)), "heldout")


# -- time features and seeds --------------------------------------------------------------------------------
def test_time_of_year_and_hour_of_day_for_daily_and_hourly_labels(fine):
    july_first = [cftime.DatetimeGregorian(2001, 7, 1)]
    value = time_of_year(july_first, "day")[0]
    assert value.dtype == np.float32 and value == np.float32((181 + 0.5 / 24) / 365)
    assert abs(value - 181 / 365) < 1 / (24 * 365)
    toy = time_of_year(fine.ds["time"], "day")
    assert toy.shape == (365,) and toy.min() >= 0 and toy.max() < 1 and np.all(np.diff(toy) > 0)
    # calendar-aware: the last hour of a leap year, a 360-day year, a noleap year
    assert time_of_year([cftime.DatetimeGregorian(2000, 12, 31, 23)], "hour")[0] == np.float32(
        (365 + 23.5 / 24) / 366
    )
    assert time_of_year([cftime.Datetime360Day(2001, 12, 30)], "day")[0] == np.float32((359 + 0.5 / 24) / 360)
    assert time_of_year([cftime.DatetimeNoLeap(2000, 3, 1)], "day")[0] == np.float32((59 + 0.5 / 24) / 365)
    assert time_of_year(july_first, "year")[0] == np.float32(0.5)
    hours = [cftime.DatetimeGregorian(2001, 7, 1, h) for h in (0, 3, 6, 21)]
    np.testing.assert_array_equal(hour_of_day(hours), np.float32([0, 3 / 24, 6 / 24, 21 / 24]))
    np.testing.assert_array_equal(hour_of_day(fine.ds["time"]), np.zeros(365, np.float32))


def test_time_index_is_distinct_for_every_day_and_hour(fine):
    index = time_index(fine.ds["time"], "day")
    assert len(set(index)) == 365 and index == sorted(index)
    assert index[0] == DAILY_INDEX_BASE + (2001 * 12) * 31 * 24
    assert min(index) > max(month_index(fine.ds["time"].values)), "never a month index of the same data"
    hourly = [cftime.DatetimeGregorian(2001, 1, 1) + timedelta(hours=h) for h in range(24 * 366)]
    assert len(set(time_index(hourly, "hour"))) == 24 * 366
    with pytest.raises(FineDataError, match="share one day index"):
        time_index(
            [cftime.DatetimeGregorian(2001, 1, 1, 6, 10), cftime.DatetimeGregorian(2001, 1, 1, 6, 40)], "day"
        )


@pytest.mark.parametrize("calendar", ["standard", "noleap", "360_day", "proleptic_gregorian"])
def test_monthly_labels_reproduce_the_existing_features_exactly(calendar):
    months = [
        cftime.datetime(1999 + k // 12, k % 12 + 1, 15 if k % 2 else 1, calendar=calendar) for k in range(30)
    ]
    np.testing.assert_array_equal(time_of_year(months, "month"), monthly_time_of_year(np.array(months)))
    assert time_of_year(months, "month").dtype == np.float32
    np.testing.assert_array_equal(
        time_of_year(months, "month")[:12], ((np.arange(12, dtype=np.float32) + 0.5) / 12)
    )
    assert (
        time_index(months, "month")
        == month_index(months)
        == [y * 12 + m - 1 for y, m in ((t.year, t.month) for t in months)]
    )


def test_time_step_inference():
    def series(step: timedelta, n: int = 10) -> list:
        return [cftime.DatetimeGregorian(2001, 1, 1) + step * k for k in range(n)]

    assert infer_time_step(series(timedelta(hours=3))) == ("hour", 3.0)
    assert infer_time_step(series(timedelta(hours=1))) == ("hour", 1.0)
    assert infer_time_step(series(timedelta(days=1))) == ("day", 24.0)
    months = [cftime.DatetimeGregorian(2001 + k // 12, k % 12 + 1, 16) for k in range(14)]
    assert infer_time_step(months) == ("month", None)
    assert infer_time_step([cftime.Datetime360Day(2000 + k, 7, 1) for k in range(4)]) == ("year", None)
    one = [cftime.DatetimeGregorian(2001, 7, 1)]
    assert infer_time_step(one) == ("month", None) and infer_time_step(one, "day") == ("day", 24.0)
    with pytest.raises(
        FineDataError, match=r"data\.time_step is 'month' but the times are 24 hours apart \(day\)"
    ):
        infer_time_step(series(timedelta(days=1)), "month")
    with pytest.raises(FineDataError, match="10 hours apart"):
        infer_time_step(series(timedelta(hours=10)))


# -- other sources and layouts -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_stores(tmp_path_factory) -> tuple[str, str]:
    return write_tiny_stores(tmp_path_factory.mktemp("tiny"))


def test_a_monthly_zarr_opens_with_lat_lon_unchanged(tiny_stores):
    truth_url, _ = tiny_stores
    cfg = FineDataConfig(
        path=truth_url,
        variables=["tas", "uas", "vas"],
        train=TimeSelection(years=(2000, 2001)),
        heldout=TimeSelection(years=(2002, 2002)),
    )
    fine = open_fine_data(cfg)
    store = xr.open_zarr(truth_url, decode_times=xr.coders.CFDatetimeCoder(use_cftime=True))
    np.testing.assert_array_equal(fine.ds["lat"].values, store["lat"].values)  # bitwise: nothing to snap
    np.testing.assert_array_equal(fine.ds["lon"].values, store["lon"].values)
    assert fine.source["snap"]["max_offset_deg"] == 0.0
    assert fine.grid == Grid.from_dataset(store) and (fine.grid.nlat, fine.grid.nlon) == (40, 40)
    assert (fine.time_step, fine.step_hours) == ("month", None)
    assert fine.mask.values.all() and fine.source["masked_cells"] == 0
    assert fine.source["mask"] == "all cells valid (no missing value)"
    assert fine.transforms == {"tas": "identity", "uas": "identity", "vas": "identity"}
    np.testing.assert_array_equal(fine.ds["uas"].values, store["uas"].values)
    times = fine.ds["time"].values
    np.testing.assert_array_equal(time_of_year(times, "month"), monthly_time_of_year(times))
    assert time_index(times, "month") == month_index(times)
    parts = fine.splits(cfg)
    assert (parts["train"].sizes["time"], parts["heldout"].sizes["time"]) == (24, 12)
    assert fine.for_factor(4) is fine and fine.for_factor(8) is fine


def test_a_glob_of_netcdf_files_with_and_without_time_bnds(tmp_path, daily, fine):
    ds = xr.open_dataset(daily["path"], decode_times=xr.coders.CFDatetimeCoder(use_cftime=True)).load()
    first, second = ds.isel(time=slice(0, 181)), ds.isel(time=slice(181, None))
    bounds = np.stack([first["time"].values, first["time"].values + timedelta(days=1)], axis=1)
    first = first.assign(time_bnds=(("time", "bnds"), bounds))
    first["time"].attrs["bounds"] = "time_bnds"
    first.to_netcdf(
        tmp_path / "part-2001a.nc",
        encoding={
            "time": {"units": "days since 2001-01-01"},
            "time_bnds": {"units": "days since 2001-01-01"},
        },
    )
    second.to_netcdf(tmp_path / "part-2001b.nc", encoding={"time": {"units": "hours since 2001-07-01"}})
    both = open_fine_data(daily_config(str(tmp_path / "part-*.nc")))
    assert both.source["how"] == "2 netCDF files" and both.ds.sizes["time"] == 365
    assert "time_bnds" not in both.ds.variables
    np.testing.assert_array_equal(both.ds["tasmax"].values, fine.ds["tasmax"].values)
    np.testing.assert_array_equal(both.ds["lat"].values, regular_lat())
    np.testing.assert_array_equal(both.mask.values, fine.mask.values)
    assert both.source["snap"]["max_offset_deg"] == pytest.approx(fine.source["snap"]["max_offset_deg"])
    with pytest.raises(FineDataError, match=r"no file matches the pattern .*nothing-\*\.nc"):
        open_fine_data(daily_config(str(tmp_path / "nothing-*.nc")))


def small(tmp_path: Path, name: str = "small.nc", n: int = 6, **change) -> str:
    """A 6-day, 8 x 12 netCDF on the box's south-west corner (t2m_max, precip; NaN in one corner)."""
    land = np.full((NLAT, NLON), 100.0)
    land[:2, :3] = 0.0
    times = days(n=n)
    fields = {k: v[:, :8, :12] for k, v in daily_fields(land, np.zeros((NLAT, NLON)), times).items()}
    ds = user_dataset(fields, times, regular_lat()[:8], regular_lon()[:12])
    for key, value in change.items():
        ds = value(ds) if callable(value) else ds.assign({key: value})
    return write_netcdf(ds, tmp_path / name)


def test_a_missing_source_variable_names_the_file_and_its_variables(tmp_path):
    path = small(tmp_path)
    cfg = FineDataConfig(
        path=path, variables={"tasmax": "t2m_maximum", "pr": "precip"}, train=TRAIN, heldout=HELDOUT
    )
    with pytest.raises(
        FineDataError,
        match=rf"fine data {path} lacks variable\(s\) 't2m_maximum'; it has \['precip', 't2m_max'\]",
    ):
        open_fine_data(cfg)
    with pytest.raises(FineDataError, match=r"lacks variable\(s\) 'lsm' \(data\.mask\)"):
        open_fine_data(daily_config(path, mask="lsm"))
    with pytest.raises(FineDataError, match="no netCDF file at"):
        open_fine_data(daily_config(str(tmp_path / "absent.nc")))
    with pytest.raises(FineDataError, match="cannot open Zarr store"):
        open_fine_data(daily_config(str(tmp_path / "absent.zarr")))


@pytest.mark.parametrize("coord", ["latitude", "longitude"])
def test_a_fifth_of_a_cell_offset_is_refused_naming_the_coordinate(tmp_path, coord):
    def shift(ds: xr.Dataset) -> xr.Dataset:
        values = ds[coord].values.copy()
        values[3] += 0.2 * STEP
        return ds.assign_coords({coord: values})

    path = small(tmp_path, shift=shift)
    name = coord[:3]
    with pytest.raises(
        FineDataError,
        match=rf"{path}: {name} is not a regular grid: {name}\[\d\] = .* is 0\.05 deg \(0\.2 cells\)",
    ):
        open_fine_data(daily_config(path))
    assert open_fine_data(daily_config(path, snap=0.25)).source["snap"]["max_offset_cells"] == pytest.approx(
        0.2
    )


def test_units_are_checked_when_configured(tmp_path):
    path = small(tmp_path)
    wrong = {"tasmax": FineVariable(source="t2m_max", units="degC"), "pr": FineVariable(source="precip")}
    cfg = FineDataConfig(path=path, variables=wrong, train=TRAIN, heldout=HELDOUT)
    with pytest.raises(
        FineDataError,
        match=r"variable 'tasmax' \(source 't2m_max'\) has units 'K' but data\.variables\.tasmax\.units expects 'degC'",
    ):
        open_fine_data(cfg)
    right = {"tasmax": {"source": "t2m_max", "units": "degK"}, "pr": {"source": "precip", "units": "kg/m2/s"}}
    fine = open_fine_data(FineDataConfig(path=path, variables=right, train=TRAIN, heldout=HELDOUT))
    assert fine.source["variables"]["tasmax"]["units"] == "K"


def test_a_mask_variable_and_partially_missing_cells(tmp_path):
    lsm = (("latitude", "longitude"), np.ones((8, 12)))
    path = small(
        tmp_path, lsm=lsm, shift=lambda ds: ds.assign(lsm=ds["lsm"].where(np.isfinite(ds["t2m_max"][0]), 0.0))
    )
    fine = open_fine_data(daily_config(path, mask="lsm"))
    assert fine.source["mask"] == "variable 'lsm' (nonzero = valid)" and fine.source["masked_cells"] == 6
    assert not fine.mask.values[:2, :3].any() and fine.mask.values.sum() == 8 * 12 - 6
    assert "lsm" not in fine.ds
    # a mask that calls a missing cell valid is refused
    with pytest.raises(FineDataError, match=r"6 cell\(s\) inside mask 'lsm' have missing values of 'tasmax'"):
        open_fine_data(daily_config(small(tmp_path, "ones.nc", lsm=lsm), mask="lsm"))
    # one missing day at one cell: "auto" masks the cell at every time
    gap = small(
        tmp_path,
        "gap.nc",
        shift=lambda ds: ds.assign(
            precip=ds["precip"].where(
                ~(
                    (ds["time"] == ds["time"][2])
                    & (ds["latitude"] == ds["latitude"][0])
                    & (ds["longitude"] == ds["longitude"][11])
                )
            )
        ),
    )
    fine = open_fine_data(daily_config(gap))
    assert fine.source["masked_cells"] == 7 and fine.source["partially_missing_cells"] == 1
    row = 7  # latitude[0] of the (descending) file is the northernmost row
    assert not fine.mask.values[row, 11] and np.isnan(fine.ds["tasmax"].values[:, row, 11]).all()


def test_longitudes_across_greenwich_in_0_360_and_valid_time(tmp_path):
    def era5(ds: xr.Dataset) -> xr.Dataset:
        ds = ds.assign_coords(longitude=ds["longitude"] % 360).sortby("longitude")  # 0.125 .. 359.875
        return ds.rename({"time": "valid_time"}).expand_dims(number=1).transpose("valid_time", "number", ...)

    land = np.full((NLAT, NLON), 100.0)
    times = days(n=3)
    fields = daily_fields(land, np.zeros((NLAT, NLON)), times)
    ds = era5(user_dataset(fields, times, regular_lat(), regular_lon()))
    assert ds["longitude"].values[0] == 0.125 and ds["longitude"].values[-1] == 359.875
    ds.to_netcdf(tmp_path / "era5.nc", encoding={"valid_time": {"units": "hours since 2001-01-01"}})
    fine = open_fine_data(daily_config(str(tmp_path / "era5.nc")))
    assert (
        fine.grid == Grid(SOUTH, WEST, STEP, STEP, NLAT, NLON) and fine.source["lon_reordered"] == "-180..180"
    )
    assert fine.source["dropped_dimensions"] == ["number"]
    np.testing.assert_array_equal(fine.ds["tasmax"].values, fields["t2m_max"])


def test_a_catalog_query_gives_the_same_data(make_catalog, catalog_row, daily, fine):
    rows = [
        catalog_row(
            daily["path"], v, source_id="MY-ANALYSIS", frequency="day", time_range="20010101-20011231"
        )
        for v in ("t2m_max", "precip")
    ]
    catalog = make_catalog(rows)
    cfg = FineDataConfig(
        query=CatalogQuery(source_id="MY-ANALYSIS", time=("2001-03", "2001-12")),
        catalog=catalog,
        variables=VARIABLES,
        train=TimeSelection(dates=("2001-03-01", "2001-09-30")),
        heldout=HELDOUT,
    )
    found = open_fine_data(cfg)
    assert (
        found.ds.sizes["time"] == 365 - 59 and found.ds["time"].values[0].isoformat() == "2001-03-01T00:00:00"
    )
    np.testing.assert_array_equal(found.ds["pr"].values, fine.ds["pr"].values[59:])
    assert found.grid == fine.grid and found.source["how"].startswith(
        "catalog query {'source_id': 'MY-ANALYSIS'}"
    )
    with pytest.raises(FineDataError, match="no catalog rows match"):
        open_fine_data(cfg.model_copy(update={"query": CatalogQuery(source_id="NONE")}))


# -- static fields -------------------------------------------------------------------------------------------
def test_fine_static_from_a_global_store_and_from_one_on_the_fine_grid(
    tmp_path, fine, static_5min, land_fraction
):
    url, kind = static_5min
    static = fine_static(fine, url)
    assert set(static.data_vars) == {"orog", "orog_std", "sftlf"} and static["sftlf"].dtype == np.float32
    np.testing.assert_array_equal(static["lat"].values, fine.grid.lat)
    # conservative means of the 3 x 3 5' cells of each 0.25-deg cell: the plain means up to the cos(lat) weights
    np.testing.assert_allclose(static["sftlf"].values, land_fraction[0], atol=0.1)
    np.testing.assert_allclose(static["orog"].values, land_fraction[1], rtol=1e-3, atol=0.5)
    assert float(static["orog_std"].max()) > (10.0 if kind == "real" else 1.0)
    # a store on the fine grid (here that result, coordinates jittered) serves a padded grid: padding is 0
    jitter = static.assign_coords(lat=static["lat"] + JITTER)
    jitter.to_zarr(tmp_path / "static-fine.zarr", mode="w")
    padded = open_fine_data(daily_config(fine.source["where"], domain="pad")).for_factor(8)
    on_cells = fine_static(padded, str(tmp_path / "static-fine.zarr"))
    assert on_cells.sizes == {"lat": 40, "lon": 88}
    np.testing.assert_array_equal(on_cells["sftlf"].values[:NLAT, :NLON], static["sftlf"].values)
    assert (on_cells["orog"].values[NLAT:] == 0).all() and (on_cells["sftlf"].values[:, NLON:] == 0).all()
    with pytest.raises(FineDataError, match="cannot be put on the fine grid"):
        fine_static(padded, url)  # the 5' box store does not reach 46N
    static[["orog", "sftlf"]].to_zarr(tmp_path / "no-std.zarr", mode="w")
    with pytest.raises(FineDataError, match="lacks orog_std"):
        fine_static(fine, str(tmp_path / "no-std.zarr"))


# -- configuration ---------------------------------------------------------------------------------------------
def test_config_refusals():
    with pytest.raises(ValueError, match="exactly one of path .* or query"):
        FineDataConfig(
            path="a.nc", query=CatalogQuery(source_id="X"), variables=["tas"], train=TRAIN, heldout=HELDOUT
        )
    with pytest.raises(ValueError, match="exactly one of path"):
        FineDataConfig(variables=["tas"], train=TRAIN, heldout=HELDOUT)
    with pytest.raises(ValueError, match=r"years \(2002, 2001\) end before they start"):
        TimeSelection(years=(2002, 2001))
    with pytest.raises(ValueError, match=r"dates \('2001-10', '2001-09-30'\) end before they start"):
        TimeSelection(dates=("2001-10", "2001-09-30"))
    with pytest.raises(ValueError, match="not both"):
        TimeSelection(years=(2001, 2001), dates=("2001-01", "2001-02"))
    with pytest.raises(ValueError, match="'2001-13-01' is not one of"):
        TimeSelection(dates=("2001-13-01", "2002"))
    with pytest.raises(ValueError, match=r"train \(all times\) overlaps heldout"):
        FineDataConfig(path="a.nc", variables=["tas"], train=TimeSelection(), heldout=HELDOUT)
    with pytest.raises(ValueError, match=r"source\(s\) \['t'\] used by more than one product"):
        FineDataConfig(path="a.nc", variables={"tas": "t", "tasmax": "t"}, train=TRAIN, heldout=HELDOUT)
    with pytest.raises(ValueError, match="at least 1 item"):
        FineDataConfig(path="a.nc", variables=[], train=TRAIN, heldout=HELDOUT)
    assert TimeSelection(dates=("2001-09-15", "2001-09")).window() == ((2001, 9, 15), (2001, 9))
    assert not TimeSelection(years=(2000, 2000)).overlaps(TimeSelection(dates=("2001-01-01T00", "2001-02")))


def test_the_data_section_round_trips_through_yaml_and_overrides(tmp_path):
    f = tmp_path / "data.yaml"
    f.write_text(
        "data:\n"
        "  path: /data/era5/tmax_*.nc\n"
        "  variables:\n"
        "    tasmax: {source: t2m_max, units: K}\n"
        "    pr: {source: precip, transform: log1p}\n"
        "  mask: auto\n"
        "  train: {dates: [2001-01-01, 2001-09-30]}\n"
        "  validation: {years: [2000, 2000], every: 2}\n"
        "  heldout: {dates: ['2001-10', 2001-12-31]}\n"
    )
    cfg = load_config(f, ["data.domain=pad", "data.snap=0.02", "data.train.offset=3"])
    data = cfg.data
    assert data is not None and (data.domain, data.snap, data.mask) == ("pad", 0.02, "auto")
    assert data.train == TimeSelection(dates=("2001-01-01", "2001-09-30"), offset=3)
    assert data.heldout.dates == ("2001-10", "2001-12-31") and data.validation.every == 2
    assert data.variables["tasmax"] == FineVariable(source="t2m_max", units="K")
    assert data.sources() == {"tasmax": "t2m_max", "pr": "precip"}
    again = ClimReconConfig.model_validate(json.loads(json.dumps(cfg.model_dump(mode="json"))))
    assert again == cfg and again.data == data
    assert load_config().data is None
    listed = ClimReconConfig.model_validate(
        {
            "data": {
                "path": "s3://b/era5.zarr",
                "variables": ["tas", "pr"],
                "train": {"years": [1981, 2010]},
                "heldout": {"years": [2011, 2020]},
            }
        }
    )
    assert listed.data.variables == {"tas": FineVariable(), "pr": FineVariable()}
    with pytest.raises(
        ConfigError, match=r"data\.heldout: .*must never be trained on|data: .*overlaps heldout"
    ):
        load_config(f, ["data.heldout.dates=[2001-09-30, 2001-12-31]"])


def test_a_single_field_with_a_scalar_time_is_monthly_unless_told(tmp_path):
    path = small(tmp_path, n=1, one=lambda ds: ds.isel(time=0))
    with xr.open_dataset(path) as raw:
        assert raw["time"].ndim == 0
    fine = open_fine_data(daily_config(path))
    assert (fine.time_step, fine.ds.sizes["time"], fine.source["time_dimension_added"]) == ("month", 1, True)
    assert open_fine_data(daily_config(path, time_step="day")).step_hours == 24.0
    with pytest.raises(FineDataError, match=r"data\.time_step is 'month' but the times are 24 hours apart"):
        open_fine_data(daily_config(small(tmp_path, "six.nc"), time_step="month"))
