"""Prefect flow of the downscale stage: plan, template, one task per work unit on a Dask GPU pool, finalize.

Thin by design: every decision lives in :mod:`climrecon.tasks.downscale`, which runs the method the
``method:`` section names (any registered method). Each work unit (a block of
months x members) is one Prefect task named after it ("sample 1990-01..1990-12 m0-7", retried on
failure); inside it the unit's sampling is a Dask future pinned to GPU workers when the cluster has any
(``resources={"GPU": 1}``, :func:`climrecon.flows.runtime.sampling_resources`) and its region write a
future that may run on any worker. A progress artifact follows the units as they finish. Parameters
carry no secrets; storage options are resolved inside each task from the config and the environment.

GPU concurrency: within one cluster, the GPU workers (one per GPU, one thread each) bound it. Across
runs sharing a pool (several reconstructions, one GPU cluster), every unit task carries the tag
:data:`SAMPLING_TAG`, so a Prefect tag concurrency limit caps the units sampling at once, server-wide:
``prefect concurrency-limit create climrecon-sampling 4`` (no code change; units wait for a slot).
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.cache_policies import NO_CACHE
from prefect.futures import as_completed

from climrecon.config import ClimReconConfig, StorageConfig, resolve_config
from climrecon.flows.runtime import dask_client, retry_transient, sampling_resources
from climrecon.storage import resolve_storage_options
from climrecon.tasks.downscale import (
    DownscalePlan,
    UnitReport,
    WorkUnit,
    finalize_downscale,
    plan_downscale,
    prepare_downscale,
    submit_unit,
)

__all__ = ["SAMPLING_TAG", "UNIT_RETRIES", "default_inputs", "downscale_flow"]

UNIT_RETRIES = 2
SAMPLING_TAG = "climrecon-sampling"  # every unit task: the handle for a server-wide concurrency limit


def default_inputs(cfg: ClimReconConfig) -> dict[str, str | None]:
    """``{"fine", "static", "coarse"}`` store URLs: ``downscale.*`` when set, else the stores the regrid
    stage of the same config writes (planned, not run: nothing is written here)."""
    ds = cfg.downscale
    if ds.fine and ds.static:
        return {"fine": ds.fine, "static": ds.static, "coarse": ds.coarse}
    from climrecon.tasks.regrid_stage import default_sources, plan_regrid

    source, static = default_sources(cfg)
    plan = plan_regrid(cfg.regrid, source, cfg.storage, static)
    return {
        "fine": ds.fine or plan.fine_url,
        "static": ds.static or plan.static_url,
        "coarse": ds.coarse or plan.coarse_url,
    }


@task(name="downscale-plan", task_run_name="plan downscale of {fine_url}", cache_policy=NO_CACHE)
def plan_task(
    cfg: ClimReconConfig,
    fine_url: str,
    static_url: str,
    coarse_url: str | None,
    fit_coarse_url: str | None = None,
) -> DownscalePlan:
    return plan_downscale(
        cfg,
        fine_url,
        static_url,
        coarse_url,
        storage_options=resolve_storage_options(cfg.storage.options),
        fit_coarse_url=fit_coarse_url,
    )


@task(
    name="downscale-prepare",
    task_run_name="template for {plan.name}",
    retries=1,
    retry_condition_fn=retry_transient,
    cache_policy=NO_CACHE,
)
def prepare_task(plan: DownscalePlan, storage: StorageConfig) -> list[WorkUnit]:
    return prepare_downscale(plan, resolve_storage_options(storage.options))


@task(
    name="downscale-unit",
    task_run_name="sample {unit.label}",
    retries=UNIT_RETRIES,
    retry_condition_fn=retry_transient,
    cache_policy=NO_CACHE,
    tags=[SAMPLING_TAG],
)
def unit_task(
    plan: DownscalePlan, unit: WorkUnit, storage: StorageConfig, resources: dict[str, float] | None
) -> UnitReport:
    """Sample one unit (pinned by ``resources``) and write its region; a retry starts the unit afresh."""
    from distributed import default_client

    return submit_unit(
        default_client(), plan, unit, resolve_storage_options(storage.options), resources
    ).result()


@task(name="downscale-finalize", task_run_name="finalize {plan.name}", cache_policy=NO_CACHE)
def finalize_task(plan: DownscalePlan, storage: StorageConfig, reports: list[UnitReport]) -> str:
    return finalize_downscale(plan, resolve_storage_options(storage.options), reports)


@flow(name="downscale")
def downscale_flow(
    config_path: str | None = None,
    overrides: list[str] | None = None,
    fine_url: str | None = None,
    static_url: str | None = None,
    coarse_url: str | None = None,
    fit_coarse_url: str | None = None,
    scheduler_address: str | None = None,
    n_workers: int | None = None,
    gpu_workers: int | None = None,
    config: ClimReconConfig | None = None,
) -> str:
    """Downscale one regridded store into the member store; returns its URL.

    Inputs: the arguments, else ``downscale.fine/static/coarse``, else the regrid output of the same
    config; ``fit_coarse_url`` (else ``downscale.fit_coarse``): the coarse store a bias correction is fitted
    on. Workers: the cluster at ``scheduler_address``, else a local one with one GPU worker per CUDA
    device (``gpu_workers``, default: all) plus ``n_workers`` CPU workers, or ``n_workers`` CPU workers
    when there is no GPU. A complete store is skipped; an incomplete one is filled where units are missing.
    """
    cfg = resolve_config(config, config_path, overrides or [])
    urls: dict[str, Any] = {"fine": fine_url, "static": static_url, "coarse": coarse_url}
    if not (fine_url and static_url):
        urls = {k: urls[k] or v for k, v in default_inputs(cfg).items()}
    elif urls["coarse"] is None:  # stores given as arguments: the coarse one may still come from the config
        urls["coarse"] = cfg.downscale.coarse
    plan = plan_task(cfg, urls["fine"], urls["static"], urls["coarse"], fit_coarse_url)
    with dask_client(scheduler_address, n_workers, gpu_workers=gpu_workers) as client:
        resources = sampling_resources(client)
        pending = prepare_task(plan, cfg.storage)
        total = len(plan.units())
        finished = total - len(pending)
        artifact = create_progress_artifact(
            progress=100.0 * finished / total,
            description=f"downscale {plan.name}: {finished}/{total} units ({len(pending)} to sample) -> {plan.out_url}",
        )
        futures = [unit_task.submit(plan, unit, cfg.storage, resources) for unit in pending]
        reports, failures = [], []
        for future in as_completed(futures):  # let every unit finish (and keep its marker) before failing
            try:
                reports.append(future.result())
            except Exception as exc:  # noqa: BLE001 - re-raised below, after the other units
                failures.append(exc)
                continue
            if reports[-1].note:  # e.g. a concurrent run of the same store wrote this unit
                get_run_logger().warning("%s: %s", reports[-1].label, reports[-1].note)
            finished += 1
            update_progress_artifact(artifact, progress=100.0 * finished / total)
        if failures:
            raise failures[0]
        return finalize_task(plan, cfg.storage, reports)
