"""Static fields on the global 5' grid, built once from the real ETOPO5 and GLOBE data (a few seconds)."""

import numpy as np
import pytest
import xarray as xr

from climrecon.catalogs.static import (
    CHUNK,
    MissingSourceDataError,
    build_static_fields,
    etopo5_path,
    open_static_fields,
    static_fields_key,
)
from climrecon.storage import default_data_home
from climrecon.stores import StageStore, StoreStateError


@pytest.fixture(scope="module")
def static_url(tmp_path_factory):
    url = str(tmp_path_factory.mktemp("static") / "static.zarr")
    assert build_static_fields(default_data_home(), url) == url
    return url


@pytest.fixture(scope="module")
def static(static_url):
    return open_static_fields(static_url).load()


def test_grid_contract_is_exact(static):
    assert dict(static.sizes) == {"lat": 2160, "lon": 4320}
    lat, lon = static.lat.values, static.lon.values
    np.testing.assert_allclose(lat[[0, -1]], [-89.958333333, 89.958333333], atol=1e-8)
    np.testing.assert_allclose(lon[[0, -1]], [-179.958333333, 179.958333333], atol=1e-8)
    np.testing.assert_allclose(np.diff(lat), 1 / 12, rtol=0, atol=1e-10)
    np.testing.assert_allclose(np.diff(lon), 1 / 12, rtol=0, atol=1e-10)
    assert static.lat.attrs["units"] == "degrees_north" and static.lon.attrs["units"] == "degrees_east"
    for name, std, units in (("orog", "surface_altitude", "m"), ("sftlf", "land_area_fraction", "%")):
        assert static[name].dtype == np.float32
        assert static[name].attrs["standard_name"] == std and static[name].attrs["units"] == units
    assert {"climrecon_origin", "license", "method"} <= set(static.attrs)
    origin = static.attrs["climrecon_origin"]
    assert "etopo5.cdf" in origin and "global-land-mask" in origin


def test_store_is_chunked_and_complete(static_url):
    lazy = open_static_fields(static_url)
    assert lazy.orog.encoding["chunks"] == (CHUNK, CHUNK)
    assert StageStore(static_url, static_fields_key(default_data_home())).is_complete()


def _at(ds, lat, lon):
    return ds.sel(lat=lat, lon=lon, method="nearest")


def test_spot_values(static):
    denver = _at(static, 39.74, -104.99)
    assert 1500 < float(denver.orog) < 1800 and float(denver.sftlf) == 100
    everest = static.sel(lat=slice(27.5, 28.5), lon=slice(86.5, 87.5))
    assert float(everest.orog.max()) > 5000
    pacific = _at(static, 0.0, -150.0)
    assert float(pacific.orog) == 0 and float(pacific.sftlf) == 0
    assert float(_at(static, 38.5, -98.5).sftlf) == 100  # Kansas
    # land below sea level keeps its value: the Dead Sea shore
    assert float(static.sel(lat=slice(31, 32), lon=slice(35.3, 35.7)).orog.min()) < -300


def test_coastlines_are_fractional_and_land_fraction_is_earths(static):
    dover = static.sftlf.sel(lat=slice(50.8, 51.4), lon=slice(1.0, 1.8)).values
    assert ((dover > 0) & (dover < 100)).sum() >= 5
    sftlf = static.sftlf.values
    assert sftlf.min() == 0 and sftlf.max() == 100 and np.all(sftlf == np.round(sftlf))
    weights = np.cos(np.deg2rad(static.lat.values))
    land_share = np.average(sftlf.mean(axis=1), weights=weights) / 100
    assert 0.28 < land_share < 0.30  # 29 % of the Earth's surface is land
    assert 0.005 < ((sftlf > 0) & (sftlf < 100)).mean() < 0.05


def test_water_is_never_below_sea_level(static):
    orog, sftlf = static.orog.values, static.sftlf.values
    assert orog[sftlf < 50].min() == 0
    assert orog.min() >= -430  # nothing lower than the Dead Sea shore
    assert orog.max() < 8848


def test_orog_is_the_mean_of_the_four_etopo5_nodes_around_each_cell(static):
    with xr.open_dataset(etopo5_path(default_data_home())) as etopo:
        rose = etopo.ROSE.values
    # Denver's cell: centre (39.708333, -105.041667) lies between nodes lat 39.6667/39.75, lon 254.9167/255.0
    i = int(np.argmin(abs(static.lat.values - 39.74)))
    j = int(np.argmin(abs(static.lon.values + 104.99)))
    lat_c, lon_c = static.lat.values[i], static.lon.values[j]
    k = int(round((lat_c - 1 / 24 + 90) * 12))  # southern node row
    c = int(round((lon_c - 1 / 24) % 360 * 12))  # western node column (0..360 in the file)
    expected = rose[k : k + 2, c : c + 2].mean()
    assert float(static.orog[i, j]) == pytest.approx(expected, abs=1e-3)


def test_rebuild_is_a_no_op_and_other_stores_are_never_overwritten(static_url, tmp_path):
    marker = StageStore(static_url, "x")._state("complete.json")
    before = open(marker).read()
    assert build_static_fields(default_data_home(), static_url) == static_url
    assert open(marker).read() == before
    foreign = str(tmp_path / "foreign.zarr")
    StageStore(foreign, "other").initialize(xr.Dataset({"a": ("x", np.zeros(3))}).chunk())
    with pytest.raises(StoreStateError, match="refusing to overwrite"):
        build_static_fields(default_data_home(), foreign)


def test_missing_source_data_names_the_file_and_the_installer(tmp_path):
    with pytest.raises(MissingSourceDataError, match=r"etopo5\.cdf.*deploy/install\.sh"):
        build_static_fields(tmp_path, str(tmp_path / "s.zarr"))


def test_incomplete_or_absent_store_is_rejected(tmp_path):
    with pytest.raises(FileNotFoundError, match="build_static_fields"):
        open_static_fields(str(tmp_path / "absent.zarr"))
    partial = StageStore(str(tmp_path / "partial.zarr"), "k")
    zeros = (("lat", "lon"), np.zeros((2, 2), "f4"))
    ds = xr.Dataset({"orog": zeros, "sftlf": zeros})
    partial.initialize(ds.chunk())
    with pytest.raises(StoreStateError, match="incomplete"):
        open_static_fields(partial.url)
