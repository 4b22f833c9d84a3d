"""Cloud path on a local stand-in: a Pangeo-style CMIP6 Zarr catalog on S3 (moto) -> ingest -> S3 store.

The stand-in has Pangeo's exact catalog columns (``zstore``, ``dcpp_init_year``, ...) and a CMIP6-like
Zarr store per variable written from the real MPI-ESM-LR files. Credentials live only in the
environment; the test checks that the secret appears in no byte of the output store.
"""

import dataclasses
import json
import uuid

import numpy as np
import pandas as pd
import pytest
import xarray as xr

from climrecon.config import load_config
from climrecon.storage import resolve_storage_options
from climrecon.tasks.ingest import ingest_plan, plan_ingest

PANGEO_COLUMNS = [
    "activity_id",
    "institution_id",
    "source_id",
    "experiment_id",
    "member_id",
    "table_id",
    "variable_id",
    "grid_label",
    "zstore",
    "dcpp_init_year",
    "version",
]
CFTIME = xr.coders.CFDatetimeCoder(use_cftime=True)


@pytest.fixture(scope="module")
def standin(moto_s3, raw_files):
    """CMIP6-like Zarr stores + a Pangeo-schema catalog (JSON + CSV) in a bucket of the moto server.

    Written once per module with explicit throw-away credentials (test setup, not a config).
    """
    s3 = dataclasses.replace(moto_s3, bucket=f"standin-{uuid.uuid4().hex[:8]}")
    s3.filesystem().mkdir(s3.bucket)
    opts = {**s3.storage_options, "key": s3.key, "secret": s3.secret}
    rows = []
    for var in ("tas", "uas", "vas"):
        ds = xr.open_dataset(raw_files[var], decode_times=CFTIME).load()
        ds.attrs.update(source_id="MPI-ESM-LR", variable_id=var, tracking_id=f"hdl:21.14100/{var}-standin")
        zstore = s3.url(
            "cmip6", "CMIP", "MPI-M", "MPI-ESM-LR", "historical", "r1i1p1", "Amon", var, "gn", "v20110527"
        )
        ds.drop_encoding().to_zarr(zstore, storage_options=opts, zarr_format=2, consolidated=True)
        rows.append(
            {
                "activity_id": "CMIP",
                "institution_id": "MPI-M",
                "source_id": "MPI-ESM-LR",
                "experiment_id": "historical",
                "member_id": "r1i1p1",
                "table_id": "Amon",
                "variable_id": var,
                "grid_label": "gn",
                "zstore": zstore,
                "dcpp_init_year": np.nan,
                "version": 20110527,
            }
        )
    fs = s3.filesystem()
    csv_url = s3.url("catalogs", "pangeo-cmip6.csv")
    fs.pipe(csv_url, pd.DataFrame(rows, columns=PANGEO_COLUMNS).to_csv(index=False).encode())
    # the shipped template, pointed at the stand-in CSV instead of Google's
    from importlib.resources import files

    spec = json.loads(files("climrecon.catalogs").joinpath("templates/pangeo-cmip6.json").read_text())
    assert [a["column_name"] for a in spec["attributes"]] == PANGEO_COLUMNS
    spec["catalog_file"] = csv_url
    json_url = s3.url("catalogs", "pangeo-cmip6.json")
    fs.pipe(json_url, json.dumps(spec).encode())
    return s3, json_url


def _all_bytes(s3, prefix: str) -> bytes:
    fs = s3.filesystem()
    return b"".join(fs.cat(p) for p in sorted(fs.find(prefix)))


@pytest.mark.parametrize("credentials", ["aws_env", "climrecon_env"])
def test_pangeo_standin_on_s3_ingests_to_s3(standin, raw_files, monkeypatch, tmp_path, credentials):
    s3, catalog = standin
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3.key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3.secret)
    if credentials == "climrecon_env":  # secrets as CLIMRECON_STORAGE_OPTIONS JSON only
        monkeypatch.delenv("AWS_ACCESS_KEY_ID")
        monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
        monkeypatch.setenv("CLIMRECON_STORAGE_OPTIONS", json.dumps({"key": s3.key, "secret": s3.secret}))
    config = tmp_path / "ingest.yaml"
    config.write_text(
        f"storage:\n  root: {s3.url(credentials)}\n  options:\n    endpoint_url: {s3.endpoint_url}\n"
        f"ingest:\n  catalog: {catalog}\n  time_chunk: 6\n"
        "  query:\n    source_id: MPI-ESM-LR\n    variable_id: [tas, uas, vas]\n"
    )
    cfg = load_config(config)
    assert s3.secret not in config.read_text()
    (plan,) = plan_ingest(cfg.ingest, cfg.ingest.catalog, cfg.storage)
    assert plan.url.startswith(f"s3://{s3.bucket}/{credentials}/ingest/MPI-ESM-LR.historical.r1i1p1.Amon.")
    assert s3.secret not in repr(plan) and s3.secret not in json.dumps(plan.rows)
    url = ingest_plan(plan, resolve_storage_options(cfg.storage.options))
    # anyone with the endpoint and credentials reads it back with plain xarray
    out = xr.open_zarr(url, storage_options=resolve_storage_options(cfg.storage.options), decode_times=CFTIME)
    assert out.attrs["climrecon_status"] == "complete" and out.tas.encoding["chunks"] == (6, 96, 192)
    for var in ("tas", "uas", "vas"):
        src = xr.open_dataset(raw_files[var], decode_times=CFTIME)[var].roll(lon=96)
        np.testing.assert_array_equal(out[var].values, src.values)
    assert out.lon.values[0] == -180.0 and out.time.values[0].day == 1
    assert out.attrs["source_files"][0].startswith(f"s3://{s3.bucket}/cmip6/CMIP/MPI-M/")
    assert out.attrs["source_versions"] == ["20110527"]
    assert sorted(out.attrs["source_tracking_ids"]) == [
        f"hdl:21.14100/{v}-standin" for v in ("tas", "uas", "vas")
    ]
    stored = _all_bytes(s3, f"{s3.bucket}/{credentials}")
    assert s3.secret.encode() not in stored and s3.key.encode() not in stored
    # re-running against S3 finds the store complete and writes nothing
    listing = {
        p: info["ETag"] for p, info in s3.filesystem().find(f"{s3.bucket}/{credentials}", detail=True).items()
    }
    assert ingest_plan(plan, resolve_storage_options(cfg.storage.options)) == url
    assert {
        p: i["ETag"] for p, i in s3.filesystem().find(f"{s3.bucket}/{credentials}", detail=True).items()
    } == listing
