"""Prefect flow of the regrid stage: plan, static fields + templates, time-block groups on Dask, finalize.

Thin by design: every decision lives in :mod:`climrecon.tasks.regrid_stage`. Each block group is one
Prefect task named after the period it covers; inside it every time block is its own Dask future, so
the workers of the cluster (a new LocalCluster, or the one at ``scheduler_address``) fill the same stores
side by side. Parameters carry no secrets; storage options are resolved inside each task.
"""

from __future__ import annotations

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from climrecon.config import ClimReconConfig, RegridConfig, StorageConfig, resolve_config
from climrecon.flows.runtime import dask_client, retry_transient
from climrecon.storage import resolve_storage_options
from climrecon.tasks.regrid_stage import (
    RegridPlan,
    default_sources,
    finalize_regrid,
    plan_regrid,
    prepare_regrid,
    run_blocks,
)

__all__ = ["regrid_flow", "BLOCKS_PER_TASK"]

BLOCKS_PER_TASK = 10  # time blocks per Prefect task (10 years of monthly data at time_chunk=12)


@task(name="regrid-plan", task_run_name="plan regrid of {source_url}", cache_policy=NO_CACHE)
def plan_task(cfg: RegridConfig, source_url: str, storage: StorageConfig, static_url: str) -> RegridPlan:
    return plan_regrid(cfg, source_url, storage, static_url)


@task(
    name="regrid-prepare",
    task_run_name="static fields and templates for {plan.name}",
    retries=1,
    retry_condition_fn=retry_transient,
    cache_policy=NO_CACHE,
)
def prepare_task(plan: RegridPlan, storage: StorageConfig) -> list[dict[str, slice]]:
    return prepare_regrid(plan, resolve_storage_options(storage.options))


@task(
    name="regrid-blocks",
    task_run_name="regrid {plan.name} {period}",
    retries=1,
    retry_condition_fn=retry_transient,
    cache_policy=NO_CACHE,
)
def blocks_task(
    plan: RegridPlan, regions: list[dict[str, slice]], storage: StorageConfig, period: str
) -> int:
    """Write one group of time blocks (one Dask future per block); returns how many were written."""
    from distributed import default_client

    return run_blocks(plan, regions, resolve_storage_options(storage.options), client=default_client())


@task(name="regrid-finalize", task_run_name="finalize {plan.name}", cache_policy=NO_CACHE)
def finalize_task(plan: RegridPlan, storage: StorageConfig) -> dict[str, str]:
    return finalize_regrid(plan, resolve_storage_options(storage.options)).urls()


@flow(name="regrid")
def regrid_flow(
    config_path: str | None = None,
    overrides: list[str] | None = None,
    source_url: str | None = None,
    scheduler_address: str | None = None,
    config: ClimReconConfig | None = None,
) -> dict[str, str]:
    """Regrid one ingested store; returns ``{"coarse": url, "fine": url, "static": url}``.

    The source is ``source_url``, else ``regrid.source``, else the ingest output of the same config;
    complete stores are skipped, incomplete ones are filled where blocks are missing.
    """
    cfg = resolve_config(config, config_path, overrides or [])
    source, static = default_sources(cfg, source_url)
    plan = plan_task(cfg.regrid, source, cfg.storage, static)
    with dask_client(scheduler_address):
        pending = prepare_task(plan, cfg.storage)
        groups = [pending[i : i + BLOCKS_PER_TASK] for i in range(0, len(pending), BLOCKS_PER_TASK)]
        futures = [blocks_task.submit(plan, group, cfg.storage, plan.label(group)) for group in groups]
        for f in futures:
            f.result()
        return finalize_task(plan, cfg.storage)
