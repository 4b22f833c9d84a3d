"""Session fixtures for the deployment tests: a real Prefect server and one deployment run through a worker.

Loaded as a pytest plugin (``pytest_plugins = ["deploy_fixtures"]`` in the test modules) so that the
end-to-end test and the browser test share ONE server and ONE flow run per session.

- ``prefect_server``: ``prefect server start`` on 127.0.0.1 at a free port, SQLite in a temporary
  PREFECT_HOME (:func:`climrecon.flows.server.start_server`); stopped at the end of the session.
- ``deployed_run``: creates the process work pool from deploy/work-pools/process.json, deploys
  :data:`E2E`'s deployment with ``prefect deploy --prefect-file deploy/prefect.yaml``, creates a flow run
  with small-run overrides (stores in a temporary directory), runs it with
  ``prefect worker start --pool P --run-once`` started OUTSIDE the repository (so the pull step must
  take it there), and returns what the API then says about the run. Every process it starts is
  stopped, even on failure.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml

from climrecon.flows.server import LocalPrefectServer, start_server, template_database

REPO = Path(__file__).resolve().parents[1]
PREFECT_YAML = REPO / "deploy" / "prefect.yaml"
WORK_POOLS = REPO / "deploy" / "work-pools"
ARTIFACTS = REPO / "tests" / "artifacts"


@dataclass(frozen=True)
class E2ERun:
    """Which deployment the end-to-end test runs, the overrides that keep it small, the artifacts it makes."""

    deployment: str
    overrides: tuple[str, ...] = ()
    artifact_keys: frozenset[str] = frozenset()


# The run under test: the whole reconstruction (ingest -> regrid -> downscale -> aggregate -> skill against
# the sample catalog's synthetic truth) with the shipped checkpoint, kept small: 2 members, 4 sampler steps.
E2E = E2ERun(
    "reconstruct-local",
    ("downscale.members=2", "downscale.members_per_unit=2", "sampler.num_steps=4"),
    frozenset(
        {"reconstruct-stores", "reconstruct-summary", "reconstruct-skill", "reconstruct-skill-records"}
    ),
)


def prefect_bin() -> str:
    return str(Path(sys.executable).with_name("prefect"))


def deployment_spec(name: str) -> dict[str, Any]:
    """The deployment ``name`` from deploy/prefect.yaml (YAML anchors resolved)."""
    spec = yaml.safe_load(PREFECT_YAML.read_text())
    for d in spec["deployments"]:
        if d["name"] == name:
            return d
    raise KeyError(f"deployment {name!r} is not in {PREFECT_YAML}")


def stop_process_tree(proc: subprocess.Popen | None, timeout: float = 15.0) -> None:
    """Terminate ``proc`` and every descendant it started (then kill what is left)."""
    if proc is None:
        return
    try:
        procs = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        procs = []
    for p in procs:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=5)
    if proc.poll() is None:
        proc.wait(timeout=5)


def sync_client(server: LocalPrefectServer):
    """A synchronous Prefect client of ``server`` (whatever Prefect settings this process has)."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    class _Client:
        def __enter__(self):
            self._settings = temporary_settings({PREFECT_API_URL: server.api_url})
            self._settings.__enter__()
            self._client = get_client(sync_client=True)
            return self._client.__enter__()

        def __exit__(self, *exc):
            try:
                self._client.__exit__(*exc)
            finally:
                self._settings.__exit__(*exc)

    return _Client()


@dataclass
class DeployedRun:
    """What the API says about the deployment run (read after it finished)."""

    server: LocalPrefectServer
    deployment_name: str
    flow_run: Any
    task_runs: list[Any]
    artifacts: list[Any]
    log_messages: list[str]
    storage_root: Path
    result_storage: Path
    worker_log: Path
    worker_returncode: int | None
    timings: dict[str, float] = field(default_factory=dict)
    tmpdir: Path | None = None  # the run's TMPDIR: nothing may be left in it


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory):
    server = start_server(tmp_path_factory.mktemp("prefect-home"), template=template_database())
    try:
        yield server
    finally:
        server.stop()


def _sample_overrides(tmp: Path) -> list[str]:
    """Use the built sample catalog, or build the real-data part of it (no synthetic) under ``tmp``."""
    from climrecon.catalogs.sample import MissingSourceDataError, build_sample_catalog
    from climrecon.config import load_config

    cfg = load_config()
    if cfg.sample_catalog().is_file():
        return []
    directory = tmp / "sample"
    try:
        build_sample_catalog(directory, Path(cfg.data_home), include_synthetic=None, progress=False)
    except MissingSourceDataError as exc:
        pytest.skip(f"raw sample data not installed (run deploy/install.sh): {exc}")
    return [f"sample.directory={directory}"]


def _wait_for_task_runs(client, flow_run_id, timeout: float = 30.0) -> list[Any]:
    """Task runs reach the API through events; wait until they are all in a final state."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    flt = FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
    deadline = time.monotonic() + timeout
    while True:
        runs = client.read_task_runs(flow_run_filter=flt)
        if runs and all(r.state is not None and r.state.is_final() for r in runs):
            return runs
        if time.monotonic() > deadline:
            return runs
        time.sleep(0.5)


@pytest.fixture(scope="session")
def deployed_run(prefect_server: LocalPrefectServer, tmp_path_factory) -> DeployedRun:
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, LogFilter, LogFilterFlowRunId

    tmp = tmp_path_factory.mktemp("deployment-e2e")
    timings: dict[str, float] = {"server_start": prefect_server.startup_seconds}
    spec = deployment_spec(E2E.deployment)
    pool = spec["work_pool"]["name"]
    storage_root, results = tmp / "stores", tmp / "results"
    overrides = [f"storage.root={storage_root}", *_sample_overrides(tmp), *E2E.overrides]
    env = {
        **os.environ,
        **prefect_server.client_environment(),
        "PREFECT_WORKER_QUERY_SECONDS": "1",
        "PREFECT_RESULTS_PERSIST_BY_DEFAULT": "true",
        "PREFECT_LOCAL_STORAGE_PATH": str(results),
        "TMPDIR": str(tmp / "tmpdir"),
    }
    (tmp / "tmpdir").mkdir()

    t0 = time.monotonic()
    with sync_client(prefect_server) as client:
        template = json.loads((WORK_POOLS / "process.json").read_text())
        client.create_work_pool(WorkPoolCreate(name=pool, type="process", base_job_template=template))
    timings["work_pool"] = time.monotonic() - t0

    t0 = time.monotonic()
    deploy = subprocess.run(
        [
            prefect_bin(),
            "--no-prompt",
            "deploy",
            "--prefect-file",
            str(PREFECT_YAML),
            "--name",
            E2E.deployment,
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    timings["deploy"] = time.monotonic() - t0
    assert deploy.returncode == 0, f"prefect deploy failed:\n{deploy.stdout[-3000:]}\n{deploy.stderr[-3000:]}"

    with sync_client(prefect_server) as client:
        from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName

        (deployment,) = client.read_deployments(
            deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=[E2E.deployment]))
        )
        flow = client.read_flow(deployment.flow_id)
        flow_run = client.create_flow_run_from_deployment(deployment.id, parameters={"overrides": overrides})

    worker_log = tmp / "worker.log"
    worker = None
    t0 = time.monotonic()
    try:
        with open(worker_log, "wb") as log:
            worker = subprocess.Popen(
                [prefect_bin(), "worker", "start", "--pool", pool, "--run-once", "--name", "e2e-worker"],
                cwd=tmp,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
            try:
                worker.wait(timeout=240)
            except subprocess.TimeoutExpired:
                pass
        timings["worker_run"] = time.monotonic() - t0
    finally:
        stop_process_tree(worker)

    with sync_client(prefect_server) as client:
        flow_run = client.read_flow_run(flow_run.id)
        task_runs = _wait_for_task_runs(client, flow_run.id)
        artifacts = client.read_artifacts(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run.id]))
        )
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run.id])))

    run = DeployedRun(
        server=prefect_server,
        deployment_name=f"{flow.name}/{deployment.name}",
        flow_run=flow_run,
        task_runs=task_runs,
        artifacts=artifacts,
        log_messages=[entry.message for entry in logs],
        storage_root=storage_root,
        result_storage=results,
        worker_log=worker_log,
        worker_returncode=worker.returncode if worker else None,
        timings=timings,
        tmpdir=tmp / "tmpdir",
    )
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / "deployment_e2e.json").write_text(
        json.dumps(
            {
                "deployment": run.deployment_name,
                "flow_run_id": str(flow_run.id),
                "state": flow_run.state_name,
                "task_runs": sorted(r.name for r in task_runs),
                "timings_s": {k: round(v, 2) for k, v in timings.items()},
                "ui_url": prefect_server.flow_run_url(flow_run.id),
            },
            indent=1,
        )
    )
    return run
