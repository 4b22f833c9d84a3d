"""A pool across hosts: the downscale stage on a Dask scheduler and two workers that share neither a
network nor a filesystem with the client, stores on S3, compared byte for byte with a one-host run.

Run (as root, Linux: it makes network, mount, UTS and PID namespaces)::

    .venv/bin/python benchmarks/multi_host.py [--repeats 2]   # ~4 min on 2 busy cores
    -> benchmarks/results/multi_host.json

What it sets up, all on this machine and all removed again (``try/finally`` and ``atexit``):

- a Linux bridge ``mh<tag>b`` with ``10.77.<k>.1/24`` (the "host" side; ``<k>`` a free /24) and, per
  worker, a network namespace joined to it by a veth pair (``10.77.<k>.2``, ``.3``): the workers' only
  network is that link (their own loopback aside); the client reaches them, and they the scheduler, the
  object store and each other, over the bridge only;
- ``moto_server`` (a real S3 API) on ``10.77.<k>.1``: inputs and outputs are ``s3://`` objects; the
  credentials reach the client and the workers as ``AWS_*`` environment variables, never as arguments,
  parameters or config;
- a ``dask scheduler`` on the host side (``10.77.<k>.1``, no dashboard);
- two ``dask worker`` processes (``--nthreads 1 --resources GPU=1``, the resource the product pins its
  sampling to, :func:`climrecon.flows.runtime.sampling_resources`; no CUDA here, so the CPU fallback runs),
  each inside its network namespace and its own mount, UTS and PID namespaces: private tmpfs ``/tmp``
  (Dask's local directory, ``HOME``) and ``/dev/shm``, the root filesystem read-only (the installed
  environment and the shipped checkpoint readable, as on a host built from the same image; nothing the
  client writes to its scratch is visible, and nothing the worker writes reaches a disk the client sees),
  a hostname of its own. Files the client keeps in its private scratch that a worker needs (a test's
  checkpoint) are copied into the worker's private ``/tmp`` at the same path before it starts, as a real
  host would have them installed (``provision`` of :func:`worker_pool`).

Then the ``downscale`` Prefect flow (:func:`climrecon.flows.downscale.downscale_flow` with
``scheduler_address``: the product's own entry) runs with the same config and seed on a one-host pool
(the same scheduler + 2 ``dask worker`` processes, in the root namespaces, on 127.0.0.1) and on the
namespaced pool, in ``--repeats`` interleaved rounds (fresh pools and stores each; medians reported). Every object of the two member stores is listed with s3fs and compared byte for byte
(:func:`compare_stores`). Objects that legitimately differ are reported with the keys that differ:
the root group's attributes (its ``history`` line and ``climrecon_completed`` carry the time, and
``climrecon_provenance`` the store URL, the start time, the worker addresses, the sampling seconds; in
``zarr.json``, or ``.zattrs``/``.zmetadata`` for zarr v2 stores), and ``.climrecon/complete.json`` (completion time); every
array chunk and every array's metadata must be identical. The scheduler's task stream says which worker
ran which task: both namespaced workers must have run sampling tasks.

Inputs: synthetic regridded stores (smooth seasonal ``tas``, ``uas``, ``vas`` on a 0.25-deg grid over the
western US, real-looking static fields with their coarse views), the shipped checkpoint
``checkpoints/dpdm-westus-x8.pt`` given by a path relative to the project (each host resolves it against
its own installation).
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import json
import os
import random
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from climrecon.localhost import LocalS3, free_port, moto_server_argv, wait_listening

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent))

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
RESULTS = Path(__file__).resolve().parent / "results" / "multi_host.json"
SUBNET = "10.77"  # 10.77.<k>.0/24, <k> chosen free at run time
CHECKPOINT = "checkpoints/dpdm-westus-x8.pt"  # relative: each host resolves it in its own installation
GPU_RESOURCE = "GPU=1"  # what product workers advertise (climrecon.flows.runtime.GPU, deploy/dask/*.yaml)
NLAT, NLON = 48, 64

# every cleanup this process still owes (run by atexit if a finally never came)
_CLEANUPS: dict[int, Callable[[], None]] = {}


def _owe(fn: Callable[[], None]) -> int:
    token = id(fn)
    _CLEANUPS[token] = fn
    return token


def _paid(token: int) -> None:
    _CLEANUPS.pop(token, None)


@atexit.register
def _cleanup_all() -> None:
    for token in list(_CLEANUPS)[::-1]:
        fn = _CLEANUPS.pop(token, None)
        if fn is not None:
            with contextlib.suppress(Exception):
                fn()


def _run(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(list(argv), check=check, capture_output=True, text=True)


def namespaces_unavailable() -> str | None:
    """Why this machine cannot make the namespaces (not root, no ``ip``/``unshare``, no netns), or None."""
    if sys.platform != "linux":
        return "Linux network and mount namespaces are needed"
    if os.geteuid() != 0:
        return "making network/mount namespaces, a bridge and veth pairs needs root"
    for tool in ("ip", "unshare", "mount"):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed"
    probe = f"climrecon-mh-probe-{uuid.uuid4().hex[:6]}"
    made = _run("ip", "netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"`ip netns add` failed: {made.stderr.strip()}"
    _run("ip", "netns", "del", probe, check=False)
    return None


# -- the network: a bridge on the host side, one namespace + veth pair per worker ---------------------------
@dataclass
class HostNetwork:
    """A bridge ``mh<tag>b`` holding ``10.77.<k>.1/24`` and ``n`` network namespaces ``climrecon-mh-<tag>.<pid>-<i>``,
    each linked to the bridge by a veth pair, with address ``10.77.<k>.<i+2>``."""

    n: int
    tag: str = field(default_factory=lambda: uuid.uuid4().hex[:6])
    k: int = 0
    created: list[tuple[str, str]] = field(default_factory=list)  # ("netns"|"link", name), in order
    _token: int | None = None

    @property
    def bridge(self) -> str:
        return f"mh{self.tag}b"

    @property
    def host_ip(self) -> str:
        return f"{SUBNET}.{self.k}.1"

    def namespace(self, i: int) -> str:
        return f"climrecon-mh-{self.tag}.{os.getpid()}-{i}"  # the owner's pid: see sweep_stale

    def worker_ip(self, i: int) -> str:
        return f"{SUBNET}.{self.k}.{i + 2}"

    def _free_subnet(self) -> int:
        used = set(re.findall(rf"inet {re.escape(SUBNET)}\.(\d+)\.", _run("ip", "-o", "-4", "addr").stdout))
        free = [k for k in range(1, 255) if str(k) not in used]
        if not free:
            raise RuntimeError(f"no free {SUBNET}.x.0/24 subnet on this machine")
        return random.choice(free)

    def create(self) -> HostNetwork:
        sweep_stale()
        self._token = _owe(self.delete)
        self.k = self._free_subnet()
        _run("ip", "link", "add", self.bridge, "type", "bridge")
        self.created.append(("link", self.bridge))
        _run("ip", "addr", "add", f"{self.host_ip}/24", "dev", self.bridge)
        _run("ip", "link", "set", self.bridge, "up")
        for i in range(self.n):
            ns, host_end, ns_end = self.namespace(i), f"mh{self.tag}h{i}", f"mh{self.tag}n{i}"
            _run("ip", "netns", "add", ns)
            self.created.append(("netns", ns))
            _run("ip", "link", "add", host_end, "type", "veth", "peer", "name", ns_end)
            self.created.append(("link", host_end))
            _run("ip", "link", "set", ns_end, "netns", ns)
            _run("ip", "link", "set", host_end, "master", self.bridge)
            _run("ip", "link", "set", host_end, "up")
            _run("ip", "-n", ns, "addr", "add", f"{self.worker_ip(i)}/24", "dev", ns_end)
            _run("ip", "-n", ns, "link", "set", ns_end, "up")
            _run("ip", "-n", ns, "link", "set", "lo", "up")
        return self

    def delete(self) -> None:
        """Remove every namespace and link this object made (a namespace takes its veth end with it)."""
        for kind, name in reversed(self.created):
            if kind == "netns":
                _run("ip", "netns", "del", name, check=False)
            else:
                _run("ip", "link", "del", name, check=False)
        self.created.clear()
        if self._token is not None:
            _paid(self._token)
            self._token = None

    def leftovers(self) -> list[str]:
        """Namespaces or links of this tag still present (for tests of the cleanup)."""
        names = _run("ip", "netns", "list").stdout + _run("ip", "-o", "link").stdout
        return sorted(set(re.findall(rf"(climrecon-mh-{self.tag}\.\d+-\d+|mh{self.tag}[bhn]\d*)", names)))


def sweep_stale() -> list[str]:
    """Remove the namespaces (and their bridge) of runs whose process is gone (killed before its cleanup
    ran); those of live runs are left alone. What was removed."""
    removed = []
    for ns, tag, pid in re.findall(
        r"(climrecon-mh-([0-9a-f]{6})\.(\d+)-\d+)", _run("ip", "netns", "list").stdout
    ):
        try:
            os.kill(int(pid), 0)
            continue
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        _run("ip", "netns", "del", ns, check=False)
        _run("ip", "link", "del", f"mh{tag}b", check=False)
        removed.append(ns)
    return removed


# -- processes ---------------------------------------------------------------------------------------------
@dataclass
class Process:
    """A child started in its own session (its process group is what is killed)."""

    name: str
    popen: subprocess.Popen
    log: Path
    _token: int | None = None

    def stop(self, timeout: float = 10.0) -> None:
        if self.popen.poll() is None:
            for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.popen.pid, sig)
                try:
                    self.popen.wait(timeout=wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
        with contextlib.suppress(ProcessLookupError):  # leftovers of the group (e.g. a nanny's worker)
            os.killpg(self.popen.pid, signal.SIGKILL)
        if self._token is not None:
            _paid(self._token)
            self._token = None

    def tail(self, chars: int = 2000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


def _spawn(name: str, argv: Sequence[str], logs: Path, env: Mapping[str, str]) -> Process:
    logs.mkdir(parents=True, exist_ok=True)
    log = logs / f"{name}.log"
    with log.open("wb") as out:
        popen = subprocess.Popen(  # dies with this process, however it dies (PR_SET_PDEATHSIG)
            list(argv),
            stdout=out,
            stderr=subprocess.STDOUT,
            env=dict(env),
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
    proc = Process(name, popen, log)
    proc._token = _owe(proc.stop)
    return proc


try:
    _LIBC = ctypes.CDLL("libc.so.6", use_errno=True)  # loaded here: nothing is imported after fork
except OSError:
    _LIBC = None


def _die_with_parent() -> None:
    """``preexec_fn``: the child gets SIGTERM when this process dies, SIGKILL included (as
    ``climrecon.flows.server`` does for its server)."""
    if _LIBC is not None:
        _LIBC.prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


def base_env() -> dict[str, str]:
    """The environment every child gets: this one without S3 credentials, one thread per library."""
    env = {
        k: v for k, v in os.environ.items() if not k.startswith("AWS_") and k != "CLIMRECON_STORAGE_OPTIONS"
    }
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return env


@dataclass(frozen=True)
class ObjectStore(LocalS3):
    """A moto S3 server (:class:`climrecon.localhost.LocalS3`: endpoint, bucket, throw-away credentials for
    the environment) and its process."""

    process: Process | None = None


def start_object_store(host: str, logs: Path) -> ObjectStore:
    """``moto_server`` on ``host`` at a free port, with an empty bucket."""
    port = free_port(host)
    proc = _spawn("moto_server", moto_server_argv(host, port), logs, base_env())
    wait_listening(host, port, process=proc.popen, name=proc.name, log=proc.tail)
    return ObjectStore(f"http://{host}:{port}", process=proc).with_new_bucket("mh")


def start_scheduler(host: str, logs: Path, env: Mapping[str, str]) -> tuple[Process, str]:
    """``dask scheduler`` listening on ``host`` (free port, no dashboard); its address."""
    file = logs / f"scheduler-{uuid.uuid4().hex[:6]}.json"
    argv = [str(VENV_BIN / "dask"), "scheduler", "--host", host, "--port", "0", "--no-dashboard"]
    proc = _spawn("scheduler", [*argv, "--scheduler-file", str(file)], logs, env)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if file.exists():
            with contextlib.suppress(ValueError):
                return proc, json.loads(file.read_text())["address"]
        if proc.popen.poll() is not None:
            raise RuntimeError(f"dask scheduler exited with {proc.popen.returncode}:\n{proc.tail()}")
        time.sleep(0.1)
    proc.stop()
    raise RuntimeError(f"dask scheduler did not start within 60 s:\n{proc.tail()}")


def worker_argv(address: str, name: str, host: str, local_directory: str) -> list[str]:
    """``dask worker`` as a product GPU worker is started (deploy/dask/existing-scheduler.yaml): one thread,
    the GPU resource; plus where it listens and keeps its files, and no dashboard."""
    return [
        str(VENV_BIN / "dask"),
        "worker",
        address,
        "--name",
        name,
        "--nthreads",
        "1",
        "--nworkers",
        "1",
        "--resources",
        GPU_RESOURCE,
        "--host",
        host,
        "--local-directory",
        local_directory,
        "--no-dashboard",
        "--death-timeout",
        "60",
    ]


def installation_dirs() -> list[Path]:
    """The project and its Python environment (outermost directories only)."""
    dirs = sorted({REPO, Path(sys.prefix).resolve()}, key=lambda d: len(d.parts))
    return [d for i, d in enumerate(dirs) if not any(d.is_relative_to(o) for o in dirs[:i])]


def namespaced_command(
    network: HostNetwork, i: int, hostname: str, inner: Sequence[str], provision: Sequence[str] = ()
) -> list[str]:
    """``inner`` run as PID 1 of new mount, UTS and PID namespaces inside network namespace ``i``: private
    tmpfs ``/tmp`` and ``/dev/shm``, root filesystem read-only (a bind of it, so the host's stays as it
    is), hostname ``hostname``; ``provision`` (absolute paths under /tmp) copied into the private /tmp
    first, at the same paths."""
    for p in provision:
        if not (Path(p).is_absolute() and Path(p).parts[1] == "tmp"):
            raise ValueError(f"provisioned files must lie under /tmp (the worker's private tmpfs): {p}")
    copy_in = " ".join(shlex.quote(str(Path(p).relative_to("/"))) for p in provision)
    # the installation itself (project and environment) stays visible where it lies, even under /tmp (a CI
    # checkout): bound aside before /tmp is replaced, moved back to its path, read-only
    keep = [str(d) for d in installation_dirs() if Path(d).parts[1:2] == ("tmp",)]
    hold = [
        line
        for k, d in enumerate(keep)
        for line in (f"mkdir -p /mnt/keep{k}", f"mount --bind {shlex.quote(d)} /mnt/keep{k}")
    ]
    restore = [
        line
        for k, d in enumerate(keep)
        for line in (
            f"mkdir -p {shlex.quote(d)}",
            f"mount -n --move /mnt/keep{k} {shlex.quote(d)}",
            f"mount -n -o remount,bind,ro {shlex.quote(d)}",
        )
    ]
    script = "\n".join(
        [
            "set -e",
            f"hostname {shlex.quote(hostname)}",
            "mount -t tmpfs -o size=512m,mode=0700 climrecon-stage /mnt",  # staging: this namespace only
            f'cd / && for f in {copy_in}; do cp --parents "$f" /mnt/; done' if provision else ":",
            *hold,
            "mount --rbind / /",
            "mount -o remount,bind,ro /",  # this namespace's bind of / only; the host's root stays rw
            "mount -t tmpfs -o mode=1777 climrecon-tmp /tmp",
            "mount -t tmpfs -o mode=1777 climrecon-shm /dev/shm",
            "if [ -d /mnt/tmp ]; then cp -a /mnt/tmp/. /tmp/; fi",
            *restore,
            "umount -l /mnt || true",
            "mkdir -p /tmp/home /tmp/dask-scratch",
            "cd /tmp",
            "exec " + shlex.join(inner),
        ]
    )
    unshare = [
        "unshare",
        "--mount",
        "--uts",
        "--pid",
        "--fork",
        "--kill-child",
        "--mount-proc",
        "--propagation",
        "private",
    ]
    return ["ip", "netns", "exec", network.namespace(i), *unshare, "sh", "-c", script]


@dataclass
class Pool:
    """A running scheduler and its workers (``kind``: ``namespaced`` or ``one-host``)."""

    kind: str
    address: str
    workers: dict[str, str]  # name -> the address it listens on (host part)
    processes: list[Process]


@contextlib.contextmanager
def worker_pool(
    kind: str,
    logs: Path,
    credentials: Mapping[str, str],
    network: HostNetwork | None = None,
    n_workers: int = 2,
    provision: Sequence[str] = (),
    timeout: float = 180.0,
) -> Iterator[Pool]:
    """A scheduler + ``n_workers`` ``dask worker`` processes, stopped on exit.

    ``network`` given: the scheduler on its host side, worker ``i`` inside namespace ``i`` of it
    (:func:`namespaced_command`). Else all in this machine's namespaces, on 127.0.0.1. ``credentials`` (the
    object store's ``AWS_*``) reach the workers through their environment only."""
    from distributed import Client

    procs: list[Process] = []
    try:
        host = network.host_ip if network else "127.0.0.1"
        scheduler, address = start_scheduler(host, logs / kind, base_env())
        procs.append(scheduler)
        workers = {}
        for i in range(n_workers):
            name = f"{kind}-w{i}"
            env = {**base_env(), **credentials}
            if network:
                worker_ip = network.worker_ip(i)
                argv = worker_argv(address, name, worker_ip, "/tmp/dask-scratch")
                argv = namespaced_command(network, i, name, argv, provision)
                env["HOME"] = "/tmp/home"
            else:
                worker_ip = "127.0.0.1"
                argv = worker_argv(address, name, worker_ip, str(logs / kind / f"{name}-scratch"))
            procs.append(_spawn(name, argv, logs / kind, env))
            workers[name] = worker_ip
        deadline = time.monotonic() + timeout
        with Client(address, timeout=timeout, set_as_default=False) as client:
            while len(client.scheduler_info(n_workers=-1)["workers"]) < n_workers:
                dead = [p for p in procs if p.popen.poll() is not None]
                if dead:
                    raise RuntimeError(
                        f"{dead[0].name} exited with {dead[0].popen.returncode}:\n{dead[0].tail()}"
                    )
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"{kind} pool: workers did not join within {timeout:.0f} s:\n"
                        + "\n".join(f"--- {p.name}\n{p.tail(800)}" for p in procs[1:])
                    )
                time.sleep(0.2)
            client.get_task_stream(start=time.time())  # installs the scheduler's task-stream recorder now
        yield Pool(kind, address, workers, procs)
    finally:
        for proc in reversed(procs):
            proc.stop()


# -- what the workers are, seen from inside -----------------------------------------------------------------
def probe_workers(
    client: Any, client_marker: str, checkpoint: str | None = None
) -> dict[str, dict[str, Any]]:
    """Facts each worker reports about itself, keyed by worker address: hostname, its network/mount/PID
    namespaces (same as the client's or not), interfaces, whether its root filesystem is read-only, its
    /tmp filesystem type, whether it sees ``client_marker`` (a file in the client's scratch), CUDA, and
    which ``checkpoint`` it would load (resolved as the method resolves it, on the worker) with its
    content hash."""
    here = _namespace_ids()

    def probe(marker: str, checkpoint: str | None) -> dict[str, Any]:  # nested: pickled by value
        import os

        found = None
        if checkpoint:
            from climrecon.methods.dpdm import default_checkpoint
            from climrecon.models.checkpoint import read_checkpoint

            path = default_checkpoint(checkpoint)
            try:
                found = {"path": path, "content_sha256": read_checkpoint(path).header["content_sha256"]}
            except Exception as exc:  # noqa: BLE001 - reported, not raised
                found = {"path": path, "error": f"{type(exc).__name__}: {exc}"}

        def ns(kind: str) -> str:
            try:
                return os.readlink(f"/proc/self/ns/{kind}")
            except OSError:
                return "?"

        tmp_type = "?"
        with open("/proc/self/mounts") as mounts:
            for line in mounts:
                parts = line.split()
                if len(parts) > 2 and parts[1] == "/tmp":
                    tmp_type = parts[2]
        try:
            import torch

            cuda = bool(torch.cuda.is_available())
        except Exception:  # noqa: BLE001
            cuda = False
        return {
            "hostname": socket.gethostname(),
            "namespaces": {k: ns(k) for k in ("net", "mnt", "uts", "pid")},
            "interfaces": sorted(name for _, name in socket.if_nameindex()),
            "root_read_only": bool(os.statvfs("/").f_flag & os.ST_RDONLY),
            "tmp_filesystem": tmp_type,
            "sees_client_scratch": os.path.exists(marker),
            "pid": os.getpid(),
            "cuda_available": cuda,
            "checkpoint": found,
        }

    facts = client.run(probe, client_marker, checkpoint)
    for info in facts.values():
        info["shares_with_client"] = sorted(k for k, v in info.pop("namespaces").items() if here.get(k) == v)
    return facts


def _namespace_ids() -> dict[str, str]:
    out = {}
    for kind in ("net", "mnt", "uts", "pid"):
        with contextlib.suppress(OSError):
            out[kind] = os.readlink(f"/proc/self/ns/{kind}")
    return out


def warm_up(client: Any) -> list[Any]:
    """Start importing the downscale stage (torch, xarray, zarr, the methods) on every worker, without
    waiting: a worker's first unit then does not pay for it (tests overlap it with other work). The
    futures, one per worker (gather them before counting tasks)."""

    def load() -> str:  # nested: pickled by value
        import climrecon.methods.dpdm  # noqa: F401
        import climrecon.tasks.downscale  # noqa: F401

        return "loaded"

    workers = client.scheduler_info(n_workers=-1)["workers"]
    return [
        client.submit(load, pure=False, workers=[w], allow_other_workers=False, key=f"warm-up-{w}")
        for w in workers
    ]


def task_counts(client: Any, since: float) -> dict[str, dict[str, int]]:
    """Per worker address: tasks run since ``since`` (epoch s) by kind (``downscale-sample``,
    ``downscale-write``, other), from the scheduler's task stream."""
    out: dict[str, dict[str, int]] = {}
    for rec in client.get_task_stream(start=since):
        key = str(rec.get("key", ""))
        kind = next((k for k in ("downscale-sample", "downscale-write") if key.startswith(k)), "other")
        per = out.setdefault(str(rec.get("worker")), {})
        per[kind] = per.get(kind, 0) + 1
    return out


# -- stores -----------------------------------------------------------------------------------------------
METADATA_NAMES = ("zarr.json", ".zattrs", ".zgroup", ".zarray", ".zmetadata")
RUN_ATTRS = ("history", "climrecon_completed", "climrecon_provenance")
"""Root-group attributes that say when and where a run happened (so differ between two runs)."""
RUN_STATE = (".climrecon/complete.json",)
"""The store's completion record (holds the completion time)."""


def _json_diff(a: Any, b: Any, path: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _json_diff(a.get(k), b.get(k), f"{path}/{k}" if path else str(k))
        return out
    return [] if a == b else [path or "(whole)"]


def _allowed(rel: str, keys: list[str]) -> bool:
    """Whether a differing object differs only where a run's time, store URL or workers are recorded: the
    root group's :data:`RUN_ATTRS` (in ``zarr.json`` or ``.zattrs``, and as consolidated in ``.zmetadata``)
    or the completion record."""
    if rel in RUN_STATE:
        return True
    where = {
        "zarr.json": "attributes/{}",  # zarr v3 root group
        ".zattrs": "{}",  # zarr v2 root group
        ".zmetadata": "metadata/.zattrs/{}",  # zarr v2 consolidated copy of the root attributes
    }.get(rel)
    return bool(keys) and where is not None and set(keys) <= {where.format(n) for n in RUN_ATTRS}


def compare_stores(fs: Any, a: str, b: str) -> dict[str, Any]:
    """Every object of store ``a`` against store ``b``, byte for byte (both listed afresh with ``fs``).

    Returns counts, ``only_in_a``/``only_in_b``, ``differing`` (object -> the JSON keys that differ, for
    metadata documents), ``data_chunks_identical`` (every object that is not zarr metadata nor the store's
    state) and ``bytes_identical``: the same objects, every chunk and array metadata identical, and the
    only differences in the attributes that record a run's time, store URL and workers
    (:data:`RUN_ATTRS`) and in the completion record (:data:`RUN_STATE`)."""
    roots = {s: s.split("://", 1)[-1].rstrip("/") for s in (a, b)}
    fs.invalidate_cache()
    listing = {s: {p[len(r) + 1 :] for p in fs.find(r)} for s, r in roots.items()}
    common = sorted(listing[a] & listing[b])
    differing: dict[str, list[str]] = {}
    chunks = identical = 0
    chunks_identical = True
    for rel in common:
        x, y = fs.cat(f"{roots[a]}/{rel}"), fs.cat(f"{roots[b]}/{rel}")
        is_meta = rel.rsplit("/", 1)[-1] in METADATA_NAMES or rel.startswith(".climrecon/")
        chunks += not is_meta
        if x == y:
            identical += 1
            continue
        if not is_meta:
            chunks_identical = False
            differing[rel] = ["(chunk bytes)"]
            continue
        try:
            differing[rel] = _json_diff(json.loads(x), json.loads(y))
        except ValueError:
            differing[rel] = ["(not JSON)"]
    only_a, only_b = sorted(listing[a] - listing[b]), sorted(listing[b] - listing[a])
    allowed = all(_allowed(rel, keys) for rel, keys in differing.items())
    return {
        "objects_compared": len(common),
        "objects_identical": identical,
        "data_chunks_compared": chunks,
        "data_chunks_identical": chunks_identical and chunks > 0,
        "only_in_a": only_a,
        "only_in_b": only_b,
        "differing": differing,
        "bytes_identical": bool(common) and not only_a and not only_b and chunks_identical and allowed,
    }


def write_inputs(
    store: ObjectStore,
    months: int,
    nlat: int = NLAT,
    nlon: int = NLON,
    variables=("tas", "uas", "vas"),
    factor: int = 8,
) -> dict[str, str]:
    """Synthetic regridded ``fine`` and ``static`` stores (as the regrid stage leaves them) under
    ``s3://<bucket>/inputs``: smooth seasonal fields with a little noise on a 0.25-deg grid over the western
    US, static fields with the coarse views the regrid stage adds."""
    import cftime
    import numpy as np
    import xarray as xr

    from climrecon.methods.features import with_coarse_static
    from climrecon.stores import StageStore, content_key
    from climrecon.tasks.grids import Grid
    from climrecon.tasks.regrid_stage import STATIC_COARSE_VIEWS

    rng = np.random.default_rng(0)
    lat = 32.0 + 0.25 * (np.arange(nlat) + 0.5)
    lon = -122.0 + 0.25 * (np.arange(nlon) + 0.5)
    starts = [cftime.DatetimeNoLeap(2000 + i // 12, i % 12 + 1, 1) for i in range(months + 1)]
    yy, xx = np.meshgrid(np.linspace(0, 1, nlat), np.linspace(0, 1, nlon), indexing="ij")
    season = np.cos(2 * np.pi * np.arange(months) / 12)[:, None, None]
    base = {"tas": 285 + 8 * season - 10 * yy, "uas": 3 * xx + season, "vas": 2 * yy - season}
    fine = xr.Dataset(
        {
            v: (
                ("time", "lat", "lon"),
                (base[v] + 0.2 * rng.standard_normal((months, nlat, nlon))).astype("float32"),
                {"units": "K" if v == "tas" else "m s-1"},
            )
            for v in variables
        },
        coords={"time": starts[:-1], "lat": lat, "lon": lon},
    )
    fine["time_bnds"] = (("time", "bnds"), np.stack([starts[:-1], starts[1:]], axis=1))
    fine["time"].encoding.update(units="days since 1850-01-01", calendar="noleap")
    orog = 2500 * np.exp(-((xx - 0.6) ** 2 + (yy - 0.5) ** 2) / 0.05)
    static = xr.Dataset(
        {
            "orog": (("lat", "lon"), orog.astype("float32")),
            "orog_std": (("lat", "lon"), (0.1 * orog).astype("float32")),
            "sftlf": (("lat", "lon"), (100.0 * (xx > 0.2)).astype("float32")),
        },
        coords={"lat": lat, "lon": lon},
    )
    static = with_coarse_static(static, Grid.from_dataset(static).coarsened(factor), STATIC_COARSE_VIEWS)
    attrs = {
        "source_id": "MH-GCM",
        "experiment_id": "historical",
        "member_id": "r1i1p1",
        "climrecon_regrid_config": json.dumps({"coarse_resolution": 0.25 * factor}),
    }
    urls = {}
    for name, ds, a in (("fine", fine, attrs), ("static", static, {})):
        url = store.url("inputs", f"MH-GCM.historical.r1i1p1.{name}.zarr")
        stage = StageStore(url, content_key("multi-host", name, months, nlat, nlon), store.storage_options)
        stage.initialize(ds)
        region = {d: slice(0, ds.sizes[d]) for d in ("time", "lat") if d in ds.dims}
        stage.write_block(ds, region)
        stage.finalize([region], attrs=a)
        urls[name] = url
    return urls


def upload_tree(fs: Any, local: str | Path, url: str) -> str:
    """Copy a local store (a directory) to ``url`` object by object; ``url``."""
    local = Path(local)
    root = url.split("://", 1)[-1].rstrip("/")
    for path in sorted(p for p in local.rglob("*") if p.is_file()):
        fs.pipe(f"{root}/{path.relative_to(local).as_posix()}", path.read_bytes())
    return url


# -- the benchmark ------------------------------------------------------------------------------------------
def run_flow(pool: Pool, overrides: list[str], inputs: Mapping[str, str | None]) -> tuple[str, float, dict]:
    """The downscale flow on ``pool`` (by scheduler address): store URL, wall seconds, task counts."""
    from distributed import Client

    from climrecon.flows.downscale import downscale_flow

    with Client(pool.address, set_as_default=False) as watcher:
        since = time.time()
        start = time.perf_counter()
        url = downscale_flow(
            overrides=overrides,
            fine_url=inputs["fine"],
            static_url=inputs["static"],
            coarse_url=inputs.get("coarse"),
            scheduler_address=pool.address,
        )
        wall = time.perf_counter() - start
        counts = task_counts(watcher, since)
    return url, wall, counts


def main(argv: list[str] | None = None) -> dict[str, Any]:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--months", type=int, default=6)
    parser.add_argument("--members", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4, help="sampler.num_steps")
    parser.add_argument("--months-per-unit", type=int, default=3)
    parser.add_argument("--members-per-unit", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2, help="rounds of each run (medians reported)")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    reason = namespaces_unavailable()
    if reason:
        raise SystemExit(f"cannot run the multi-host benchmark here: {reason}")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that the finally blocks clean up
    from common import command_line, machine, versions, write_results
    from distributed import Client
    from prefect import flow
    from prefect.testing.utilities import prefect_test_harness

    from climrecon.config import load_config

    scratch = Path(tempfile.mkdtemp(prefix="climrecon-multi-host-"))
    marker = scratch / "client-only.marker"
    marker.write_text("the client's scratch; no worker may see it\n")
    network = HostNetwork(n=2)
    try:
        network.create()
        s3 = start_object_store(network.host_ip, scratch / "logs")
        try:
            os.environ.update(s3.credentials)  # the client's credentials: environment only
            inputs = write_inputs(s3, args.months)
            common = [
                f"method.checkpoint={CHECKPOINT}",
                # the inputs are a toy GCM's fine view with no coarse store to bias-correct (on by default for
                # dpdm since the bias-correction work): what this measures is where the bytes are made
                "method.bias_correction=false",
                f"storage.options={json.dumps(s3.storage_options)}",
                f"downscale.members={args.members}",
                f"downscale.months_per_unit={args.months_per_unit}",
                f"downscale.members_per_unit={args.members_per_unit}",
                f"downscale.time_chunk={args.months_per_unit}",
                f"sampler.num_steps={args.steps}",
            ]
            runs: dict[str, list[dict[str, Any]]] = {"one_host": [], "multi_host": []}
            with prefect_test_harness():
                flow(name="warm-up")(_no_op)()  # the API's start-up work lands on no measured run
                for rep in range(args.repeats):  # interleaved rounds, fresh pools and stores each time
                    for kind, network_or_none in (("one_host", None), ("multi_host", network)):
                        root = s3.url(kind.replace("_", "-"), f"round-{rep}")
                        with worker_pool(
                            kind.replace("_", "-"), scratch / "logs", s3.credentials, network_or_none
                        ) as pool:
                            with Client(pool.address, set_as_default=False) as c:
                                probes = probe_workers(c, str(marker), CHECKPOINT)
                            url, wall, counts = run_flow(pool, [*common, f"storage.root={root}"], inputs)
                        runs[kind].append(
                            {
                                "url": url,
                                "wall_s": round(wall, 2),
                                "tasks_per_worker": counts,
                                "workers": probes,
                            }
                        )
            fs = s3.filesystem()
            reference = runs["one_host"][0]["url"]
            comparisons = {
                f"{kind} round {rep}": compare_stores(fs, reference, run["url"])
                for kind in ("multi_host", "one_host")
                for rep, run in enumerate(runs[kind])
                if run["url"] != reference
            }
            cfg = load_config(overrides=[*common, f"storage.root={s3.url('multi-host')}"])
            provenance = _provenance(s3, runs["multi_host"][0]["url"])
        finally:
            s3.process.stop()
    finally:
        network.delete()
        shutil.rmtree(scratch, ignore_errors=True)

    first = comparisons["multi_host round 0"]
    walls = {kind: [r["wall_s"] for r in runs[kind]] for kind in runs}
    median = {kind: round(float(statistics.median(w)), 2) for kind, w in walls.items()}
    checkpoint_sha = (provenance.get("checkpoint") or {}).get("sha256")
    multi_checks = []
    for run in runs["multi_host"]:
        sampled_on = {w: c.get("downscale-sample", 0) for w, c in run["tasks_per_worker"].items()}
        namespaced = {w for w, info in run["workers"].items() if not info["shares_with_client"]}
        multi_checks.append(
            bool(sampled_on)
            and set(sampled_on) == namespaced == set(run["workers"])
            and all(n > 0 for n in sampled_on.values())
        )
    multi = runs["multi_host"][0]
    results = {
        "multi_host": {
            "bytes_identical": all(c["bytes_identical"] for c in comparisons.values()),
            "wall_s": median["multi_host"],
            "one_host_wall_s": median["one_host"],
            "wall_s_rounds": walls["multi_host"],
            "one_host_wall_s_rounds": walls["one_host"],
            "workers": len(multi["workers"]),
            "months": args.months,
            "members": args.members,
            "units": -(-args.months // args.months_per_unit) * -(-args.members // args.members_per_unit),
            "objects_compared": first["objects_compared"],
            "objects_identical": first["objects_identical"],
            "data_chunks_compared": first["data_chunks_compared"],
            "data_chunks_identical": first["data_chunks_identical"],
            "differing_objects": first["differing"],
            "differing_why": (
                "the root group's history line and climrecon_completed carry the time of the run, "
                "climrecon_provenance the store URL (another storage.root), start time, worker addresses and "
                "sampling seconds (zarr.json holds the root attributes and the consolidated metadata); "
                ".climrecon/complete.json holds the completion time. Every chunk and every array's "
                "metadata is compared strictly."
            ),
            "comparisons": {
                k: {x: v[x] for x in ("bytes_identical", "objects_compared", "data_chunks_identical")}
                for k, v in comparisons.items()
            },
            "sampling_tasks_per_worker": {
                w: c.get("downscale-sample", 0) for w, c in multi["tasks_per_worker"].items()
            },
            "all_sampling_on_namespaced_workers": all(multi_checks),
            "checkpoint": {
                "configured": CHECKPOINT,
                "client_content_sha256": checkpoint_sha,
                "every_worker_loads_the_same": all(
                    (info.get("checkpoint") or {}).get("content_sha256") == checkpoint_sha
                    for run in runs["multi_host"]
                    for info in run["workers"].values()
                ),
                "how": "a path relative to the project: each host resolves it in its own installation",
            },
            "namespaces": {
                "network": (
                    f"each worker in its own network namespace, a veth pair to a host bridge "
                    f"({SUBNET}.x.0/24): scheduler, S3 endpoint and the other worker reached over it only"
                ),
                "mount": (
                    "each worker in its own mount namespace: private tmpfs /tmp (Dask local directory, HOME) and "
                    "/dev/shm, root filesystem read-only (the installed environment readable, nothing writable "
                    "that the client sees); the client's scratch (its /tmp: logs, a marker file) invisible"
                ),
                "uts": "own hostname per worker",
                "pid": "own PID namespace per worker (the dask nanny is its PID 1)",
                "verified_inside_each_worker": multi["workers"],
            },
            "devices": sorted({w.get("device", "?") for w in provenance.get("workers", [])}),
        },
        "one_host": {
            "pool": "a dask scheduler + 2 `dask worker` processes (same options) on 127.0.0.1, root namespaces",
            "tasks_per_worker": runs["one_host"][0]["tasks_per_worker"],
        },
        "multi_host_tasks_per_worker": multi["tasks_per_worker"],
        "wall_s_ratio_multi_over_one": round(median["multi_host"] / median["one_host"], 3),
        "what_is_timed": (
            "the downscale Prefect flow (plan, template, unit tasks on the pool, finalize), pools already "
            "started and probed (torch imported); each worker loads the model in its first unit. Rounds "
            "interleave one-host and multi-host runs, fresh pools and stores each; medians reported"
        ),
        "store": {"multi_host": multi["url"], "one_host": runs["one_host"][0]["url"]},
        "command": command_line(),
        "machine": machine(),
        "versions": versions("torch", "dask", "distributed", "prefect", "xarray", "zarr", "s3fs", "moto"),
        "config": {
            "overrides": [o for o in common if not o.startswith("storage.options")]
            + ["storage.options={endpoint_url: <moto>}"],
            "downscale": cfg.downscale.model_dump(mode="json"),
            "sampler": cfg.sampler.model_dump(mode="json"),
            "method": cfg.method.model_dump(mode="json"),
            "grid": {"lat": NLAT, "lon": NLON, "resolution_deg": 0.25},
        },
    }
    load, cores = os.getloadavg()[0], len(os.sched_getaffinity(0))
    if load > cores - 0.5:
        results["note"] = (
            f"the machine was busy while measuring (1-min load {load:.1f} on {cores} cores): wall times compare "
            "the two pools under the same load, not absolute speed"
        )
    write_results(args.out, results)
    print(json.dumps(results["multi_host"], indent=1, default=str))
    return results


def _no_op() -> None:
    """The warm-up flow's body."""


def _provenance(s3: ObjectStore, url: str) -> dict[str, Any]:
    import zarr

    group = zarr.open_group(store=url, mode="r", storage_options=s3.storage_options)
    try:
        return json.loads(group.attrs.get("climrecon_provenance", "{}"))
    except ValueError:
        return {}


if __name__ == "__main__":
    main()
