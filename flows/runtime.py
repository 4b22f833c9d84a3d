"""Where Dask computes: an existing scheduler, or a LocalCluster started for the duration of a flow.

Prefect orchestrates (tasks, retries, state); Dask computes (every lazy xarray operation a task runs
goes to the client opened here, which becomes the default scheduler while the context is open).

GPU pools: :func:`gpu_pool_spec` describes a local cluster with one worker per GPU (``resources={"GPU":
1}``, ``CUDA_VISIBLE_DEVICES`` set to its device) plus CPU workers that declare no resources; work
submitted with ``resources={"GPU": 1}`` (see :func:`sampling_resources`) runs only on the GPU workers.
``fake_gpu=True`` (tests, machines without GPUs) makes the first worker declare ``GPU=1`` without a
device, so that pinning can be checked anywhere.

Worker processes start without Dask's default ``MALLOC_TRIM_THRESHOLD_=65536`` (see
:func:`worker_spawn_environ`): with it glibc maps and unmaps every large buffer, and the sampler's torch
CPU kernels ran 1.9x slower in a worker than in a plain process (measured, benchmarks/downscale.py).
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import dask
from distributed import Client, LocalCluster, Nanny, Scheduler, SpecCluster, Worker
from distributed.diagnostics.plugin import SchedulerPlugin, WorkerPlugin

__all__ = ["dask_client", "gpu_pool_spec", "local_gpu_count", "sampling_resources", "worker_spawn_environ"]

GPU = "GPU"
SPAWN_ENVIRON_KEY = "distributed.nanny.pre-spawn-environ"


def worker_spawn_environ() -> dict[str, Any]:
    """Dask's pre-spawn environment for worker processes, minus ``MALLOC_TRIM_THRESHOLD_``.

    Dask sets it to 64 KiB so that workers hand freed memory back to the OS; setting it also switches off
    glibc's dynamic mmap threshold, so every tensor-sized allocation becomes an mmap + munmap pair with
    fresh page faults. PyTorch on CPU allocates such buffers at every layer: a sampling worker ran at
    half speed. Sampling workers hold a model and steady-sized buffers, so the default allocator is
    the right trade. Everything else (``OMP_NUM_THREADS=1`` ...) is kept."""
    environ = dict(dask.config.get(SPAWN_ENVIRON_KEY, default={}) or {})
    environ.pop("MALLOC_TRIM_THRESHOLD_", None)
    return environ


def local_gpu_count() -> int:
    """CUDA devices on this machine (0 without torch or CUDA)."""
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # noqa: BLE001 - a broken CUDA install counts as no GPU
        return 0


def gpu_pool_spec(
    n_gpus: int,
    cpu_workers: int = 0,
    threads_per_worker: int = 1,
    fake_gpu: bool = False,
    processes: bool = True,
) -> dict[str, dict[str, Any]]:
    """Worker specs (for ``SpecCluster``): ``gpu-<i>`` per GPU with ``resources={"GPU": 1}`` and
    ``CUDA_VISIBLE_DEVICES=i``, then ``cpu-<j>`` workers without resources. ``fake_gpu``: the GPU workers
    declare the resource but see no device (``CUDA_VISIBLE_DEVICES=""``), for tests on CPU-only machines.
    ``processes=False``: workers are threads of this process (fast to start; tests), without the env."""
    if not processes and n_gpus and not fake_gpu:
        raise ValueError("a GPU pool needs worker processes (each sees its own CUDA_VISIBLE_DEVICES)")
    spec: dict[str, dict[str, Any]] = {}
    for i in range(n_gpus):
        options: dict[str, Any] = {"nthreads": 1, "resources": {GPU: 1}}
        if processes:
            options.update(
                env={"CUDA_VISIBLE_DEVICES": "" if fake_gpu else str(i)}, silence_logs=logging.ERROR
            )
        spec[f"gpu-{i}"] = {"cls": Nanny if processes else Worker, "options": options}
    for j in range(cpu_workers):
        options = {"nthreads": threads_per_worker, **({"silence_logs": logging.ERROR} if processes else {})}
        spec[f"cpu-{j}"] = {"cls": Nanny if processes else Worker, "options": options}
    return spec


def sampling_resources(client: Client) -> dict[str, float] | None:
    """``{"GPU": 1}`` when some worker of ``client``'s cluster declares a GPU, else None (run anywhere)."""
    workers = client.scheduler_info(n_workers=-1).get("workers", {})  # all workers, not the first 5
    return {GPU: 1} if any(w.get("resources", {}).get(GPU, 0) > 0 for w in workers.values()) else None


@contextmanager
def dask_client(
    address: str | None = None,
    n_workers: int | None = None,
    threads_per_worker: int = 1,
    *,
    gpu_workers: int | None = 0,
    fake_gpu: bool = False,
    processes: bool = True,
) -> Iterator[Client]:
    """A ``distributed.Client`` for the block: connected to ``address`` if given, else to a new local cluster.

    The local cluster uses worker processes (``n_workers``, default: Dask's choice for this machine) with
    ``threads_per_worker`` threads each (1 by default: netCDF/HDF5 reads are not thread-safe), its
    dashboard on a free port (``client.dashboard_link``), and quiet logs. It is closed on exit; a
    cluster reached by address is left running.

    ``gpu_workers``: 0 (default) a plain LocalCluster; ``None`` one GPU worker per local CUDA device (a
    plain LocalCluster when there is none); ``k > 0`` a GPU pool (:func:`gpu_pool_spec`) of ``k`` GPU
    workers plus ``n_workers`` CPU workers (default 1). ``fake_gpu``: a pool whose first of ``n_workers``
    workers declares ``GPU=1`` without a device (tests on CPU-only machines). ``processes=False``: the
    workers are threads of this process (quick to start; for tests).
    """
    # Prefect's logging set-up re-enables INFO on the "distributed" logger; keep the console to warnings.
    logging.getLogger("distributed").setLevel(logging.WARNING)
    if address:
        with Client(address, set_as_default=True) as client:
            watch_lost_workers(client)
            yield client
        return
    if fake_gpu:
        n = max(n_workers or 2, 1)
        spec = gpu_pool_spec(1, n - 1, threads_per_worker, fake_gpu=True, processes=processes)
    else:
        gpus = local_gpu_count() if gpu_workers is None else gpu_workers
        spec = (
            gpu_pool_spec(gpus, 1 if n_workers is None else n_workers, threads_per_worker) if gpus else None
        )
    with dask.config.set({SPAWN_ENVIRON_KEY: worker_spawn_environ()}):  # read when each Nanny is created
        if spec is None:
            cluster = LocalCluster(
                n_workers=n_workers,
                threads_per_worker=threads_per_worker,
                processes=processes,
                dashboard_address=":0",
                silence_logs=logging.ERROR,
            )
        else:
            scheduler = {"cls": Scheduler, "options": {"dashboard_address": ":0"}}
            cluster = SpecCluster(workers=spec, scheduler=scheduler, silence_logs=logging.ERROR)
    with cluster, Client(cluster, set_as_default=True) as client:
        if spec is not None:
            client.wait_for_workers(len(spec))
        watch_lost_workers(client)
        if processes:
            client.register_plugin(DieWithParent())
            if not os.environ.get(VERBOSE_ENV):
                client.register_plugin(OneLineTaskErrors())
        yield client


VERBOSE_ENV = "CLIMRECON_VERBOSE"  # set by `climrecon --verbose`: full tracebacks everywhere


class _OneLine(logging.Filter):
    """Dask's "Compute Failed" record (a dozen lines with the traceback) as one line; the failure itself
    reaches the client, which reports it."""

    def filter(self, record: logging.LogRecord) -> bool:
        if (
            str(record.msg).startswith("Compute Failed")
            and isinstance(record.args, tuple)
            and len(record.args) >= 4
        ):
            record.msg, record.args = "task %s failed: %s", (record.args[0], record.args[3])
        return True


class OneLineTaskErrors(WorkerPlugin):
    """Worker processes log a failed task in one line (no traceback on the console; ``--verbose`` keeps it)."""

    name = "climrecon-one-line-errors"

    def setup(self, worker: Any) -> None:
        logger = logging.getLogger("distributed.worker")
        if not any(isinstance(f, _OneLine) for f in logger.filters):
            logger.addFilter(_OneLine())


class DieWithParent(WorkerPlugin):
    """Worker processes of a cluster this process started die with it (Linux parent-death signal), so a
    killed ``climrecon`` command leaves no worker behind, still sampling a unit and holding its lease."""

    name = "climrecon-die-with-parent"

    def setup(self, worker: Any) -> None:
        from climrecon.flows.server import _die_with_parent

        if os.getppid() != 1:
            _die_with_parent()


LOST_WORKERS_LOGGER = "climrecon.dask"


class LostWorkerLog(SchedulerPlugin):
    """Logs (logger ``climrecon.dask``, on the scheduler) every worker that dies unexpectedly, with the tasks
    it was running: a unit's sampling task is named after the unit (``downscale-sample-<store>-<unit>-...``),
    so the log says which unit was lost (Dask reschedules it on another worker)."""

    name = "climrecon-lost-workers"

    def log_event(self, topic: str, msg: Any) -> None:
        if topic != "all" or not isinstance(msg, dict) or msg.get("action") != "remove-worker":
            return
        running = sorted(str(k) for k in msg.get("processing-tasks") or ())
        if msg.get("expected") or not running:
            return  # a planned shutdown, or nothing was lost
        logging.getLogger(LOST_WORKERS_LOGGER).warning(
            "Dask worker %s was lost while running %s; Dask runs it again on another worker",
            msg.get("worker"),
            ", ".join(running),
        )


def watch_lost_workers(client: Client) -> None:
    """Register :class:`LostWorkerLog` on the client's scheduler (a remote scheduler needs climrecon
    installed to load it; if it cannot, the run goes on without the log line)."""
    try:
        with warnings.catch_warnings():  # a stage reconnecting to a run's cluster registers it again
            warnings.filterwarnings("ignore", message=".*already contains a plugin with name")
            client.register_plugin(LostWorkerLog())
    except Exception as exc:  # noqa: BLE001 - observability must not stop a run
        logging.getLogger(LOST_WORKERS_LOGGER).info("lost-worker log not installed on the scheduler: %s", exc)


# -- what is worth retrying ---------------------------------------------------------------------------------
DETERMINISTIC_ERRORS: tuple[type[BaseException], ...] = (
    ValueError,  # every ClimRecon input/config error (ConfigError, DownscaleError, MethodError, ...) is one
    TypeError,
    LookupError,
    AttributeError,
    NotImplementedError,
    AssertionError,
)
"""Failures that fail the same way on a retry (bad input, bad config, a bug): never retried."""


def is_transient(exc: BaseException) -> bool:
    """Whether a retry can succeed: I/O and network errors, lost or killed workers, time-outs, decoding a
    chunk that was being rewritten; not the deterministic errors of :data:`DETERMINISTIC_ERRORS` (a
    ``FileNotFoundError`` or ``PermissionError`` is an input error too)."""
    if isinstance(exc, FileNotFoundError | PermissionError | IsADirectoryError | NotADirectoryError):
        return False
    return not isinstance(exc, DETERMINISTIC_ERRORS)


def retry_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect ``retry_condition_fn``: retry a failed task run only when its error :func:`is_transient`."""
    try:
        state.result()
    except BaseException as exc:  # noqa: BLE001 - the state's own exception is what we classify
        return is_transient(exc)
    return False
