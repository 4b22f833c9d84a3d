"""The downscale stage library (climrecon.tasks.downscale): batching, determinism, store, resume, GPU pinning."""

from __future__ import annotations

import json
from pathlib import Path

import cftime
import numpy as np
import pytest
import torch
import xarray as xr

from climrecon.config import ClimReconConfig, ConfigError, load_config
from climrecon.methods.features import ConditioningSpec
from climrecon.models.checkpoint import (
    CheckpointError,
    CheckpointMetadata,
    GridSpec,
    NetworkSpec,
    save_checkpoint,
)
from climrecon.models.edm import EDMPrecond
from climrecon.models.normalization import NormalizationStats
from climrecon.models.samplers import seed_for
from climrecon.models.unet import UNet, UNetConfig
from climrecon.stores import StageStore, content_key
from climrecon.tasks.downscale import (
    DownscaleError,
    plan_downscale,
    prepare_downscale,
    run_downscale,
)

VARIABLES = ("tas", "uas")
N_TIME, NLAT, NLON, FACTOR, PATCH = 24, 12, 20, 4, 8
FAST = {"members": 4, "time_chunk": 6, "months_per_unit": 12, "members_per_unit": 4}
SAMPLER = {"num_steps": 3, "max_patches_per_batch": 16, "overlap": 2, "device": "cpu"}


def config(root, checkpoint, sampler=None, **downscale) -> ClimReconConfig:
    """The config of a downscale run: ``storage.root``, the DPDM checkpoint, the test's fast sampler; no bias
    correction (the toy GCM has no truth to fit one on; tests/test_bias_correction.py covers it)."""
    overrides = [f"storage.root={root}", f"method.checkpoint={checkpoint}", "method.bias_correction=false"]
    overrides += [f"sampler.{k}={v}" for k, v in {**SAMPLER, **(sampler or {})}.items()]
    overrides += [f"downscale.{k}={v}" for k, v in {**FAST, **downscale}.items()]
    return load_config(overrides=overrides)


@pytest.fixture(autouse=True)
def one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# -- builders (also used by test_flow_downscale) ----------------------------------------------------------
def tiny_net(variables=VARIABLES, cond_channels=None) -> EDMPrecond:
    """A 2-level UNet with seeded random weights (perturbed so every layer matters)."""
    spec = ConditioningSpec(tuple(variables), FACTOR)
    torch.manual_seed(0)
    config = UNetConfig(
        out_channels=len(variables),
        cond_channels=len(cond_channels or spec.channel_names()),
        base_channels=8,
        channel_mults=(1, 2),
        num_blocks=1,
        attention_levels=(),
        mid_attention=False,
        time_harmonics=1,
    )
    net = EDMPrecond(UNet(config))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
    return net.eval()


def write_checkpoint(path: Path, variables=VARIABLES, factor=FACTOR, cond_channels=None) -> str:
    """A random-init checkpoint with the metadata the downscale stage reads."""
    channels = cond_channels or ConditioningSpec(tuple(variables), factor).channel_names()
    net = tiny_net(variables, channels)
    stats = {"tas": (280.0, 10.0), "uas": (0.0, 3.0), "vas": (0.0, 3.0)}
    meta = CheckpointMetadata(
        method="dpdm",
        networks={"denoiser": NetworkSpec.of(net)},
        variables=tuple(variables),
        cond_channels=tuple(channels),
        normalization=NormalizationStats(
            tuple(variables), tuple(stats[v][0] for v in variables), tuple(stats[v][1] for v in variables)
        ),
        grid=GridSpec(fine_resolution=0.25, coarsening_factor=factor, patch_size=PATCH),
        train={"note": "random init for tests"},
        data={"synthetic": True},
    )
    save_checkpoint(path, {"denoiser": net.state_dict()}, meta)
    return str(path)


def _stage_store(url: str, ds: xr.Dataset, key: str, attrs: dict, time_chunk: int | None = None) -> str:
    store = StageStore(url, key)
    encoding = (
        {
            v: {"chunks": (time_chunk, *ds[v].shape[1:])}
            for v in ds.data_vars
            if "time" in ds[v].dims and v != "time_bnds"
        }
        if time_chunk
        else None
    )
    store.initialize(ds, encoding=encoding)
    region = {d: slice(0, ds.sizes[d]) for d in ("time", "lat") if d in ds.dims}
    store.write_block(ds, region)
    store.finalize([region], attrs=attrs)
    return url


def write_inputs(
    root: Path, variables=VARIABLES, coarse_resolution=1.0, n_time=N_TIME, static_shift=0.0
) -> dict:
    """Fine (coarse field on the 0.25-deg grid), static and coarse stores as the regrid stage leaves them."""
    rng = np.random.default_rng(0)
    lat = 30.0 + 0.25 * (np.arange(NLAT) + 0.5)
    lon = -120.0 + 0.25 * (np.arange(NLON) + 0.5)
    starts = [cftime.DatetimeNoLeap(1990 + i // 12, i % 12 + 1, 1) for i in range(n_time + 1)]
    time = xr.DataArray(starts[:-1], dims="time")
    bnds = xr.DataArray(np.stack([starts[:-1], starts[1:]], axis=1), dims=("time", "bnds"))
    yy, xx = np.meshgrid(np.linspace(0, 1, NLAT), np.linspace(0, 1, NLON), indexing="ij")
    season = np.cos(2 * np.pi * np.arange(n_time) / 12)[:, None, None]
    fields = {"tas": 280 + 8 * season + 5 * yy, "uas": 3 * xx + season, "vas": 2 * yy - season}
    fine = xr.Dataset(
        {
            v: (
                ("time", "lat", "lon"),
                (fields[v] + 0.1 * rng.normal(size=(n_time, NLAT, NLON))).astype("float32"),
                {"units": "K" if v == "tas" else "m s-1", "standard_name": v},
            )
            for v in variables
        },
        coords={"time": time, "lat": lat, "lon": lon},
    )
    fine["time_bnds"] = bnds
    fine["time"].encoding.update(units="days since 1850-01-01", calendar="noleap")
    fine_attrs = {
        "source_id": "TOY-GCM",
        "experiment_id": "historical",
        "member_id": "r1i1p1",
        "climrecon_regrid_config": json.dumps({"coarse_resolution": coarse_resolution}),
        "history": "test regrid",
    }
    fine.attrs.update({k: v for k, v in fine_attrs.items() if k != "climrecon_regrid_config"})
    static = xr.Dataset(
        {
            "orog": (("lat", "lon"), (1500 * xx * yy).astype("float32")),
            "orog_std": (("lat", "lon"), (100 * xx).astype("float32")),
            "sftlf": (("lat", "lon"), (100 * (xx > 0.3)).astype("float32")),
        },
        coords={"lat": lat + static_shift, "lon": lon},
    )
    c = coarse_resolution
    clat = 30.0 + c * (np.arange(max(2, round(NLAT * 0.25 / c))) + 0.5)
    clon = -120.0 + c * (np.arange(max(2, round(NLON * 0.25 / c))) + 0.5)
    coarse = xr.Dataset(
        {v: (("time", "lat", "lon"), np.zeros((n_time, clat.size, clon.size), "float32")) for v in variables},
        coords={"time": time, "lat": clat, "lon": clon},
    )
    tag = f"{'-'.join(variables)}-{c:g}-{n_time}-{static_shift:g}"
    return {
        "fine": _stage_store(
            str(root / f"TOY-GCM.historical.r1i1p1.Amon.fine-0.25.{tag}.zarr"),
            fine,
            content_key("fine", tag),
            fine_attrs,
            time_chunk=6,
        ),
        "static": _stage_store(str(root / f"static.{tag}.zarr"), static, content_key("static", tag), {}),
        "coarse": _stage_store(
            str(root / f"TOY-GCM.coarse.{tag}.zarr"), coarse, content_key("coarse", tag), {}
        ),
    }


def open_members(url: str) -> xr.Dataset:
    return xr.open_zarr(url, decode_times=xr.coders.CFDatetimeCoder(use_cftime=True))


def assert_same_bytes(a_url: str, b_url: str, variables=VARIABLES) -> None:
    a, b = open_members(a_url), open_members(b_url)
    for v in variables:
        assert a[v].values.tobytes() == b[v].values.tobytes(), v


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs")
    return {**write_inputs(root), "checkpoint": write_checkpoint(root / "tiny.pt")}


@pytest.fixture(scope="module")
def reference(inputs, tmp_path_factory):
    """One uninterrupted in-process run: 12 months x 4 members per unit."""
    root = str(tmp_path_factory.mktemp("reference"))
    plan = plan_downscale(
        config(root, inputs["checkpoint"]), inputs["fine"], inputs["static"], inputs["coarse"]
    )
    url, reports = run_downscale(plan)
    assert len(reports) == 2 and all(r.worker is None and r.device == "cpu" for r in reports)
    return plan, url


# -- the store ---------------------------------------------------------------------------------------------
def test_member_store_layout_attributes_and_provenance(reference, inputs):
    plan, url = reference
    assert url.endswith(f"/downscale/TOY-GCM.historical.r1i1p1.dpdm.{plan.out_key}.zarr")
    ds = open_members(url)
    assert StageStore(url, plan.out_key).is_complete() and ds.attrs["climrecon_key"] == plan.out_key
    for v in VARIABLES:
        assert ds[v].dims == ("member", "time", "lat", "lon") and ds[v].dtype == np.float32
        assert ds[v].encoding["chunks"] == (1, 6, NLAT, NLON)
        assert np.isfinite(ds[v].values).all()
    assert ds["member"].values.tolist() == [0, 1, 2, 3]
    assert (
        ds["time"].values[0] == cftime.DatetimeNoLeap(1990, 1, 1)
        and ds["time"].values[0].calendar == "noleap"
    )
    assert ds["time_bnds"].values[-1, 1] == cftime.DatetimeNoLeap(1992, 1, 1)
    assert ds["tas"].attrs["units"] == "K"
    # members are distinct samples; physical units come back (tas near the conditioning's ~280 K scale)
    assert not np.array_equal(ds["tas"].values[0], ds["tas"].values[1])
    assert 150 < float(ds["tas"].mean()) < 400
    assert json.loads(ds.attrs["climrecon_downscale_config"])["members"] == 4
    assert json.loads(ds.attrs["climrecon_sampler"])["blend"] == "every_step"
    assert json.loads(ds.attrs["climrecon_method"])["checkpoint"] == inputs["checkpoint"]
    assert "test regrid" in ds.attrs["history"] and "downscale" in ds.attrs["history"]
    prov = json.loads(ds.attrs["climrecon_provenance"])
    assert (
        prov["stage"] == "downscale"
        and prov["content_key"] == plan.out_key
        and prov["base_seed"] == FAST_SEED()
    )
    assert (
        prov["checkpoint"]["sha256"] == plan.description["checkpoint"]["sha256"]
        and prov["checkpoint"]["train"]
    )
    assert prov["method"]["method"] == "dpdm" and "seed_for" in prov["seeds"]
    assert {i["store"] for i in prov["inputs"]} == {inputs["fine"], inputs["static"], inputs["coarse"]}
    assert prov["upstream"]["store"] == inputs["fine"] and prov["workers"][0]["hardware"]["cpu_count"] >= 1
    assert prov["started"] <= prov["ended"] and "code_version" in prov


def FAST_SEED() -> int:
    return ClimReconConfig().downscale.seed


def test_bytes_do_not_depend_on_unit_sizes(reference, inputs, tmp_path):
    plan, url = reference
    small = config(
        tmp_path,
        inputs["checkpoint"],
        sampler={"max_patches_per_batch": 7},
        months_per_unit=6,
        members_per_unit=1,
    )
    other = plan_downscale(small, inputs["fine"], inputs["static"], inputs["coarse"])
    assert other.out_key == plan.out_key  # unit sizes are not part of the content
    out, reports = run_downscale(other)
    assert len(reports) == 16 and reports[0].items == 6
    assert_same_bytes(url, out)
    # and the seeds are the documented ones: member 3 of 1990-02 starts from seed_for(seed, 1990*12+1, 3)
    assert seed_for(FAST_SEED(), 1990 * 12 + 1, 3) != seed_for(FAST_SEED(), 1990 * 12 + 1, 2)


def test_failure_mid_run_leaves_no_partial_unit_and_a_rerun_matches(reference, inputs, tmp_path):
    _, ref_url = reference
    cfg = config(tmp_path, inputs["checkpoint"], months_per_unit=6, members_per_unit=2)
    run = plan_downscale(cfg, inputs["fine"], inputs["static"], inputs["coarse"])
    chunk = Path(inputs["fine"]) / "tas" / "c" / "2" / "0" / "0"  # months 12..17 of tas
    good = chunk.read_bytes()
    chunk.write_bytes(b"not a zstd frame")
    try:
        with pytest.raises(Exception, match=r"(?i)zstd|decompress|codec|frame|error"):
            run_downscale(run)
    finally:
        chunk.write_bytes(good)
    store = StageStore(run.out_url, run.out_key)
    assert not store.is_complete()
    done = store.done_blocks()
    assert done == {
        "member-0-2_time-0-6",
        "member-2-4_time-0-6",
        "member-0-2_time-6-12",
        "member-2-4_time-6-12",
    }
    pending = prepare_downscale(run)
    assert [u.label for u in pending] == [
        "1991-01..1991-06 m0-1",
        "1991-01..1991-06 m2-3",
        "1991-07..1991-12 m0-1",
        "1991-07..1991-12 m2-3",
    ]
    out, reports = run_downscale(run)
    assert len(reports) == 4 and store.is_complete()
    assert_same_bytes(ref_url, out)


def test_inputs_are_checked_against_the_checkpoint(inputs, tmp_path):
    def plan(fine, static, coarse, checkpoint):
        return plan_downscale(config(tmp_path, checkpoint), fine, static, coarse)

    wrong_coarse = write_inputs(tmp_path / "c2", coarse_resolution=2.0)
    with pytest.raises(
        DownscaleError,
        match=r"trained to downscale by x4 \(1 deg -> 0.25 deg\); the coarse input is "
        r"x8 coarser .* re-run regrid with regrid.coarse_resolution=1",
    ):
        plan(wrong_coarse["fine"], wrong_coarse["static"], wrong_coarse["coarse"], inputs["checkpoint"])
    three = write_checkpoint(tmp_path / "three.pt", variables=("tas", "uas", "vas"))
    with pytest.raises(DownscaleError, match=r"lacks \['vas'\]"):
        plan(inputs["fine"], inputs["static"], None, three)
    shifted = write_inputs(tmp_path / "shift", static_shift=0.25)
    with pytest.raises(DownscaleError, match="static store .* is not on the grid of the fine store"):
        plan(inputs["fine"], shifted["static"], None, inputs["checkpoint"])
    odd = write_checkpoint(tmp_path / "odd.pt", cond_channels=["tas_coarse", "uas_coarse", "elevation"])
    with pytest.raises(
        DownscaleError, match=r"expects conditioning channels \['tas_coarse', 'uas_coarse', 'elevation'\]"
    ):
        plan(inputs["fine"], inputs["static"], None, odd)
    with pytest.raises(CheckpointError, match="does not exist"):
        plan(inputs["fine"], inputs["static"], None, str(tmp_path / "none.pt"))
    # a checkpoint that also sees the coarse grid's view of the terrain needs a static store that has it
    views = ConditioningSpec(VARIABLES, FACTOR, static_coarse=("orog", "sftlf")).channel_names()
    with_views = write_checkpoint(tmp_path / "views.pt", cond_channels=views)
    with pytest.raises(
        DownscaleError, match=r"lack \['orog_coarse', 'sftlf_coarse'\] .* re-run the regrid stage"
    ):
        plan(inputs["fine"], inputs["static"], None, with_views)
    static = xr.open_zarr(inputs["static"]).load()
    static = static.assign(
        orog_coarse=static.orog.mean() + 0 * static.orog, sftlf_coarse=static.sftlf.mean() + 0 * static.sftlf
    )
    url = _stage_store(str(tmp_path / "static-views.zarr"), static, content_key("static", "views"), {})
    done = plan(inputs["fine"], url, None, with_views)
    assert done.description["variables"] == list(VARIABLES)
    with pytest.raises(ConfigError, match=r"months_per_unit \(5\) must be a multiple of time_chunk \(6\)"):
        load_config(overrides=["downscale.months_per_unit=5", "downscale.time_chunk=6"])


# -- the Dask pool -----------------------------------------------------------------------------------------
def test_gpu_pool_pins_sampling_and_worker_count_does_not_change_bytes(reference, inputs, tmp_path):
    from climrecon.flows.runtime import dask_client, sampling_resources

    _, ref_url = reference
    # worker threads of this process (a pool of processes works the same, but takes ~20 s to start here)
    with dask_client(n_workers=2, fake_gpu=True, processes=False) as client:
        workers = client.scheduler_info(n_workers=-1)["workers"]
        gpu = [a for a, w in workers.items() if w["resources"].get("GPU")]
        assert len(workers) == 2 and len(gpu) == 1
        resources = sampling_resources(client)
        assert resources == {"GPU": 1}
        cfg = config(tmp_path / "pinned", inputs["checkpoint"], months_per_unit=6, members_per_unit=2)
        pinned = plan_downscale(cfg, inputs["fine"], inputs["static"], None)
        _, reports = run_downscale(pinned, client=client, resources=resources)
        assert len(reports) == 8 and {r.worker for r in reports} == set(gpu)  # 1 sampling worker
        cfg = config(tmp_path / "free", inputs["checkpoint"], months_per_unit=6, members_per_unit=2)
        free = plan_downscale(cfg, inputs["fine"], inputs["static"], None)
        _, spread = run_downscale(free, client=client)  # no resources: both workers sample
        assert {r.worker for r in spread} <= set(workers)
    assert_same_bytes(ref_url, pinned.out_url)
    assert_same_bytes(ref_url, free.out_url)


def test_a_worker_with_another_checkpoint_at_the_planned_path_refuses_to_sample(inputs, tmp_path):
    """Hosts install their own copy of the checkpoint: a different file there must not write under the
    planned store's key (bytes from another model)."""
    import shutil

    from climrecon.models.checkpoint import load_networks, save_checkpoint
    from climrecon.tasks import downscale as stage

    path = tmp_path / "host-copy.pt"
    shutil.copy(inputs["checkpoint"], path)
    plan = plan_downscale(config(tmp_path, str(path)), inputs["fine"], inputs["static"], inputs["coarse"])
    nets, meta = load_networks(path)
    weights = {k: v + 1e-3 for k, v in nets["denoiser"].state_dict().items()}
    save_checkpoint(path, {"denoiser": weights}, meta)  # another host's file: same name, other weights
    stage._METHODS.pop(plan.out_key, None)
    with pytest.raises(DownscaleError, match="is not the one the run was planned with"):
        run_downscale(plan)
    assert not StageStore(plan.out_url, plan.out_key).is_complete()
