"""Wall time of the demo (`climrecon demo`: the whole reconstruction on the embedded defaults), split into
start-up, each stage, the work inside them, and the rest (orchestration and idle time).

    python benchmarks/demo.py [--out benchmarks/results/demo.json] [--set key=value ...]

Runs the ``reconstruct`` flow in this process exactly as the demo does (Prefect's local API, a Dask
LocalCluster, the shipped checkpoint), into a fresh temporary storage root so no stage is skipped, then
reads the run back through the Prefect API:

- ``startup_s``: from the call to the first stage subflow's start (the demo's temporary Prefect server on
  the user's Prefect database, ``prefect_server_start_s`` of it; parent flow run, sample-catalog check,
  checkpoint read, Dask cluster start);
- ``stages_s``: each stage subflow's wall time (start to end);
- ``work_s``: the wall time during which at least one task run (the parent's or a subflow's) was running,
  i.e. the union of their [start, end] intervals (task runs overlap: downscale units run in parallel, so
  their summed run time, ``task_run_time_sum_s``, can exceed the wall time);
- ``orchestration_fraction = 1 - work_s / total_s``: the wall time with no stage work running (Prefect and
  Dask start-up, flow bookkeeping, scheduling gaps, idle time), as a fraction of the total.
Goal (issue "Orchestration"): under 0.15.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import command_line, machine, versions, write_results  # noqa: E402

STAGES = ("ingest", "regrid", "downscale", "aggregate", "evaluate")


async def _runs(parent_id: Any) -> tuple[list[Any], list[Any]]:
    """The parent's subflow runs and the task runs of the parent and every subflow."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, FlowRunFilterParentFlowRunId

    async with get_client() as client:
        subflows = await client.read_flow_runs(
            flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[parent_id]))
        )
        ids = [parent_id, *(r.id for r in subflows)]
        tasks = await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=ids)))
        flows = {r.flow_id: (await client.read_flow(r.flow_id)).name for r in subflows}
    for r in subflows:
        r.__dict__["_flow_name"] = flows[r.flow_id]
    return list(subflows), [t for t in tasks if t.state_name != "Cached"]


def busy_seconds(intervals: list[tuple[datetime, datetime]]) -> float:
    """Length of the union of [start, end] intervals, in seconds."""
    total, end = 0.0, None
    for a, b in sorted(intervals):
        if end is None or a > end:
            total += (b - a).total_seconds()
            end = b
        elif b > end:
            total += (b - end).total_seconds()
            end = b
    return total


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="benchmarks/results/demo.json")
    ap.add_argument(
        "--set", dest="overrides", action="append", default=[], help="config override (as the CLI's)"
    )
    args = ap.parse_args(argv)

    import climrecon.flows  # noqa: F401 - offline Prefect defaults before Prefect is imported
    from climrecon.flows.reconstruct import reconstruct_flow

    root = tempfile.mkdtemp(prefix="climrecon-demo-bench-")
    overrides = [f"storage.root={root}", *args.overrides]  # the demo runs the embedded defaults
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import PREFECT_API_URL

    if PREFECT_API_URL.value():
        raise SystemExit("unset PREFECT_API_URL: the benchmark measures the demo's own temporary server")
    started_at = datetime.now().astimezone()
    t0 = time.perf_counter()
    # The demo's temporary Prefect server, exactly as the demo gets it: the process-wide server that
    # Prefect's ephemeral mode starts on the user's database (PREFECT_HOME). Started here (counted in
    # start-up) rather than by the flow's first API call, so the run can be read back before it stops.
    server = SubprocessASGIServer()
    server.start(timeout=180)
    server_s = time.perf_counter() - t0
    state = reconstruct_flow(overrides=overrides, return_state=True)
    total = time.perf_counter() - t0
    if not state.is_completed():
        raise SystemExit(f"the demo flow did not complete: {state}")
    subflows, tasks = asyncio.run(_runs(state.state_details.flow_run_id))
    # the server stops at exit, as the demo's does: after Prefect's log and event workers have flushed to it

    stage_s: dict[str, float] = {}
    first_start = None
    for r in subflows:
        name = r.__dict__["_flow_name"]
        stage_s[name] = stage_s.get(name, 0.0) + (r.end_time - r.start_time).total_seconds()
        first_start = r.start_time if first_start is None else min(first_start, r.start_time)
    # scoring against truth is a task of the parent flow, not a subflow
    stage_s["evaluate"] = sum(
        (t.end_time - t.start_time).total_seconds()
        for t in tasks
        if t.name.startswith("skill vs truth") and t.start_time and t.end_time
    )
    startup = (first_start - started_at).total_seconds() if first_start else float("nan")
    work = busy_seconds([(t.start_time, t.end_time) for t in tasks if t.start_time and t.end_time])
    results = {
        "command": command_line(),
        "machine": machine(),
        "versions": versions("prefect", "dask", "distributed", "xarray", "zarr", "torch"),
        "config": {
            "overrides": overrides,
            "what": "climrecon demo (reconstruct flow on the embedded defaults)",
        },
        "total_s": round(total, 2),
        "startup_s": round(startup, 2),
        "prefect_server_start_s": round(server_s, 2),
        "stages_s": {k: round(stage_s.get(k, 0.0), 2) for k in STAGES},
        "idle_s": round(total - startup - sum(stage_s.values()), 2),
        "work_s": round(work, 2),
        "task_run_time_sum_s": round(sum(t.total_run_time.total_seconds() for t in tasks), 2),
        "task_runs": len(tasks),
        "orchestration_fraction": round(1.0 - work / total, 4),
        "goal": "orchestration_fraction < 0.15",
    }
    print(write_results(args.out, results))
    print({k: v for k, v in results.items() if k not in ("machine", "versions")})


if __name__ == "__main__":
    main()
