"""The `downscale` Prefect flow on a Dask pool with a (declared) GPU worker: task names, retries, progress
artifact, failure then resume to the same bytes as an uninterrupted in-process run."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from test_downscale import FAST, SAMPLER, assert_same_bytes, config, write_checkpoint, write_inputs

from climrecon.stores import StageStore
from climrecon.tasks.downscale import plan_downscale, run_downscale

UNIT = {**FAST, "months_per_unit": 6, "members_per_unit": 2}


def _overrides(root: Path, checkpoint: str) -> list[str]:
    return [
        f"storage.root={root}",
        f"method.checkpoint={checkpoint}",
        "method.bias_correction=false",  # the toy GCM has no truth to fit one on (test_bias_correction.py)
        *(f"downscale.{k}={v}" for k, v in UNIT.items()),
        *(f"sampler.{k}={v}" for k, v in SAMPLER.items()),
    ]


async def _task_runs(flow_run_id):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    async with get_client() as client:
        runs = await client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
        )
        artifacts = await client.read_artifacts()
    return runs, artifacts


def test_flow_retries_failed_units_reports_progress_and_resumes(prefect_harness, tmp_path):

    from climrecon.flows.downscale import UNIT_RETRIES, downscale_flow
    from climrecon.flows.runtime import dask_client

    inputs = {**write_inputs(tmp_path / "in"), "checkpoint": write_checkpoint(tmp_path / "tiny.pt")}
    ref = plan_downscale(
        config(tmp_path / "ref", inputs["checkpoint"], **UNIT), inputs["fine"], inputs["static"], None
    )
    ref_url, _ = run_downscale(ref)
    args = {
        "overrides": _overrides(tmp_path / "out", inputs["checkpoint"]),
        "fine_url": inputs["fine"],
        "static_url": inputs["static"],
        "coarse_url": inputs["coarse"],
    }

    chunk = Path(inputs["fine"]) / "uas" / "c" / "3" / "0" / "0"  # months 18..23 of uas
    good = chunk.read_bytes()
    with dask_client(n_workers=2, fake_gpu=True, processes=False) as client:  # an existing scheduler
        address = client.scheduler.address
        chunk.write_bytes(b"corrupt")
        try:
            state = downscale_flow(**args, scheduler_address=address, return_state=True)
        finally:
            chunk.write_bytes(good)
        assert state.is_failed()
        runs, artifacts = asyncio.run(_task_runs(state.state_details.flow_run_id))
        by_name = {r.name: r for r in runs}
        failed = by_name["sample 1991-07..1991-12 m0-1"]
        assert failed.state.is_failed() and failed.run_count == UNIT_RETRIES + 1  # retried, then failed
        assert by_name["sample 1990-01..1990-06 m2-3"].state.is_completed()
        assert any(a.type == "progress" for a in artifacts)
        out_url = ref.out_url.replace(str(tmp_path / "ref"), str(tmp_path / "out"))
        store = StageStore(out_url, ref.out_key)
        assert not store.is_complete() and len(store.done_blocks()) == 6  # 6 of 8 units, no partial one

        state = downscale_flow(**args, scheduler_address=address, return_state=True)
        assert state.is_completed() and state.result() == out_url
        runs, artifacts = asyncio.run(_task_runs(state.state_details.flow_run_id))
        assert sorted(r.name for r in runs if r.name.startswith("sample")) == [
            "sample 1991-07..1991-12 m0-1",
            "sample 1991-07..1991-12 m2-3",
        ]  # only the missing units
        progress = [
            a for a in artifacts if a.type == "progress" and a.flow_run_id == state.state_details.flow_run_id
        ]
        assert progress and float(progress[0].data) == pytest.approx(100.0)
    assert store.is_complete()
    assert_same_bytes(ref_url, out_url)


async def _set_tag_limit(tag: str, limit: int | None) -> None:
    from prefect.client.orchestration import get_client

    async with get_client() as client:
        if limit is None:
            await client.delete_concurrency_limit_by_tag(tag)
        else:
            await client.create_concurrency_limit(tag=tag, concurrency_limit=limit)


def test_a_tag_concurrency_limit_caps_units_sampling_at_once(prefect_harness, tmp_path):
    """Two GPU workers, but a server-wide limit of 1 on the sampling tag: the units run one at a time."""
    from climrecon.flows.downscale import SAMPLING_TAG, downscale_flow
    from climrecon.flows.runtime import dask_client

    inputs = {**write_inputs(tmp_path / "in"), "checkpoint": write_checkpoint(tmp_path / "tiny.pt")}
    args = {
        "overrides": [*_overrides(tmp_path / "out", inputs["checkpoint"]), "downscale.months_per_unit=12"],
        "fine_url": inputs["fine"],
        "static_url": inputs["static"],
        "coarse_url": inputs["coarse"],
    }
    asyncio.run(_set_tag_limit(SAMPLING_TAG, 1))
    # Prefect's client remembers "no limit on these tags" for 5 s (prefect.concurrency.services): a limit
    # created right after units ran in this process applies once that has expired
    time.sleep(5.5)
    try:
        with dask_client(n_workers=2, processes=False) as client:
            state = downscale_flow(**args, scheduler_address=client.scheduler.address, return_state=True)
    finally:
        asyncio.run(_set_tag_limit(SAMPLING_TAG, None))
    assert state.is_completed()
    runs, _ = asyncio.run(_task_runs(state.state_details.flow_run_id))
    units = sorted((r for r in runs if r.name.startswith("sample")), key=lambda r: r.start_time)
    assert len(units) == 4 and all(SAMPLING_TAG in r.tags for r in units)
    for before, after in zip(units, units[1:], strict=False):
        assert after.start_time >= before.end_time  # never two units sampling at once
