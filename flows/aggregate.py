"""Prefect flow of the aggregate stage: plan, template, time-block groups on Dask, finalize, catalog.

Thin by design: every decision lives in :mod:`climrecon.tasks.aggregate` and
:mod:`climrecon.catalogs.output_catalog`. Each block group is one Prefect task named after the period
it covers; inside it every time block is its own Dask future. Parameters carry no secrets (a store URL,
a config path, overrides); storage options are resolved inside each task from the config and the
environment.
"""

from __future__ import annotations

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from climrecon.catalogs.output_catalog import add_to_output_catalog, output_catalog_url
from climrecon.config import ClimReconConfig, StorageConfig, resolve_config
from climrecon.flows.runtime import dask_client, retry_transient
from climrecon.storage import resolve_storage_options
from climrecon.tasks.aggregate import (
    AggregateConfig,
    AggregatePlan,
    finalize_aggregate,
    plan_aggregate,
    prepare_aggregate,
    run_blocks,
)

__all__ = ["aggregate_flow", "BLOCKS_PER_TASK"]

BLOCKS_PER_TASK = 4  # time blocks per Prefect task (40 years at the default time_chunk of 120 months)


@task(name="aggregate-plan", task_run_name="plan aggregate of {member_store}", cache_policy=NO_CACHE)
def plan_task(member_store: str, cfg: AggregateConfig, storage: StorageConfig) -> AggregatePlan:
    return plan_aggregate(member_store, cfg, storage.root, resolve_storage_options(storage.options))


@task(
    name="aggregate-prepare",
    task_run_name="template for {plan.name}",
    retries=1,
    retry_condition_fn=retry_transient,
    cache_policy=NO_CACHE,
)
def prepare_task(plan: AggregatePlan, storage: StorageConfig) -> list[dict[str, slice]]:
    return prepare_aggregate(plan, resolve_storage_options(storage.options))


@task(
    name="aggregate-blocks",
    task_run_name="aggregate {plan.name} {period}",
    retries=1,
    retry_condition_fn=retry_transient,
    cache_policy=NO_CACHE,
)
def blocks_task(
    plan: AggregatePlan, regions: list[dict[str, slice]], storage: StorageConfig, period: str
) -> int:
    from distributed import default_client

    return run_blocks(plan, regions, resolve_storage_options(storage.options), client=default_client())


@task(name="aggregate-finalize", task_run_name="finalize {plan.name}", cache_policy=NO_CACHE)
def finalize_task(plan: AggregatePlan, storage: StorageConfig) -> str:
    return finalize_aggregate(plan, resolve_storage_options(storage.options))


@task(
    name="aggregate-catalog",
    task_run_name="catalog {store_url}",
    retries=1,
    retry_condition_fn=retry_transient,
    cache_policy=NO_CACHE,
)
def catalog_task(store_url: str, storage: StorageConfig) -> str:
    return add_to_output_catalog(
        output_catalog_url(storage.root), store_url, resolve_storage_options(storage.options)
    )


@flow(name="aggregate")
def aggregate_flow(
    member_store: str,
    config_path: str | None = None,
    overrides: list[str] | None = None,
    scheduler_address: str | None = None,
    config: ClimReconConfig | None = None,
) -> str:
    """Ensemble statistics of one downscaled member store; returns the output store URL.

    A complete output store is skipped (only its catalog rows are refreshed); an incomplete one is
    filled where blocks are missing. The store is listed in ``<storage.root>/catalogs/outputs.json``.
    """
    cfg = resolve_config(config, config_path, overrides or [])
    plan = plan_task(member_store, cfg.aggregate, cfg.storage)
    with dask_client(scheduler_address):
        pending = prepare_task(plan, cfg.storage)
        groups = [pending[i : i + BLOCKS_PER_TASK] for i in range(0, len(pending), BLOCKS_PER_TASK)]
        futures = [blocks_task.submit(plan, group, cfg.storage, plan.label(group)) for group in groups]
        for f in futures:
            f.result()
        url = finalize_task(plan, cfg.storage)
    catalog_task(url, cfg.storage)
    return url
