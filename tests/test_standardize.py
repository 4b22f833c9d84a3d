"""standardize(): real files of every kind on disk end up in the same conventions; bad inputs say why."""

import cftime
import numpy as np
import pytest
import xarray as xr

from climrecon.tasks.standardize import (
    CalendarError,
    CoordinateError,
    EmptyVariableError,
    GridError,
    IngestError,
    MissingVariableError,
    UnitsError,
    standardize,
)

CFTIME = xr.coders.CFDatetimeCoder(use_cftime=True)


def _open(path, **kw):
    return xr.open_dataset(path, decode_times=False, **kw)


def _field(
    name="tas",
    units="K",
    lat=(-10.0, 0.0, 10.0),
    lon=(0.0, 120.0, 240.0),
    n_time=3,
    calendar="noleap",
    values=None,
    attrs=None,
    time_units="days since 2000-01-01",
):
    shape = (n_time, len(lat), len(lon))
    data = np.arange(np.prod(shape), dtype="float32").reshape(shape) if values is None else values
    ds = xr.Dataset(
        {name: (("time", "lat", "lon"), data, {"units": units, **(attrs or {})})},
        coords={
            "time": ("time", 15.0 + 30.0 * np.arange(n_time), {"units": time_units, "calendar": calendar}),
            "lat": ("lat", np.array(lat), {"units": "degrees_north"}),
            "lon": ("lon", np.array(lon), {"units": "degrees_east"}),
        },
    )
    return ds


def test_mpi_esm_lr_monthly_is_rolled_to_minus180_and_keeps_values(raw_files):
    src = xr.open_dataset(raw_files["tas"], decode_times=CFTIME)
    out = standardize(_open(raw_files["tas"]), source=str(raw_files["tas"]))
    assert dict(out.tas.sizes) == {"time": 12, "lat": 96, "lon": 192} and out.tas.dtype == np.float32
    assert out.lon.values[0] == -180.0 and np.all(np.diff(out.lon) > 0) and out.lon.values[-1] < 180
    assert np.all(np.diff(out.lat) > 0)
    # the same cells hold the same values (K stays K): 358.125E is -1.875, 0E stays 0
    np.testing.assert_array_equal(out.tas.sel(lon=-1.875).values, src.tas.sel(lon=358.125).values)
    np.testing.assert_array_equal(out.tas.sel(lon=0.0).values, src.tas.sel(lon=0.0).values)
    # bounds moved with their cells
    np.testing.assert_allclose(
        out.lon_bnds.sel(lon=-1.875).values, src.lon_bnds.sel(lon=358.125).values - 360
    )
    assert np.all(out.lat_bnds[:, 0] < out.lat_bnds[:, 1])
    # monthly labels at the start of the month, proleptic_gregorian kept
    t = out.time.values
    assert (
        t[0] == cftime.datetime(2005, 1, 1, calendar="proleptic_gregorian")
        and t[0].calendar == "proleptic_gregorian"
    )
    assert [d.month for d in t] == list(range(1, 13)) and all(d.day == 1 and d.hour == 0 for d in t)
    assert out.time_bnds.values[-1, 1] == cftime.datetime(2006, 1, 1, calendar="proleptic_gregorian")
    np.testing.assert_array_equal(out.time_bnds.values[1:, 0], out.time_bnds.values[:-1, 1])
    assert out.tas.attrs["standard_name"] == "air_temperature" and out.tas.attrs["units"] == "K"
    assert out.lat.attrs["units"] == "degrees_north" and out.time.attrs["bounds"] == "time_bnds"


def test_a1b_annual_360day_regional_keeps_calendar_and_both_conventions(raw_files):
    src = xr.open_dataset(raw_files["a1b"], decode_times=CFTIME)
    out = standardize(_open(raw_files["a1b"]), source="a1b")
    assert list(out.data_vars) == ["tas", "time_bnds"]  # air_temperature matched by standard_name
    assert out.tas.attrs["climrecon_renamed_from"] == "air_temperature"
    t0 = out.time.values[0]
    assert t0.calendar == "360_day" and (t0.year, t0.month, t0.day) == (1860, 1, 1)
    assert out.time_bnds.values[0, 1] == cftime.datetime(1861, 1, 1, calendar="360_day")
    assert out.lon.values[0] == -135.0 and out.lon.values[-1] == -45.0  # regional: relabelled, not rolled
    np.testing.assert_array_equal(out.tas.values, src.air_temperature.values)
    east = standardize(_open(raw_files["a1b"]), source="a1b", lon_convention="0..360")
    assert east.lon.values[0] == 225.0 and east.lon.values[-1] == 315.0
    assert float(out.height) == 1.5  # the scalar height coordinate survives


def test_navy_winds_legacy_names_units_and_lon_beyond_360(raw_files):
    src = xr.open_dataset(raw_files["navy"], decode_times=CFTIME)
    out = standardize(_open(raw_files["navy"]), source="navy")
    assert sorted(out.data_vars) == ["time_bnds", "uas", "vas"]  # UWND/VWND by long_name, "M/S" -> m s-1
    assert out.uas.attrs["units"] == "m s-1" and out.uas.attrs["climrecon_renamed_from"] == "UWND"
    assert out.lon.values[0] == -180.0 and out.lon.values[-1] == 177.5 and out.sizes["lon"] == 144
    # 360E..377.5E of the source are 0..17.5E; 200E is -160
    np.testing.assert_array_equal(out.uas.sel(lon=0.0).values, src.UWND.sel(FNOCX=360.0).values)
    np.testing.assert_array_equal(out.vas.sel(lon=-160.0).values, src.VWND.sel(FNOCX=200.0).values)
    assert out.time.values[0] == cftime.datetime(1982, 1, 1, calendar="standard")
    assert out.time.values[2] == cftime.datetime(1982, 3, 1, calendar="standard")  # labelled 1982-03-18 17:00
    assert np.isnan(out.uas.values).sum() == np.isnan(src.UWND.values).sum()  # -99.9 fill became NaN


@pytest.mark.parametrize(
    ("name", "units", "scale", "offset"),
    [
        ("tas", "degC", 1.0, 273.15),
        ("tas", "C", 1.0, 273.15),
        ("uas", "knots", 1852 / 3600, 0.0),
        ("vas", "M/S", 1.0, 0.0),
        ("psl", "hPa", 100.0, 0.0),
        ("psl", "mb", 100.0, 0.0),
        ("pr", "mm/day", 1 / 86400, 0.0),
        ("pr", "kg m-2 s-1", 1.0, 0.0),
    ],
)
def test_units_are_converted_exactly(name, units, scale, offset):
    ds = _field(name, units)
    out = standardize(ds, source="mem", lon_convention="0..360")
    expected = (ds[name].values.astype("float64") * scale + offset).astype("float32")
    np.testing.assert_allclose(out[name].values, expected, rtol=1e-7, atol=0)
    assert out[name].dtype == np.float32
    if units == "mm/day":
        assert "1000 kg m-3" in out.pr.attrs["comment"]


def test_descending_latitude_is_flipped_with_bounds():
    ds = _field(lat=(10.0, 0.0, -10.0))
    ds = ds.assign_coords(lat_bnds=(("lat", "nb2"), np.array([[15.0, 5.0], [5.0, -5.0], [-5.0, -15.0]])))
    ds.lat.attrs["bounds"] = "lat_bnds"
    out = standardize(ds, source="mem", lon_convention="0..360")
    np.testing.assert_array_equal(out.lat.values, [-10.0, 0.0, 10.0])
    np.testing.assert_array_equal(out.tas.values, ds.tas.values[:, ::-1, :])
    np.testing.assert_array_equal(out.lat_bnds.values, [[-15.0, -5.0], [-5.0, 5.0], [5.0, 15.0]])


def test_cyclic_duplicate_column_is_dropped_and_daily_labels_kept():
    ds = _field(lon=(0.0, 120.0, 240.0, 360.0))
    out = standardize(ds, source="mem", lon_convention="0..360")
    np.testing.assert_array_equal(out.lon.values, [0.0, 120.0, 240.0])


def test_datetime64_times_become_cftime():
    ds = xr.decode_cf(_field(calendar="standard"))
    out = standardize(ds, source="mem")
    assert isinstance(out.time.values[0], cftime.datetime) and out.time.values[0].day == 1


@pytest.mark.parametrize(
    ("mutate", "error", "message"),
    [
        (
            lambda ds: ds.assign(tas=ds.tas.assign_attrs(units="m s-1")),
            UnitsError,
            "'m s-1', which cannot be converted to 'K'",
        ),
        (lambda ds: ds.assign(tas=ds.tas.assign_attrs(units="")), UnitsError, "no units attribute"),
        (
            lambda ds: ds.assign(tas=ds.tas.assign_attrs(units="furlongs per banana")),
            UnitsError,
            "cannot parse",
        ),
        (
            lambda ds: ds.assign_coords(lat=("lat", [0.0, 10.0, 5.0], {"units": "degrees_north"})),
            CoordinateError,
            "'lat' has values that are not monotonic",
        ),
        (
            lambda ds: ds.assign_coords(lon=("lon", [0.0, 120.0, 120.0], {"units": "degrees_east"})),
            CoordinateError,
            "'lon' has duplicate values [120.0]",
        ),
        (
            lambda ds: ds.assign_coords(time=("time", [15.0, 15.0, 45.0], ds.time.attrs)),
            CoordinateError,
            "'time' has duplicate values",
        ),
        (
            lambda ds: ds.assign_coords(time=("time", [15.0, 16.0, 45.0], ds.time.attrs)).assign_attrs(
                frequency="mon"
            ),
            CoordinateError,
            "same month more than once",
        ),
        (
            lambda ds: ds.assign_coords(
                time=("time", ds.time.values, {**ds.time.attrs, "calendar": "mars_sol"})
            ),
            CalendarError,
            "calendar 'mars_sol' is not supported; supported: standard",
        ),
        (lambda ds: ds.assign(tas=ds.tas * np.nan), EmptyVariableError, "['tas'] hold no valid value"),
        (lambda ds: ds.rename(tas="foo"), MissingVariableError, "no recognised variable"),
        (
            lambda ds: ds.assign_coords(lon=("lon", [170.0, 180.0, 190.0], {"units": "degrees_east"})),
            CoordinateError,
            "crosses the seam of the -180..180",
        ),
    ],
)
def test_bad_inputs_raise_clear_errors(mutate, error, message):
    ds = mutate(_field())
    with pytest.raises(error, match=None) as info:
        standardize(ds, source="bad.nc")
    assert isinstance(info.value, IngestError)
    assert "bad.nc" in str(info.value) and message in str(info.value), str(info.value)


def test_missing_requested_variable_lists_what_is_there():
    with pytest.raises(
        MissingVariableError, match=r"\['pr'\] not found; the source holds data variables \['tas'\]"
    ):
        standardize(_field(), source="bad.nc", variables=["tas", "pr"])


def test_single_unknown_field_named_by_caller():
    out = standardize(_field("XYZ"), source="mem", variables=["tas"])
    assert "tas" in out and out.tas.attrs["climrecon_renamed_from"] == "XYZ"


def test_rotated_pole_and_curvilinear_grids_are_not_supported_yet(raw_files):
    with pytest.raises(GridError, match="tas_rotated_grid_EUR11.nc.*not supported yet"):
        standardize(_open(raw_files["eur11"]), source=str(raw_files["eur11"]))
    ds = _field()
    lat2d = xr.DataArray(
        np.tile(ds.lat.values[:, None], (1, 3)), dims=("y", "x"), attrs={"units": "degrees_north"}
    )
    curvi = xr.Dataset(
        {"tas": (("time", "y", "x"), ds.tas.values, {"units": "K"})},
        coords={
            "time": ds.time,
            "nav_lat": lat2d,
            "nav_lon": lat2d.copy().assign_attrs(units="degrees_east"),
        },
    )
    with pytest.raises(GridError, match="curvi.nc.*curvilinear grids are not supported yet"):
        standardize(curvi, source="curvi.nc")
