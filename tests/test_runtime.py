"""Dask runtime (climrecon.flows.runtime): the environment worker processes start with."""

from __future__ import annotations

import os

import dask


def _environ() -> dict[str, str | None]:
    return {
        k: os.environ.get(k) for k in ("MALLOC_TRIM_THRESHOLD_", "OMP_NUM_THREADS", "CUDA_VISIBLE_DEVICES")
    }


def test_worker_spawn_environ_drops_only_the_malloc_trim_threshold():
    from climrecon.flows.runtime import SPAWN_ENVIRON_KEY, worker_spawn_environ

    dask_default = {"MALLOC_TRIM_THRESHOLD_": 65536, "OMP_NUM_THREADS": 1, "MKL_NUM_THREADS": 1}
    with dask.config.set({SPAWN_ENVIRON_KEY: dask_default}):  # Dask's default, whatever config is installed
        assert worker_spawn_environ() == {"OMP_NUM_THREADS": 1, "MKL_NUM_THREADS": 1}
        assert dask.config.get(SPAWN_ENVIRON_KEY) == dask_default  # the global config is untouched


def test_shipped_dask_config_unsets_the_malloc_trim_threshold():
    from pathlib import Path

    folder = Path(__file__).resolve().parents[1] / "deploy" / "dask" / "config"
    collected = dask.config.collect(paths=[str(folder)], env={})
    environ = collected["distributed"]["nanny"]["pre-spawn-environ"]
    assert environ == {"MALLOC_TRIM_THRESHOLD_": None}  # None: Dask's way to unset a default variable
    assert collected["distributed"]["worker"]["profile"]["enabled"] is False
    merged = dask.config.merge(
        {
            "distributed": {
                "nanny": {"pre-spawn-environ": {"MALLOC_TRIM_THRESHOLD_": 65536, "OMP_NUM_THREADS": 1}}
            }
        },
        collected,
    )
    from distributed.nanny import _get_env_variables

    with dask.config.set(merged):
        assert _get_env_variables("distributed.nanny.pre-spawn-environ") == {"OMP_NUM_THREADS": "1"}


def test_worker_processes_start_without_malloc_trim_threshold():
    from climrecon.flows.runtime import dask_client

    # a GPU pool of processes (first worker declares GPU=1 without a device) covers both cluster kinds' Nannies
    with dask_client(n_workers=2, fake_gpu=True) as client:
        seen = client.run(_environ)
        profiling = client.run(lambda dask_worker: "profile" in dask_worker.periodic_callbacks)
    assert len(seen) == 2 and not any(profiling.values())  # the installed config (deploy/install.sh) holds
    assert all(
        env["MALLOC_TRIM_THRESHOLD_"] is None and env["OMP_NUM_THREADS"] == "1" for env in seen.values()
    )
    assert sorted(env["CUDA_VISIBLE_DEVICES"] or "" for env in seen.values())[0] == ""  # the fake-GPU worker
