"""The whole reconstruction as one Prefect flow: ingest -> regrid -> downscale -> aggregate (-> evaluate).

Each stage runs as a subflow (its own flow run in the UI) and hands the next one store URLs, never
datasets. Completed stages are skipped by their content keys (each stage checks its output store's
complete marker), so re-running a reconstruction only does what is missing. One Dask cluster serves
every stage; sampling tasks are pinned to its GPU workers, whose number bounds the GPU concurrency.

Artifacts for the run: a table of every input and output store, a markdown summary with how to open
the results, and PNG maps of the ensemble mean and spread of the first month. When fine truth is
available (``evaluate.truth`` / ``evaluate.truth_query``, or the sample catalog's synthetic reanalysis
for a run on the sample catalog) and shares months with the run, each result is scored against it
(:mod:`climrecon.tasks.added_value`: climatology of the ensemble mean vs the interpolated input, large
and fine scales) and the skill tables become artifacts (``reconstruct-skill``) and files under
``<storage.root>/evaluate/``.
"""

from __future__ import annotations

import base64
import tempfile
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from climrecon.config import ClimReconConfig, resolve_config
from climrecon.flows.aggregate import aggregate_flow
from climrecon.flows.downscale import downscale_flow
from climrecon.flows.ingest import ingest_flow
from climrecon.flows.regrid import regrid_flow
from climrecon.flows.runtime import dask_client
from climrecon.storage import resolve_storage_options
from climrecon.tasks.downscale import historical_fit_stores, store_identity

__all__ = ["reconstruct_flow", "model_grid_overrides", "STAGE_OPTIONS"]

# Time-outs per stage. Retries live on the tasks inside each stage (one block or work unit at a time, and
# only for transient errors: flows.runtime.retry_transient); a stage is never re-run whole, so a
# deterministic input error fails once, at once.
STAGE_OPTIONS: dict[str, dict[str, Any]] = {
    "ingest": {"timeout_seconds": 3600},
    "regrid": {"timeout_seconds": 3 * 3600},
    "downscale": {"timeout_seconds": 48 * 3600},
    "aggregate": {"timeout_seconds": 6 * 3600},
    "evaluate": {"timeout_seconds": 3600},
}


def model_grid_overrides(cfg: ClimReconConfig) -> list[str]:
    """Overrides that put the regrid stage on the grids the method was trained for (fine resolution, coarse
    = factor x fine), when it records them (a trained checkpoint); none for a method that serves any grid.

    The downscale stage refuses conditioning that was not made on the model's coarse grid; a
    reconstruction derives it from the method instead of asking the user to keep them in step.
    """
    from climrecon.methods import build

    grid = build(cfg.method, cfg.sampler).describe().get("grid") or {}
    fine, factor = grid.get("fine_resolution"), grid.get("coarsening_factor")
    if not (fine and factor):
        return []
    return [f"regrid.resolution={fine}", f"regrid.coarse_resolution={fine * factor}"]


@task(name="sample-catalog", task_run_name="sample catalog (build if missing)", cache_policy=NO_CACHE)
def ensure_sample_catalog(cfg: ClimReconConfig) -> str:
    """Build the offline sample catalog when the run uses it (a re-run only checks it, in well under a second)."""
    from climrecon.catalogs.sample import build_sample_catalog

    return str(
        build_sample_catalog(
            cfg.sample_dir(), Path(cfg.data_home), include_synthetic=cfg.sample.synthetic, progress=False
        )
    )


@task(
    name="evaluate-reconstruction",
    task_run_name="skill vs truth: {aggregate_url}",
    cache_policy=NO_CACHE,
    **STAGE_OPTIONS["evaluate"],
)
def evaluate_reconstruction(aggregate_url: str, fine_url: str, cfg: ClimReconConfig) -> dict[str, Any] | None:
    """Score one result against the truth (:func:`climrecon.tasks.added_value.score_reconstruction`); its
    tables and map become artifacts. None when there is nothing to score it against (logged)."""
    from climrecon.storage import resolve_storage_options
    from climrecon.tasks.added_value import score_reconstruction

    logger = get_run_logger()
    scored = score_reconstruction(
        aggregate_url, fine_url, cfg, resolve_storage_options(cfg.storage.options), log=logger.info
    )
    if scored is None:
        return None
    caption = "fine scale of the time mean: truth, downscaled, interpolated"
    create_markdown_artifact(
        f"{scored['markdown']}\n![{caption}](data:image/png;base64,{scored.pop('png_base64')})\n",
        key="reconstruct-skill",
        description="Reconstruction vs fine truth",
    )
    create_table_artifact(
        scored["records"], key="reconstruct-skill-records", description="Every variable x method x scale"
    )
    return scored


@task(name="report", task_run_name="report artifacts", cache_policy=NO_CACHE)
def report(outputs: dict[str, Any], cfg: ClimReconConfig) -> None:
    """Artifacts: the run's stores, a summary with how to open them, maps of ensemble mean and spread."""
    rows = [
        {"stage": stage, "store": url}
        for stage in ("ingest", "regrid", "downscale", "aggregate")
        for url in outputs.get(stage, [])
    ]
    create_table_artifact(rows, key="reconstruct-stores", description="Stores written or reused by this run")
    lines = [
        "# ClimRecon reconstruction",
        "",
        f"Output catalog: `{outputs['catalog']}`",
        "",
        "Open a result with plain xarray (add `storage_options=` for s3:// stores):",
        "",
        "```python",
        "import xarray as xr",
        *[f'ds = xr.open_zarr("{url}")' for url in outputs.get("aggregate", [])],
        "```",
    ]
    from climrecon.storage import resolve_storage_options
    from climrecon.tasks.plots import ensemble_maps, point_series

    options = resolve_storage_options(cfg.storage.options)
    for url in outputs.get("aggregate", []):
        with tempfile.TemporaryDirectory(prefix="climrecon-maps-") as tmp:
            for caption, png in (
                ("ensemble mean and spread", ensemble_maps(url, Path(tmp), storage_options=options)),
                ("a point's time series", point_series(url, Path(tmp), storage_options=options)),
            ):
                if png is not None:
                    encoded = base64.b64encode(png.read_bytes()).decode()
                    lines += ["", f"![{caption}](data:image/png;base64,{encoded})"]
    for scored in outputs.get("evaluate", []):
        lines += [
            "",
            scored["markdown"].replace("# Reconstruction vs truth", "## Skill against fine truth", 1),
        ]
    create_markdown_artifact("\n".join(lines), key="reconstruct-summary", description="Where the outputs are")


@flow(name="reconstruct")
def reconstruct_flow(
    config_path: str | None = None,
    overrides: list[str] | None = None,
    scheduler_address: str | None = None,
    evaluate: bool = True,
    config: ClimReconConfig | None = None,
) -> dict[str, Any]:
    """Run every stage on the config; returns ``{"ingest": [...], "regrid": [...], "downscale": [...],
    "aggregate": [...], "evaluate": [...], "catalog": url}`` (store URLs; per scored result its records,
    Markdown table and files, see :func:`evaluate_reconstruction`).
    ``evaluate=False`` skips scoring against truth."""
    logger = get_run_logger()
    cfg = resolve_config(config, config_path, list(overrides or []))
    if cfg.ingest.catalog is None:
        ensure_sample_catalog(cfg)
    cfg = cfg.with_overrides(
        model_grid_overrides(cfg)
    )  # every stage gets this validated config, no raw strings
    outputs: dict[str, Any] = {"ingest": [], "regrid": [], "downscale": [], "aggregate": [], "evaluate": []}
    with dask_client(scheduler_address, gpu_workers=None) as client:
        address = client.scheduler.address
        logger.info("Dask scheduler %s (dashboard %s)", address, client.dashboard_link)
        ingested = ingest_flow.with_options(**STAGE_OPTIONS["ingest"])(scheduler_address=address, config=cfg)
        outputs["ingest"] = ingested
        regridded = []
        for source in ingested:
            stores = regrid_flow.with_options(**STAGE_OPTIONS["regrid"])(
                source_url=source, scheduler_address=address, config=cfg
            )
            outputs["regrid"] += [stores["coarse"], stores["fine"], stores["static"]]
            regridded.append(stores)
        # a scenario's bias correction is fitted on the same model's historical run when the query has one
        options = resolve_storage_options(cfg.storage.options)
        fit_on = historical_fit_stores({s["coarse"]: store_identity(s["fine"], options) for s in regridded})
        for stores in regridded:
            members = downscale_flow.with_options(**STAGE_OPTIONS["downscale"])(
                fine_url=stores["fine"],
                static_url=stores["static"],
                coarse_url=stores["coarse"],
                fit_coarse_url=fit_on.get(stores["coarse"]),
                scheduler_address=address,
                config=cfg,
            )
            outputs["downscale"].append(members)
            outputs["aggregate"].append(
                aggregate_flow.with_options(**STAGE_OPTIONS["aggregate"])(
                    members, scheduler_address=address, config=cfg
                )
            )
            if evaluate:
                scored = evaluate_reconstruction(outputs["aggregate"][-1], stores["fine"], cfg)
                if scored is not None:
                    outputs["evaluate"].append(scored)
    from climrecon.catalogs.output_catalog import output_catalog_url

    outputs["catalog"] = output_catalog_url(cfg.storage.root)
    report(outputs, cfg)
    return outputs
