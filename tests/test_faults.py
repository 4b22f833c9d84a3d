"""The fault suite: faults a run must survive, bad input it must refuse cleanly, secrets it must never leak.

Every case reproduces a defect found by trying the product (issue "Reliability"), then proves the fix:
- faults: a Dask worker killed mid-unit; the whole CLI run killed and resumed, locally and on S3 (moto);
  S3 unreachable before and during a run; two runs of one store at once; stale S3 listings at finalize;
  the private Prefect server and `climrecon server` outliving their parent;
- bad input: each refused with a message naming the culprit, every store written before byte-identical;
- secrets: canary credentials in the environment and in nested storage options reach no log, attribute,
  provenance document, output catalog or Prefect database.
Each passing case is recorded in the ``fault_record`` ledger (tests/conftest.py), which
``benchmarks/faults.py`` turns into ``benchmarks/results/faults.json``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import pytest
import torch
import xarray as xr
from test_downscale import assert_same_bytes, config, write_checkpoint, write_inputs

from climrecon.config import ConfigError, load_config
from climrecon.flows.runtime import dask_client, is_transient
from climrecon.localhost import free_port
from climrecon.models.checkpoint import CheckpointError, load_networks
from climrecon.storage import (
    S3_CLIENT_DEFAULTS,
    StoragePathError,
    explain_storage_error,
    join_url,
    store_url,
    url_options,
)
from climrecon.stores import StageStore
from climrecon.tasks.downscale import (
    DownscaleError,
    plan_downscale,
    prepare_downscale,
    run_downscale,
    sample_unit,
    write_unit,
)

pytestmark = [pytest.mark.faults, pytest.mark.timeout(300)]
BIN = Path(sys.executable).parent
# what the suite proves (benchmarks/faults.py counts each kind a passing test entered in the ledger)
FAULT_KINDS = (
    "dask worker killed mid-unit",
    "CLI killed mid-run, resumed (local)",
    "CLI killed mid-run, resumed (S3)",
    "stale S3 listing at finalize",
    "S3 unreachable before a run",
    "S3 unreachable during a run, then a run completes",
    "two runs of one store at once",
    "CLI SIGKILLed: its Prefect server stops",
    "climrecon server SIGTERMed: its Prefect server stops",
    "retries only for transient errors",
    "S3 without credentials: the message names the URL and the variables",
    "remote storage options kept away from local stores and catalogs",
)
BAD_INPUT_KINDS = (  # besides the ingest table of tests/test_ingest_errors.py
    "truncated checkpoint",
    "random-bytes checkpoint",
    "pickled-object checkpoint",
    "checkpoint for other variables",
    "config typo",
    "config type",
    "config range",
    "region outside the source",
    "path traversal in catalog columns",
    "path traversal in store names",
    "missing catalog column",
)
SECRET_KINDS = (
    "canaries in environment credentials and nested storage options",
    "environment storage options never travel in Dask task arguments",
)
REPO = Path(__file__).resolve().parents[1]
SLOW_SAMPLER = {"num_steps": 12}  # units of a second or two: a run can be killed between two of them
UNITS = {"months_per_unit": 6, "time_chunk": 6, "members_per_unit": 2}


# -- helpers ----------------------------------------------------------------------------------------------
def _snapshot(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _children(pid: int) -> set[int]:
    """Every descendant process of ``pid`` (from /proc)."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            parents[int(stat.parent.name)] = int(fields[1])
        except (OSError, IndexError, ValueError):
            continue
    out, frontier = set(), {pid}
    while frontier:
        frontier = {c for c, p in parents.items() if p in frontier} - out
        out |= frontier
    return out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"


def _wait_gone(pids: set[int], timeout: float = 20.0) -> set[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        left = {p for p in pids if _alive(p)}
        if not left:
            return set()
        time.sleep(0.2)
    return {p for p in pids if _alive(p)}


def _cli_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_SERVER_ANALYTICS_ENABLED="false", **extra)
    return env


def _downscale_args(
    inputs: dict, root: str, checkpoint: str, sampler: dict | None = None, units: dict | None = None
) -> list[str]:
    sets = {
        "storage.root": root,
        "method.checkpoint": checkpoint,
        "method.bias_correction": "false",  # as the reference run (test_downscale.config)
        "downscale.coarse": inputs["coarse"],
        "downscale.members": 4,
        **{f"downscale.{k}": v for k, v in (units or UNITS).items()},
        "sampler.overlap": 2,
        "sampler.max_patches_per_batch": 16,
        "sampler.device": "cpu",
        **{f"sampler.{k}": v for k, v in (sampler or SLOW_SAMPLER).items()},
    }
    args = [str(BIN / "climrecon"), "downscale", "--fine", inputs["fine"], "--static", inputs["static"]]
    args += ["--workers", "1"]
    for k, v in sets.items():
        args += ["--set", f"{k}={v}"]
    return args


def _done_markers(fs, root: str) -> list[str]:
    try:
        return fs.glob(join_url(root, "downscale", "*.zarr", ".climrecon", "done", "*"))
    except FileNotFoundError:
        return []


def _kill_after_first_unit(
    args: list[str], env: dict, fs, root: str, timeout: float = 180
) -> tuple[set[int], str]:
    """Start the CLI, SIGKILL it once a first unit is done (not all); its descendants and its output."""
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline, family = time.monotonic() + timeout, set()
    while time.monotonic() < deadline and proc.poll() is None:
        family |= _children(proc.pid)
        fs.invalidate_cache()
        if _done_markers(fs, root):
            break
        time.sleep(0.2)
    assert proc.poll() is None, (
        "the run ended before it could be killed:\n" + (proc.stdout.read() or "")[-3000:]
    )
    family |= _children(proc.pid)
    proc.kill()
    out = proc.communicate()[0]
    return family, out


@pytest.fixture(autouse=True)
def one_torch_thread():
    """In-process sampling on one thread (two oversubscribe a shared 2-core machine badly)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    inputs = write_inputs(root / "in")
    return {"root": root, "inputs": inputs, "checkpoint": write_checkpoint(root / "tiny.pt")}


@pytest.fixture(scope="module")
def shared_server(tmp_path_factory):
    """One Prefect server (API only) for the CLI runs of the cases that test storage faults, not the CLI's
    private server: each of those runs would otherwise start and stop a server of its own. The cases about
    the private server (killed CLI, SIGTERM) keep it."""
    from climrecon.flows.server import start_server, template_database

    with start_server(
        tmp_path_factory.mktemp("prefect"), services=False, template=template_database()
    ) as server:
        yield server


@pytest.fixture(scope="module")
def reference(tiny) -> str:
    """The undisturbed in-process run of ``tiny`` (SLOW_SAMPLER, UNITS), computed once: what every faulted
    run of the same inputs must reproduce byte for byte. Read only."""
    inputs = tiny["inputs"]
    cfg = config(tiny["root"] / "reference", tiny["checkpoint"], sampler=SLOW_SAMPLER, members=4, **UNITS)
    url, _ = run_downscale(plan_downscale(cfg, inputs["fine"], inputs["static"], inputs["coarse"]))
    return url


# -- faults -----------------------------------------------------------------------------------------------
def test_killed_worker_is_logged_and_its_unit_redone_to_the_same_bytes(
    tiny, reference, tmp_path, caplog, fault_record
):
    cfg = config(tmp_path / "run", tiny["checkpoint"], sampler=SLOW_SAMPLER, members=4, **UNITS)
    plan = plan_downscale(cfg, tiny["inputs"]["fine"], tiny["inputs"]["static"], tiny["inputs"]["coarse"])
    killed: list[str] = []
    caplog.set_level(logging.WARNING, logger="climrecon.dask")
    with dask_client(n_workers=2) as client:
        pids = client.run(os.getpid)

        def killer():
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and not killed:
                for addr, keys in client.processing().items():
                    if any(str(k).startswith("downscale-sample-") for k in keys):
                        os.kill(pids[addr], signal.SIGKILL)
                        killed.append(addr)
                        return
                time.sleep(0.05)

        thread = threading.Thread(target=killer, daemon=True)
        thread.start()
        url, reports = run_downscale(plan, client=client)
        thread.join(5)
    assert killed, "no worker was killed"
    assert_same_bytes(reference, url)
    lost = [
        r.getMessage() for r in caplog.records if "was lost while running downscale-sample-" in r.getMessage()
    ]
    assert lost and plan.name in lost[0], caplog.text
    fault_record("fault", "dask worker killed mid-unit", log_line=lost[0][:200])


def test_cli_killed_mid_run_resumes_to_the_same_bytes_and_leaves_no_server(
    tiny, reference, tmp_path, fault_record
):
    import fsspec

    root = str(tmp_path / "cli")
    args = _downscale_args(tiny["inputs"], root, tiny["checkpoint"])
    fs = fsspec.filesystem("file")
    family, out = _kill_after_first_unit(args, _cli_env(), fs, root)
    assert not _wait_gone(family), f"processes outlived the killed CLI: {family}"  # server and workers too
    (store,) = Path(root, "downscale").glob("*.zarr")
    assert not Path(store, ".climrecon", "complete.json").exists()  # partial, and it says so
    done_before = len(list(Path(store, ".climrecon", "done").iterdir()))
    again = subprocess.run(args, env=_cli_env(), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert Path(store, ".climrecon", "complete.json").exists()
    assert_same_bytes(reference, str(store))
    fault_record("fault", "CLI killed mid-run, resumed (local)", units_done_before_resume=done_before)


def test_cli_killed_and_resumed_on_s3_with_local_inputs(
    tiny, reference, tmp_path, s3, shared_server, fault_record
):
    """Stores on S3 (moto), inputs local: each opens with its own options, completeness comes from fresh
    listings (the resumed run's finalize sees the markers its workers wrote), bytes as a local run."""
    env = _cli_env(PREFECT_API_URL=shared_server.api_url)  # not the private server
    root = s3.url("out")
    args = _downscale_args(tiny["inputs"], root, tiny["checkpoint"])
    args += ["--set", f"storage.options.endpoint_url={s3.endpoint_url}"]
    fs = s3.filesystem()
    family, _ = _kill_after_first_unit(args, env, fs, root)
    assert not _wait_gone(family)
    again = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    url = again.stdout.strip().splitlines()[-1]
    assert url.startswith(root)
    ds = xr.open_zarr(url, storage_options=s3.storage_options)
    assert ds.attrs["climrecon_status"] == "complete"
    ref_ds = xr.open_zarr(reference)
    for v in ("tas", "uas"):
        assert ds[v].values.tobytes() == ref_ds[v].values.tobytes(), v
    fault_record("fault", "CLI killed mid-run, resumed (S3)")


def test_stale_s3_listing_never_decides_completeness(s3, fault_record):
    """Markers written by other processes (other s3fs instances) are seen at once: no false 'not written
    yet' at finalize, whatever this process cached before."""
    url = s3.url("stale.zarr")
    store = StageStore(url, "k1", s3.storage_options)
    ds = xr.Dataset({"a": (("time",), np.arange(4.0))})
    store.initialize(ds, encoding={"a": {"chunks": (2,)}})
    regions = [{"time": slice(0, 2)}, {"time": slice(2, 4)}]
    assert len(store.pending(regions)) == 2  # this process now has a listing of the state folder cached
    import s3fs

    other = s3fs.S3FileSystem(endpoint_url=s3.endpoint_url, skip_instance_cache=True)  # "a worker"
    for r in regions:
        other.pipe(
            f"{url.removeprefix('s3://')}/.climrecon/done/time-{r['time'].start}-{r['time'].stop}", b""
        )
    assert store.pending(regions) == []
    store.finalize(regions)
    assert StageStore(url, "k1", s3.storage_options).is_complete()
    fault_record("fault", "stale S3 listing at finalize")


class _Proxy:
    """A TCP proxy to the S3 endpoint that can go down (refusing and cutting connections) and come back.

    Sockets are shut down before they are closed: on Linux, close() alone neither wakes a thread blocked
    in accept()/recv() nor ends the connection it serves."""

    def __init__(self, target_port: int):
        self.target, self.port = target_port, free_port()
        self._server: socket.socket | None = None
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self._up = False
        self.up()

    def up(self) -> None:
        srv = socket.socket()
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind(("127.0.0.1", self.port))
        srv.listen(64)
        with self._lock:
            self._server, self._up = srv, True
        threading.Thread(target=self._accept, args=(srv,), daemon=True).start()

    def down(self) -> None:
        with self._lock:
            self._up = False
            socks, self._conns = [*self._conns, *([self._server] if self._server else [])], []
            self._server = None
        for sock in socks:
            _cut(sock)

    def _accept(self, srv: socket.socket) -> None:
        while True:
            try:
                client, _ = srv.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target))
            except OSError:
                _cut(client)
                continue
            with self._lock:
                if not self._up:
                    _cut(client)
                    _cut(upstream)
                    continue
                self._conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(a: socket.socket, b: socket.socket) -> None:
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        finally:
            _cut(a)
            _cut(b)


def _cut(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()


def test_s3_unreachable_before_and_during_a_run_fails_clearly_then_completes(
    tiny, tmp_path, s3, shared_server, fault_record
):
    env = _cli_env(PREFECT_API_URL=shared_server.api_url)  # not the private server
    proxy = _Proxy(int(s3.endpoint_url.rsplit(":", 1)[1]))
    root = s3.url("down")
    two_units = {
        "months_per_unit": 12,
        "time_chunk": 12,
        "members_per_unit": 4,
    }  # a failing unit costs retries
    base = _downscale_args(
        tiny["inputs"], root, tiny["checkpoint"], sampler={"num_steps": 12}, units=two_units
    )
    args = base + ["--set", f"storage.options.endpoint_url=http://127.0.0.1:{proxy.port}"]
    # before the run: nothing answers
    proxy.down()
    start = time.monotonic()
    before = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    fail_s = time.monotonic() - start
    assert before.returncode == 1
    last = (
        before.stderr.strip().splitlines()[-1]
        if before.stderr.strip()
        else before.stdout.strip().splitlines()[-1]
    )
    text = before.stdout + before.stderr
    assert "error: cannot reach the object store of " + root in text.replace("\n", ""), text[-2000:]
    assert "Traceback" not in text, text[-3000:]
    # during the run: the endpoint goes away once the run has written its store's template. This run and
    # the next ask botocore for one attempt per request (the first run kept the defaults: its time to the
    # message is the one users see), so the failing unit's retries fail at once
    args += ["--set", 'storage.options.config_kwargs={"connect_timeout": 5, "retries": {"max_attempts": 1}}']
    proxy.up()
    proc = subprocess.Popen(
        args,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    fs = s3.filesystem()
    deadline, template = time.monotonic() + 180, join_url(root, "downscale", "*.zarr", "zarr.json")
    while time.monotonic() < deadline and proc.poll() is None and not fs.glob(template):
        fs.invalidate_cache()
        time.sleep(0.05)
    proxy.down()
    assert proc.poll() is None, "the run ended before the endpoint went away"
    out = proc.communicate(timeout=400)[0]
    assert proc.returncode == 1, out[-3000:]
    assert "cannot reach the object store of" in out.replace("\n", "") and "Traceback" not in out, out[-3000:]
    fs.invalidate_cache()
    assert not fs.glob(
        join_url(root, "downscale", "*.zarr", ".climrecon", "complete.json")
    )  # nothing looks done
    proxy.up()
    later = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert later.returncode == 0, later.stdout[-3000:] + later.stderr[-3000:]
    proxy.down()
    fault_record("fault", "S3 unreachable before a run", fail_s=round(fail_s, 1), message=last[:200])
    fault_record("fault", "S3 unreachable during a run, then a run completes")


def test_two_runs_of_one_store_share_the_work_and_say_so(tiny, reference, tmp_path, caplog, fault_record):
    cfg = config(tmp_path / "two", tiny["checkpoint"], sampler=SLOW_SAMPLER, members=4, **UNITS)
    a = plan_downscale(cfg, tiny["inputs"]["fine"], tiny["inputs"]["static"], tiny["inputs"]["coarse"])
    b = plan_downscale(cfg, tiny["inputs"]["fine"], tiny["inputs"]["static"], tiny["inputs"]["coarse"])
    assert a.out_url == b.out_url and a.run_id != b.run_id
    units = prepare_downscale(a)
    first = units[0]
    store = StageStore(a.out_url, a.out_key)
    assert store.lease(first.region, a.run_id, 60) == (True, None)  # run A is sampling its first unit
    caplog.set_level(logging.WARNING, logger="climrecon.stores")
    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(out=run_downscale(b)))
    thread.start()  # run B: waits for A's unit, does the others
    time.sleep(1.0)
    write_unit(a, first, sample_unit(a, first))  # A finishes its unit (and releases its lease)
    thread.join(300)
    url, reports = result["out"]
    assert [r.note for r in reports if r.label == first.label] == ["written by another run"]
    assert "is being written by run" in caplog.text and "was written by another run: skipped" in caplog.text
    assert_same_bytes(reference, url)
    # a dead run's lease (its process is gone) is taken over at once
    dead = {"owner": "dead-run", "host": socket.gethostname(), "pid": 2**22 + 7, "expires": time.time() + 600}
    store._put(store._state("lease", "member-0-2_time-0-6"), json.dumps(dead).encode())
    assert store.lease(first.region, "new-run", 60) == (True, None)
    fault_record("fault", "two runs of one store at once")


def test_private_prefect_server_dies_with_its_command(tmp_path, fault_record):
    code = (
        "import os, time\n"
        "from climrecon.flows.server import prefect_api\n"
        "with prefect_api() as url:\n"
        "    print(url, flush=True)\n"
        "    time.sleep(600)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], env=_cli_env(), stdout=subprocess.PIPE, text=True)
    url = proc.stdout.readline().strip()
    assert url.startswith("http://127.0.0.1:"), url
    family = _children(proc.pid)
    assert family
    proc.kill()
    proc.wait()
    assert not _wait_gone(family), "the Prefect server outlived its SIGKILLed parent"
    left = Path(tempfile.gettempdir()) / "climrecon-prefect" / str(proc.pid)
    assert left.is_dir()  # a SIGKILLed process cannot clean up: the next command sweeps it
    from climrecon.flows.server import _sweep_dead_homes

    _sweep_dead_homes(left.parent)
    assert not left.exists()
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    with pytest.raises(ConnectionRefusedError):  # nothing listens on its port any more
        socket.create_connection(("127.0.0.1", port), timeout=2)
    fault_record("fault", "CLI SIGKILLed: its Prefect server stops")


def test_climrecon_server_stops_with_sigterm_to_its_process_group(tmp_path, fault_record):
    port = free_port()
    proc = subprocess.Popen(
        [str(BIN / "climrecon"), "server", "--home", str(tmp_path / "home"), "--port", str(port)],
        env=_cli_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    from climrecon.flows.server import wait_until_healthy

    wait_until_healthy(f"http://127.0.0.1:{port}/api", timeout=90)
    family = _children(proc.pid)
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=30)
    assert not _wait_gone(family), "prefect server start outlived `climrecon server`"
    fault_record("fault", "climrecon server SIGTERMed: its Prefect server stops")


# -- errors: deterministic ones fail at once, transient ones are retried ----------------------------------
def test_input_errors_are_not_retried_and_io_errors_are(prefect_harness, fault_record):
    from prefect import flow, task

    from climrecon.flows.runtime import retry_transient

    calls = {"input": 0, "io": 0}

    @task(retries=3, retry_condition_fn=retry_transient)
    def bad_input():
        calls["input"] += 1
        raise DownscaleError("the fine store lacks 'tas'")

    @task(retries=2, retry_condition_fn=retry_transient)
    def flaky():
        calls["io"] += 1
        if calls["io"] < 3:
            raise ConnectionResetError("peer reset")
        return "ok"

    @flow
    def run():
        with pytest.raises(DownscaleError):
            bad_input()
        return flaky()

    assert run() == "ok" and calls == {"input": 1, "io": 3}
    assert not is_transient(FileNotFoundError("x")) and is_transient(TimeoutError("x"))
    fault_record("fault", "retries only for transient errors")


# -- bad input ----------------------------------------------------------------------------------------------
def test_bad_inputs_are_refused_by_name_and_leave_earlier_stores_untouched(
    tiny, tmp_path, make_catalog, catalog_row, raw_files, fault_record
):
    from climrecon.config import CatalogQuery, IngestConfig, StorageConfig
    from climrecon.tasks.ingest import ingest_plan, plan_ingest

    out = tmp_path / "out"
    cfg = config(
        out, tiny["checkpoint"], sampler={"num_steps": 2}, members=2, months_per_unit=12, time_chunk=12
    )
    run_downscale(
        plan_downscale(cfg, tiny["inputs"]["fine"], tiny["inputs"]["static"], tiny["inputs"]["coarse"])
    )
    before = _snapshot(out)

    def refused(kind: str, error, needle: str, fn) -> None:
        with pytest.raises(error) as info:
            fn()
        assert needle in str(info.value), f"{kind}: {info.value}"
        assert _snapshot(out) == before, kind
        fault_record("bad_input", kind, message=str(info.value)[:300])

    ckpt = Path(tiny["checkpoint"])
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    refused(
        "truncated checkpoint", CheckpointError, "Re-copy or re-train it.", lambda: load_networks(truncated)
    )
    with pytest.raises(CheckpointError) as info:
        load_networks(truncated)
    assert str(info.value).endswith("Re-copy or re-train it.") and str(truncated) in str(info.value)
    random_bytes = tmp_path / "random.pt"
    random_bytes.write_bytes(np.random.default_rng(0).bytes(5000))
    refused(
        "random-bytes checkpoint", CheckpointError, str(random_bytes), lambda: load_networks(random_bytes)
    )
    pickled = tmp_path / "pickled.pt"
    torch.save({"metadata": "x", "payload": os.system}, pickled)  # pickled code: refused, never unpickled
    refused(
        "pickled-object checkpoint", CheckpointError, "refusing to unpickle", lambda: load_networks(pickled)
    )
    other = write_checkpoint(tmp_path / "other.pt", variables=("tas", "uas", "vas"))
    refused(
        "checkpoint for other variables",
        DownscaleError,
        "lacks ['vas']",
        lambda: plan_downscale(
            config(out, other), tiny["inputs"]["fine"], tiny["inputs"]["static"], tiny["inputs"]["coarse"]
        ),
    )
    refused(
        "config typo",
        ConfigError,
        "downscale.membres: unknown key",
        lambda: load_config(None, ["downscale.membres=3"]),
    )
    refused(
        "config type",
        ConfigError,
        "downscale.members: Input should be a valid integer",
        lambda: load_config(None, ["downscale.members=many"]),
    )
    refused(
        "config range",
        ConfigError,
        "sampler.num_steps: Input should be greater than or equal to 1",
        lambda: load_config(None, ["sampler.num_steps=0"]),
    )
    refused(
        "region outside the source",
        ValueError,
        "region",
        lambda: __import__("climrecon.tasks.regrid_stage", fromlist=["plan_regrid"]).plan_regrid(
            load_config(None, ["regrid.region.lat_min=-80", "regrid.region.lat_max=-60"]).regrid,
            tiny["inputs"]["fine"],
            StorageConfig(root=str(out)),
            tiny["inputs"]["static"],
        ),
    )
    # a catalog whose source_id climbs out of the storage root: the store stays under it
    good = raw_files["tas"]
    rows = [catalog_row(good, "tas", source_id="../../../escape", time_range="200501-200512")]
    catalog = make_catalog(rows)
    (plan,) = plan_ingest(
        IngestConfig(query=CatalogQuery(variable_id="tas")), catalog, StorageConfig(root=str(out))
    )
    assert plan.url.startswith(str(out) + "/ingest/") and ".." not in plan.url
    assert "escape" in plan.url
    fault_record("bad_input", "path traversal in catalog columns", url=plan.url)
    with pytest.raises(StoragePathError):
        store_url(str(out), "ingest", ["x"], "../../y.zarr")
    assert join_url("s3://bucket/root", "downscale", "../../elsewhere") == "s3://bucket/elsewhere"
    fault_record("bad_input", "path traversal in store names")
    # a missing catalog column
    import pandas as pd

    csv = Path(catalog).with_suffix(".csv")
    pd.read_csv(csv).drop(columns=["variable_id"]).to_csv(csv, index=False)
    from climrecon.tasks.ingest import CatalogQueryError

    with pytest.raises(Exception) as info:
        plan_ingest(
            IngestConfig(query=CatalogQuery(variable_id="tas")), catalog, StorageConfig(root=str(out))
        )
    assert "variable_id" in str(info.value), info.value
    assert _snapshot(out) == before
    fault_record("bad_input", "missing catalog column", message=str(info.value)[:300])
    del ingest_plan, CatalogQueryError


def test_messages_for_storage_without_credentials_and_options_per_url(monkeypatch, s3, moto_s3, fault_record):
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    import s3fs

    fs = s3fs.S3FileSystem(endpoint_url=s3.endpoint_url, skip_instance_cache=True)
    with pytest.raises(Exception) as info:
        fs.ls(s3.bucket)
    message = explain_storage_error(info.value, s3.url("out"))
    assert message and s3.url("out") in message and "AWS_ACCESS_KEY_ID" in message, (info.value, message)
    assert url_options("/local/path.zarr", {"endpoint_url": "x"}) is None
    assert url_options("s3://b/x.zarr", {"endpoint_url": "x"})["endpoint_url"] == "x"
    credentials = {
        "key": moto_s3.credentials["AWS_ACCESS_KEY_ID"],
        "secret": moto_s3.credentials["AWS_SECRET_ACCESS_KEY"],
    }
    options = url_options("s3://b/x.zarr", {"endpoint_url": s3.endpoint_url, **credentials})
    assert options["config_kwargs"]["connect_timeout"] == 10  # bounded waits
    fsspec.filesystem("s3", skip_instance_cache=True, **options).ls(s3.bucket)
    assert S3_CLIENT_DEFAULTS["retries"] == {"max_attempts": 4, "mode": "standard"}  # botocore got a copy
    fault_record(
        "fault", "S3 without credentials: the message names the URL and the variables", message=message
    )


# -- secrets ------------------------------------------------------------------------------------------------
def test_canary_secrets_reach_no_log_attribute_catalog_or_prefect_database(tiny, tmp_path, s3, fault_record):
    from climrecon.flows.server import start_server, template_database

    canary = f"canary{uuid.uuid4().hex}"
    env = _cli_env(
        AWS_ACCESS_KEY_ID=f"{canary}-key",
        AWS_SECRET_ACCESS_KEY=f"{canary}-secret",
        CLIMRECON_STORAGE_OPTIONS=json.dumps(
            {"endpoint_url": s3.endpoint_url, "client_kwargs": {"aws_session_token": f"{canary}-token"}}
        ),
    )
    root = s3.url("secret-run")
    outputs = []
    with start_server(tmp_path / "prefect", services=False, template=template_database()) as server:
        env["PREFECT_API_URL"] = server.api_url
        # a nested secret on the command line is refused before anything runs (and never echoed)
        refused = subprocess.run(
            [
                str(BIN / "climrecon"),
                "config",
                "show",
                "--set",
                f"storage.options.client_kwargs.aws_secret_access_key={canary}-cli",
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert (
            refused.returncode == 2
            and "client_kwargs.aws_secret_access_key" in refused.stdout + refused.stderr
        )
        outputs.append(refused.stdout + refused.stderr)
        run = subprocess.run(
            _downscale_args(tiny["inputs"], root, tiny["checkpoint"], sampler={"num_steps": 2}),
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        outputs.append(run.stdout + run.stderr)
        assert run.returncode == 0, outputs[-1][-3000:]
        member_store = run.stdout.strip().splitlines()[-1]
        agg = subprocess.run(
            [str(BIN / "climrecon"), "aggregate", member_store, "--set", f"storage.root={root}"],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        outputs.append(agg.stdout + agg.stderr)
        assert agg.returncode == 0, outputs[-1][-3000:]
    hits = []
    for i, text in enumerate(outputs):
        if canary in text:
            hits.append(f"output of command {i}")
    fs = s3.filesystem()
    for path in fs.find(root.removeprefix("s3://")):
        if path.endswith((".json", ".csv", "zarr.json", ".zattrs", ".zmetadata")) or "/.climrecon/" in path:
            if canary.encode() in fs.cat(path):
                hits.append(path)
    db = (tmp_path / "prefect" / "prefect.db").read_bytes()
    if canary.encode() in db:
        hits.append("prefect.db")
    assert hits == []
    fault_record(
        "secret",
        "canaries in environment credentials and nested storage options",
        canary_hits=len(hits),
        places_searched=["stdout/stderr", "zarr attributes", "provenance", "output catalog", "prefect.db"],
    )


class _RecordingClient:
    """A Dask client that keeps the repr of every task's arguments it submits (what travels to the
    scheduler and the workers), then submits as the client does."""

    def __init__(self, client: Any) -> None:
        self.client, self.sent = client, []

    def submit(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        self.sent.append(f"{getattr(fn, '__name__', fn)}: {args!r} {kwargs!r}")
        return self.client.submit(fn, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.client, name)


def test_environment_storage_options_never_travel_in_dask_task_arguments(
    tiny, tmp_path, s3, monkeypatch, fault_record
):
    """CLIMRECON_STORAGE_OPTIONS (here the endpoint and a canary session token) stay in the environment:
    units are submitted without them and each worker merges its own environment's back, so the run still
    reaches the store (the endpoint is nowhere else) and no task argument holds the canary."""
    from climrecon.flows.runtime import dask_client
    from climrecon.storage import for_workers, resolve_storage_options

    canary = f"canary{uuid.uuid4().hex}"
    secret = {"endpoint_url": s3.endpoint_url, "client_kwargs": {"aws_session_token": canary}}
    monkeypatch.setenv("CLIMRECON_STORAGE_OPTIONS", json.dumps(secret))
    options = resolve_storage_options({"anon": False})
    assert (
        for_workers(options) == {"anon": False} and resolve_storage_options(for_workers(options)) == options
    )
    cfg = config(s3.url("env-secrets"), tiny["checkpoint"], members=4, **UNITS)
    plan = plan_downscale(
        cfg, tiny["inputs"]["fine"], tiny["inputs"]["static"], tiny["inputs"]["coarse"], options
    )
    with dask_client(n_workers=1, processes=False) as client:  # the workers share this environment
        recording = _RecordingClient(client)
        url, reports = run_downscale(plan, options, client=recording)
    assert len(recording.sent) == 2 * len(reports) and all("unit" in s for s in recording.sent)
    assert [s for s in recording.sent if canary in s or s3.endpoint_url in s] == []
    assert xr.open_zarr(url, storage_options=options).attrs["climrecon_status"] == "complete"
    fault_record("secret", SECRET_KINDS[1], submitted_tasks=len(recording.sent), canary_hits=0)


def test_remote_storage_options_never_reach_local_stores_or_catalogs(
    tiny, tmp_path, make_catalog, catalog_row, raw_files, fault_record
):
    """A run on S3 (options with an endpoint and a dict-valued client_kwargs) still reads its local inputs:
    the sample catalog, a local truth, local stores to regrid."""
    from climrecon.catalogs.esmcat import open_catalog
    from climrecon.config import StorageConfig
    from climrecon.tasks.regrid_stage import plan_regrid
    from climrecon.tasks.training_data import open_truth

    options = {"endpoint_url": "http://127.0.0.1:9", "client_kwargs": {"region_name": "us-east-1"}}
    catalog = make_catalog(
        [catalog_row(raw_files["tas"], "tas", source_id="LOCAL", time_range="200501-200512")]
    )
    assert len(open_catalog(catalog, storage_options=options).df) == 1
    assert "tas" in open_truth(tiny["inputs"]["fine"], ["tas"], options).data_vars
    storage = StorageConfig(root="s3://bucket/run", options={"endpoint_url": "http://127.0.0.1:9"})
    regrid = load_config(
        None,
        [
            "regrid.region.lat_min=30",
            "regrid.region.lat_max=33",
            "regrid.region.lon_min=-120",
            "regrid.region.lon_max=-115",
            "regrid.coarse_resolution=1.0",
        ],
    ).regrid
    try:  # the local source and static stores open without the run's S3 options (planning writes nothing)
        plan_regrid(regrid, tiny["inputs"]["fine"], storage, tiny["inputs"]["static"])
    except Exception as exc:  # noqa: BLE001 - any refusal must be about the data, not the options
        assert "storage_options" not in str(exc) and "was provided but unused" not in str(exc), exc
    fault_record("fault", "remote storage options kept away from local stores and catalogs")
