"""A deployment from deploy/prefect.yaml run to completion by a process worker against a real Prefect server.

The server, work pool, deployment and flow run come from ``deployed_run`` (tests/deploy_fixtures.py):
real ``prefect server start`` (SQLite), ``prefect deploy``, ``prefect worker start --run-once``.
Everything is checked through the API, then against the stores the run wrote.
"""

from __future__ import annotations

import urllib.request
from pathlib import Path

import pytest
import xarray as xr

from climrecon.stores import StageStore

pytest.register_assert_rewrite("deploy_fixtures")
from deploy_fixtures import E2E, deployment_spec, sync_client  # noqa: E402

pytest_plugins = ["deploy_fixtures"]


def _store_urls(value) -> set[str]:
    """Every ``*.zarr`` URL inside a flow result (a list for ingest, a dict for reconstruct)."""
    if isinstance(value, str):
        return {value} if value.rstrip("/").endswith(".zarr") else set()
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        return set().union(*(_store_urls(v) for v in value)) if value else set()
    return set()


def test_server_serves_api_and_ui(prefect_server):
    with urllib.request.urlopen(f"{prefect_server.api_url}/health", timeout=10) as r:
        assert r.read().strip() == b"true"
    with urllib.request.urlopen(prefect_server.ui_url, timeout=10) as r:
        page = r.read().decode()
    assert r.headers.get_content_type() == "text/html" and '<div id="app"' in page
    assert prefect_server.home.joinpath("prefect.db").is_file()  # SQLite in the given home


def test_deployment_run_completes_through_a_worker(deployed_run):
    run = deployed_run
    worker_output = run.worker_log.read_text(errors="replace")[-4000:]
    assert run.flow_run.state is not None and run.flow_run.state.is_completed(), (
        f"flow run {run.flow_run.name} ended {run.flow_run.state_name}; worker log:\n{worker_output}"
    )
    assert run.worker_returncode == 0, worker_output
    assert run.flow_run.work_pool_name == "climrecon-process"
    assert run.deployment_name.endswith(f"/{E2E.deployment}")
    # the pull step moved the flow run from the worker's directory into the checkout
    assert any("set_working_directory" in m for m in run.log_messages), run.log_messages[:20]
    assert any("Finished in state Completed" in m for m in run.log_messages)


def test_task_runs_and_artifacts_are_recorded(deployed_run):
    run = deployed_run
    assert run.task_runs, "no task runs recorded for the flow run"
    assert all(r.flow_run_id == run.flow_run.id for r in run.task_runs)
    not_completed = {r.name: r.state_name for r in run.task_runs if not r.state.is_completed()}
    assert not not_completed, not_completed
    if E2E.deployment.startswith("ingest"):
        assert sorted(r.name for r in run.task_runs) == ["ingest MPI-ESM-LR historical r1i1p1 Amon"]
    else:  # reconstruct: its own tasks in the parent run; each stage is a subflow run with its own tasks
        assert {r.name for r in run.task_runs} >= {"report artifacts"}
    assert {a.key for a in run.artifacts if a.key} == set(E2E.artifact_keys)
    assert all(a.flow_run_id == run.flow_run.id for a in run.artifacts)


def test_flow_result_names_the_complete_stores_it_wrote(deployed_run):
    from prefect.settings import PREFECT_API_URL, PREFECT_LOCAL_STORAGE_PATH, temporary_settings

    run = deployed_run
    with temporary_settings(
        {PREFECT_API_URL: run.server.api_url, PREFECT_LOCAL_STORAGE_PATH: run.result_storage}
    ):
        result = run.flow_run.state.result()
    urls = _store_urls(result)
    written = {str(p) for p in Path(run.storage_root).rglob("*.zarr") if p.is_dir()}
    assert urls and urls <= written, (urls, written)
    for url in urls:
        ds = xr.open_zarr(url)
        assert ds.attrs["climrecon_status"] == "complete"
        assert StageStore(url, ds.attrs["climrecon_key"]).is_complete()
    if E2E.deployment.startswith("ingest"):
        (url,) = urls
        ds = xr.open_zarr(url)
        assert set(ds.data_vars) == {"tas", "time_bnds"} and ds.tas.dims == ("time", "lat", "lon")
        assert ds.sizes["time"] == 12 and ds.tas.attrs["units"] == "K"
    else:
        (agg,) = result["aggregate"]
        ds = xr.open_zarr(agg)
        assert {"tas_mean", "tas_std", "uas_mean", "vas_quantile"} <= set(ds.data_vars)
        assert ds.sizes["time"] == 12 and ds.attrs["ensemble_size"] == 2
        assert Path(result["catalog"]).is_file()


def test_api_lists_the_run_under_its_deployment(deployed_run):
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    run = deployed_run
    with sync_client(run.server) as client:
        runs = client.read_flow_runs(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[run.flow_run.deployment_id]))
        )
        deployment = client.read_deployment(run.flow_run.deployment_id)
    assert [r.id for r in runs] == [run.flow_run.id]
    assert deployment.work_pool_name == "climrecon-process"
    assert deployment.pull_steps and "set_working_directory" in next(iter(deployment.pull_steps[0]))
    assert deployment.parameters == deployment_spec(E2E.deployment)["parameters"]


def test_the_run_leaves_no_temporary_folders(deployed_run):
    """The report and the skill scoring write their PNGs in temporary folders they remove."""
    left = sorted(p.name for p in deployed_run.tmpdir.glob("climrecon-*"))
    assert left == []
