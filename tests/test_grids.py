"""Contracts of climrecon.tasks.grids.Grid: centres, bounds, spherical areas, conventions, validation."""

from __future__ import annotations

import numpy as np
import pytest

from climrecon.config import Region
from climrecon.tasks.grids import EARTH_RADIUS_M, Grid, GridError, lat_edges_from_centres

SPHERE = 4 * np.pi * EARTH_RADIUS_M**2


@pytest.mark.parametrize("res", [0.25, 1.0, 1.875, 2.5])
def test_global_cell_areas_sum_to_the_sphere(res: float) -> None:
    grid = Grid.global_(res)
    area = grid.cell_area()
    assert area.shape == (grid.nlat, grid.nlon)
    assert area.sum() == pytest.approx(SPHERE, rel=1e-12)
    assert area.min() > 0


def test_centres_bounds_and_conventions() -> None:
    grid = Grid.global_(2.0)
    assert grid.lat[0] == -89.0 and grid.lat[-1] == 89.0
    assert grid.lon[0] == -179.0 and grid.lon[-1] == 179.0 and grid.is_global_lon
    lat_b, lon_b = grid.bounds()
    np.testing.assert_allclose(lat_b.mean(axis=1), grid.lat)
    np.testing.assert_allclose(lon_b.mean(axis=1), grid.lon)
    assert lat_b[0, 0] == -90 and lat_b[-1, 1] == 90 and lon_b[0, 0] == -180 and lon_b[-1, 1] == 180
    east = Grid.global_(2.0, lon_convention="0..360")
    assert east.lon[0] == 1.0 and east.lon[-1] == 359.0 and east.lon_convention == "0..360"
    with pytest.raises(GridError, match="lon_convention"):
        Grid.global_(2.0, lon_convention="east")


def test_region_grid_tiles_the_region_exactly() -> None:
    region = Region(lat_min=30.0, lat_max=50.0, lon_min=-125.0, lon_max=-100.0)
    grid = Grid.from_region(region, 0.25)
    assert (grid.nlat, grid.nlon) == (80, 100)
    assert grid.lat[0] == 30.125 and grid.lon[-1] == -100.125
    assert (grid.south, grid.north, grid.west, grid.east) == (30.0, 50.0, -125.0, -100.0)
    band = np.radians(0.25) * (np.sin(np.radians(50.0)) - np.sin(np.radians(30.0)))
    assert grid.cell_area(radius=1.0).sum() == pytest.approx(band * 100, rel=1e-12)


def test_dateline_and_greenwich_regions_are_contiguous() -> None:
    dateline = Grid.from_region(Region(lat_min=-10, lat_max=10, lon_min=170, lon_max=-170), 1.0)
    assert dateline.nlon == 20 and dateline.lon_convention == "0..360"
    assert dateline.lon[0] == 170.5 and dateline.lon[-1] == 189.5
    assert np.all(np.diff(dateline.lon) > 0)
    greenwich = Grid.from_region(Region(lat_min=40, lat_max=60, lon_min=350, lon_max=10), 0.5)
    assert greenwich.lon_convention == "-180..180" and greenwich.lon[0] == -9.75 and greenwich.lon[-1] == 9.75
    assert Grid.global_(1.0).contains(dateline) and Grid.global_(1.0).contains(greenwich)
    assert not greenwich.contains(dateline)


def test_coarsened_grid_centres_are_block_centres() -> None:
    fine = Grid.from_region(Region(lat_min=30, lat_max=50, lon_min=-125, lon_max=-100), 0.25)
    coarse = fine.coarsened(4)
    assert (coarse.nlat, coarse.nlon, coarse.dlat) == (20, 25, 1.0)
    np.testing.assert_allclose(coarse.lat, fine.lat.reshape(20, 4).mean(axis=1))
    np.testing.assert_allclose(coarse.lon, fine.lon.reshape(25, 4).mean(axis=1))
    np.testing.assert_allclose(coarse.cell_area().sum(), fine.cell_area().sum(), rtol=1e-12)
    with pytest.raises(GridError, match="cannot coarsen a 80 x 100 grid by 3"):
        fine.coarsened(3)


def test_to_dataset_is_a_regrid_target() -> None:
    ds = Grid.global_(5.0).to_dataset()
    assert ds["lat"].attrs["units"] == "degrees_north" and ds["lon"].attrs["units"] == "degrees_east"
    assert ds["lat_bnds"].shape == (36, 2) and ds["lon_bnds"].shape == (72, 2)
    assert ds.attrs["lon_convention"] == "-180..180"
    back = Grid.from_dataset(ds)
    assert back == Grid.global_(5.0)


def test_validation_messages_say_what_was_expected() -> None:
    region = Region(lat_min=30, lat_max=50, lon_min=-125, lon_max=-100)
    with pytest.raises(
        GridError, match=r"region longitudes -125..-100: an extent of 25 deg is not a whole number of 2-deg"
    ):
        Grid.from_region(region, 2.0)
    with pytest.raises(GridError, match="leave -90..90"):
        Grid(south=-91, west=0, dlat=1, dlon=1, nlat=2, nlon=2)
    with pytest.raises(GridError, match="not regular"):
        Grid.from_dataset(Grid.global_(5.0).to_dataset().isel(lat=[0, 1, 3]))
    with pytest.raises(GridError, match="neither convention"):
        Grid(south=0, west=-10, dlat=1, dlon=1, nlat=1, nlon=300)


def test_lat_edges_of_a_gaussian_like_grid_reach_the_poles() -> None:
    centres = np.array([-88.5, -86.0, 0.0, 86.0, 88.5])
    edges = lat_edges_from_centres(centres)
    assert edges[0] == -90.0 and edges[-1] == 90.0
    np.testing.assert_allclose(edges[1:-1], [-87.25, -43.0, 43.0, 87.25])
