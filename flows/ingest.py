"""Prefect flow of the ingest stage: plan from the catalog, one task per dataset group, Dask computes.

Thin by design: every decision lives in :mod:`climrecon.tasks.ingest`. Parameters carry no secrets;
storage options are resolved inside each task from the config and the environment.
"""

from __future__ import annotations

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from climrecon.config import ClimReconConfig, StorageConfig, resolve_config
from climrecon.flows.runtime import dask_client, retry_transient
from climrecon.storage import resolve_storage_options
from climrecon.tasks.ingest import IngestPlan, ingest_plan, plan_ingest

__all__ = ["ingest_flow", "ingest_group"]


@task(
    name="ingest-group",
    task_run_name="ingest {plan.label}",
    retries=1,
    retry_condition_fn=retry_transient,
    cache_policy=NO_CACHE,
)
def ingest_group(plan: IngestPlan, storage: StorageConfig) -> str:
    """Write one group's store (skipped if complete) and return its URL."""
    return ingest_plan(plan, resolve_storage_options(storage.options))


@flow(name="ingest")
def ingest_flow(
    config_path: str | None = None,
    overrides: list[str] | None = None,
    scheduler_address: str | None = None,
    config: ClimReconConfig | None = None,
) -> list[str]:
    """Ingest every catalog group matching the config's query; returns the store URLs (plan order)."""
    cfg = resolve_config(config, config_path, overrides or [])
    catalog = cfg.ingest.catalog or str(cfg.sample_catalog())
    plans = plan_ingest(cfg.ingest, catalog, cfg.storage)
    with dask_client(scheduler_address):
        futures = [ingest_group.submit(plan, cfg.storage) for plan in plans]
        return [f.result() for f in futures]
