"""Ingest stage on real files: catalog query -> plans -> standardized, chunked, provenance-stamped stores."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from climrecon.config import CatalogQuery, IngestConfig, StorageConfig
from climrecon.stores import StageStore
from climrecon.tasks.ingest import CatalogQueryError, ingest_plan, open_plan, plan_ingest, search_catalog

CFTIME = xr.coders.CFDatetimeCoder(use_cftime=True)


@pytest.fixture
def real_catalog(make_catalog, catalog_row, raw_files):
    rows = [catalog_row(raw_files[v], v) for v in ("tas", "uas", "vas")]
    rows += [
        catalog_row(
            raw_files["navy"],
            v,
            source_id="FNOC-winds",
            institution_id="FNOC",
            experiment_id="obs",
            member_id="r1",
            calendar="standard",
            time_range="198201-199212",
            version="",
        )
        for v in ("uas", "vas")
    ]
    rows.append(
        catalog_row(
            raw_files["a1b"],
            "tas",
            source_id="HadCM3-UM",
            institution_id="MOHC",
            experiment_id="sresa1b",
            member_id="r1",
            table_id="Ayr",
            frequency="yr",
            calendar="360_day",
            time_range="1860-2099",
            version="v1",
        )
    )
    return make_catalog(rows)


def _files(root: Path) -> dict[str, tuple[int, bytes]]:
    return {
        str(p.relative_to(root)): (p.stat().st_mtime_ns, p.read_bytes())
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_plans_one_store_per_group_with_readable_labels(real_catalog, tmp_path):
    cfg = IngestConfig(query=CatalogQuery(variable_id=["uas", "vas"]))
    plans = plan_ingest(cfg, real_catalog, StorageConfig(root=str(tmp_path / "out")))
    assert [p.label for p in plans] == ["FNOC-winds obs r1 Amon", "MPI-ESM-LR historical r1i1p1 Amon"]
    mpi = plans[1]
    assert mpi.url == f"{tmp_path}/out/ingest/MPI-ESM-LR.historical.r1i1p1.Amon.{mpi.key}.zarr"
    assert mpi.variables() == ["uas", "vas"] and mpi.frequency == "mon"
    # the key follows the inputs: another query or config gives another store
    other = plan_ingest(
        cfg.model_copy(update={"time_chunk": 6}), real_catalog, StorageConfig(root=str(tmp_path))
    )
    assert other[1].key != mpi.key
    json.dumps([p.rows for p in plans])  # plans are plain data (they travel to workers)


def test_ingest_mpi_esm_lr_values_chunks_provenance_and_rerun_skips(real_catalog, raw_files, tmp_path):
    root = tmp_path / "out"
    cfg = IngestConfig(
        query=CatalogQuery(source_id="MPI-ESM-LR", variable_id=["tas", "uas", "vas"]), time_chunk=5
    )
    (plan,) = plan_ingest(cfg, real_catalog, StorageConfig(root=str(root)))
    url = ingest_plan(plan)
    assert url == plan.url and StageStore(url, plan.key).is_complete()
    out = xr.open_zarr(url, decode_times=CFTIME)
    assert sorted(out.data_vars) == ["tas", "time_bnds", "uas", "vas"]
    assert out.tas.encoding["chunks"] == (5, 96, 192) and out.tas.dtype == np.float32
    for v in ("tas", "uas", "vas"):
        src = xr.open_dataset(raw_files[v], decode_times=CFTIME)[v].roll(lon=96)  # 0..360 -> -180..180
        np.testing.assert_array_equal(out[v].values, src.values)
    assert out.lon.values[0] == -180.0 and np.all(np.diff(out.lat) > 0)
    assert out.time.values[0].calendar == "proleptic_gregorian" and out.time.values[0].day == 1
    a = out.attrs
    assert a["climrecon_status"] == "complete" and a["source_catalog"] == real_catalog
    assert a["source_files"] == sorted(str(raw_files[v]) for v in ("tas", "uas", "vas"))
    assert a["source_versions"] == ["v20110527"]
    assert a["source_tracking_ids"] == ["c6446bbf-65ed-41cc-a67d-71e3559a2824"]  # from the tas file
    assert json.loads(a["ingest_config"])["time_chunk"] == 5
    assert a["code_version"].startswith("climrecon ") and "climrecon ingest of tas, uas, vas" in a["history"]
    # a second run finds the store complete and leaves every byte and mtime as it was
    before = _files(root)
    assert ingest_plan(plan) == url
    assert _files(root) == before


def test_annual_360day_and_time_clip(real_catalog, raw_files, tmp_path):
    cfg = IngestConfig(
        query=CatalogQuery(source_id="HadCM3-UM", time=("1990", "1999")), lon_convention="0..360"
    )
    (plan,) = plan_ingest(cfg, real_catalog, StorageConfig(root=str(tmp_path)))
    assert plan.frequency == "yr"
    out = xr.open_zarr(ingest_plan(plan), decode_times=CFTIME)
    assert out.time.values[0].calendar == "360_day" and [t.year for t in out.time.values] == list(
        range(1990, 2000)
    )
    assert out.lon.values[0] == 225.0 and out.tas.encoding["chunks"] == (10, 37, 49)
    src = xr.open_dataset(raw_files["a1b"], decode_times=CFTIME).air_temperature.isel(time=slice(130, 140))
    np.testing.assert_array_equal(out.tas.values, src.values)


def test_navy_file_serving_two_rows_opens_once(real_catalog, raw_files, tmp_path):
    cfg = IngestConfig(query=CatalogQuery(source_id="FNOC-winds", time=("1990-01", "1990-06")))
    (plan,) = plan_ingest(cfg, real_catalog, StorageConfig(root=str(tmp_path)))
    ds = open_plan(plan)
    assert sorted(ds.data_vars) == ["time_bnds", "uas", "vas"] and ds.sizes["time"] == 6
    assert ds.uas.chunks[0] == (6,)  # lazy, chunked like the store


def test_query_matching_nothing_lists_available_values(real_catalog):
    with pytest.raises(
        CatalogQueryError,
        match=r"no entry with source_id=\['CanESM5'\].*'FNOC-winds', 'HadCM3-UM', 'MPI-ESM-LR'",
    ):
        search_catalog(real_catalog, CatalogQuery(source_id="CanESM5"), {})
    with pytest.raises(CatalogQueryError, match=r"variable_id=\['pr'\].*\['tas', 'uas', 'vas'\]"):
        search_catalog(real_catalog, CatalogQuery(variable_id=["tas", "pr"]), {})
    with pytest.raises(CatalogQueryError, match="no file of the query overlaps time"):
        search_catalog(real_catalog, CatalogQuery(source_id="MPI-ESM-LR", time=("1950", "1960")), {})
    with pytest.raises(CatalogQueryError, match="does not exist"):
        search_catalog(os.fspath(Path(real_catalog).with_name("nope.json")), CatalogQuery(), {})


def test_a_zarr_store_listed_as_a_file_url_is_ingested(make_catalog, catalog_row, tmp_path):
    """Catalogs (the sample's own) list Zarr stores as file:// URLs: the store is opened, not mistaken for a
    relative path (it read '<cwd>/file:/...' before)."""
    from test_training_data import write_tiny_stores

    truth, _ = write_tiny_stores(tmp_path / "src")
    url = "file://" + str(Path(truth).resolve())
    rows = [
        catalog_row(
            url, v, format="zarr", source_id="TINY", experiment_id="synthetic", time_range="200001-200212"
        )
        for v in ("tas", "uas")
    ]
    cfg = IngestConfig(query=CatalogQuery(source_id="TINY", time=("2001-01", "2001-06")))
    (plan,) = plan_ingest(cfg, make_catalog(rows), StorageConfig(root=str(tmp_path / "out")))
    out = xr.open_zarr(ingest_plan(plan), decode_times=CFTIME)
    src = xr.open_zarr(truth, decode_times=CFTIME).sel(time=slice("2001-01", "2001-06"))
    assert {"tas", "uas"} <= set(out.data_vars) and out.sizes["time"] == 6
    np.testing.assert_allclose(out["tas"].values, src["tas"].transpose(*out["tas"].dims).values, rtol=1e-6)
