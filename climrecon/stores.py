"""Hash-keyed, resumable Zarr stores that several workers fill block by block.

Every stage writes its output the same way (STACK.md, "Parallel writers"):

1. :meth:`StageStore.initialize` writes the template once (metadata and coordinates, no data) with the
   store's content key and ``climrecon_status="incomplete"`` in its attributes;
2. each block is written with :meth:`StageStore.write_block` as a chunk-aligned ``region`` write, then a
   small *done marker* object is put under ``<store>/.climrecon/done/`` (after the data, never before);
3. :meth:`StageStore.finalize` checks every expected block has its marker, flips the status attribute to
   ``complete``, re-consolidates metadata and writes ``<store>/.climrecon/complete.json`` last.

So a store is complete only if that marker exists and names the same key; an interrupted or failed run
leaves a store that :meth:`is_complete` rejects, and a re-run writes only the blocks without markers.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import socket
import threading
import time
import warnings
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr
import zarr

from climrecon.storage import filesystem, join_url, url_options

__all__ = ["content_key", "StageStore", "StoreStateError", "time_blocks"]

STATE_DIR = ".climrecon"


class StoreStateError(RuntimeError):
    """A store exists but does not belong to this run (other key) or is not in the state expected."""


def _canonical(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {str(k): _canonical(v) for k, v in sorted(obj.items(), key=lambda kv: str(kv[0]))}
    if isinstance(obj, (list, tuple)):
        return [_canonical(v) for v in obj]
    if isinstance(obj, (np.integer, np.floating)):
        return obj.item()
    if hasattr(obj, "model_dump"):
        return _canonical(obj.model_dump(mode="json"))
    return obj


def content_key(*parts: Any, length: int = 16) -> str:
    """A stable hex digest of JSON-able parts (dict order does not matter; pydantic models allowed)."""
    blob = json.dumps(_canonical(list(parts)), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:length]


def time_blocks(n_time: int, block: int) -> list[slice]:
    """Consecutive ``slice``s of length ``block`` (the last may be shorter) covering ``range(n_time)``."""
    return [slice(i, min(i + block, n_time)) for i in range(0, n_time, block)]


LEASE_SECONDS = 1800.0  # how long another run waits at most for a block being written
LEASE_POLL_SECONDS = 2.0
LOG = logging.getLogger("climrecon.stores")


def default_owner() -> str:
    """This process and thread as a lease owner (a retry in another thread or process is another owner;
    a dead owner's lease is taken over at once)."""
    return f"{socket.gethostname()}:{os.getpid()}:{threading.get_ident()}"


def _lease_alive(record: Mapping[str, Any]) -> bool:
    """A lease holds until it expires, unless its process is known dead (same host, pid gone)."""
    if float(record.get("expires", 0)) <= time.time():
        return False
    if record.get("host") == socket.gethostname():
        try:
            pid = int(record.get("pid", -1))
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except (PermissionError, ValueError, OverflowError):
            return True
        try:  # a killed process not yet reaped by its parent (a zombie) is dead too
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
        except (OSError, IndexError):
            return True
    return True


@contextlib.contextmanager
def _quiet_state_folder() -> Iterator[None]:
    """Consolidating a store lists our state folder (``.climrecon/``), which sits inside the store on
    purpose; zarr notes it is not a node of the hierarchy: that note only, silenced."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Object at \.climrecon is not recognized")
        yield


def _block_name(region: Mapping[str, slice]) -> str:
    return "_".join(f"{dim}-{s.start}-{s.stop}" for dim, s in sorted(region.items()))


@dataclass
class StageStore:
    """One stage output store at ``url`` whose identity is ``key`` (a :func:`content_key`)."""

    url: str
    key: str
    storage_options: dict[str, Any] = field(default_factory=dict, repr=False)

    # -- state ------------------------------------------------------------------------------------
    def _fs(self):
        return filesystem(self.url, self.storage_options)

    def _state(self, *parts: str) -> str:
        return join_url(self._fs()[1], STATE_DIR, *parts)

    def _put(self, path: str, data: bytes) -> None:
        fs, _ = self._fs()
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        fs.pipe(path, data)

    def exists(self) -> bool:
        fs, path = self._fs()
        return fs.exists(join_url(path, "zarr.json")) or fs.exists(join_url(path, ".zgroup"))

    def stored_key(self) -> str | None:
        """The key recorded in the store's attributes, or None when there is no readable store."""
        if not self.exists():
            return None
        try:
            group = zarr.open_group(
                store=self.url, mode="r", storage_options=url_options(self.url, self.storage_options)
            )
        except Exception:  # noqa: BLE001 - an unreadable store has no key
            return None
        return group.attrs.get("climrecon_key")

    def _forget_listings(self) -> None:
        """Drop this process's cached directory listings of the state folders: s3fs (and other fsspec
        backends) cache listings per process, and markers are written by other processes (Dask workers,
        a concurrent run), so completeness is always decided from a fresh listing. (``invalidate_cache``
        drops a path and its parents, never its children: each listed folder is named.)"""
        fs, _ = self._fs()
        for folder in ("done", "lease"):
            fs.invalidate_cache(self._state(folder))
        fs.invalidate_cache(self._state())

    def is_complete(self) -> bool:
        fs, _ = self._fs()
        marker = self._state("complete.json")
        self._forget_listings()
        if not fs.exists(marker):
            return False
        try:
            info = json.loads(fs.cat(marker))
        except (ValueError, OSError):
            return False
        return info.get("key") == self.key

    def done_blocks(self) -> set[str]:
        """Names of the blocks with a done marker, from a fresh listing (never a cached one)."""
        fs, _ = self._fs()
        self._forget_listings()
        try:
            return {p.rsplit("/", 1)[-1] for p in fs.ls(self._state("done"), detail=False, refresh=True)}
        except FileNotFoundError:
            return set()

    def is_done(self, region: Mapping[str, slice]) -> bool:
        """Whether ``region`` has its done marker (a fresh check)."""
        fs, _ = self._fs()
        self._forget_listings()
        return fs.exists(self._state("done", _block_name(region)))

    # -- leases: one writer per block across concurrent runs ------------------------------------------
    def lease(
        self, region: Mapping[str, slice], owner: str, seconds: float
    ) -> tuple[bool, dict[str, Any] | None]:
        """Try to take the lease of ``region`` for ``owner`` for ``seconds``: ``(True, None)`` when taken (or
        already ours), ``(False, holder)`` when another live owner holds it (its JSON record: owner, host,
        pid, expires). A lease is dead when it has expired or its process is gone from this host; a dead
        lease is taken over. The record lives beside the done markers, on the store's own filesystem.
        Two runs racing for a free lease both write, then read back: the last writer keeps it, the other
        backs off (the worst case is one block sampled twice, to the same bytes)."""
        path = self._state("lease", _block_name(region))
        holder = self._read_lease(path)
        if holder and holder.get("owner") != owner and _lease_alive(holder):
            return False, holder
        record = {
            "owner": owner,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "expires": time.time() + float(seconds),
        }
        self._put(path, json.dumps(record).encode())
        now = self._read_lease(path)  # (read back from a fresh listing)
        if now and now.get("owner") != owner:
            return False, now
        return True, None

    def claim(
        self,
        region: Mapping[str, slice],
        owner: str | None = None,
        seconds: float = LEASE_SECONDS,
        poll: float = LEASE_POLL_SECONDS,
    ) -> bool:
        """Before computing ``region``: take its lease (:meth:`lease`), waiting while another live run holds
        it. True: write it, then :meth:`write_block` and :meth:`release`; False: another run wrote it
        meanwhile (skip it). Both the wait and the skip are logged (logger ``climrecon.stores``).
        ``owner`` defaults to this process and thread (:func:`default_owner`)."""
        owner = owner or default_owner()
        said = False
        while True:
            if self.is_done(region):
                if said:
                    LOG.warning("%s %s was written by another run: skipped", self.url, _block_name(region))
                return False
            taken, holder = self.lease(region, owner, seconds)
            if taken:
                # the holder may have written and released between our check and our lease: look again
                if not self.is_done(region):
                    return True
                self.release(region, owner)
                continue
            if not said:
                LOG.warning(
                    "%s %s is being written by run %s (pid %s on %s, lease until %s): waiting for it",
                    self.url,
                    _block_name(region),
                    holder.get("owner"),
                    holder.get("pid"),
                    holder.get("host"),
                    time.strftime("%H:%M:%S", time.localtime(float(holder.get("expires", 0)))),
                )
                said = True
            time.sleep(poll)

    def release(self, region: Mapping[str, slice], owner: str) -> None:
        """Drop ``owner``'s lease of ``region`` (a no-op when it is not ours any more)."""
        fs, _ = self._fs()
        path = self._state("lease", _block_name(region))
        holder = self._read_lease(path)
        if holder and holder.get("owner") == owner:
            try:
                fs.rm(path)
            except FileNotFoundError:
                pass

    def _read_lease(self, path: str) -> dict[str, Any] | None:
        fs, _ = self._fs()
        fs.invalidate_cache(path.rsplit("/", 1)[0])
        try:
            return json.loads(fs.cat(path))
        except (FileNotFoundError, ValueError):
            return None

    def pending(self, regions: Iterable[Mapping[str, slice]]) -> list[dict[str, slice]]:
        """The regions among ``regions`` that have no done marker yet, in order."""
        done = self.done_blocks()
        return [dict(r) for r in regions if _block_name(r) not in done]

    # -- writing ----------------------------------------------------------------------------------
    def initialize(
        self, template: xr.Dataset, encoding: dict[str, Any] | None = None, zarr_format: int = 3
    ) -> bool:
        """Write the template (no data) unless a store with this key is already there.

        Returns True when a new template was written, False when an existing one (complete or
        partially filled with this key) is reused. The template counts as written once its marker
        (``.climrecon/template.json``) exists: a template interrupted mid-write (no marker, no block) is
        written again, so a fault while writing it never poisons the store. A store at ``url`` with
        another key is never overwritten: :class:`StoreStateError`.
        """
        mode = "w-"
        if self.exists():
            found = self.stored_key()
            if found != self.key:
                raise StoreStateError(
                    f"{self.url} already holds a store with key {found!r}, not {self.key!r}; refusing to overwrite it"
                )
            fs, _ = self._fs()
            self._forget_listings()
            if fs.exists(self._state("template.json")) or self.done_blocks():  # (stores of earlier releases
                return False  # have done markers but no template marker)
            mode = "w"  # our own template, interrupted while it was written (no block yet): write it again
        tmpl = template.copy()
        tmpl.attrs = {**template.attrs, "climrecon_key": self.key, "climrecon_status": "incomplete"}
        # The group's metadata, with the key, is the first object written (one PUT): a fault anywhere after
        # it leaves a store that says whose it is, so the next run rewrites it instead of refusing it.
        zarr.open_group(
            store=self.url,
            mode=mode,
            zarr_format=zarr_format,
            attributes={"climrecon_key": self.key, "climrecon_status": "incomplete"},
            storage_options=url_options(self.url, self.storage_options),
        )
        with _quiet_state_folder():  # appending consolidates the whole store, .climrecon/ included
            tmpl.to_zarr(
                self.url,
                mode="a",
                compute=False,
                encoding=encoding,
                zarr_format=zarr_format,
                consolidated=True,
                storage_options=url_options(self.url, self.storage_options),
            )
        self._put(
            self._state("template.json"), json.dumps({"key": self.key}).encode()
        )  # the template is whole
        return True

    def write_block(self, block: xr.Dataset, region: Mapping[str, slice]) -> None:
        """Write ``block`` into ``region`` (chunk-aligned), then record the block as done."""
        dims = set(region)
        drop = [n for n, c in block.coords.items() if not dims.intersection(c.dims)]
        block.drop_vars(drop).to_zarr(
            self.url,
            region=dict(region),
            mode="r+",
            storage_options=url_options(self.url, self.storage_options),
        )
        self._put(self._state("done", _block_name(region)), b"")

    def finalize(
        self, regions: Iterable[Mapping[str, slice]], attrs: Mapping[str, Any] | None = None
    ) -> None:
        """Mark the store complete once every region in ``regions`` has its done marker."""
        missing = self.pending(regions)
        if missing:
            raise StoreStateError(f"{self.url}: {len(missing)} block(s) not written yet, e.g. {missing[0]}")
        group = zarr.open_group(
            store=self.url, mode="r+", storage_options=url_options(self.url, self.storage_options)
        )
        finished = datetime.now(UTC).isoformat(timespec="seconds")
        group.attrs.update({**(attrs or {}), "climrecon_status": "complete", "climrecon_completed": finished})
        with _quiet_state_folder():
            zarr.consolidate_metadata(group.store)
        self._put(self._state("complete.json"), json.dumps({"key": self.key, "completed": finished}).encode())
