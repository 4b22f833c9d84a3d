"""The regrid stage on stores: plan/URLs, conservation on real and synthetic data, two Dask workers filling
one store, resume after an interrupted run, and bad inputs that fail cleanly before touching any store."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
from distributed import Client, LocalCluster

from climrecon.catalogs.synthetic import synthetic_reanalysis
from climrecon.config import Region, RegridConfig, StorageConfig, SyntheticConfig
from climrecon.methods.features import coarse_on_fine
from climrecon.storage import default_data_home
from climrecon.stores import StageStore, content_key, time_blocks
from climrecon.tasks.grids import Grid
from climrecon.tasks.regrid import RegridError, area_weights, coarsen_blocks, static_on_grid
from climrecon.tasks.regrid_stage import (
    finalize_regrid,
    open_source,
    plan_regrid,
    prepare_regrid,
    read_steps,
    regrid_block,
    run_regrid,
    target_grids,
    time_chunk_for,
    write_static_on_grid,
)
from climrecon.tasks.standardize import standardize

NUG = default_data_home() / "debian" / "usr" / "share" / "ncarg" / "data" / "nug"
MPI_TAS = NUG / "tas_rectilinear_grid_2D.nc"
EUR11 = NUG / "tas_rotated_grid_EUR11.nc"
STATIC_STEP = 1.0 / 12.0
CFG = RegridConfig(time_chunk=3)  # default region (30..50N, 125..105W), 0.25 deg fine, 5 deg coarse
TIME = xr.coders.CFDatetimeCoder(use_cftime=True)


# -- helpers: stores shaped like the ingest stage's and the static-fields store -----------------------
def write_stage_store(
    ds: xr.Dataset, url: str, time_chunk: int = 12, history: str = "made by a test", key: str | None = None
) -> str:
    """Write ``ds`` as a complete StageStore the way ingest does (template, time blocks, provenance)."""
    key = key or content_key("test-store", url)
    ds = ds.copy()
    ds.attrs = {**ds.attrs, "history": history}
    encoding = {}
    if "time" in ds.dims:
        calendar = ds["time"].values[0].calendar
        for n in ("time", "time_bnds"):
            if n in ds.variables:
                encoding[n] = {"units": "days since 1850-01-01", "calendar": calendar, "dtype": "float64"}
        if "time_bnds" in ds:
            ds["time_bnds"] = ds["time_bnds"].load()
        chunks, dim, step = {"time": time_chunk}, "time", time_chunk
    else:
        chunks, dim, step = {}, "lat", ds.sizes["lat"]
    # fields without the block dimension (a source's own orog) are in memory: the template writes them
    blocked = [v for v, x in ds.data_vars.items() if dim in x.dims]
    template = ds.assign({v: ds[v].chunk(chunks or {dim: step}) for v in blocked if v != "time_bnds"})
    store = StageStore(url, key)
    store.initialize(template, encoding=encoding)
    regions = [{dim: s} for s in time_blocks(ds.sizes[dim], step)]
    for r in regions:
        store.write_block(ds[blocked].isel(r).load(), r)
    store.finalize(regions)
    return url


def analytic_static(
    lat0=25.0, lat1=55.0, lon0=-130.0, lon1=-100.0, orog_units="m", sftlf_units="%"
) -> xr.Dataset:
    """5' static fields: ocean west of a wavy coast, a Sierra-like ridge and a Rockies-like plateau."""
    lat = np.arange(lat0 + STATIC_STEP / 2, lat1, STATIC_STEP)
    lon = np.arange(lon0 + STATIC_STEP / 2, lon1, STATIC_STEP)
    la, lo = np.meshgrid(lat, lon, indexing="ij")
    land = lo > -122.0 + 1.5 * np.sin(np.deg2rad(la) * 12.0)
    orog = 2500.0 * np.exp(-(((lo + 118.0) / 0.6) ** 2)) + 2000.0 * np.exp(
        -(((lo + 109.0) / 2.5) ** 2 + ((la - 42.0) / 5.0) ** 2)
    )
    orog = np.where(land, orog + 300.0, 0.0)
    sftlf = 100.0 * land if sftlf_units == "%" else 1.0 * land
    return xr.Dataset(
        {
            "orog": (
                ("lat", "lon"),
                orog.astype("float32"),
                {"units": orog_units, "standard_name": "surface_altitude"},
            ),
            "sftlf": (
                ("lat", "lon"),
                sftlf.astype("float32"),
                {"units": sftlf_units, "standard_name": "land_area_fraction"},
            ),
        },
        coords={"lat": lat, "lon": lon},
    )


def tree_digest(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` (the byte-level state of all stores there)."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def region_mean(ds: xr.Dataset, var: str, lat_b: np.ndarray, lon_b: np.ndarray, box: Grid) -> np.ndarray:
    """Area-weighted mean over ``box`` of a field whose cells have bounds ``lat_b``/``lon_b``, per time.

    Independent of the library: each cell's weight is its exact spherical overlap with the box.
    """
    mu = np.sin(np.radians(np.clip(lat_b, -90, 90)))
    w_lat = np.clip(
        np.minimum(mu[:, 1], np.sin(np.radians(box.north)))
        - np.maximum(mu[:, 0], np.sin(np.radians(box.south))),
        0,
        None,
    )
    w_lon = np.clip(np.minimum(lon_b[:, 1], box.east) - np.maximum(lon_b[:, 0], box.west), 0, None)
    w = np.outer(w_lat, w_lon)
    x = ds[var].values.astype("float64")
    return (x * w).sum((-2, -1)) / w.sum()


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("regrid")


@pytest.fixture(scope="module")
def static_url(root) -> str:
    return write_stage_store(
        analytic_static(), str(root / "inputs" / "static-5arcmin.zarr"), history="analytic test static"
    )


@pytest.fixture(scope="module")
def mpi_tas() -> xr.Dataset:
    """The real MPI-ESM-LR historical tas (2005, 12 months, T63) in the project conventions."""
    if not MPI_TAS.is_file():
        pytest.skip(f"{MPI_TAS} not installed (run deploy/install.sh)")
    with xr.open_dataset(MPI_TAS, decode_times=False) as raw:
        return standardize(raw.load(), source=str(MPI_TAS), frequency="mon")


@pytest.fixture(scope="module")
def mpi_url(root, mpi_tas) -> str:
    key = "00c0ffee00c0ffee"
    url = str(root / "ingest" / f"MPI-ESM-LR.historical.r1i1p1.Amon.{key}.zarr")
    return write_stage_store(mpi_tas, url, history="ingested", key=key)


@pytest.fixture(scope="module")
def single(root, mpi_url, static_url):
    """The MPI tas regridded in this process (the reference for the parallel and resumed runs)."""
    storage = StorageConfig(root=str(root / "single"))
    plan = plan_regrid(CFG, mpi_url, storage, static_url)
    return plan, run_regrid(plan)


def _open(url: str) -> xr.Dataset:
    return xr.open_zarr(url, decode_times=TIME)


# -- plan ------------------------------------------------------------------------------------------------
def test_target_grids_extend_the_region_to_whole_coarse_cells():
    cfg = RegridConfig(region=Region(lat_min=31, lat_max=49, lon_min=-124, lon_max=-106), resolution=0.5)
    coarse, fine = target_grids(cfg)
    assert (fine.south, fine.north, fine.west, fine.east, fine.nlat) == (31, 49, -124, -106, 36)
    assert (coarse.south, coarse.north, coarse.west, coarse.east, coarse.nlat, coarse.nlon) == (
        30,
        50,
        -125,
        -105,
        4,
        4,
    )
    coarse360, fine360 = target_grids(cfg, "0..360")
    assert (coarse360.west, fine360.west) == (235, 236) and np.allclose(fine360.lon - 360, fine.lon)
    with pytest.raises(RegridError, match="coarse_resolution 10 deg"):
        target_grids(
            cfg.model_copy(
                update={
                    "coarse_resolution": 10.0,
                    "region": Region(lat_min=31, lat_max=39, lon_min=0, lon_max=8),
                }
            )
        )


def test_plan_names_stores_by_source_and_config(root, mpi_url, static_url):
    storage = StorageConfig(root=str(root / "plans"))
    plan = plan_regrid(CFG, mpi_url, storage, static_url)
    assert plan.name == "MPI-ESM-LR.historical.r1i1p1.Amon" and plan.variables == ("tas",)
    assert plan.coarse_url == f"{root}/plans/regrid/{plan.name}.coarse-5.{plan.coarse_key}.zarr"
    assert plan.fine_url == f"{root}/plans/regrid/{plan.name}.fine-0.25.{plan.fine_key}.zarr"
    assert (
        plan.static_url == f"{root}/plans/static/static.0.25deg.lat30_50.lon-125_-105.{plan.static_key}.zarr"
    )
    assert plan.label(plan.regions()) == "2005-01..2005-12" and len(plan.regions()) == 4
    other = plan_regrid(CFG.model_copy(update={"fine_method": "conservative"}), mpi_url, storage, static_url)
    assert other.coarse_key == plan.coarse_key and other.fine_key != plan.fine_key
    assert other.static_key == plan.static_key  # static fields depend on the grid only
    assert not (root / "plans").exists()  # planning writes nothing


# -- conservation and contents -----------------------------------------------------------------------------
def test_real_mpi_tas_conserves_the_regional_mean(single, mpi_tas):
    plan, result = single
    assert result.blocks_written == result.blocks_total == 4
    coarse, fine, static = _open(result.coarse_url), _open(result.fine_url), _open(result.static_url)
    for url, key in (
        (result.coarse_url, plan.coarse_key),
        (result.fine_url, plan.fine_key),
        (result.static_url, plan.static_key),
    ):
        assert StageStore(url, key).is_complete()
    assert (
        coarse.tas.shape == (12, 4, 4) and fine.tas.shape == (12, 80, 80) and coarse.tas.dtype == np.float32
    )
    assert coarse.tas.encoding["chunks"] == (3, 4, 4)
    np.testing.assert_array_equal(coarse.time.values, mpi_tas.time.values)
    box = plan.coarse_grid
    # source cells as the file's own CF bounds describe them (T63 Gaussian latitudes)
    expected = region_mean(mpi_tas, "tas", mpi_tas.lat_bnds.values, mpi_tas.lon_bnds.values, box)
    got = region_mean(coarse, "tas", *box.bounds(), box)
    np.testing.assert_allclose(got, expected, rtol=0, atol=2e-4)
    assert 240 < got.min() and got.max() < 300  # western US, K
    # the fine field is the coarse one interpolated (the models' conditioning), not a re-read of the source
    xr.testing.assert_allclose(fine.tas.load(), coarse_on_fine(coarse.load(), plan.fine_grid).tas, rtol=1e-6)
    assert set(static.data_vars) == {"orog", "orog_std", "sftlf", "orog_coarse", "sftlf_coarse"}
    assert static.orog.shape == static.orog_coarse.shape == (80, 80)
    assert 0 <= float(static.sftlf.min()) and float(static.sftlf.max()) == 100
    # the coarse grid's view of the terrain went through the coarse input's operators: area means on the
    # coarse grid (which reaches past the region, read from the global store), bilinear back
    on_coarse = static_on_grid(analytic_static(), plan.coarse_grid)
    expected_view = coarse_on_fine(on_coarse[["orog", "sftlf"]].astype("float64"), plan.fine_grid)
    np.testing.assert_allclose(static.orog_coarse.values, expected_view.orog.values, rtol=1e-5, atol=1e-2)
    np.testing.assert_allclose(static.sftlf_coarse.values, expected_view.sftlf.values, rtol=1e-5, atol=1e-3)
    assert float((static.orog - static.orog_coarse).std()) > 50.0  # the terrain the coarse grid misses
    assert static.orog_coarse.attrs["units"] == "m" and "coarse grid" in static.orog_coarse.attrs["long_name"]
    # provenance: the source's key and history, the config, the code version
    attrs = coarse.attrs
    assert attrs["climrecon_status"] == "complete" and attrs["climrecon_source_key"] == plan.source_key
    assert attrs["history"].startswith("ingested\n") and "regrid: key" in attrs["history"]
    assert '"coarse_resolution": 5.0' in attrs["climrecon_regrid_config"] and attrs[
        "climrecon_code_version"
    ].startswith("climrecon")
    assert attrs["experiment_id"] == "historical"  # source metadata carried over


def test_synthetic_reanalysis_coarse_step_is_the_exact_block_mean(root, static_url):
    cfg = SyntheticConfig(resolution=0.5, start_year=2000, end_year=2000, variables=["tas", "pr"], seed=3)
    src = synthetic_reanalysis(cfg, analytic_static(30, 50, -125, -105)).compute()
    url = write_stage_store(src, str(root / "ingest" / "synthetic.zarr"), time_chunk=6)
    plan = plan_regrid(
        CFG.model_copy(update={"time_chunk": 6}), url, StorageConfig(root=str(root / "syn")), static_url
    )
    assert plan.variables == ("pr", "tas")  # the synthetic store's own orog/sftlf are not regridded
    coarse = _open(run_regrid(plan).coarse_url).load()
    blocks = coarsen_blocks(src[["tas", "pr"]], 10)
    for v in ("tas", "pr"):
        np.testing.assert_allclose(coarse[v].values, blocks[v].values, rtol=2e-6)
        w = area_weights(src.lat, src.lon)
        source_mean = (src[v].astype("float64") * w).sum(("lat", "lon")) / w.sum()
        coarse_mean = region_mean(coarse, v, *plan.coarse_grid.bounds(), plan.coarse_grid)
        np.testing.assert_allclose(coarse_mean, source_mean.values, rtol=1e-6)


# -- parallel writers and resume ---------------------------------------------------------------------------
def test_two_dask_workers_fill_one_store_identical_to_a_single_process(root, single, mpi_url, static_url):
    plan_single, result_single = single
    plan = plan_regrid(CFG, mpi_url, StorageConfig(root=str(root / "parallel")), static_url)
    with (
        LocalCluster(
            n_workers=2,
            threads_per_worker=1,
            processes=True,
            dashboard_address=None,
            silence_logs=logging.ERROR,
        ) as cluster,
        Client(cluster) as client,
    ):
        workers = sorted(client.scheduler_info()["workers"])
        pending = prepare_regrid(plan)
        futures = [
            client.submit(
                regrid_block, plan, r, None, workers=[workers[i % 2]], allow_other_workers=False, pure=False
            )
            for i, r in enumerate(pending)
        ]
        written = client.gather(futures)
        ran_on = {w for f in futures for w in client.who_has(f)[f.key]}
    assert len(pending) == 4 and all(len(w) == 2 for w in written) and ran_on == set(workers)
    result = finalize_regrid(plan)
    for a, b in ((result.coarse_url, result_single.coarse_url), (result.fine_url, result_single.fine_url)):
        par, ref = _open(a).load(), _open(b).load()
        np.testing.assert_array_equal(par.tas.values, ref.tas.values)
        np.testing.assert_array_equal(par.time_bnds.values, ref.time_bnds.values)
        chunks = sorted(Path(a).glob("tas/c/*/*/*"))
        assert len(chunks) == 4 and [c.read_bytes() for c in chunks] == [
            (Path(b) / c.relative_to(a)).read_bytes() for c in chunks
        ]


def test_a_rerun_fills_only_the_missing_blocks(root, single, mpi_url, static_url):
    _, result_single = single
    plan = plan_regrid(CFG, mpi_url, StorageConfig(root=str(root / "resume")), static_url)
    first = prepare_regrid(plan)
    for region in first[:2]:  # an interrupted run: two of four blocks written, no complete marker
        regrid_block(plan, region)
    assert not StageStore(plan.coarse_url, plan.coarse_key).is_complete()
    before = {p: p.stat().st_mtime_ns for p in Path(plan.coarse_url).glob("tas/c/*/*/*")}
    assert len(before) == 2
    result = run_regrid(plan)
    assert result.blocks_written == 2 and result.blocks_total == 4
    assert all(p.stat().st_mtime_ns == t for p, t in before.items())  # the earlier blocks were not rewritten
    np.testing.assert_array_equal(_open(result.fine_url).tas.values, _open(result_single.fine_url).tas.values)
    state = tree_digest(root / "resume")
    assert (
        run_regrid(plan).blocks_written == 0 and tree_digest(root / "resume") == state
    )  # complete: untouched


# -- block size --------------------------------------------------------------------------------------------
def test_time_chunk_by_bytes_in_whole_years():
    month = xr.DataArray(
        np.zeros((1, 180, 360), np.float32), dims=("time", "lat", "lon")
    )  # 1-deg global: 259 kB
    ds = xr.Dataset({"tas": month.chunk().pad(time=(0, 479))})  # 40 years, lazy (nothing allocated)
    assert time_chunk_for(ds, ["tas"], block_mb=32) == 120  # 123 months of data -> 10 whole years
    assert time_chunk_for(ds, ["tas"], block_mb=16) == 60 and time_chunk_for(ds, ["tas"], block_mb=0.1) == 12
    assert time_chunk_for(ds, ["tas"], block_mb=1e4) == 480  # at most the record
    assert (
        time_chunk_for(ds.isel(time=slice(0, 30)), ["tas"], block_mb=1e4) == 36
    )  # 2.5 years -> 3 whole years
    with pytest.raises(RegridError, match="block_mb > 0"):
        time_chunk_for(ds, ["tas"], block_mb=0)


def test_a_block_of_several_source_chunks_is_read_piecewise_with_the_same_result(
    root, single, mpi_tas, static_url
):
    _, reference = single  # time_chunk 3 from a source in 12-month chunks
    url = write_stage_store(mpi_tas, str(root / "ingest" / "mpi-3month-chunks.zarr"), time_chunk=3)
    src = open_source(url, lazy=False)
    assert read_steps(src, ["tas"], 12) == 3 and read_steps(src, ["tas"], 2) == 2
    plan = plan_regrid(
        CFG.model_copy(update={"time_chunk": 12}), url, StorageConfig(root=str(root / "big")), static_url
    )
    result = run_regrid(plan)
    assert result.blocks_written == result.blocks_total == 1
    for got, ref in ((result.coarse_url, reference.coarse_url), (result.fine_url, reference.fine_url)):
        got, ref = _open(got), _open(ref)
        assert got.tas.encoding["chunks"][0] == 12
        np.testing.assert_array_equal(got.tas.values, ref.tas.values)


# -- bad inputs ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bad_root(root, single) -> Path:
    """A storage root that already holds complete stores, which no bad input may change."""
    return Path(single[1].coarse_url).parent.parent


def _assert_untouched(root: Path, before: dict[str, str]) -> None:
    assert tree_digest(root) == before


def test_rotated_grid_is_not_supported_yet(root, bad_root, static_url):
    if not EUR11.is_file():
        pytest.skip(f"{EUR11} not installed")
    with xr.open_dataset(EUR11, decode_times=TIME) as raw:
        raw = raw.load()
    # the grid-mapping variable as an int (its value is never used; zarr v3 has no spec for char arrays)
    raw["rotated_pole"] = raw["rotated_pole"].copy(data=np.int32(0))
    url = write_stage_store(raw, str(root / "ingest" / "eur11.zarr"), time_chunk=1)
    before = tree_digest(bad_root)
    with pytest.raises(RegridError, match=r"eur11\.zarr: curvilinear/rotated-pole grid .* not supported yet"):
        plan_regrid(CFG, url, StorageConfig(root=str(bad_root)), static_url)
    _assert_untouched(bad_root, before)


def test_region_outside_the_source_domain(root, bad_root, mpi_url, static_url):
    src = synthetic_reanalysis(
        SyntheticConfig(resolution=0.5, start_year=2000, end_year=2000, variables=["tas"]),
        analytic_static(30, 50, -125, -105),
    )
    url = write_stage_store(src, str(root / "ingest" / "west-us.zarr"))
    before = tree_digest(bad_root)
    europe = CFG.model_copy(update={"region": Region(lat_min=40, lat_max=60, lon_min=0, lon_max=20)})
    with pytest.raises(
        RegridError,
        match=r"regrid.region \(lat 40..60, lon 0..20; .*\) does not fit inside the source store .*west-us.zarr, whose domain is lat 30..50, lon -125..-105",
    ):
        plan_regrid(europe, url, StorageConfig(root=str(bad_root)), static_url)
    outside_static = CFG.model_copy(update={"region": Region(lat_min=-20, lat_max=0, lon_min=0, lon_max=20)})
    with pytest.raises(RegridError, match="does not fit inside the static store"):
        plan_regrid(outside_static, mpi_url, StorageConfig(root=str(bad_root)), static_url)
    _assert_untouched(bad_root, before)


def test_nan_only_slice_stops_the_run_and_leaves_the_store_incomplete(root, bad_root, mpi_tas, static_url):
    broken = mpi_tas.copy()
    broken["tas"] = broken.tas.where(broken.time != broken.time[7])  # August 2005 all NaN
    url = write_stage_store(broken, str(root / "ingest" / "broken.zarr"))
    before = tree_digest(bad_root)
    out = root / "nan"
    plan = plan_regrid(CFG, url, StorageConfig(root=str(out)), static_url)
    with pytest.raises(
        RegridError,
        match=r"broken.zarr: variable 'tas' is NaN everywhere at 1 time step\(s\), first \['2005-08-01",
    ):
        run_regrid(plan)
    coarse = StageStore(plan.coarse_url, plan.coarse_key)
    assert not coarse.is_complete() and len(coarse.done_blocks()) == 2  # blocks before August only
    assert _open(plan.coarse_url).attrs["climrecon_status"] == "incomplete"
    _assert_untouched(bad_root, before)


def test_units_are_checked_and_fractions_converted(root, bad_root, mpi_tas, mpi_url):
    before = tree_digest(bad_root)
    km = write_stage_store(analytic_static(orog_units="km"), str(root / "inputs" / "static-km.zarr"))
    with pytest.raises(
        RegridError, match=r"static store .*static-km.zarr: variable 'orog' is in 'km', expected 'm'"
    ):
        plan_regrid(CFG, mpi_url, StorageConfig(root=str(bad_root)), km)
    celsius = mpi_tas.assign(tas=(mpi_tas.tas - 273.15).assign_attrs(units="degC"))
    c_url = write_stage_store(celsius, str(root / "ingest" / "celsius.zarr"))
    with pytest.raises(
        RegridError, match=r"celsius.zarr: variable 'tas' is in 'degC', expected the CF canonical 'K'"
    ):
        plan_regrid(
            CFG, c_url, StorageConfig(root=str(bad_root)), str(root / "inputs" / "static-5arcmin.zarr")
        )
    _assert_untouched(bad_root, before)
    fraction = write_stage_store(
        analytic_static(sftlf_units="1"), str(root / "inputs" / "static-fraction.zarr")
    )
    plan = plan_regrid(CFG, mpi_url, StorageConfig(root=str(root / "fraction")), fraction)
    assert plan.sftlf_scale == 100.0
    converted = _open(write_static_on_grid(plan))
    reference = _open(
        plan_regrid(
            CFG, mpi_url, StorageConfig(root=str(bad_root)), str(root / "inputs" / "static-5arcmin.zarr")
        ).static_url
    )
    np.testing.assert_allclose(converted.sftlf.values, reference.sftlf.values, rtol=1e-6)
    assert converted.sftlf.attrs["units"] == "%" and float(converted.sftlf.max()) == 100.0
