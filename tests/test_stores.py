"""StageStore: template once, region blocks with markers, completeness only at the very end."""

import numpy as np
import pytest
import xarray as xr

from climrecon.stores import StageStore, StoreStateError, content_key, time_blocks


def _dataset(n_time: int = 10) -> xr.Dataset:
    rng = np.random.default_rng(0)
    return xr.Dataset(
        {"tas": (("time", "lat", "lon"), rng.normal(size=(n_time, 3, 4)).astype("float32"))},
        coords={"time": np.arange(n_time), "lat": [0.0, 1.0, 2.0], "lon": [0.0, 1.0, 2.0, 3.0]},
    )


def test_content_key_is_order_independent_and_sensitive():
    assert content_key({"a": 1, "b": [1, 2]}) == content_key({"b": [1, 2], "a": 1})
    assert content_key({"a": 1}) != content_key({"a": 2})


def test_blocks_fill_store_and_complete_only_at_end(tmp_path):
    ds = _dataset()
    store = StageStore(str(tmp_path / "s.zarr"), key="k1")
    assert store.initialize(ds.chunk({"time": 4}))
    regions = [{"time": s} for s in time_blocks(ds.sizes["time"], 4)]
    assert len(regions) == 3 and regions[-1]["time"] == slice(8, 10)
    for r in regions[:2]:
        store.write_block(ds.isel(r), r)
    assert not store.is_complete()
    with pytest.raises(StoreStateError, match="1 block"):
        store.finalize(regions)
    assert store.pending(regions) == [regions[2]]
    # a second run reuses the template and writes only what is missing
    assert not store.initialize(ds.chunk({"time": 4}))
    for r in store.pending(regions):
        store.write_block(ds.isel(r), r)
    store.finalize(regions, attrs={"note": "x"})
    assert store.is_complete()
    out = xr.open_zarr(store.url)
    assert out.attrs["climrecon_status"] == "complete" and out.attrs["note"] == "x"
    np.testing.assert_array_equal(out.tas.values, ds.tas.values)


def test_store_with_other_key_is_never_overwritten(tmp_path):
    ds = _dataset()
    a = StageStore(str(tmp_path / "s.zarr"), key="k1")
    a.initialize(ds.chunk({"time": 5}))
    b = StageStore(a.url, key="k2")
    with pytest.raises(StoreStateError, match="refusing to overwrite"):
        b.initialize(ds.chunk({"time": 5}))
    assert not b.is_complete()


def test_a_template_interrupted_mid_write_is_written_again(tmp_path):
    """A fault while the template is written (group metadata there, arrays not) must not poison the store:
    without its template marker and with no block written, the next run writes the template again."""
    import shutil
    from pathlib import Path

    ds = _dataset()
    store = StageStore(str(tmp_path / "s.zarr"), key="k1")
    assert store.initialize(ds.chunk({"time": 5}))
    Path(store.url, ".climrecon", "template.json").unlink()  # as if the run died before the marker
    shutil.rmtree(Path(store.url, "tas"))  # ... and before the array's metadata
    assert store.initialize(ds.chunk({"time": 5}))  # written again, not reused
    regions = [{"time": slice(0, 5)}, {"time": slice(5, 10)}]
    for r in regions:
        store.write_block(ds.isel(r), r)
    store.finalize(regions)
    np.testing.assert_array_equal(xr.open_zarr(store.url).tas.values, ds.tas.values)
    # a store of an earlier release (done markers, no template marker) is reused, never overwritten
    Path(store.url, ".climrecon", "template.json").unlink()
    assert not store.initialize(ds.chunk({"time": 5}))


def test_a_fault_right_after_the_first_write_leaves_a_store_that_says_whose_it_is(tmp_path, monkeypatch):
    """The key is in the very first object written: a fault before the arrays (or the attributes xarray
    writes) leaves a store the next run of the same key rewrites, and another key still refuses."""
    ds = _dataset()
    store = StageStore(str(tmp_path / "s.zarr"), key="k1")

    def cut(*args, **kwargs):
        raise OSError("connection lost")

    with monkeypatch.context() as m:
        m.setattr(xr.Dataset, "to_zarr", cut)
        with pytest.raises(OSError, match="connection lost"):
            store.initialize(ds.chunk({"time": 5}))
    assert store.exists() and store.stored_key() == "k1" and not store.is_complete()
    with pytest.raises(StoreStateError, match="refusing to overwrite"):
        StageStore(store.url, key="k2").initialize(ds.chunk({"time": 5}))
    assert store.initialize(ds.chunk({"time": 5}))  # written again
    regions = [{"time": slice(0, 5)}, {"time": slice(5, 10)}]
    for r in regions:
        store.write_block(ds.isel(r), r)
    store.finalize(regions)
    np.testing.assert_array_equal(xr.open_zarr(store.url).tas.values, ds.tas.values)


def test_claim_waits_for_a_live_lease_and_skips_a_block_written_meanwhile(tmp_path, caplog):
    import logging
    import threading

    ds = _dataset()
    store = StageStore(str(tmp_path / "s.zarr"), key="k1")
    store.initialize(ds.chunk({"time": 5}))
    region = {"time": slice(0, 5)}
    assert store.lease(region, "run-a", 60) == (True, None)  # run A (alive: this process) computes it
    caplog.set_level(logging.WARNING, logger="climrecon.stores")
    got = {}
    waiter = threading.Thread(target=lambda: got.update(b=store.claim(region, "run-b", poll=0.05)))
    waiter.start()
    threading.Event().wait(0.3)
    store.write_block(ds.isel(region), region)  # run A writes it ...
    store.release(region, "run-a")
    waiter.join(10)
    assert got == {"b": False}  # ... so run B skips it
    assert "is being written by run run-a" in caplog.text and "was written by another run" in caplog.text
    assert store.claim({"time": slice(5, 10)}, "run-b")  # a free block is taken at once


def test_claim_skips_a_block_written_between_its_check_and_its_lease(tmp_path, monkeypatch):
    """The race a busy machine hits: run A writes and releases the block after run B found it not done but
    before B took the free lease. B must look again, skip the block and leave no lease behind."""
    ds = _dataset()
    store = StageStore(str(tmp_path / "s.zarr"), key="k1")
    store.initialize(ds.chunk({"time": 5}))
    region = {"time": slice(0, 5)}
    real_lease = store.lease

    def lease_after_run_a_finished(region_, owner, seconds):
        if not store.is_done(region_):
            store.write_block(ds.isel(region_), region_)  # run A writes it and has released it ...
        return real_lease(region_, owner, seconds)  # ... just before run B takes the free lease

    monkeypatch.setattr(store, "lease", lease_after_run_a_finished)
    assert store.claim(region, "run-b") is False
    monkeypatch.undo()
    assert store.lease(region, "run-c", 60) == (True, None)  # run B let its lease go
