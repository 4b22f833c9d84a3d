"""The ingest flow under Prefect's test API with Dask doing the compute on a 2-worker LocalCluster."""

import logging

import pytest
import xarray as xr
from distributed import LocalCluster

from climrecon.flows.ingest import ingest_flow
from climrecon.flows.runtime import dask_client
from climrecon.stores import StageStore


@pytest.fixture(scope="module")
def cluster():
    with LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0", silence_logs=logging.ERROR
    ) as c:
        yield c


def test_ingest_flow_runs_one_named_task_per_group(
    prefect_harness, cluster, make_catalog, catalog_row, raw_files, tmp_path
):
    rows = [catalog_row(raw_files[v], v) for v in ("tas", "uas", "vas")]
    rows += [
        catalog_row(
            raw_files["navy"],
            v,
            source_id="FNOC-winds",
            experiment_id="obs",
            member_id="r1",
            time_range="198201-199212",
        )
        for v in ("uas", "vas")
    ]
    catalog = make_catalog(rows)
    config = tmp_path / "flow.yaml"
    config.write_text(
        f"storage:\n  root: {tmp_path / 'out'}\ningest:\n  catalog: {catalog}\n"
        "  query:\n    variable_id: [uas, vas]\n"
    )
    state = ingest_flow(
        str(config),
        overrides=["ingest.time_chunk=24"],
        scheduler_address=cluster.scheduler_address,
        return_state=True,
    )
    urls = state.result()
    assert len(urls) == 2 and all("/ingest/" in u for u in urls)
    for url in urls:
        ds = xr.open_zarr(url)
        assert ds.attrs["climrecon_status"] == "complete" and ds.uas.encoding["chunks"][0] == min(
            24, ds.sizes["time"]
        )
        assert StageStore(url, ds.attrs["climrecon_key"]).is_complete()
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs()
    names = sorted(r.name for r in runs if r.flow_run_id == state.state_details.flow_run_id)
    assert names == ["ingest FNOC-winds obs r1 Amon", "ingest MPI-ESM-LR historical r1i1p1 Amon"]
    # a second run skips both complete stores
    assert (
        ingest_flow(
            str(config), overrides=["ingest.time_chunk=24"], scheduler_address=cluster.scheduler_address
        )
        == urls
    )


def test_dask_client_starts_and_closes_a_local_cluster():
    with dask_client(n_workers=1) as client:
        assert client.submit(sum, [1, 2, 3]).result() == 6
        assert len(client.scheduler_info()["workers"]) == 1
    assert client.status == "closed"
