"""A deployment from deploy/prefect.yaml run to completion by a process worker against a real Prefect server.

The server, work pool, deployment and flow run come from ``deployed_run`` (tests/deploy_fixtures.py):
real ``prefect server start`` (SQLite), ``prefect deploy``, ``prefect worker start --run-once``.
Everything is checked through the API, then against the stores the run wrote, then in the Prefect UI: headless
Chromium shows the run as Completed (skipped when /usr/bin/chromium is absent; .ci/run installs it; the
screenshot is kept in tests/artifacts/ui_flow_run.png). One module, so that one pytest-xdist worker makes the
one server and flow run that every test here reads.
"""

from __future__ import annotations

import html
import re
import subprocess
import urllib.request
from pathlib import Path

import pytest
import xarray as xr

from climrecon.stores import StageStore

pytest.register_assert_rewrite("deploy_fixtures")
from deploy_fixtures import ARTIFACTS, E2E, deployment_spec, sync_client  # noqa: E402

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


# -- the UI --------------------------------------------------------------------------------------------------
CHROMIUM = Path("/usr/bin/chromium")

NEEDS_CHROMIUM = pytest.mark.skipif(
    not CHROMIUM.exists(),
    reason="needs headless Chromium at /usr/bin/chromium "
    "(apt-get install -y --no-install-recommends chromium; .ci/run installs it)",
)


def visible_text(dom: str) -> str:
    """The text a reader sees in a dumped DOM (scripts, styles and tags removed, whitespace collapsed)."""
    text = re.sub(r"<(script|style)\b.*?</\1>", " ", dom, flags=re.S | re.I)
    text = re.sub(r"<[^>]+>", " ", text)
    return re.sub(r"\s+", " ", html.unescape(text)).strip()


def render(url: str, screenshot: Path, profile: Path, budget_ms: int = 20000) -> str:
    """Load ``url`` in a fresh headless Chromium profile; save a screenshot and return the rendered DOM."""
    command = [
        str(CHROMIUM),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        f"--user-data-dir={profile}",
        "--window-size=1400,900",
        f"--virtual-time-budget={budget_ms}",
        f"--screenshot={screenshot}",
        "--dump-dom",
        url,
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"chromium exited {done.returncode}: {done.stderr[-2000:]}"
    return done.stdout


@pytest.mark.browser
@NEEDS_CHROMIUM
def test_ui_shows_the_deployment_run_completed(deployed_run, tmp_path):
    run = deployed_run
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    screenshot = ARTIFACTS / "ui_flow_run.png"
    screenshot.unlink(missing_ok=True)
    text = visible_text(render(run.server.flow_run_url(run.flow_run.id), screenshot, tmp_path / "profile"))
    (ARTIFACTS / "ui_flow_run.txt").write_text(text)
    # the run's own page: breadcrumb "Runs <name>", (its tags), its state badge, then flow, deployment, pool
    header = re.search(rf"Runs {re.escape(run.flow_run.name)} (?P<tags>.{{0,120}}?)\bCompleted\b", text)
    assert header, text[:1500]
    flow_name, deployment = run.deployment_name.split("/")
    assert f"Flow {flow_name} Deployment {deployment} Work Pool {run.flow_run.work_pool_name}" in text, text[
        :1500
    ]
    # the header counts the run's own task runs ("2 Task runs"); the API also lists the placeholder task
    # runs a parent keeps for its subflows, so the API count is an upper bound
    shown = re.search(r"\b(\d+) Task runs?\b", text)
    assert shown and 1 <= int(shown.group(1)) <= len(run.task_runs), text[:1500]
    assert screenshot.is_file() and screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert screenshot.stat().st_size > 10_000  # a rendered page, not a blank image
