"""The Prefect ``evaluate`` flow writes the tables, records and figures and publishes them as artifacts."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import yaml
from test_evaluate import EVALUATE, SAMPLER, write_tiny_checkpoint
from test_training_data import write_tiny_stores


async def _artifacts(flow_run_id):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    async with get_client() as client:
        return await client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )


def test_evaluate_flow_writes_files_and_publishes_artifacts(prefect_harness, tmp_path):
    from climrecon.flows.evaluate import evaluate_flow

    truth, static = write_tiny_stores(tmp_path)
    checkpoint = write_tiny_checkpoint(tmp_path / "tiny.pt", truth, static)
    config = tmp_path / "evaluate.yaml"
    section = {
        **EVALUATE,
        "truth": truth,
        "static": static,
        "methods": ["bilinear", {"name": "dpdm", "checkpoint": checkpoint}],
        "factors": [4],
    }
    sampler = SAMPLER.model_dump(mode="json")
    config.write_text(
        yaml.safe_dump({"storage": {"root": str(tmp_path / "out")}, "evaluate": section, "sampler": sampler})
    )

    state = evaluate_flow(
        config_path=str(config), overrides=["evaluate.ensemble_sizes=[2]"], return_state=True
    )
    assert state.is_completed()
    out = state.result()
    assert out["output"] == str(tmp_path / "out" / "evaluate") and out["records"] == 3 + 3
    doc = json.loads(Path(out["json"]).read_text())
    assert {(r["method"], r["members"]) for r in doc["records"]} == {("bilinear", 1), ("dpdm", 2)}
    assert doc["config"]["ensemble_sizes"] == [2] and doc["source"]["synthetic"] is True
    assert len(out["figures"]) == 9 and all(p.endswith(".png") for p in out["figures"])
    markdown = Path(out["markdown"]).read_text()
    assert "## (a) MAE / RMSE by coarsening factor" in markdown and "| dpdm (N=2) |" in markdown

    artifacts = {a.key: a for a in asyncio.run(_artifacts(state.state_details.flow_run_id))}
    assert {"evaluation-tables", "evaluation-records", "evaluation-figures"} <= set(artifacts)
    assert (
        artifacts["evaluation-tables"].type == "markdown" and artifacts["evaluation-tables"].data == markdown
    )
    table = artifacts["evaluation-records"].data
    rows = json.loads(table) if isinstance(table, str) else table
    assert len(rows) == 6 and {r["variable"] for r in rows} == {"tas", "uas", "vas"}
    figures = artifacts["evaluation-figures"].data
    assert figures.count("](data:image/png;base64,") == 9 and "rank_histogram_tas_x4" in figures
