"""Shared fixtures: a local S3 (moto_server), a Prefect test harness, small intake-esm catalogs.

- ``moto_s3`` (session): a real S3 API served by ``moto_server`` on 127.0.0.1 at a free port, stopped at
  the end of the session. It yields :class:`climrecon.localhost.LocalS3` (endpoint URL, non-secret storage options, and
  throw-away credentials that tests put in the environment, never in a config).
- ``s3`` (function): ``moto_s3`` with the credentials set as AWS_* environment variables and a fresh
  bucket; use ``s3.url(...)`` for object URLs and ``s3.storage_options`` for fsspec/xarray.
- ``prefect_harness`` (session): Prefect's temporary test API (``prefect_test_harness``), ~10-30 s once per
  worker.
- ``make_catalog``: writes an intake-esm catalog (JSON + CSV, the project's columns) for given rows.
- ``fault_record`` (session): the fault suite's ledger (``record(category, kind, **figures)`` once a case
  has passed); written as JSON to ``$CLIMRECON_FAULTS_REPORT`` at the end of the session, which
  ``benchmarks/faults.py`` turns into ``benchmarks/results/faults.json``.

The suite runs on two pytest-xdist workers (pyproject.toml's addopts), a whole module per worker
(``--dist loadfile``: module fixtures are built once; the deployment's server and flow run serve one module);
:func:`pytest_collection_modifyitems` sends the longest modules first, so that the two workers finish
together. ``-n 0`` runs everything in one process.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from climrecon.localhost import serve_moto

# modules sent first, longest first (from --durations on the CI machine); the rest follow in collection order
LONG_MODULES = (
    "test_faults.py",
    "test_deployment_e2e.py",
    "test_aggregate_s3.py",
    "test_deploy_files.py",
    "test_multi_host.py",
    "test_fastpath.py",
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The longest modules first, so that the two xdist workers (``--dist loadfile``) finish together."""

    def rank(item: pytest.Item) -> int:
        name = item.path.name
        return LONG_MODULES.index(name) if name in LONG_MODULES else len(LONG_MODULES)

    items.sort(key=rank)  # stable: collection order within a rank


CATALOG_COLUMNS = [
    "activity_id",
    "institution_id",
    "source_id",
    "experiment_id",
    "member_id",
    "table_id",
    "variable_id",
    "grid_label",
    "version",
    "frequency",
    "calendar",
    "time_range",
    "format",
    "path",
    "origin",
    "synthetic",
    "license",
]
GROUPBY = [
    "activity_id",
    "institution_id",
    "source_id",
    "experiment_id",
    "member_id",
    "table_id",
    "grid_label",
]


@pytest.fixture(scope="session")
def moto_s3():
    with serve_moto() as server:
        yield server


@pytest.fixture
def s3(moto_s3, monkeypatch):
    """The moto server with its credentials in the environment and a new, empty bucket."""
    for name, value in moto_s3.credentials.items():
        monkeypatch.setenv(name, value)
    return moto_s3.with_new_bucket()


@pytest.fixture(scope="session")
def prefect_harness():
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):  # a fresh database migrates slowly on a busy CPU
        yield


def catalog_row(path: str | Path, variable_id: str, **overrides: Any) -> dict[str, Any]:
    """A catalog row with the project's columns (MPI-ESM-LR historical r1i1p1 Amon unless overridden)."""
    row = {
        "activity_id": "CMIP",
        "institution_id": "MPI-M",
        "source_id": "MPI-ESM-LR",
        "experiment_id": "historical",
        "member_id": "r1i1p1",
        "table_id": "Amon",
        "variable_id": variable_id,
        "grid_label": "gn",
        "version": "v20110527",
        "frequency": "mon",
        "calendar": "proleptic_gregorian",
        "time_range": "200501-200512",
        "format": "netcdf",
        "path": str(path),
        "origin": "test",
        "synthetic": False,
        "license": "test",
    }
    row.update(overrides)
    return row


def write_catalog(
    directory: Path,
    rows: list[dict[str, Any]],
    name: str = "catalog",
    columns: list[str] | None = None,
    path_column: str = "path",
) -> Path:
    """An intake-esm catalog (``<name>.json`` + ``<name>.csv``) grouping like the project's sample catalog."""
    directory.mkdir(parents=True, exist_ok=True)
    cols = columns or CATALOG_COLUMNS
    pd.DataFrame(rows, columns=cols).to_csv(directory / f"{name}.csv", index=False)
    assets: dict[str, Any] = {"column_name": path_column}
    if "format" in cols:
        assets["format_column_name"] = "format"
    else:
        assets["format"] = "zarr"
    spec = {
        "esmcat_version": "0.1.0",
        "id": name,
        "description": "test catalog",
        "catalog_file": f"{name}.csv",
        "attributes": [{"column_name": c, "vocabulary": ""} for c in cols if c != path_column],
        "assets": assets,
        "aggregation_control": {
            "variable_column_name": "variable_id",
            "groupby_attrs": [c for c in GROUPBY if c in cols],
            "aggregations": [{"type": "union", "attribute_name": "variable_id", "options": {}}],
        },
    }
    (directory / f"{name}.json").write_text(json.dumps(spec, indent=1))
    return directory / f"{name}.json"


@pytest.fixture
def make_catalog(tmp_path):
    """``make_catalog(rows, name="catalog", ...)`` -> path of an intake-esm JSON in ``tmp_path/catalogs``."""

    def make(rows, name="catalog", **kwargs):
        return str(write_catalog(tmp_path / "catalogs", rows, name, **kwargs))

    return make


@pytest.fixture(name="catalog_row")
def _catalog_row_fixture():
    """The :func:`catalog_row` helper (a row with the project's columns)."""
    return catalog_row


@pytest.fixture(scope="session")
def raw_files() -> dict[str, Path]:
    """Real raw files unpacked by deploy/install.sh and shipped by iris-sample-data (skips if absent)."""
    import iris_sample_data

    from climrecon.storage import default_data_home

    debian = default_data_home() / "debian" / "usr" / "share"
    nug = debian / "ncarg" / "data" / "nug"
    files = {
        "tas": nug / "tas_rectilinear_grid_2D.nc",
        "uas": nug / "uas_rectilinear_grid_2D.nc",
        "vas": nug / "vas_rectilinear_grid_2D.nc",
        "eur11": nug / "tas_rotated_grid_EUR11.nc",
        "navy": debian / "ferret-vis" / "data" / "monthly_navy_winds.cdf",
        "a1b": Path(iris_sample_data.path) / "A1B_north_america.nc",
    }
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing:
        pytest.skip(f"raw data not installed (run deploy/install.sh): {missing}")
    return files


FAULTS_REPORT_ENV = "CLIMRECON_FAULTS_REPORT"


@pytest.fixture(scope="session")
def fault_record():
    results: dict[str, dict[str, Any]] = {}

    def record(category: str, kind: str, **figures: Any) -> None:
        results[f"{category}:{kind}"] = {"category": category, "kind": kind, "ok": True, **figures}

    yield record
    path = os.environ.get(FAULTS_REPORT_ENV)
    if path:
        Path(path).write_text(json.dumps(results, indent=1, sort_keys=True, default=str) + "\n")


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a test module (the CPU is shared; small convolutions crawl when oversubscribed)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
