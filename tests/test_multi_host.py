"""A pool across hosts, small: the downscale stage on a Dask scheduler and two ``dask worker`` processes
that share neither network nor filesystem with the client (each in its own network, mount, UTS and PID
namespaces, joined to the host by a veth pair), inputs and outputs on S3 (moto_server), against the same
config run in this process on one host: every object compared byte for byte.

The namespace and pool helpers are the benchmark's (``benchmarks/multi_host.py``, which runs the whole
Prefect flow at a larger size and writes ``benchmarks/results/multi_host.json``); imported from
``benchmarks/`` as tests/test_shipped_checkpoint.py does. Skipped when not root or without ``ip netns``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
from test_downscale import write_checkpoint, write_inputs

BENCHMARKS = str(Path(__file__).resolve().parents[1] / "benchmarks")
if BENCHMARKS not in sys.path:
    sys.path.insert(0, BENCHMARKS)

import multi_host as mh  # noqa: E402 - benchmarks/ is not a package

UNITS = [
    "downscale.members=2",
    "downscale.time_chunk=1",
    "downscale.months_per_unit=1",
    "downscale.members_per_unit=1",
]  # 2 months x 2 members: 4 units
SAMPLER = [
    "sampler.num_steps=2",
    "sampler.overlap=2",
    "sampler.max_patches_per_batch=16",
    "sampler.device=cpu",
]


@pytest.fixture
def host_network():
    """The bridge and two worker namespaces; removed whatever happens (checked)."""
    reason = mh.namespaces_unavailable()
    if reason:
        pytest.skip(reason)
    network = mh.HostNetwork(n=2)
    try:
        yield network.create()
    finally:
        network.delete()
    assert network.leftovers() == []


def test_two_namespaced_workers_write_the_bytes_of_a_one_host_run(host_network, tmp_path, monkeypatch):
    """The stage's own entry (``run_downscale`` with the pool's client and ``sampling_resources``: what each
    unit task of the flow submits; the benchmark runs the whole Prefect flow) on the namespaced pool."""
    from climrecon.config import load_config
    from climrecon.flows.runtime import dask_client, sampling_resources
    from climrecon.models.checkpoint import read_checkpoint
    from climrecon.tasks.downscale import plan_downscale, run_downscale

    started = time.perf_counter()
    s3 = mh.start_object_store(host_network.host_ip, tmp_path / "logs")
    pool_processes = []
    try:
        for name, value in s3.credentials.items():  # the client's credentials: environment only
            monkeypatch.setenv(name, value)
        fs = s3.filesystem()
        local = write_inputs(tmp_path / "in", n_time=2)
        inputs = {k: mh.upload_tree(fs, local[k], s3.url("inputs", Path(local[k]).name)) for k in local}
        checkpoint = write_checkpoint(tmp_path / "tiny.pt")  # in the client's private /tmp
        sha256 = read_checkpoint(checkpoint).header["content_sha256"]
        marker = tmp_path / "client-only.marker"
        marker.write_text("the client's scratch")
        common = [
            f"method.checkpoint={checkpoint}",
            f'storage.options={{"endpoint_url": "{s3.endpoint_url}"}}',
            *UNITS,
            *SAMPLER,
        ]

        def plan(root: str):
            cfg = load_config(overrides=[*common, f"storage.root={root}"])
            return plan_downscale(cfg, inputs["fine"], inputs["static"], inputs["coarse"], s3.storage_options)

        # each worker gets its own copy of the checkpoint (at the same path), as an installation would
        with mh.worker_pool(
            "namespaced", tmp_path / "logs", s3.credentials, host_network, provision=[checkpoint]
        ) as pool:
            pool_processes = pool.processes
            with dask_client(pool.address) as client:  # the product's client (the default while open)
                warming = mh.warm_up(client)
                # one host: the same config, in this process (while the workers import)
                one_host_url, _ = run_downscale(plan(s3.url("one-host")), s3.storage_options)
                client.gather(warming)
                probes = mh.probe_workers(client, str(marker), checkpoint)
                since = time.time()
                resources = sampling_resources(client)
                url, reports = run_downscale(
                    plan(s3.url("multi-host")), s3.storage_options, client, resources
                )
                counts = mh.task_counts(client, since)
        comparison = mh.compare_stores(fs, one_host_url, url)
    finally:
        s3.process.stop()
    assert all(p.popen.poll() is not None for p in [*pool_processes, s3.process])  # nothing left running

    # the workers were other "hosts": no namespace shared with the client, nothing of its scratch visible
    assert len(probes) == 2 and all(address.split("://")[1].startswith(mh.SUBNET) for address in probes)
    for info in probes.values():
        assert info["shares_with_client"] == [] and not info["sees_client_scratch"]
        assert info["root_read_only"] and info["tmp_filesystem"] == "tmpfs"
        assert sorted(info["interfaces"])[0] == "lo" and len(info["interfaces"]) == 2
        assert info["checkpoint"] == {"path": checkpoint, "content_sha256": sha256}  # its own copy
    # pinned to the GPU resource the workers advertise; both sampled units, and only they ran tasks
    assert resources == {"GPU": 1}
    assert set(counts) == set(probes), counts
    assert all(c.get("downscale-sample", 0) > 0 for c in counts.values()), counts
    assert sum(c.get("downscale-sample", 0) for c in counts.values()) == len(reports) == 4
    assert {r.worker for r in reports} == set(probes)

    assert comparison["bytes_identical"], comparison
    assert comparison["data_chunks_identical"] and comparison["data_chunks_compared"] >= 8
    assert set(comparison["differing"]) <= {"zarr.json", ".climrecon/complete.json"}, comparison["differing"]
    assert time.perf_counter() - started < 300
