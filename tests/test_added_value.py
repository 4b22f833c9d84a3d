"""Reconstruction vs truth (climrecon.tasks.added_value): scale split, matching, scores, store-level entry."""

from __future__ import annotations

import json

import cftime
import numpy as np
import pytest
import xarray as xr
from dask.callbacks import Callback

from climrecon.tasks.added_value import (
    AddedValueError,
    added_value_markdown,
    added_value_records,
    climatologies,
    matching_truth,
    reconstruction_fields,
    split_scales,
)
from climrecon.tasks.plots import fine_scale_maps
from climrecon.tasks.regrid import coarsen_blocks

FACTOR = 4


def grid_field(
    nt: int,
    calendar: str,
    seed: int,
    start_year: int = 2005,
    nlat: int = 16,
    nlon: int = 20,
    lat0: float = 30.0,
    scale: float = 1.0,
) -> xr.Dataset:
    rng = np.random.default_rng(seed)
    times = [cftime.datetime(start_year + m // 12, m % 12 + 1, 1, calendar=calendar) for m in range(nt)]
    lat = lat0 + 0.25 * (np.arange(nlat) + 0.5)
    lon = -120.0 + 0.25 * (np.arange(nlon) + 0.5)
    values = scale * rng.standard_normal((nt, nlat, nlon)).astype("float32")
    return xr.Dataset(
        {"tas": (("time", "lat", "lon"), values, {"units": "K"})},
        coords={"time": times, "lat": lat, "lon": lon},
    )


def test_split_scales_is_exact_and_the_fine_part_has_zero_block_means():
    field = grid_field(1, "standard", 0, nlat=18, nlon=21).isel(time=0)  # remainder rows/columns are dropped
    large, fine = split_scales(field, FACTOR)
    assert large.sizes == fine.sizes == {"lat": 16, "lon": 20}
    np.testing.assert_allclose(
        (large + fine)["tas"], field["tas"].isel(lat=slice(0, 16), lon=slice(0, 20)), atol=1e-5
    )
    np.testing.assert_allclose(coarsen_blocks(fine, FACTOR)["tas"], 0.0, atol=1e-5)
    assert np.all(large["tas"].values[:4, :4] == large["tas"].values[0, 0])  # constant on each block
    with pytest.raises(AddedValueError, match="smaller than one 4 x 4 block"):
        split_scales(field.isel(lat=slice(0, 3)), FACTOR)


def test_matching_truth_pairs_months_across_calendars_and_selects_the_grid():
    truth = grid_field(36, "standard", 1, start_year=2004, nlat=24, lat0=29.0)  # wider in lat, 2004-2006
    run = grid_field(12, "noleap", 2, start_year=2005).isel(time=slice(3, 15))  # 2005-04.. (9 months shared)
    run = xr.concat([run, grid_field(15, "noleap", 3, start_year=2006).isel(time=slice(12, 15))], "time")
    matched = matching_truth(truth, run, ["tas"], "truth.zarr")
    # 2005-04..12 are shared; 2007-01..03 are not in the truth and are left out
    assert [(t.year, t.month) for t in matched["time"].values] == [(2005, m) for m in range(4, 13)]
    assert matched["time"].values[0].calendar == "noleap"  # the run's time coordinate
    np.testing.assert_array_equal(matched["lat"], run["lat"])
    np.testing.assert_array_equal(matched["tas"].isel(time=0), truth["tas"].isel(time=15, lat=slice(4, 20)))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda t: t.rename({"tas": "pr"}), r"truth truth\.zarr lacks \['tas'\]"),
        (
            lambda t: t.assign_coords(time=[cftime.datetime(1990, m + 1, 1) for m in range(12)]),
            "shares no month",
        ),
        (lambda t: t.assign_coords(lon=t["lon"] + 0.1), "does not have the reconstruction's lon cells"),
    ],
)
def test_truth_that_cannot_be_compared_is_named(change, message):
    run = grid_field(12, "noleap", 2)
    with pytest.raises(AddedValueError, match=message):
        matching_truth(change(grid_field(12, "standard", 1)), run, ["tas"], "truth.zarr")


def test_downscaling_that_recovers_the_fine_scale_beats_interpolation_there():
    truth = grid_field(12, "standard", 4, scale=2.0)
    large, _ = split_scales(truth.mean("time"), FACTOR)
    interpolated = truth.copy(data={"tas": np.broadcast_to(large["tas"].values, truth["tas"].shape) + 0.0})
    downscaled = truth + 0.1 * grid_field(12, "standard", 5)["tas"].values
    records = added_value_records(climatologies(downscaled, interpolated, truth), FACTOR)
    by = {(r["method"], r["scale"]): r for r in records}
    assert len(records) == 6 and {r["months"] for r in records} == {12}
    assert by["downscaled", "fine"]["pattern_correlation"] > 0.9
    assert by["interpolated", "fine"]["pattern_correlation"] is None  # its fine scale is exactly zero
    assert by["downscaled", "fine"]["rmse"] < 0.2 * by["interpolated", "fine"]["rmse"]
    assert by["interpolated", "large"]["rmse"] == pytest.approx(0.0, abs=1e-5)
    assert by["downscaled", "whole"]["monthly_mae"] < by["interpolated", "whole"]["monthly_mae"]
    table = added_value_markdown(records, "truth.zarr", FACTOR)
    assert "| tas [K] | fine |" in table and "truth.zarr" in table
    json.dumps(records, allow_nan=False)  # no NaN reaches the JSON file or the table artifact


def test_reconstruction_fields_read_the_run_stores(tmp_path):
    truth = grid_field(24, "standard", 6, start_year=2004)
    run = grid_field(12, "noleap", 7, start_year=2005)
    aggregate = xr.Dataset({"tas_mean": run["tas"] + 0.5, "tas_std": run["tas"] * 0 + 1.0})
    aggregate.to_zarr(tmp_path / "aggregate.zarr")
    run.to_zarr(tmp_path / "fine.zarr")
    urls = str(tmp_path / "aggregate.zarr"), str(tmp_path / "fine.zarr")
    ensemble_mean, interpolated, reference = reconstruction_fields(*urls, truth, "truth.zarr")
    assert list(ensemble_mean.data_vars) == ["tas"] and ensemble_mean.sizes["time"] == 12
    np.testing.assert_allclose(ensemble_mean["tas"], interpolated["tas"] + 0.5, atol=1e-6)
    np.testing.assert_array_equal(reference["tas"], truth["tas"].isel(time=slice(12, 24)))
    computes = []

    class CountComputes(Callback):
        def _start(self, dsk):
            computes.append(len(dsk))

    with CountComputes():  # the stores are read in one pass, and scoring/plotting reads nothing more
        clim = climatologies(ensemble_mean, interpolated, reference)
        records = added_value_records(clim, FACTOR)
        fine_scale_maps(clim.time_means, FACTOR, "tas", tmp_path / "fine.png", months=clim.months, units="K")
    assert len(computes) == 1 and (tmp_path / "fine.png").stat().st_size > 0
    by = {(r["method"], r["scale"]): r for r in records}
    assert by["downscaled", "whole"]["bias"] == pytest.approx(
        by["interpolated", "whole"]["bias"] + 0.5, abs=1e-4
    )
    assert by["downscaled", "fine"]["rmse"] == pytest.approx(by["interpolated", "fine"]["rmse"], abs=1e-4)
    with pytest.raises(AddedValueError, match="none of the reconstructed variables"):
        reconstruction_fields(*urls, truth.rename({"tas": "pr"}), "truth.zarr")
    with pytest.raises(AddedValueError, match="no aggregate store at"):
        reconstruction_fields(str(tmp_path / "missing.zarr"), urls[1], truth, "t")
