"""Masked (ocean, missing) cells through training: filled coarse inputs, a loss over valid cells only, and the
NaN message that names the cause."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import xarray as xr
from test_training_data import write_tiny_stores

from climrecon.methods.features import ConditioningSpec, fill_nearest, perfect_model_coarse
from climrecon.models.edm import EDMConfig, EDMLoss, EDMPrecond
from climrecon.models.trainer import Batch, TrainConfig, reduce_loss
from climrecon.models.trainer import train as train_loop
from climrecon.models.unet import UNet, UNetConfig
from climrecon.tasks.training_data import (
    PatchBatches,
    fit_target_normalization,
    open_truth,
    perfect_model_pairs,
    select_years,
    static_for_truth,
    valid_cells,
)

SPEC = ConditioningSpec(("tas", "uas"), 4)


@pytest.fixture(scope="module")
def masked(tmp_path_factory):
    truth_url, static_url = write_tiny_stores(tmp_path_factory.mktemp("masks"))
    truth = select_years(open_truth(truth_url, SPEC.variables), (2000, 2000)).load()
    static = static_for_truth(static_url, truth)
    ocean = np.zeros((truth.sizes["lat"], truth.sizes["lon"]), bool)
    ocean[:10, :] = True  # the southern quarter: whole coarse rows of 4 x 4 blocks are "ocean"
    ocean[10:13, :5] = True  # and a ragged coast
    return truth.where(~xr.DataArray(ocean, dims=("lat", "lon"))), static, ocean


def test_fill_nearest_fills_only_missing_cells_from_the_nearest_valid_one():
    a = np.arange(12.0).reshape(1, 3, 4)
    a[0, 0, :2] = np.nan
    ds = xr.Dataset(
        {"x": (("time", "lat", "lon"), a)}, coords={"lat": [0.5, 1.5, 2.5], "lon": [0, 1, 2, 3.0]}
    )
    out = fill_nearest(ds)["x"].values[0]
    assert out[0, 2] == 2.0 and out[1, 0] == 4.0 and out[0, 0] == 4.0 and out[0, 1] in (2.0, 5.0)
    assert fill_nearest(ds.fillna(0.0)) is not None and np.isfinite(out).all()


def test_masked_truth_gives_finite_conditioning_and_a_mask_of_the_missing_cells(masked):
    truth, static, ocean = masked
    coarse = perfect_model_coarse(truth, 4)
    assert np.isfinite(coarse["tas"].values).all()
    # partly valid blocks are means over their valid cells only
    block = truth["tas"].isel(time=0, lat=slice(12, 16), lon=slice(4, 8)).values
    assert coarse["tas"].isel(time=0, lat=3, lon=1).item() == pytest.approx(np.nanmean(block), rel=1e-5)
    target, cond = perfect_model_pairs(truth, static, SPEC)
    assert np.isfinite(cond.values).all()
    np.testing.assert_array_equal(valid_cells(target, SPEC.variables), ~ocean)
    assert valid_cells(target.fillna(0.0), SPEC.variables) is None


def test_the_loss_counts_valid_cells_only_and_masked_values_never_matter(masked, tmp_path):
    truth, static, ocean = masked
    target, cond = perfect_model_pairs(truth, static, SPEC)
    stats = fit_target_normalization(target, SPEC.variables)
    valid = valid_cells(target, SPEC.variables)

    def batches(fill: float) -> PatchBatches:
        t = target.fillna(fill).where(~xr.DataArray(ocean, dims=("lat", "lon")), fill)
        return PatchBatches.from_pairs(t, cond, SPEC, stats, patch_size=16, batch_size=6, seed=1, valid=valid)

    a, b = batches(0.0).batch(3), batches(1e6).batch(3)
    assert torch.equal(a.target, b.target) and torch.equal(a.weight, b.weight)
    assert a.weight.shape == (6, 1, 16, 16) and 0 < float(a.weight.mean()) < 1
    per = torch.rand(6, 2, 16, 16)
    w = a.weight
    want = (per * w).sum() / (w.sum() * 2)
    assert float(reduce_loss(per, w)) == pytest.approx(float(want), rel=1e-6)
    assert torch.equal(reduce_loss(per, None), per.mean())

    net = EDMPrecond(
        UNet(
            UNetConfig(
                out_channels=2,
                cond_channels=len(SPEC.channel_names()),
                base_channels=8,
                channel_mults=(1,),
                attention_levels=(),
                mid_attention=False,
            )
        ),
        EDMConfig(),
    )
    cfg = TrainConfig(max_steps=3, lr=1e-3, warmup_steps=1, checkpoint_every=3, device="cpu")
    result = train_loop(
        net, batches(0.0), cfg, loss=EDMLoss(), checkpoint_path=tmp_path / "masked.pt", progress=False
    )
    assert np.isfinite(result.losses).all()


def test_nan_batches_are_refused_naming_the_missing_cells_not_the_learning_rate(tmp_path):
    net = EDMPrecond(
        UNet(
            UNetConfig(
                out_channels=1, cond_channels=0, base_channels=8, channel_mults=(1,), attention_levels=()
            )
        ),
        EDMConfig(),
    )
    x = torch.zeros(2, 1, 8, 8)
    x[0, 0, 0, 0] = float("nan")

    def stream(first: int):
        while True:
            yield Batch(target=x, time_of_year=torch.zeros(2))

    with pytest.raises(FloatingPointError, match=r"NaN/inf in \['target'\].*mask"):
        train_loop(
            net,
            stream,
            TrainConfig(max_steps=2, lr=1e-3, warmup_steps=0, device="cpu"),
            loss=EDMLoss(),
            checkpoint_path=tmp_path / "x.pt",
            progress=False,
        )
