"""The offline sample catalog built from the real packaged data (and the esmcat writer it uses)."""

import csv
import json
import re
import time
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from climrecon.catalogs.esmcat import (
    COLUMNS,
    CatalogError,
    open_catalog,
    open_datasets,
    read_rows,
    write_catalog,
)
from climrecon.catalogs.sample import MissingSourceDataError, build_sample_catalog, sample_files
from climrecon.config import Region, SyntheticConfig
from climrecon.storage import default_data_home

CFTIME = xr.coders.CFDatetimeCoder(use_cftime=True)
# (source_id, experiment_id, member_id, table_id, variable_id) -> (calendar, time_range)
EXPECTED = {
    ("UM605", "A1B", "r1i1p1", "Ayr", "tas"): ("360_day", "1860-2099"),
    ("UM605", "E1", "r1i1p1", "Ayr", "tas"): ("360_day", "1860-2099"),
    ("MPI-ESM-LR", "historical", "r1i1p1", "Amon", "tas"): ("proleptic_gregorian", "200501-200512"),
    ("MPI-ESM-LR", "historical", "r1i1p1", "Amon", "uas"): ("proleptic_gregorian", "200501-200512"),
    ("MPI-ESM-LR", "historical", "r1i1p1", "Amon", "vas"): ("proleptic_gregorian", "200501-200512"),
    ("MPI-ESM-LR", "historical", "r0i0p0", "fx", "orog"): ("", ""),
    ("MPI-ESM-LR", "historical", "r0i0p0", "fx", "sftlf"): ("", ""),
    ("FNOC", "analysis", "r1i1p1", "Amon", "uas"): ("standard", "198201-199212"),
    ("FNOC", "analysis", "r1i1p1", "Amon", "vas"): ("standard", "198201-199212"),
    ("COSMO-CLM", "unspecified", "r1i1p1", "Amon", "tas"): ("proleptic_gregorian", "200601-200601"),
    ("ETOPO5-GLOBE", "static", "r0i0p0", "fx", "orog"): ("", ""),
    ("ETOPO5-GLOBE", "static", "r0i0p0", "fx", "sftlf"): ("", ""),
    ("ClimRecon-SyntheticReanalysis", "synthetic", "r1i1p1f1", "Amon", "tas"): ("standard", "200001-200012"),
    ("ClimRecon-SyntheticReanalysis", "synthetic", "r1i1p1f1", "Amon", "pr"): ("standard", "200001-200012"),
}
SYNTHETIC = SyntheticConfig(
    region=Region(lat_min=39.0, lat_max=40.0, lon_min=-106.0, lon_max=-105.0),
    start_year=2000, end_year=2000, variables=["tas", "pr"],
)  # fmt: skip


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    directory = tmp_path_factory.mktemp("sample")
    catalog = build_sample_catalog(
        directory, default_data_home(), include_synthetic=SYNTHETIC, progress=False
    )
    return directory, catalog


@pytest.fixture(scope="module")
def rows(built):
    return read_rows(built[1])


def _key(r):
    return (r["source_id"], r["experiment_id"], r["member_id"], r["table_id"], r["variable_id"])


def test_catalog_has_the_columns_and_every_expected_row(built, rows):
    directory, catalog = built
    assert catalog == directory / "catalog.json"
    with open(directory / "catalog.csv") as f:
        assert next(csv.reader(f)) == list(COLUMNS)
    spec = json.loads(catalog.read_text())
    assert spec["assets"] == {"column_name": "path", "format_column_name": "format"}
    assert spec["aggregation_control"]["variable_column_name"] == "variable_id"
    assert {_key(r): (r["calendar"], r["time_range"]) for r in rows} == EXPECTED
    for r in rows:
        assert r["synthetic"] == ("true" if r["source_id"] == "ClimRecon-SyntheticReanalysis" else "false")
        assert r["license"] and r["origin"]
        if r["format"] == "netcdf":
            assert Path(r["path"]).is_file()
        else:
            assert r["path"].startswith("file://") and r["path"].endswith(".zarr")


def test_files_follow_the_cmip6_drs(rows):
    for r in (r for r in rows if r["format"] == "netcdf"):
        p = Path(r["path"])
        facets = ("variable_id", "table_id", "source_id", "experiment_id", "member_id", "grid_label")
        name = "_".join(r[c] for c in facets)
        assert p.name == (f"{name}_{r['time_range']}.nc" if r["time_range"] else f"{name}.nc")
        drs = [r[c] for c in ("activity_id", "institution_id", "source_id", "experiment_id", "member_id",
                              "table_id", "variable_id", "grid_label", "version")]  # fmt: skip
        assert list(p.parts[-10:-1]) == drs
    mpi = next(r for r in rows if _key(r) == ("MPI-ESM-LR", "historical", "r1i1p1", "Amon", "tas"))
    assert Path(mpi["path"]).name == "tas_Amon_MPI-ESM-LR_historical_r1i1p1_gn_200501-200512.nc"
    assert "libncarg-data" in mpi["origin"] and mpi["origin"].endswith("nug/tas_rectilinear_grid_2D.nc")


def test_written_files_keep_the_source_data_and_metadata(built):
    """Values, units, calendar, latitude order and longitude convention are exactly the source's."""
    directory, _ = built
    for item in sample_files(default_data_home()):
        out_path = directory / "data" / item.relative_path()
        with (
            xr.open_dataset(item.source_path, decode_times=CFTIME) as src,
            xr.open_dataset(out_path, decode_times=CFTIME) as out,
        ):
            name = {"UWND": "uas", "VWND": "vas", "air_temperature": "tas"}
            src_var = next(v for v in src.data_vars if name.get(v, v) == item.variable)
            a, b = src[src_var], out[item.variable]
            np.testing.assert_array_equal(a.values, b.values)
            assert b.attrs["units"] == a.attrs["units"]
            for axis in ("lat", "lon", "time"):
                src_axis = {
                    "lat": ("lat", "latitude", "FNOCY", "rlat"),
                    "lon": ("lon", "longitude", "FNOCX", "rlon"),
                    "time": ("time", "TIME"),
                }[axis]
                s = next((src[n] for n in src_axis if n in src.coords), None)
                o = next((out[n] for n in src_axis if n in out.coords), None)
                assert (s is None) == (o is None)
                if s is not None:
                    np.testing.assert_array_equal(s.values, o.values)
            g = out.attrs
            assert g["variable_id"] == item.variable and g["variant_label"] == g["member_id"]
            assert {k: g[k] for k in item.facets} == item.facets
            assert g["climrecon_origin"] == item.origin and item.source_file in g["climrecon_origin"]
    # what the later stages must standardise is still there
    navy = xr.open_dataset(next((directory / "data" / "obs").rglob("uas_*.nc")))
    assert navy.uas.attrs["units"] == "M/S" and navy.lon.values[0] == 20.0 and navy.lon.values[-1] == 377.5
    mpi = xr.open_dataset(next((directory / "data" / "CMIP5").rglob("tas_Amon_*.nc")))
    assert mpi.attrs["source_table_id"].startswith("Table Amon") and mpi.attrs["table_id"] == "Amon"
    assert mpi.lon.values.min() == 0.0 and np.all(np.diff(mpi.lat.values) > 0)


def test_intake_esm_opens_every_group(built):
    _, catalog = built
    cat = open_catalog(catalog)
    assert len(cat.df) == len(EXPECTED)
    sources = ["MPI-ESM-LR", "UM605", "FNOC", "ETOPO5-GLOBE", "ClimRecon-SyntheticReanalysis"]
    datasets = open_datasets(catalog, source_id=sources)
    by_source = {k.split(".")[2] + "." + k.split(".")[5]: ds for k, ds in datasets.items()}
    assert sorted(by_source["MPI-ESM-LR.Amon"].data_vars) == ["tas", "uas", "vas"]
    assert by_source["MPI-ESM-LR.Amon"].sizes["time"] == 12
    assert sorted(by_source["MPI-ESM-LR.fx"].data_vars) == ["orog", "sftlf"]
    assert sorted(by_source["ETOPO5-GLOBE.fx"].data_vars) == ["orog", "sftlf"]
    assert sorted(by_source["FNOC.Amon"].data_vars) == ["uas", "vas"]
    assert by_source["UM605.Ayr"].time.values[0].calendar == "360_day"
    synthetic = by_source["ClimRecon-SyntheticReanalysis.Amon"]
    assert sorted(synthetic.data_vars) == ["pr", "tas"] and synthetic.sizes["time"] == 12
    # the rotated-pole file opens as it is, for the ingest stage to reject
    (rotated,) = open_datasets(catalog, source_id="COSMO-CLM").values()
    assert rotated.rlat.attrs["standard_name"] == "grid_latitude" and "lat" not in rotated.coords


def test_rebuild_is_fast_and_rewrites_nothing(built):
    directory, catalog = built
    files = sorted((directory / "data").rglob("*.nc"))
    mtimes = [f.stat().st_mtime_ns for f in files]
    csv_before = (directory / "catalog.csv").read_text()
    start = time.perf_counter()
    build_sample_catalog(directory, default_data_home(), include_synthetic=SYNTHETIC, progress=False)
    assert time.perf_counter() - start < 5
    assert [f.stat().st_mtime_ns for f in files] == mtimes
    assert (directory / "catalog.csv").read_text() == csv_before


def test_merging_keeps_other_rows_and_replaces_same_path(tmp_path, rows):
    catalog = write_catalog(tmp_path / "c.json", rows[:3])
    extra = {**rows[0], "path": str(tmp_path / "other.nc"), "source_id": "Other"}
    write_catalog(catalog, [extra])
    assert len(read_rows(catalog)) == 4
    write_catalog(catalog, [{**extra, "version": "v2"}])
    merged = read_rows(catalog)
    assert len(merged) == 4 and [r["version"] for r in merged if r["source_id"] == "Other"] == ["v2"]
    assert len(read_rows(write_catalog(catalog, [extra], merge=False))) == 1


def test_a_store_rebuilt_under_a_new_path_replaces_its_predecessor(tmp_path, rows):
    """E.g. the synthetic reanalysis after a generator change: same dataset identity, new store name."""
    catalog = write_catalog(tmp_path / "c.json", rows[:3])
    moved = {**rows[0], "path": str(tmp_path / "rebuilt.nc")}
    merged = read_rows(write_catalog(catalog, [moved]))
    assert len(merged) == 3
    assert [
        r["path"]
        for r in merged
        if r["variable_id"] == rows[0]["variable_id"] and r["source_id"] == rows[0]["source_id"]
    ] == [moved["path"]]


def test_invalid_rows_are_rejected_by_name(tmp_path, rows):
    with pytest.raises(CatalogError, match="'format' must be one of"):
        write_catalog(tmp_path / "c.json", [{**rows[0], "format": "grib"}])
    with pytest.raises(CatalogError, match="absolute path"):
        write_catalog(tmp_path / "c.json", [{**rows[0], "path": "relative/file.nc"}])
    with pytest.raises(CatalogError, match=r"missing column\(s\) \['license'\]"):
        write_catalog(tmp_path / "c.json", [{k: v for k, v in rows[0].items() if k != "license"}])
    with pytest.raises(CatalogError, match="'synthetic' must be"):
        write_catalog(tmp_path / "c.json", [{**rows[0], "synthetic": "maybe"}])


def test_missing_source_data_points_to_the_installer(tmp_path):
    with pytest.raises(MissingSourceDataError, match=r"tas_rectilinear_grid_2D\.nc.*deploy/install\.sh"):
        build_sample_catalog(tmp_path / "out", tmp_path / "empty-data-home", progress=False)


def test_progress_bar_runs(built, capsys):
    directory, _ = built
    build_sample_catalog(directory, default_data_home(), progress=True)
    assert re.search(r"sample catalog.*\d+/\d+", capsys.readouterr().out)


def test_open_datasets_rejects_bad_queries(built):
    _, catalog = built
    with pytest.raises(CatalogError, match="no catalog rows match"):
        open_datasets(catalog, source_id="NoSuchModel")
    with pytest.raises(CatalogError, match=r"column\(s\) \['model'\]"):
        open_datasets(catalog, model="MPI-ESM-LR")
    with pytest.raises(CatalogError, match="engine"):
        open_datasets(catalog, source_id="FNOC", xarray_open_kwargs={"engine": "netcdf4"})
