"""The regrid flow under Prefect's test API: on a scheduler started here, and on the embedded default
(a LocalCluster of its own); one readably named Prefect task per step and per block group."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import xarray as xr
from distributed import LocalCluster
from test_regrid_stage import MPI_TAS, TIME, analytic_static, write_stage_store

from climrecon.flows.regrid import regrid_flow
from climrecon.stores import StageStore
from climrecon.tasks.standardize import standardize


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, str]:
    if not MPI_TAS.is_file():
        pytest.skip(f"{MPI_TAS} not installed (run deploy/install.sh)")
    root = tmp_path_factory.mktemp("flow-inputs")
    with xr.open_dataset(MPI_TAS, decode_times=False) as raw:
        tas = standardize(raw.load(), source=str(MPI_TAS), frequency="mon")
    key = "0123456789abcdef"
    source = write_stage_store(tas, str(root / f"MPI-ESM-LR.historical.r1i1p1.Amon.{key}.zarr"), key=key)
    static = write_stage_store(analytic_static(), str(root / "static-5arcmin.zarr"))
    return {"source": source, "static": static}


def _task_names(flow_run_id) -> list[str]:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return sorted(r.name for r in client.read_task_runs() if r.flow_run_id == flow_run_id)


def test_flow_on_an_existing_scheduler(prefect_harness, inputs, tmp_path):
    config = tmp_path / "regrid.yaml"
    config.write_text(
        f"storage:\n  root: {tmp_path / 'out'}\nregrid:\n  static: {inputs['static']}\n  time_chunk: 1\n"
    )
    with LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None, silence_logs=logging.ERROR
    ) as cluster:
        state = regrid_flow(
            str(config),
            source_url=inputs["source"],
            scheduler_address=cluster.scheduler_address,
            return_state=True,
        )
        urls = state.result()
        assert set(urls) == {"coarse", "fine", "static"}
        for url in urls.values():
            ds = xr.open_zarr(url, decode_times=TIME)
            assert ds.attrs["climrecon_status"] == "complete"
            assert StageStore(url, ds.attrs["climrecon_key"]).is_complete()
        name = "MPI-ESM-LR.historical.r1i1p1.Amon"
        assert _task_names(state.state_details.flow_run_id) == sorted(
            [
                f"finalize {name}",
                f"plan regrid of {inputs['source']}",
                f"regrid {name} 2005-01..2005-10",
                f"regrid {name} 2005-11..2005-12",
                f"static fields and templates for {name}",
            ]
        )
        fine = xr.open_zarr(urls["fine"], decode_times=TIME)
        assert fine.tas.shape == (12, 80, 80) and fine.tas.encoding["chunks"] == (1, 80, 80)
        # a second run finds every store complete: no block task at all, same URLs
        again = regrid_flow(
            str(config),
            source_url=inputs["source"],
            scheduler_address=cluster.scheduler_address,
            return_state=True,
        )
        assert again.result() == urls
        assert not [n for n in _task_names(again.state_details.flow_run_id) if n.startswith("regrid ")]


def test_flow_on_the_embedded_local_cluster(prefect_harness, inputs, tmp_path):
    overrides = [
        f"storage.root={tmp_path / 'out'}",
        f"regrid.source={inputs['source']}",
        f"regrid.static={inputs['static']}",
        "regrid.fine_method=conservative",
    ]
    urls = regrid_flow(overrides=overrides)
    coarse = xr.open_zarr(urls["coarse"], decode_times=TIME).tas.values
    fine = xr.open_zarr(urls["fine"], decode_times=TIME).tas.values
    assert coarse.shape == (12, 4, 4) and fine.shape == (12, 80, 80)
    # conservative to a grid nested in the coarse cells: each fine cell carries its coarse cell's value
    np.testing.assert_array_equal(fine, np.repeat(np.repeat(coarse, 20, axis=1), 20, axis=2))
