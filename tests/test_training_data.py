"""Perfect-model training data: shapes, channel order, training-years-only statistics, deterministic crops."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr

from climrecon.catalogs import synthetic as S
from climrecon.config import SyntheticConfig
from climrecon.methods.features import (
    STATIC_SCALING,
    ConditioningError,
    ConditioningSpec,
    coarse_on_fine,
    normalize_conditioning,
)
from climrecon.tasks.grids import Grid
from climrecon.tasks.regrid import coarsen_blocks
from climrecon.tasks.training_data import (
    PatchBatches,
    TrainingDataError,
    fit_target_normalization,
    open_truth,
    perfect_model_pairs,
    residual_target,
    select_years,
    static_for_truth,
)

STATIC_STEP = 1.0 / 12.0
TINY = SyntheticConfig(
    resolution=0.5, start_year=2000, end_year=2002, chunk_months=12, seed=5, variables=["tas", "uas", "vas"]
)  # 40 x 40 cells, 36 months


def analytic_static(lat0=29.0, lat1=51.0, lon0=-126.0, lon1=-104.0) -> xr.Dataset:
    """5' static fields (ocean west of a coast, a ridge, a plateau), marked complete like a static store."""
    lat = np.arange(lat0 + STATIC_STEP / 2, lat1, STATIC_STEP)
    lon = np.arange(lon0 + STATIC_STEP / 2, lon1, STATIC_STEP)
    la, lo = np.meshgrid(lat, lon, indexing="ij")
    land = lo > -122.0 + 1.5 * np.sin(np.deg2rad(la) * 12.0)
    orog = 2500.0 * np.exp(-(((lo + 119.0) / 0.6) ** 2)) + 2000.0 * np.exp(
        -(((lo + 109) / 2.5) ** 2 + ((la - 42) / 5) ** 2)
    )
    orog = np.where(land, orog + 300.0, 0.0)
    return xr.Dataset(
        {
            "orog": (("lat", "lon"), orog.astype("float32")),
            "sftlf": (("lat", "lon"), (100.0 * land).astype("float32")),
        },
        coords={"lat": lat, "lon": lon},
        attrs={"climrecon_status": "complete"},
    )


def write_tiny_stores(root: Path) -> tuple[str, str]:
    """(truth URL, static URL): a 3-year 0.5-degree synthetic reanalysis and its static store."""
    static = analytic_static()
    static_url = str(root / "static.zarr")
    static.to_zarr(static_url, mode="w")
    truth_url = str(root / "truth.zarr")
    S.write_synthetic_reanalysis(TINY, static, truth_url)
    return truth_url, static_url


def tiny_train_config(truth: str, static: str, checkpoint: Path, **train) -> dict:
    """A DPDM training config on :func:`write_tiny_stores`' stores: an 8-channel UNet on 16-cell patches,
    factor 4, one year each for training, validation and held-out, 4 steps; ``train`` overrides."""
    return {
        "method": {
            "name": "dpdm",
            "patch_size": 16,
            "network": {
                "base_channels": 8,
                "channel_mults": [1, 2],
                "attention_levels": [1],
                "num_blocks": 1,
            },
        },
        "train": {
            "truth": truth,
            "static": static,
            "factor": 4,
            "train_years": [2000, 2000],
            "validation_years": [2001, 2001],
            "heldout_years": [2002, 2002],
            "batch_size": 4,
            "max_steps": 4,
            "warmup_steps": 2,
            "checkpoint_every": 2,
            "ema_halflife_steps": 2,
            "checkpoint": str(checkpoint),
            "device": "cpu",
            **train,
        },
    }


SPEC = ConditioningSpec(("tas", "uas", "vas"), 4)


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> tuple[str, str]:
    return write_tiny_stores(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def train_pairs(stores):
    truth_url, static_url = stores
    truth = select_years(open_truth(truth_url, SPEC.variables), (2000, 2001))
    target, cond = perfect_model_pairs(truth, static_for_truth(static_url, truth), SPEC)
    return target, cond


def test_pairs_have_the_conditioning_contract(train_pairs):
    target, cond = train_pairs
    assert target.sizes == {"time": 24, "lat": 40, "lon": 40}
    assert cond.dims == ("time", "channel", "lat", "lon") and cond.dtype == np.float32
    assert list(cond.channel.values) == SPEC.channel_names()
    assert SPEC.channel_names()[:3] == ["tas_coarse", "uas_coarse", "vas_coarse"]
    # the coarse channel is the truth's 4 x 4 block mean put back on the fine grid: block means agree
    blocks = target["tas"].coarsen(lat=4, lon=4).mean()
    back = cond.sel(channel="tas_coarse").coarsen(lat=4, lon=4).mean()
    assert (
        float(abs(blocks - back).mean()) < 0.5
        and float(abs(target["tas"] - cond.sel(channel="tas_coarse")).mean()) > 0.05
    )
    assert float(cond.sel(channel="orog").max()) > 1000.0  # static fields in metres


def test_normalisation_uses_training_years_only(stores, train_pairs):
    target, _ = train_pairs
    stats = fit_target_normalization(target, SPEC.variables)
    np.testing.assert_allclose(stats.mean[0], float(target["tas"].mean()), rtol=1e-6)
    np.testing.assert_allclose(stats.std[1], float(target["uas"].std()), rtol=1e-5)
    everything = open_truth(stores[0], SPEC.variables).load()
    assert abs(stats.mean[0] - float(everything["tas"].mean())) > 1e-4  # 2002 changed it: not used


def test_conditioning_normalisation_rules(train_pairs):
    target, cond = train_pairs
    stats = fit_target_normalization(target, SPEC.variables)
    z = normalize_conditioning(cond.values, SPEC.channel_names(), stats)
    names = SPEC.channel_names()
    i = names.index("vas_coarse")
    np.testing.assert_allclose(
        z[:, i], (cond.values[:, i] - stats.mean[2]) / stats.std[2], rtol=1e-5, atol=1e-5
    )
    j = names.index("sftlf")
    np.testing.assert_allclose(z[:, j], (cond.values[:, j] - STATIC_SCALING["sftlf"][0]) / 50.0, atol=1e-6)
    k = names.index("cos_lat")
    np.testing.assert_array_equal(z[:, k], cond.values[:, k])
    assert torch.allclose(
        normalize_conditioning(torch.from_numpy(cond.values), names, stats), torch.from_numpy(z)
    )
    with pytest.raises(
        ConditioningError, match="no normalisation rule for conditioning channel 'psl_coarse'"
    ):
        normalize_conditioning(cond.values[:, :1], ["psl_coarse"], stats)


def test_coarse_views_of_static_fields_go_through_the_truths_blocks(stores):
    truth_url, static_url = stores
    spec = ConditioningSpec(SPEC.variables, 4, static_coarse=("orog", "sftlf"))
    assert spec.channel_names()[3:8] == ["orog", "orog_std", "sftlf", "orog_coarse", "sftlf_coarse"]
    truth = select_years(open_truth(truth_url, spec.variables), (2000, 2000))
    static = static_for_truth(static_url, truth)
    target, cond = perfect_model_pairs(truth, static, spec)
    assert list(cond.channel.values) == spec.channel_names()
    # orog_coarse is the orography through the same 4 x 4 blocks and bilinear step as tas_coarse
    expected = coarse_on_fine(coarsen_blocks(static[["orog"]].astype("float64"), 4), Grid.from_dataset(truth))
    np.testing.assert_allclose(
        cond.sel(channel="orog_coarse").values[0], expected.orog.values, rtol=1e-5, atol=1e-2
    )
    relief = cond.sel(channel="orog") - cond.sel(channel="orog_coarse")
    assert float(relief.std()) > 10.0 and float(cond.sel(channel="orog_coarse").std()) > 100.0
    stats = fit_target_normalization(target, spec.variables)
    z = normalize_conditioning(cond.values, spec.channel_names(), stats)
    i = spec.channel_names().index("orog_coarse")
    np.testing.assert_allclose(z[:, i], cond.values[:, i] / STATIC_SCALING["orog"][1], rtol=1e-6)


def test_spec_from_channel_names_round_trips_and_rejects_other_layouts():
    for spec in (SPEC, ConditioningSpec(("tas",), 8, static_coarse=("orog",), position=False)):
        assert ConditioningSpec.from_channel_names(spec.variables, spec.factor, spec.channel_names()) == spec
    names = SPEC.channel_names()
    with pytest.raises(ConditioningError, match="are not"):
        ConditioningSpec.from_channel_names(SPEC.variables, 4, [names[1], names[0], *names[2:]])
    with pytest.raises(ConditioningError, match="unknown static field"):
        ConditioningSpec(("tas",), 4, static_coarse=("elevation",))


def test_batches_are_deterministic_by_step_and_never_touch_other_years(train_pairs):
    target, cond = train_pairs
    stats = fit_target_normalization(target, SPEC.variables)
    batches = PatchBatches.from_pairs(target, cond, SPEC, stats, patch_size=16, batch_size=8, seed=3)
    assert batches.cond_static.shape == (7, 40, 40) and batches.cond_dynamic.shape == (24, 3, 40, 40)
    b = batches.batch(5)
    assert (
        b.target.shape == (8, 3, 16, 16) and b.cond.shape == (8, 10, 16, 16) and b.time_of_year.shape == (8,)
    )
    assert b.target.dtype == torch.float32 and b.cond.dtype == torch.float32
    again = next(batches(5))  # a run resumed at step 5 draws the same batch
    assert torch.equal(b.target, again.target) and torch.equal(b.cond, again.cond)
    assert not torch.equal(b.target, batches.batch(6).target)
    # the crop's conditioning is the matching window of the full stack, in the spec's channel order
    idx, rows, cols = batches.draw(5)
    z_cond = normalize_conditioning(cond.values, SPEC.channel_names(), stats)
    np.testing.assert_allclose(
        b.cond[0].numpy(), z_cond[idx[0], :, rows[0] : rows[0] + 16, cols[0] : cols[0] + 16]
    )
    # over many steps only the training years (2000-2001) are ever drawn; the held-out 2002 is not even loaded
    drawn = np.concatenate([batches.draw(s)[0] for s in range(300)])
    assert set(batches.years[drawn].tolist()) == {2000, 2001}
    assert np.abs(batches.target.reshape(-1, 3, 1600).transpose(1, 0, 2).reshape(3, -1).mean(1)).max() < 1e-4


def test_missing_years_or_variables_fail_clearly(stores):
    truth = open_truth(stores[0], SPEC.variables)
    with pytest.raises(
        TrainingDataError, match=r"years 1999-2001 requested .*1999\.\.1999.*covers 2000-2002"
    ):
        select_years(truth, (1999, 2001), "truth store X")
    with pytest.raises(TrainingDataError, match=r"lacks variable\(s\) \['pr'\]"):
        open_truth(stores[0], ["tas", "pr"])
    with pytest.raises(TrainingDataError, match="no truth store"):
        open_truth(str(Path(stores[0]).parent / "nope.zarr"), ["tas"])


def test_residual_target_round_trips_and_feeds_batches(train_pairs):
    target, cond = train_pairs
    residual = residual_target(target, cond, SPEC.variables)
    np.testing.assert_allclose(residual["tas"], target["tas"] - cond.sel(channel="tas_coarse"), atol=1e-4)
    full_stats = fit_target_normalization(target, SPEC.variables)
    stats = fit_target_normalization(residual, SPEC.variables)
    batches = PatchBatches.from_pairs(
        residual, cond, SPEC, stats, patch_size=16, batch_size=2, cond_stats=full_stats
    )
    z = normalize_conditioning(cond.values, SPEC.channel_names(), full_stats)
    np.testing.assert_allclose(batches.cond_dynamic, z[:, :3])
    assert abs(float(batches.target.mean())) < 1e-3 and abs(float(batches.target.std()) - 1) < 1e-3
