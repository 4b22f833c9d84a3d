"""Bring your own fine data, end to end through the product's config: a user's daily netCDF (odd variable
names, ocean cells, a grid that does not tile the factor, jittered coordinates, one year split by dates) is
trained on (CorrDiff, with the climatology channel) and scored beside the baselines by the evaluation; a
one-year monthly record split by months is scored by every baseline."""

from __future__ import annotations

import json

import cftime
import numpy as np
import pytest
import xarray as xr
from test_fine_data import daily, land_fraction, static_5min  # noqa: F401  (fixtures)
from test_training_data import write_tiny_stores

from climrecon.config import FineDataConfig, SamplerConfig, load_config
from climrecon.methods import build, corrdiff, dpdm
from climrecon.methods.features import DIURNAL_CHANNELS
from climrecon.models.checkpoint import read_checkpoint
from climrecon.tasks.evaluate import EvaluationError, perfect_model_inputs, run_evaluation
from climrecon.tasks.fine_data import fine_static, open_fine_data
from climrecon.tasks.grids import Grid
from climrecon.tasks.regrid import coarsen_blocks

NETWORK = "{base_channels: 8, channel_mults: [1, 2], attention_levels: [], mid_attention: false}"

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def data_overrides(path: str, static: str) -> list[str]:
    data = {
        "path": path,
        "variables": {
            "tasmax": {"source": "t2m_max", "units": "K"},
            "pr": {"source": "precip", "transform": "log1p"},
        },
        "static": static,
        "domain": "crop",
        "train": {"dates": ["2001-01-01", "2001-09-30"]},
        "heldout": {"dates": ["2001-10-01", "2001-12-31"]},
    }
    return [f"data={json.dumps(data)}"]


@pytest.fixture(scope="module")
def trained(daily, static_5min, tmp_path_factory):  # noqa: F811
    root = tmp_path_factory.mktemp("own")
    ckpt = root / "corrdiff-own.pt"
    cfg = load_config(
        None,
        [
            *data_overrides(daily["path"], static_5min[0]),
            "method.name=corrdiff",
            "method.climatology=true",
            "method.patch_size=16",
            f"method.network={NETWORK}",
            "method.regression.max_steps=2",
            "train.max_steps=2",
            "train.factor=8",
            "train.batch_size=4",
            "train.warmup_steps=1",
            "train.checkpoint_every=2",
            "train.threads=1",
            "train.device=cpu",
            f"train.checkpoint={ckpt}",
        ],
    )
    corrdiff.train(cfg)
    return {"checkpoint": str(ckpt), "root": root}


def test_training_reads_the_users_file_by_its_own_names_time_step_and_mask(trained, daily):  # noqa: F811
    meta = read_checkpoint(trained["checkpoint"]).metadata
    assert meta.variables == ("tasmax", "pr")
    assert meta.normalization.transforms == ("identity", "log1p")
    data = meta.data
    assert data["time_step"] == "day" and data["time_steps"] == 273  # 2001-01-01 .. 2001-09-30
    assert data["fine_data"]["domain"]["lat_rows"] == -1 and data["fine_data"]["domain"]["lon_cols"] == -1
    assert data["masked_cells"] == int((~daily["land"][:32, :80]).sum()) > 0
    assert data["seen_periods"] == [[2001010100, 2001093000]]
    assert data["climatology"]["months_present"] == list(range(1, 10))


def test_the_evaluation_scores_every_method_on_valid_cells_of_held_out_days(trained, daily, static_5min):  # noqa: F811
    methods = ["bilinear", "delta", "qm", "bcsd", {"name": "corrdiff", "checkpoint": trained["checkpoint"]}]
    cfg = load_config(
        None,
        [
            *data_overrides(daily["path"], static_5min[0]),
            "evaluate.factors=[8]",
            f"evaluate.methods={json.dumps(methods)}",
            "evaluate.ensemble_sizes=[2]",
            "evaluate.month_stride=9",
            "sampler.num_steps=2",
            "sampler.device=cpu",
            "sampler.overlap=4",
        ],
    )
    result = run_evaluation(cfg)
    assert result.months[:2] == ["2001-10-01", "2001-10-10"] and len(result.months) == 11
    rows = {(r["method"], r["variable"]): r for r in result.records}
    assert {m for m, _ in rows} == {"bilinear", "delta", "qm", "bcsd", "corrdiff"}
    # every method is scored (a 2-step CorrDiff is untrained: its numbers are large, never NaN)
    assert not any(np.isnan(r["mae"]) or np.isnan(r["crps"]) for r in rows.values())
    assert all(np.isfinite(r["mae"]) for (m, _), r in rows.items() if m != "corrdiff")
    # the delta baseline knows the lapse-rate pattern the coarse field lacks: it beats bilinear on tasmax
    assert rows["delta", "tasmax"]["mae"] < 0.9 * rows["bilinear", "tasmax"]["mae"]
    # masked cells stay NaN in every output (the figures keep the first scored day)
    ocean = ~daily["land"][:32, :80]
    for name, maps in result.maps.items():
        for v, da in maps.items():
            if name != "truth" and "lat" in da.dims:
                assert np.isnan(da.values[..., ocean]).all(), (name, v)
                assert np.isfinite(da.values[..., ~ocean]).all(), (name, v)

    # a checkpoint that saw the held-out days is refused
    leaky = cfg.with_overrides(
        [
            'data.train={"dates": ["2001-01-01", "2001-08-31"]}',
            'data.heldout={"dates": ["2001-09-01", "2001-12-31"]}',
        ]
    )
    with pytest.raises(EvaluationError, match="held-out time steps \\(the first 2001-09-01T00\\)"):
        run_evaluation(leaky)


def test_own_data_checkpoints_are_spread_calibrated_on_data_validation(trained, daily, static_5min):  # noqa: F811
    from climrecon.methods import MethodError
    from climrecon.tasks.calibrate import fit_spread_inflation

    cfg = load_config(None, data_overrides(daily["path"], static_5min[0]))
    sampler = SamplerConfig(device="cpu", num_steps=2, overlap=4)
    with pytest.raises(MethodError, match="data.validation is not set: add it to the data: section"):
        fit_spread_inflation(trained["checkpoint"], cfg=cfg, months=2, members=2, sampler=sampler)
    cfg = cfg.with_overrides(['data.validation={"dates": ["2001-09-01", "2001-09-30"]}'])
    with pytest.raises(MethodError, match="with a data: section the fit uses data.validation"):
        fit_spread_inflation(trained["checkpoint"], cfg=cfg, years=(2001, 2001), members=2, sampler=sampler)
    fitted = fit_spread_inflation(trained["checkpoint"], cfg=cfg, months=3, members=2, sampler=sampler)
    how = fitted["spread_calibration"]
    # three days spread over the validation selection, on the data's own grid and mask (ocean cells are NaN
    # in the truth and scored out: every figure is finite)
    assert how["months"] == ["2001-09-01", "2001-09-15", "2001-09-30"]
    assert "2001-09-01" in how["data_validation"] and "years" not in how
    assert set(fitted["spread_inflation"]) == {"tasmax", "pr"}
    assert all(0.5 <= f <= 2.0 for f in fitted["spread_inflation"].values())
    assert all(np.isfinite(r) and r > 0 for r in how["spread_skill_ratio_before"].values())


def test_a_one_year_monthly_record_split_by_months_is_scored_by_every_baseline(tmp_path):
    truth, static = write_tiny_stores(tmp_path)
    data = {
        "path": truth,
        "variables": ["tas", "uas"],
        "static": static,
        "train": {"dates": ["2000-01", "2000-09"]},
        "heldout": {"dates": ["2000-10", "2000-12"]},
    }
    cfg = load_config(
        None,
        [
            f"data={json.dumps(data)}",
            "evaluate.factors=[4]",
            'evaluate.methods=["bilinear", "delta", "qm", "bcsd"]',
            "evaluate.ensemble_sizes=[1]",
        ],
    )
    result = run_evaluation(cfg)
    assert result.months == ["2000-10", "2000-11", "2000-12"]
    rows = {(r["method"], r["variable"]): r for r in result.records}
    assert len(rows) == 8 and all(np.isfinite(r["mae"]) for r in rows.values())
    # ACC of months the training times lack (Oct-Dec) has no climatology: NaN, not an error
    assert all(np.isnan(r["acc"]) for r in rows.values())


def test_hourly_data_get_an_hour_of_day_channel_in_training_and_sampling(tmp_path):
    """6-hourly fields with a diurnal cycle: the checkpoint's conditioning holds sin/cos of the hour of day
    among its time-varying channels, and sampling builds them from each step's clock time."""

    _, static = write_tiny_stores(tmp_path)
    times = [cftime.DatetimeGregorian(2000, 1, 1) + np.timedelta64(6 * k, "h").item() for k in range(4 * 60)]
    lat, lon = 30.25 + 0.5 * np.arange(40), -124.75 + 0.5 * np.arange(40)
    hours = np.array([t.hour for t in times], float)
    rng = np.random.default_rng(0)
    tas = 280 + 5 * np.sin(2 * np.pi * hours / 24)[:, None, None] + rng.normal(0, 1, (len(times), 40, 40))
    path = str(tmp_path / "hourly.zarr")
    xr.Dataset(
        {"tas": (("time", "lat", "lon"), tas.astype("float32"))},
        coords={"time": times, "lat": lat, "lon": lon},
    ).to_zarr(path)
    data = {
        "path": path,
        "variables": ["tas"],
        "static": static,
        "train": {"dates": ["2000-01-01", "2000-02-15"]},
        "heldout": {"dates": ["2000-02-16", "2000-02-29"]},
    }
    ckpt = tmp_path / "hourly.pt"
    cfg = load_config(
        None,
        [
            f"data={json.dumps(data)}",
            "method.name=dpdm",
            "method.patch_size=16",
            f"method.network={NETWORK}",
            "train.max_steps=2",
            "train.factor=4",
            "train.batch_size=4",
            "train.warmup_steps=1",
            "train.device=cpu",
            f"train.checkpoint={ckpt}",
        ],
    )
    dpdm.train(cfg)
    meta = read_checkpoint(ckpt).metadata
    assert meta.data["time_step"] == "hour"
    assert list(meta.cond_channels[:3]) == ["tas_coarse", *DIURNAL_CHANNELS]
    held = (
        xr.open_zarr(path, decode_times=xr.coders.CFDatetimeCoder(use_cftime=True))
        .isel(time=slice(-4, None))
        .load()
    )
    fine = open_fine_data(FineDataConfig.model_validate(data))
    inputs = perfect_model_inputs(
        coarsen_blocks(held, 4),
        Grid.from_dataset(held),
        fine_static(fine, static),
        ["orog", "sftlf"],
        time_step="hour",
    )
    method = build(
        {"name": "dpdm", "checkpoint": str(ckpt)}, SamplerConfig(num_steps=2, device="cpu", overlap=4)
    )
    _, _, z_cond, _, _ = method._network_inputs(inputs)
    want = np.sin(2 * np.pi * np.array([t.hour for t in held["time"].values]) / 24)
    np.testing.assert_allclose(z_cond[:, 1, 0, 0], want, atol=1e-6)
    assert np.isfinite(method.downscale(inputs, members=1)["tas"].values).all()
    with pytest.raises(Exception, match="trained on hourly fields; the input is monthly"):
        method.validate(
            perfect_model_inputs(
                coarsen_blocks(held, 4), Grid.from_dataset(held), fine_static(fine, static), ["orog", "sftlf"]
            )
        )
