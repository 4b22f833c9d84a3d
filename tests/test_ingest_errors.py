"""Every bad input fails with a message naming the file, and leaves what was written before untouched."""

import hashlib
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from climrecon.config import CatalogQuery, IngestConfig, StorageConfig
from climrecon.stores import StageStore
from climrecon.tasks.ingest import ingest_plan, plan_ingest
from climrecon.tasks.standardize import (
    CalendarError,
    CoordinateError,
    EmptyVariableError,
    GridError,
    IngestError,
    MissingVariableError,
    SourceReadError,
    UnitsError,
)


def _cf_file(
    path: Path,
    *,
    name="tas",
    units="K",
    lat=(-45.0, 0.0, 45.0),
    times=(15.0, 45.0, 74.0),
    calendar="noleap",
    values=None,
    extra=None,
) -> Path:
    shape = (len(times), len(lat), 4)
    data = np.arange(np.prod(shape), dtype="float32").reshape(shape) + 250 if values is None else values
    ds = xr.Dataset(
        {name: (("time", "lat", "lon"), data, {"units": units, "standard_name": "air_temperature"})},
        coords={
            "time": ("time", np.array(times), {"units": "days since 2000-01-01", "calendar": calendar}),
            "lat": ("lat", np.array(lat), {"units": "degrees_north", "standard_name": "latitude"}),
            "lon": (
                "lon",
                [0.0, 90.0, 180.0, 270.0],
                {"units": "degrees_east", "standard_name": "longitude"},
            ),
        },
    )
    ds = ds.assign(extra or {})
    ds.to_netcdf(path)
    return path


def _curvilinear(path: Path) -> Path:
    lat2d = np.tile(np.array([-45.0, 0.0, 45.0])[:, None], (1, 4))
    ds = xr.Dataset(
        {
            "tas": (
                ("time", "y", "x"),
                np.ones((3, 3, 4), "float32"),
                {"units": "K", "coordinates": "nav_lat nav_lon"},
            )
        },
        coords={
            "time": ("time", [15.0, 45.0, 74.0], {"units": "days since 2000-01-01", "calendar": "noleap"}),
            "nav_lat": (("y", "x"), lat2d, {"units": "degrees_north"}),
            "nav_lon": (("y", "x"), lat2d * 2 + 90, {"units": "degrees_east"}),
        },
    )
    ds.to_netcdf(path)
    return path


def _truncated(src: Path, path: Path) -> Path:
    path.write_bytes(src.read_bytes()[:400_000])
    return path


BAD_INPUTS = {
    # case: (make file, catalog variable_id, error, message part)
    "units": (
        lambda d, raw: _cf_file(d / "units.nc", units="m s-1"),
        "tas",
        UnitsError,
        "'m s-1', which cannot be converted to 'K'",
    ),
    "missing": (
        lambda d, raw: _cf_file(
            d / "missing.nc",
            extra={"uas": (("time", "lat", "lon"), np.ones((3, 3, 4), "float32"), {"units": "m s-1"})},
        ),
        "pr",
        MissingVariableError,
        "['pr'] not found",
    ),
    "lat_order": (
        lambda d, raw: _cf_file(d / "lat_order.nc", lat=(0.0, 45.0, -45.0)),
        "tas",
        CoordinateError,
        "'lat' has values that are not monotonic",
    ),
    "dup_time": (
        lambda d, raw: _cf_file(d / "dup_time.nc", times=(15.0, 15.0, 45.0)),
        "tas",
        CoordinateError,
        "'time' has duplicate values",
    ),
    "calendar": (
        lambda d, raw: _cf_file(d / "calendar.nc", calendar="mars_sol"),
        "tas",
        CalendarError,
        "calendar 'mars_sol' is not supported",
    ),
    "curvilinear": (
        lambda d, raw: _curvilinear(d / "curvilinear.nc"),
        "tas",
        GridError,
        "curvilinear grids are not supported yet",
    ),
    "rotated": (
        lambda d, raw: raw["eur11"],
        "tas",
        GridError,
        "rotated-pole and curvilinear grids are not supported yet",
    ),
    "all_nan": (
        lambda d, raw: _cf_file(d / "all_nan.nc", values=np.full((3, 3, 4), np.nan, "float32")),
        "tas",
        EmptyVariableError,
        "hold no valid value",
    ),
    "truncated": (
        lambda d, raw: _truncated(raw["tas"], d / "truncated.nc"),
        "tas",
        SourceReadError,
        "truncated or corrupt",
    ),
    "garbage": (
        lambda d, raw: (d / "garbage.nc").write_bytes(bytes(range(256)) * 8) and d / "garbage.nc",
        "tas",
        SourceReadError,
        "cannot read source",
    ),
}


def _snapshot(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def files(tmp_path_factory, raw_files):
    d = tmp_path_factory.mktemp("sources")
    good = _cf_file(d / "good.nc")
    return good, {case: make(d, raw_files) for case, (make, *_rest) in BAD_INPUTS.items()}


@pytest.mark.faults
def test_bad_inputs_fail_clearly_and_leave_earlier_stores_byte_identical(
    files, make_catalog, catalog_row, tmp_path, fault_record
):
    good, bad = files
    rows = [catalog_row(good, "tas", source_id="GOOD", calendar="noleap", time_range="200001-200003")]
    rows += [
        catalog_row(path, BAD_INPUTS[case][1], source_id=f"BAD-{case}", time_range="")
        for case, path in bad.items()
    ]
    catalog = make_catalog(rows)
    storage = StorageConfig(root=str(tmp_path / "out"))
    (good_plan,) = plan_ingest(IngestConfig(query=CatalogQuery(source_id="GOOD")), catalog, storage)
    ingest_plan(good_plan)
    before = _snapshot(tmp_path / "out")
    assert any(k.endswith("complete.json") for k in before)
    for case, (_make, _variable, error, message) in BAD_INPUTS.items():
        (plan,) = plan_ingest(IngestConfig(query=CatalogQuery(source_id=f"BAD-{case}")), catalog, storage)
        with pytest.raises(error) as info:
            ingest_plan(plan)
        text = str(info.value)
        assert isinstance(info.value, IngestError)
        assert message in text and Path(bad[case]).name in text, f"{case}: {text}"
        assert not StageStore(plan.url, plan.key).is_complete()
        assert _snapshot(tmp_path / "out") == before, case
        fault_record("bad_input", f"ingest {case}", message=text[:300])
