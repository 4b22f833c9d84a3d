"""Prefect flow ``evaluate``: the perfect-model evaluation, its tables and figures as files and artifacts.

Thin by design: the protocol is :func:`climrecon.tasks.evaluate.run_evaluation`, the writers live beside it.
The evaluation is one task: in this process, or (``scheduler_address``) as one Dask task on that cluster,
pinned to a GPU worker when the cluster declares one. The report task writes ``evaluation.csv``,
``evaluation.json``, ``evaluation.md`` and the PNGs into ``evaluate.output`` (default
``<storage.root>/evaluate``) and publishes them as artifacts: the Markdown tables
(``evaluation-tables``), every record as a table (``evaluation-records``) and the figures embedded as
base64 ``data:`` images (``evaluation-figures``).
"""

from __future__ import annotations

import base64
import math
import uuid
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from climrecon.config import ClimReconConfig, resolve_config
from climrecon.storage import for_workers, resolve_storage_options
from climrecon.tasks.evaluate import (
    EvaluationResult,
    markdown_report,
    output_directory,
    run_evaluation,
    write_figures,
    write_json,
    write_records_csv,
)

__all__ = ["evaluate_flow", "figures_markdown"]


@task(name="evaluate-run", task_run_name="perfect-model evaluation", cache_policy=NO_CACHE)
def evaluate_task(cfg: ClimReconConfig, scheduler_address: str | None) -> EvaluationResult:
    options = resolve_storage_options(cfg.storage.options)
    if not scheduler_address:
        return run_evaluation(cfg, storage_options=options, log=get_run_logger().info)
    from climrecon.flows.runtime import dask_client, sampling_resources

    with dask_client(scheduler_address) as client:
        future = client.submit(
            run_evaluation,
            cfg,
            storage_options=for_workers(options),  # secrets stay in the environment (the worker's own)
            resources=sampling_resources(client),
            pure=False,
            key=f"evaluate-{uuid.uuid4().hex[:12]}",
        )
        return future.result()


def figures_markdown(paths: list[Path], title: str = "Evaluation figures") -> str:
    """Markdown embedding each PNG as a base64 ``data:image/png`` URI (artifacts cannot link local files)."""
    lines = [f"# {title}", ""]
    for p in paths:
        data = base64.b64encode(Path(p).read_bytes()).decode("ascii")
        lines += [f"**{Path(p).stem}**", "", f"![{Path(p).stem}](data:image/png;base64,{data})", ""]
    return "\n".join(lines)


@task(name="evaluate-report", task_run_name="tables, figures and artifacts", cache_policy=NO_CACHE)
def report_task(result: EvaluationResult, directory: Path) -> dict[str, Any]:
    directory.mkdir(parents=True, exist_ok=True)
    markdown = markdown_report(result)
    (directory / "evaluation.md").write_text(markdown)
    csv = write_records_csv(result, directory / "evaluation.csv")
    doc = write_json(result, directory / "evaluation.json")
    figures = write_figures(result, directory / "figures")
    create_markdown_artifact(markdown, key="evaluation-tables", description="Perfect-model skill tables")
    rows = [
        {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in r.items()}
        for r in result.records
    ]
    create_table_artifact(
        rows, key="evaluation-records", description="Every method x factor x variable x members"
    )
    create_markdown_artifact(
        figures_markdown(figures),
        key="evaluation-figures",
        description=f"Maps, power spectra and rank histograms at x{result.figure_factor}",
    )
    return {
        "output": str(directory),
        "markdown": str(directory / "evaluation.md"),
        "csv": str(csv),
        "json": str(doc),
        "figures": [str(p) for p in figures],
        "records": len(result.records),
    }


@flow(name="evaluate")
def evaluate_flow(
    config_path: str | None = None,
    overrides: list[str] | None = None,
    scheduler_address: str | None = None,
    config: ClimReconConfig | None = None,
) -> dict[str, Any]:
    """Run the ``evaluate`` section's perfect-model evaluation; returns where its tables and figures are."""
    cfg = resolve_config(config, config_path, list(overrides or ()))
    directory = output_directory(cfg)
    result = evaluate_task(cfg, scheduler_address)
    return report_task(result, directory)
