"""Contracts of climrecon.tasks.regrid: exact block means, bilinear exactness and seams, conservation,
static fields and the errors for unsupported or broken inputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from climrecon.config import Region
from climrecon.storage import default_data_home
from climrecon.tasks.grids import Grid
from climrecon.tasks.regrid import (
    RegridError,
    area_weights,
    bilinear,
    bilinear_weights,
    check_regular_latlon,
    check_target_in_domain,
    check_time_slices,
    coarsen_blocks,
    conservative,
    static_on_grid,
)

WEST_US = Region(lat_min=30.0, lat_max=50.0, lon_min=-125.0, lon_max=-100.0)


def field_on(grid: Grid, values: np.ndarray, name: str = "tas", times: int | None = None) -> xr.Dataset:
    """A dataset in the project conventions: ``values`` (lat, lon) or (time, lat, lon) on ``grid``."""
    dims = ("lat", "lon") if values.ndim == 2 else ("time", "lat", "lon")
    coords = {"lat": grid.lat, "lon": grid.lon}
    if values.ndim == 3:
        coords["time"] = np.arange(values.shape[0])
    return xr.Dataset({name: (dims, values, {"units": "K"})}, coords=coords)


def smooth_global(grid: Grid, seed: int = 0, n_time: int = 2) -> np.ndarray:
    """A random smooth field (a few low-order spherical waves), (time, lat, lon), float64."""
    rng = np.random.default_rng(seed)
    lat, lon = np.meshgrid(np.radians(grid.lat), np.radians(grid.lon), indexing="ij")
    out = np.zeros((n_time, *lat.shape))
    for t in range(n_time):
        out[t] = 280 + 30 * np.cos(lat)
        for m in range(1, 5):
            a, b, p = rng.normal(size=3)
            out[t] += 3 * a * np.cos(lat) ** m * np.cos(m * lon + p) + b * np.sin(m * lat)
    return out


def area_mean(ds: xr.Dataset, var: str = "tas") -> np.ndarray:
    """Area-weighted mean over (lat, lon) with exact spherical cell areas, NaN cells skipped."""
    w = area_weights(ds["lat"], ds["lon"])
    da = ds[var]
    return ((da * w).sum(["lat", "lon"]) / (w * da.notnull()).sum(["lat", "lon"])).values


# -- coarsen_blocks ---------------------------------------------------------------------------------------
def test_coarsen_blocks_equals_hand_computed_area_weighted_mean() -> None:
    fine = Grid.from_region(WEST_US, 0.25)
    x = np.random.default_rng(1).normal(280, 5, size=(3, fine.nlat, fine.nlon)).astype("float32")
    ds = field_on(fine, x).chunk(time=1)
    out = coarsen_blocks(ds, 4)
    assert out["tas"].chunks[0] == (1, 1, 1) and out["tas"].dtype == np.float32
    np.testing.assert_allclose(out["lat"], fine.coarsened(4).lat)
    np.testing.assert_allclose(out["lon"], fine.coarsened(4).lon)
    # by hand: cell weight ~ sin(lat_n) - sin(lat_s) (lon widths are equal), block j,k = 4x4 cells
    lat_b, _ = fine.bounds()
    w = np.diff(np.sin(np.radians(lat_b)), axis=1)[:, 0]
    j, k = 7, 11
    block = x[:, 4 * j : 4 * j + 4, 4 * k : 4 * k + 4].astype(float)
    wb = np.broadcast_to(w[4 * j : 4 * j + 4, None], (4, 4))
    expect = (block * wb).sum(axis=(1, 2)) / wb.sum()
    np.testing.assert_allclose(out["tas"].values[:, j, k], expect, rtol=1e-6)
    assert out.attrs == ds.attrs and out["tas"].attrs["units"] == "K"


def test_coarsen_blocks_is_nan_aware_and_checks_divisibility() -> None:
    fine = Grid.from_region(WEST_US, 1.0)  # 20 x 25
    x = np.arange(20 * 25, dtype="float32").reshape(20, 25)
    x[0:5, 0:2] = (
        np.nan
    )  # block (0, 0): only 3 of 5 columns valid in the first 5 rows... fully valid elsewhere
    x[5:10, 5:10] = np.nan  # block (1, 1): all NaN
    out = coarsen_blocks(field_on(fine, x), 5)["tas"].values
    lat_b, _ = fine.bounds()
    w = np.repeat(np.diff(np.sin(np.radians(lat_b)), axis=1), 5, axis=1)[0:5]
    valid = ~np.isnan(x[0:5, 0:5])
    expect = np.nansum(x[0:5, 0:5] * w) / (w * valid).sum()
    assert out[0, 0] == pytest.approx(expect, rel=1e-6)
    assert np.isnan(out[1, 1]) and np.isfinite(np.delete(out.ravel(), 6)).all()
    with pytest.raises(RegridError, match="lon has 25 cells, not divisible by factor 4"):
        coarsen_blocks(field_on(fine, x), 4)
    trimmed = coarsen_blocks(field_on(fine, x), 4, boundary="trim")
    assert trimmed.sizes == {"lat": 5, "lon": 6}


# -- bilinear ---------------------------------------------------------------------------------------------
def test_bilinear_reproduces_a_linear_field_exactly_inside_the_domain() -> None:
    coarse = Grid.from_region(WEST_US, 2.5)
    lat, lon = np.meshgrid(coarse.lat, coarse.lon, indexing="ij")
    linear = np.stack([2.0 * lat - 0.7 * lon + 5, -lat + 3 * lon])
    ds = field_on(coarse, linear).chunk(time=1)
    target = Grid.from_region(WEST_US, 0.25)
    out = bilinear(ds, target)
    assert out["tas"].chunks[0] == (1, 1)  # lazy, time chunks kept
    out = out.compute()
    tlat, tlon = np.meshgrid(target.lat, target.lon, indexing="ij")
    np.testing.assert_allclose(out["tas"].values[0], 2.0 * tlat - 0.7 * tlon + 5, atol=1e-10)
    np.testing.assert_allclose(out["tas"].values[1], -tlat + 3 * tlon, atol=1e-10)
    np.testing.assert_array_equal(out["lon"], target.lon)


def test_bilinear_is_seamless_across_the_dateline_and_greenwich() -> None:
    source = Grid.global_(2.0)  # -180..180; the dateline is the source's seam
    lat, lon = np.meshgrid(np.radians(source.lat), np.radians(source.lon), indexing="ij")
    smooth = 280 + 10 * np.cos(lat) * np.sin(lon) + 5 * np.cos(2 * lon)
    ds = field_on(source, smooth)
    for region in (
        Region(lat_min=-10, lat_max=10, lon_min=170, lon_max=-170),
        Region(lat_min=40, lat_max=60, lon_min=350, lon_max=10),
    ):
        target = Grid.from_region(region, 0.5)
        out = bilinear(ds, target)["tas"].values
        tlat, tlon = np.meshgrid(np.radians(target.lat), np.radians(target.lon), indexing="ij")
        exact = 280 + 10 * np.cos(tlat) * np.sin(tlon) + 5 * np.cos(2 * tlon)
        # bilinear error of a smooth field at 2 deg is ~1e-2; a seam would be O(10)
        assert np.abs(out - exact).max() < 0.05
        steps = np.abs(np.diff(out, axis=1))
        assert steps.max() < 2 * np.abs(np.diff(exact, axis=1)).max() + 1e-3


def test_bilinear_outside_domain_is_an_error_unless_allowed() -> None:
    coarse = Grid.from_region(WEST_US, 2.5)
    ds = field_on(coarse, np.ones((coarse.nlat, coarse.nlon)))
    outside = Grid.from_region(Region(lat_min=45, lat_max=55, lon_min=-110, lon_max=-100), 0.5)
    with pytest.raises(
        RegridError, match=r"my source: the target region \(lat 45.25..54.75.*source domain \(lat 30..50"
    ):
        bilinear(ds, outside, name="my source")
    filled = bilinear(ds, outside, allow_extrapolation=True)
    np.testing.assert_allclose(filled["tas"].values, 1.0)
    # a source given in 0..360 still serves a -180..180 target
    east = ds.assign_coords(lon=ds["lon"] + 360)
    np.testing.assert_allclose(bilinear(east, Grid.from_region(WEST_US, 0.5))["tas"].values, 1.0)


# -- conservative -----------------------------------------------------------------------------------------
def to_conventions(ds: xr.Dataset) -> xr.Dataset:
    """Local stand-in for the ingest stage: lat ascending, lon in -180..180 and increasing."""
    ds = ds.sortby("lat")
    lon = ((ds["lon"] + 180) % 360) - 180
    return ds.assign_coords(lon=lon).sortby("lon")


@pytest.mark.parametrize("res", [1.0, 5.0, (1.5, 1.875)])
def test_conservative_keeps_the_global_area_mean(res: float) -> None:
    source = Grid.global_(2.0)
    ds = field_on(source, smooth_global(source).astype("float32")).chunk(time=1)
    out = conservative(ds, Grid.global_(res, lon_convention="0..360"))
    assert out["tas"].chunks[0] == (1, 1) and out["tas"].dtype == np.float32
    out = out.compute()
    assert out["tas"].notnull().all()
    # float32 data: agreement to float rounding (~1e-7 K on 300 K), far below the 2e-3 K of a cos-lat shortcut
    np.testing.assert_allclose(area_mean(out), area_mean(ds), rtol=0, atol=2e-6)


def test_conservative_regional_mean_is_the_source_mean_over_the_region() -> None:
    source = Grid.global_(2.0)
    ds = field_on(source, smooth_global(source, seed=3))
    region = Region(lat_min=30.0, lat_max=50.0, lon_min=-124.0, lon_max=-100.0)  # on 2-deg edges
    out = conservative(ds, Grid.from_region(region, 0.25))
    inside = ds.sel(lat=slice(30, 50), lon=slice(-124, -100))
    np.testing.assert_allclose(area_mean(out), area_mean(inside), rtol=1e-13)
    # a box cutting through source cells: compare with the exact overlap-area integral of the source
    box = Region(lat_min=31.0, lat_max=33.5, lon_min=-101.0, lon_max=-99.5)
    cut = conservative(ds, Grid.from_region(box, 0.5))
    lat_b, lon_b = source.bounds()
    dmu = np.clip(
        np.sin(np.radians(np.minimum(lat_b[:, 1], 33.5))) - np.sin(np.radians(np.maximum(lat_b[:, 0], 31.0))),
        0,
        None,
    )
    dlon = np.clip(np.minimum(lon_b[:, 1], -99.5) - np.maximum(lon_b[:, 0], -101.0), 0, None)
    a = np.outer(dmu, dlon)
    expect = (ds["tas"].values * a).sum(axis=(1, 2)) / a.sum()
    np.testing.assert_allclose(area_mean(cut), expect, rtol=1e-13)


def test_conservative_renormalises_over_masked_cells() -> None:
    source = Grid.from_region(WEST_US, 1.0)
    x = np.full((source.nlat, source.nlon), 10.0)
    x[:, :12] = 20.0
    x[:10, 12] = np.nan  # a masked strip
    ds = field_on(source, x)
    out = conservative(ds, Grid.from_region(WEST_US, 5.0))["tas"].values
    # the block containing the strip: the mean of its valid cells only
    block = x[5:10, 10:15]
    w = np.diff(np.sin(np.radians(source.bounds()[0][5:10])), axis=1)
    valid = ~np.isnan(block)
    assert out[1, 2] == pytest.approx(np.nansum(block * w) / (w * valid).sum(), rel=1e-12)
    strict = conservative(ds, Grid.from_region(WEST_US, 5.0), skipna=False)["tas"].values
    assert np.isnan(strict[1, 2]) and np.isnan(strict[0, 2]) and np.isfinite(strict[2:, :]).all()


def test_conservative_on_real_mpi_esm_tas() -> None:
    path = Path(default_data_home()) / "debian/usr/share/ncarg/data/nug/tas_rectilinear_grid_2D.nc"
    if not path.is_file():
        pytest.skip(f"{path} not unpacked (deploy/install.sh unpacks libncarg-data)")
    raw = xr.open_dataset(path, decode_times=xr.coders.CFDatetimeCoder(use_cftime=True), chunks={"time": 4})
    ds = to_conventions(raw[["tas"]])  # Gaussian T63 lat (not regular), lon 0..358 -> -180..178
    check_regular_latlon(ds, "MPI-ESM-LR tas")
    source_mean = area_mean(ds)
    assert 284 < source_mean.mean() < 291  # a plausible global mean surface temperature
    for target in (Grid.global_(1.0), Grid.global_(5.0, lon_convention="0..360")):
        out = conservative(ds, target)
        assert out["tas"].chunks[0] == (4, 4, 4)
        np.testing.assert_allclose(area_mean(out.compute()), source_mean, rtol=0, atol=2e-5)
    box = Grid.from_region(WEST_US, 0.25)
    regional = conservative(ds, box).compute()
    coarse_again = conservative(regional, Grid.from_region(WEST_US, 5.0))
    direct = conservative(ds, Grid.from_region(WEST_US, 5.0))
    np.testing.assert_allclose(coarse_again["tas"], direct["tas"], rtol=1e-6)


# -- static fields ----------------------------------------------------------------------------------------
def synthetic_static(grid: Grid, seed: int = 5) -> xr.Dataset:
    rng = np.random.default_rng(seed)
    orog = np.clip(rng.gamma(2.0, 400.0, size=(grid.nlat, grid.nlon)) - 300, 0, None)
    land = (orog > 0).astype(float) * 100
    return xr.Dataset(
        {"orog": (("lat", "lon"), orog.astype("float32")), "sftlf": (("lat", "lon"), land.astype("float32"))},
        coords={"lat": grid.lat, "lon": grid.lon},
    )


def test_static_on_a_coarser_grid_matches_numpy() -> None:
    fine = Grid.from_region(WEST_US, 0.25)
    static = synthetic_static(fine)
    target = Grid.from_region(WEST_US, 1.0)
    out = static_on_grid(static, target)
    assert out.attrs["method"].startswith("conservative")
    assert all(out[v].dtype == np.float32 for v in ("orog", "orog_std", "sftlf"))
    w = np.broadcast_to(np.diff(np.sin(np.radians(fine.bounds()[0])), axis=1), (fine.nlat, fine.nlon))
    j, k = 13, 21
    sl = (slice(4 * j, 4 * j + 4), slice(4 * k, 4 * k + 4))
    h, wb = static["orog"].values[sl].astype(float), w[sl]
    mean = (h * wb).sum() / wb.sum()
    std = np.sqrt((wb * (h - mean) ** 2).sum() / wb.sum())
    land = (static["sftlf"].values[sl] * wb).sum() / wb.sum()
    assert out["orog"].values[j, k] == pytest.approx(mean, rel=1e-5)
    assert out["orog_std"].values[j, k] == pytest.approx(std, rel=1e-4)
    assert out["sftlf"].values[j, k] == pytest.approx(land, rel=1e-5)
    assert out["orog"].attrs["units"] == "m" and out["sftlf"].attrs["units"] == "%"
    assert float(out["sftlf"].min()) >= 0 and float(out["sftlf"].max()) <= 100


def test_static_on_a_finer_grid_falls_back_to_bilinear() -> None:
    coarse = Grid.from_region(WEST_US, 1.0)
    static = synthetic_static(coarse)
    out = static_on_grid(static, Grid.from_region(WEST_US, 0.25))
    assert out.attrs["method"].startswith("bilinear") and "local 3x3" in out.attrs["method"]
    # target cell (31, 42): centre 37.875N -114.375E, between source centres 37.5/38.5N, -114.5/-113.5E
    i, j = 31, 42
    wy, wx = 0.375, 0.125  # fractional position from source cell (7, 10) towards (8, 11)
    bil = np.array([[(1 - wy) * (1 - wx), (1 - wy) * wx], [wy * (1 - wx), wy * wx]])
    h = static["orog"].values.astype(float)
    assert out["orog"].values[i, j] == pytest.approx((h[7:9, 10:12] * bil).sum(), rel=1e-5)
    local_std = np.array([[h[a - 1 : a + 2, b - 1 : b + 2].std() for b in (10, 11)] for a in (7, 8)])
    assert out["orog_std"].values[i, j] == pytest.approx((local_std * bil).sum(), rel=1e-4)
    land = static["sftlf"].values.astype(float)
    assert out["sftlf"].values[i, j] == pytest.approx((land[7:9, 10:12] * bil).sum(), rel=1e-5)
    assert np.isfinite(out["orog_std"].values).all() and float(out["orog_std"].min()) >= 0


# -- errors -----------------------------------------------------------------------------------------------
def test_curvilinear_and_rotated_sources_are_rejected() -> None:
    y, x = np.arange(4.0), np.arange(5.0)
    lat2d, lon2d = np.meshgrid(40 + y, -110 + x, indexing="ij")
    curvi = xr.Dataset(
        {"tas": (("y", "x"), np.ones((4, 5)))},
        coords={"lat": (("y", "x"), lat2d), "lon": (("y", "x"), lon2d)},
    )
    msg = r"EURO-CORDEX: curvilinear/rotated-pole grid \(2-D lat/lon or rotated_pole grid mapping\) is not"
    with pytest.raises(RegridError, match=msg):
        check_regular_latlon(curvi, "EURO-CORDEX")
    rotated = xr.Dataset(
        {
            "tas": (("rlat", "rlon"), np.ones((4, 5)), {"grid_mapping": "rotated_pole"}),
            "rotated_pole": ((), 0, {"grid_mapping_name": "rotated_latitude_longitude"}),
        },
        coords={"rlat": y, "rlon": x},
    )
    with pytest.raises(RegridError, match="provide a regular lat/lon source"):
        bilinear(rotated, Grid.global_(5.0), name="EURO-CORDEX")
    with pytest.raises(RegridError, match="lat must be strictly ascending"):
        coarsen_blocks(field_on(Grid.global_(5.0), np.ones((36, 72))).isel(lat=slice(None, None, -1)), 2)


def test_nan_only_time_slices_are_named() -> None:
    grid = Grid.from_region(WEST_US, 5.0)
    x = np.ones((3, grid.nlat, grid.nlon))
    x[1] = np.nan
    ds = field_on(grid, x)
    with pytest.raises(RegridError, match=r"'tas' is NaN everywhere at 1 time step\(s\), first \['1'\]"):
        check_time_slices(ds, "ingest store")
    check_time_slices(ds.isel(time=[0, 2]), "ingest store")  # passes silently


def test_target_outside_the_source_domain_is_named() -> None:
    source = Grid.from_region(WEST_US, 1.0)
    ds = field_on(source, np.ones((source.nlat, source.nlon)))
    far = Grid.from_region(Region(lat_min=-10, lat_max=10, lon_min=170, lon_max=-170), 1.0)
    with pytest.raises(RegridError, match=r"CMIP tas: the target region \(lat -9.5..9.5, lon 170.5..189.5"):
        conservative(ds, far, name="CMIP tas")
    with pytest.raises(RegridError, match="lies partly outside the source domain"):
        check_target_in_domain(ds, far.lat, far.lon, "CMIP tas")
    # a global source covers any region, in either convention
    glob = field_on(Grid.global_(5.0), np.ones((36, 72)))
    check_target_in_domain(glob, far.lat, far.lon, "global")


def test_bilinear_from_a_global_gaussian_grid_reaches_the_poles() -> None:
    lat = np.array([-88.5, -86.0, -60.0, 0.0, 60.0, 86.0, 88.5])  # irregular, outer cells reach the poles
    lon = np.arange(0.0, 360.0, 30.0)
    x = 250 + 40 * np.cos(np.radians(lat))[:, None] + 5 * np.sin(np.radians(lon))[None, :]
    ds = xr.Dataset({"tas": (("lat", "lon"), x)}, coords={"lat": lat, "lon": lon})
    target = Grid.global_(1.0)
    out = bilinear(ds, target)["tas"].values
    assert np.isfinite(out).all() and x.min() - 1e-9 <= out.min() and out.max() <= x.max() + 1e-9
    # row 89.5N lies 2/3 of the way from the 88.5N row to the pole, whose value is that row's zonal mean
    along_row = np.interp(target.lon, lon, x[-1], period=360)
    np.testing.assert_allclose(out[-1], along_row / 3 + 2 * x[-1].mean() / 3, rtol=1e-12)


def test_a_pole_value_is_the_zonal_mean_of_the_row_whatever_the_target_extent() -> None:
    lat = np.array([-75.0, -45.0, -15.0, 15.0, 45.0, 75.0])  # 30-deg cells reaching the poles
    lon = np.arange(15.0, 360.0, 30.0)
    row = np.random.default_rng(4).normal(250, 10, size=lon.size)  # no symmetry to hide double counting
    ds = xr.Dataset({"tas": (("lat", "lon"), np.tile(row, (lat.size, 1)))}, coords={"lat": lat, "lon": lon})
    for target in (
        Grid.global_(1.0),
        Grid.from_region(Region(lat_min=80, lat_max=90, lon_min=-20, lon_max=20), 1.0),
    ):
        out = bilinear(ds, target)["tas"].values
        # 89.5N lies 29/30 of the way from the 75N row to the pole, whose value is the row's zonal mean
        along_row = np.interp(target.lon, lon, row, period=360)
        np.testing.assert_allclose(out[-1], along_row / 30 + 29 * row.mean() / 30, rtol=1e-12)


def test_bilinear_nan_stencil_is_that_of_xarray_interp() -> None:
    """A NaN reaches every target whose 2 x 2 stencil holds it (scipy's interp1d, as in xarray's interp),
    a target on a source centre included (its stencil also lists the centre below, at weight 0)."""
    source = Grid.from_region(WEST_US, 1.0)
    rng = np.random.default_rng(7)
    x = rng.normal(280, 5, size=(2, source.nlat, source.nlon))
    x[rng.random(x.shape) < 0.05] = np.nan
    ds = field_on(source, x).chunk(time=1)
    tlat = np.arange(source.lat[0], source.lat[-1] + 1e-9, 0.5)  # every other target on a source centre
    tlon = np.arange(source.lon[0], source.lon[-1] + 1e-9, 0.5)
    out = bilinear(ds, xr.Dataset(coords={"lat": tlat, "lon": tlon}))["tas"].values
    ref = ds["tas"].interp(lat=tlat, lon=tlon, method="linear").values
    assert np.isnan(out).any() and np.isfinite(out).any()
    np.testing.assert_array_equal(np.isnan(out), np.isnan(ref))
    np.testing.assert_allclose(out, ref, rtol=1e-12)


def test_separable_regridding_is_one_task_per_chunk_in_the_input_dtype() -> None:
    source = Grid.global_(2.0)
    ds = field_on(source, smooth_global(source, n_time=6).astype("float32")).chunk(time=2)
    n_in = len(ds["tas"].data.__dask_graph__())
    region = Grid.from_region(WEST_US, 0.25)
    for out in (bilinear(ds, region), conservative(ds, Grid.global_(5.0))):
        assert len(out["tas"].data.__dask_graph__()) == n_in + 3  # one kernel task per input chunk
        values = out["tas"].values
        assert out["tas"].chunks[0] == (2, 2, 2) and values.dtype == np.float32  # computed, not only declared
    # weights are built once per pair of grids and read only the source rows/columns the region needs
    w = bilinear_weights(source.lat, source.lon, region.lat, region.lon)
    assert w is bilinear_weights(source.lat.copy(), source.lon.copy(), region.lat, region.lon)
    assert (w.rows.size, w.cols.size) == (12, 14) and w.pole is None
    np.testing.assert_allclose(w.lat.sum(1), 1.0) and np.testing.assert_allclose(w.lon.sum(1), 1.0)
