"""Provenance: hardware facts, Prefect run context, lineage records, W3C PROV-JSON, secrets redacted."""

from __future__ import annotations

import json

from climrecon.provenance import (
    code_version,
    hardware,
    history_line,
    prefect_run_context,
    prov_document,
    prov_summary,
    stage_attrs,
    stage_record,
    write_prov_document,
)

SECRET = "planted-secret-0123456789"
KEYS = {"ingest": "1111aaaa2222bbbb", "regrid": "3333cccc4444dddd", "downscale": "5555eeee6666ffff"}


def _chain() -> dict:
    """A lineage as different stages might record it: catalog rows, stores, a checkpoint, flow runs."""
    ingest = {
        "stage": "ingest",
        "store": "s3://b/ingest/x.zarr",
        "content_key": KEYS["ingest"],
        "catalog": "s3://b/catalogs/pangeo-cmip6.json",
        "rows": [
            {"source_id": "MPI-ESM-LR", "variable_id": "tas", "zstore": "s3://cmip6/tas/"},
            {"source_id": "MPI-ESM-LR", "variable_id": "uas", "path": "/data/uas.nc"},
        ],
        "config": {"storage": {"options": {"endpoint_url": "http://x", "secret": SECRET}}},
        "started": "2026-11-20T10:00:00+00:00",
        "ended": "2026-11-20T10:01:00+00:00",
    }
    regrid = {
        "stage": "regrid",
        "store": "s3://b/regrid/x.zarr",
        "content_key": KEYS["regrid"],
        "upstream": ingest,
        "prefect": {"flow_run_id": "run-regrid", "flow_run_name": "quiet-owl"},
        "started": "2026-11-20T10:02:00+00:00",
    }
    return {
        "stage": "downscale",
        "content_key": KEYS["downscale"],
        "url": "s3://b/downscale/x.zarr",
        "upstream_stores": [{"url": "s3://b/regrid/x.zarr", "content_key": KEYS["regrid"], "record": regrid}],
        "checkpoint": {"hash": "abcdef0123456789abcdef", "training_config": {"lr": 1e-4}},
        "seeds": {"base": 7},
        "storage_options": {"key": "AKIAEXAMPLE", "token": SECRET},
        "flow_run_id": "run-downscale",
        "worker": {"gpu": "H100"},
        "start_time": "2026-11-20T11:00:00+00:00",
    }


def test_hardware_and_prefect_context_outside_prefect():
    hw = hardware()
    assert hw["cpu_count"] >= 1 and hw["memory_bytes"] > 2**28 and hw["cpu_model"]
    assert hw["gpu_count"] == len(hw["gpu_names"])
    assert prefect_run_context() is None or "flow_run_id" in prefect_run_context()


def test_prefect_run_context_inside_a_flow_and_task(prefect_harness):
    from prefect import flow, task

    @task
    def inner():
        return prefect_run_context()

    @flow(name="provenance-context")
    def outer():
        return prefect_run_context(), inner()

    flow_ctx, task_ctx = outer()
    assert flow_ctx["flow_name"] == "provenance-context" and flow_ctx["flow_run_name"]
    assert task_ctx["flow_run_id"] == flow_ctx["flow_run_id"] and task_ctx["task_run_id"]


def test_stage_attrs_and_history_unchanged():
    attrs = stage_attrs(
        "regrid", {"a": 1, "options": {"secret": SECRET}}, "k1", "old line", source="s3://b/x"
    )
    assert attrs["history"].startswith("old line\n") and attrs["history"].endswith("regrid: key k1")
    assert json.loads(attrs["climrecon_regrid_config"]) == {"a": 1, "options": {"secret": "***"}}
    assert attrs["climrecon_source"] == "s3://b/x" and attrs["climrecon_code_version"] == code_version()
    assert history_line("x", "y").split(" ", 1)[1].startswith("climrecon ")


def test_prov_document_covers_the_whole_chain_and_leaks_no_secret(tmp_path):
    record = stage_record(
        "aggregate",
        store="s3://b/aggregate/x.zarr",
        key="7777aaaa8888bbbb",
        config={"quantiles": [0.5], "options": {"password": SECRET}},
        started="2026-11-20T12:00:00+00:00",
        inputs=[{"store": "s3://b/downscale/x.zarr", "content_key": KEYS["downscale"]}],
        upstream=_chain(),
    )
    assert record["hardware"] == hardware() and record["code_version"] == code_version()
    assert record["upstream"]["storage_options"] == {"key": "***", "token": "***"}
    doc = prov_document(record)
    ents, acts = doc["entity"], doc["activity"]
    for stage, key in [*KEYS.items(), ("aggregate", "7777aaaa8888bbbb")]:
        assert f"climrecon:store/{key}" in ents and f"climrecon:{stage}/{key}" in acts
    assert ents[f"climrecon:store/{KEYS['regrid']}"]["prov:location"] == "s3://b/regrid/x.zarr"
    locations = {e.get("prov:location") for e in ents.values()}
    assert {"s3://cmip6/tas/", "/data/uas.nc", "s3://b/catalogs/pangeo-cmip6.json"} <= locations
    assert any(
        e.get("prov:type") == "climrecon:checkpoint" and e["climrecon:hash"].startswith("abcdef")
        for e in ents.values()
    )
    assert acts["climrecon:ingest/" + KEYS["ingest"]]["prov:endTime"] == "2026-11-20T10:01:00+00:00"
    assert acts["climrecon:downscale/" + KEYS["downscale"]]["prov:startTime"] == "2026-11-20T11:00:00+00:00"
    assert len(acts["climrecon:aggregate/7777aaaa8888bbbb"]["climrecon:config_hash"]) == 16
    agents = doc["agent"]
    assert {"climrecon:prefect-flow-run/run-regrid", "climrecon:prefect-flow-run/run-downscale"} <= set(
        agents
    )
    assoc = list(doc["wasAssociatedWith"].values())
    assert {
        "prov:activity": "climrecon:regrid/" + KEYS["regrid"],
        "prov:agent": "climrecon:prefect-flow-run/run-regrid",
    } in assoc
    # a flow run is associated only with the stage that recorded it
    assert {
        "prov:activity": "climrecon:downscale/" + KEYS["downscale"],
        "prov:agent": "climrecon:prefect-flow-run/run-regrid",
    } not in assoc
    derived = list(doc["wasDerivedFrom"].values())
    for new, old in (
        ("7777aaaa8888bbbb", KEYS["downscale"]),
        (KEYS["downscale"], KEYS["regrid"]),
        (KEYS["regrid"], KEYS["ingest"]),
    ):
        assert {
            "prov:generatedEntity": f"climrecon:store/{new}",
            "prov:usedEntity": f"climrecon:store/{old}",
        } in derived
    assert {
        "prov:entity": f"climrecon:store/{KEYS['ingest']}",
        "prov:activity": f"climrecon:ingest/{KEYS['ingest']}",
    } in doc["wasGeneratedBy"].values()
    summary = prov_summary(doc)
    assert summary["climrecon_lineage"].split(" -> ")[0] == f"ingest/{KEYS['ingest']}"
    assert summary["climrecon_lineage"].endswith("aggregate/7777aaaa8888bbbb")
    assert json.loads(summary["climrecon_prefect_flow_runs"]) == ["run-downscale", "run-regrid"]
    url = write_prov_document(str(tmp_path / "s.zarr"), doc)
    text = (tmp_path / "s.zarr" / "provenance.json").read_text()
    assert url.endswith("s.zarr/provenance.json") and json.loads(text) == doc
    for blob in (json.dumps(record), json.dumps(doc), json.dumps(summary), text):
        assert SECRET not in blob and "AKIAEXAMPLE" not in blob
