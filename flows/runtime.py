"""Where Dask computes: an existing scheduler, or a LocalCluster started for the duration of a flow.

Prefect orchestrates (tasks, retries, state); Dask computes (every lazy xarray operation a task runs
goes to the client opened here, which becomes the default scheduler while the context is open).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

from distributed import Client, LocalCluster

__all__ = ["dask_client"]


@contextmanager
def dask_client(
    address: str | None = None,
    n_workers: int | None = None,
    threads_per_worker: int = 1,
) -> Iterator[Client]:
    """A ``distributed.Client`` for the block: connected to ``address`` if given, else to a new LocalCluster.

    The LocalCluster uses worker processes (``n_workers``, default: Dask's choice for this machine) with
    ``threads_per_worker`` threads each (1 by default: netCDF/HDF5 reads are not thread-safe), its
    dashboard on a free port (``client.dashboard_link``), and quiet logs. It is closed on exit; a
    cluster reached by address is left running.
    """
    # Prefect's logging set-up re-enables INFO on the "distributed" logger; keep the console to warnings.
    logging.getLogger("distributed").setLevel(logging.WARNING)
    if address:
        with Client(address, set_as_default=True) as client:
            yield client
        return
    with LocalCluster(
        n_workers=n_workers,
        threads_per_worker=threads_per_worker,
        processes=True,
        dashboard_address=":0",
        silence_logs=logging.ERROR,
    ) as cluster, Client(cluster, set_as_default=True) as client:
        yield client
