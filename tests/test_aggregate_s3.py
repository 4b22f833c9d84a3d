"""The aggregate flow against S3 (moto): member store on S3 -> statistics on S3 -> read as a user would.

Credentials live only in the environment; a secret is also planted in the member store's recorded
provenance (as a careless upstream stage might leave it). Neither may reach the output attributes, the
PROV document, any stored byte, the logs or the Prefect flow-run parameters.
"""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import xarray as xr
from distributed import LocalCluster
from test_aggregate import check_against_members, member_dataset, write_member_store

from climrecon.catalogs.output_catalog import open_output_catalog, open_outputs, output_catalog_url
from climrecon.config import AggregateConfig
from climrecon.flows.aggregate import aggregate_flow
from climrecon.tasks.aggregate import AggregateError, plan_aggregate

CFTIME = xr.coders.CFDatetimeCoder(use_cftime=True)
PLANTED = "planted-upstream-secret-42"


@pytest.fixture
def cluster(s3):
    """Workers started after ``s3`` put the credentials in the environment (as a deployment's workers have them)."""
    with LocalCluster(
        n_workers=1, threads_per_worker=1, processes=True, dashboard_address=":0", silence_logs=logging.ERROR
    ) as c:
        yield c


def _all_bytes(s3, prefix: str) -> bytes:
    fs = s3.filesystem()
    return b"".join(fs.cat(p) for p in sorted(fs.find(prefix)))


def test_aggregate_flow_on_s3_read_back_by_users(s3, prefect_harness, cluster, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    ds = member_dataset(n_member=16, n_time=24, seed=1, calendar="360_day")
    upstream = {
        "stage": "downscale",
        "seeds": {"base": 11},
        "flow_run_id": "downscale-run-1",
        "checkpoint": {"hash": "0123456789abcdef0123", "training_config": {"lr": 2e-4}},
        "storage_options": {"endpoint_url": s3.endpoint_url, "secret": PLANTED, "key": s3.key},
    }
    member = write_member_store(s3.url("runs"), ds, storage_options=s3.storage_options, provenance=upstream)
    config = tmp_path / "run.yaml"
    config.write_text(
        f"storage:\n  root: {s3.url('runs')}\n  options:\n    endpoint_url: {s3.endpoint_url}\n"
        "aggregate:\n  time_chunk: 12\n"
    )
    state = aggregate_flow(
        member,
        str(config),
        ["aggregate.thresholds.uas=[2.5]"],
        scheduler_address=cluster.scheduler_address,
        return_state=True,
    )
    url = state.result()
    assert url.startswith(s3.url("runs", "aggregate", "MPI-ESM-LR.historical.r1i1p1.dpdm."))

    # a user with the endpoint (credentials from the environment) opens it with plain xarray
    out = xr.open_zarr(
        url, storage_options={"endpoint_url": s3.endpoint_url}, consolidated=True, decode_times=CFTIME
    )
    cfg = AggregateConfig(time_chunk=12, thresholds={"tas": [273.15, 303.15], "uas": [2.5]})
    check_against_members(out, ds, cfg)
    assert out.time.values[0].calendar == "360_day" and out.tas_mean.attrs["cell_methods"].startswith(
        "time: mean"
    )
    assert out.uas_exceedance.attrs["units"] == "1" and list(out.uas_threshold.values) == [2.5]
    assert {"lat_bnds", "lon_bnds", "time_bnds"} <= set(out.variables)

    # provenance.json beside the zarr metadata: the whole chain, this flow run as an agent
    doc = json.loads(s3.filesystem().cat(f"{url[5:]}/provenance.json"))
    key, member_key = (
        out.attrs["climrecon_key"],
        json.loads(out.attrs["climrecon_provenance"])["inputs"][0]["content_key"],
    )
    assert (
        f"climrecon:aggregate/{key}" in doc["activity"]
        and f"climrecon:downscale/{member_key}" in doc["activity"]
    )
    flow_run = str(state.state_details.flow_run_id)
    assert f"climrecon:prefect-flow-run/{flow_run}" in doc["agent"]
    assert "climrecon:prefect-flow-run/downscale-run-1" in doc["agent"]
    assert any(e.get("prov:type") == "climrecon:checkpoint" for e in doc["entity"].values())
    assert flow_run in json.loads(out.attrs["climrecon_prefect_flow_runs"])

    # through the output catalog, with intake-esm
    catalog = output_catalog_url(s3.url("runs"))
    cat = open_output_catalog(catalog, storage_options={"endpoint_url": s3.endpoint_url})
    assert set(cat.df["statistic"]) == {"mean", "std", "quantile", "exceedance"} and set(
        cat.df["format"]
    ) == {"zarr"}
    sub = cat.search(variable_id="tas", statistic="quantile")
    (via_intake,) = sub.to_dataset_dict(
        storage_options={"endpoint_url": s3.endpoint_url},
        progressbar=False,
        xarray_open_kwargs={"decode_times": CFTIME},
        threaded=False,
    ).values()
    np.testing.assert_array_equal(via_intake.tas_quantile.values, out.tas_quantile.values)
    (means,) = open_outputs(
        cat, {"endpoint_url": s3.endpoint_url}, statistic="mean", variable_id=["tas", "vas"]
    ).values()
    assert sorted(means.data_vars) == ["tas_mean", "vas_mean"]

    # no secret anywhere: stored bytes, attributes, logs, Prefect parameters
    stored = _all_bytes(s3, f"{s3.bucket}/runs/aggregate") + _all_bytes(s3, f"{s3.bucket}/runs/catalogs")
    for secret in (PLANTED, s3.secret):
        assert secret.encode() not in stored
        assert secret not in json.dumps(out.attrs) and secret not in json.dumps(doc)
        assert secret not in caplog.text
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        run = client.read_flow_run(state.state_details.flow_run_id)
        task_runs = [t for t in client.read_task_runs() if t.flow_run_id == run.id]
    assert run.parameters["member_store"] == member and s3.secret not in json.dumps(
        run.parameters, default=str
    )
    names = {t.name for t in task_runs}
    assert "aggregate MPI-ESM-LR.historical.r1i1p1.dpdm 1990-01..1991-12" in names  # 2 blocks, one task
    assert any(n.startswith("catalog s3://") for n in names)

    # re-running skips: no object under the store changes
    fs = s3.filesystem()
    etags = {p: i["ETag"] for p, i in fs.find(url[5:], detail=True).items()}
    assert (
        aggregate_flow(
            member,
            str(config),
            ["aggregate.thresholds.uas=[2.5]"],
            scheduler_address=cluster.scheduler_address,
        )
        == url
    )
    fs.invalidate_cache()
    assert {p: i["ETag"] for p, i in fs.find(url[5:], detail=True).items()} == etags


def test_incomplete_member_store_on_s3_is_refused(s3):
    url = write_member_store(
        s3.url("r"), member_dataset(n_member=3, n_time=24), storage_options=s3.storage_options, complete=False
    )
    with pytest.raises(AggregateError, match=r"member store s3://.* is incomplete"):
        plan_aggregate(url, AggregateConfig(), s3.url("r"), s3.storage_options)
