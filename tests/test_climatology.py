"""The training-period residual climatology as conditioning (methods.features.Climatology): exact values,
training times only, grid selection, storage in the checkpoint, and DPDM/CorrDiff trained and sampled with it."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from test_corrdiff import FAST, tiny_config
from test_training_data import write_tiny_stores

from climrecon import methods
from climrecon.methods import corrdiff, dpdm
from climrecon.methods.base import MethodError
from climrecon.methods.features import (
    ConditioningError,
    ConditioningSpec,
    coarse_on_fine,
    perfect_model_coarse,
)
from climrecon.models.checkpoint import read_checkpoint, strip_training_state
from climrecon.tasks.evaluate import perfect_model_inputs
from climrecon.tasks.grids import Grid
from climrecon.tasks.regrid import coarsen_blocks
from climrecon.tasks.training_data import (
    open_truth,
    select_years,
    static_for_truth,
    training_climatology,
)

SPEC = ConditioningSpec(("tas", "uas"), 4, static_coarse=("orog",), climatology=True)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    return write_tiny_stores(tmp_path_factory.mktemp("clim"))


def test_channel_layout_puts_the_climatology_with_the_time_varying_channels():
    names = SPEC.channel_names()
    assert names[:4] == ["tas_coarse", "uas_coarse", "tas_clim", "uas_clim"] and SPEC.n_dynamic() == 4
    assert ConditioningSpec.from_channel_names(SPEC.variables, 4, names) == SPEC


def test_climatology_is_the_mean_residual_per_calendar_month_of_the_training_times(stores):
    truth_url, _ = stores
    train = select_years(open_truth(truth_url, SPEC.variables), (2000, 2001)).load()
    clim = training_climatology(train, SPEC)
    grid = Grid.from_dataset(train)
    residual = train - coarse_on_fine(perfect_model_coarse(train.astype("float32"), 4), grid)
    for month in (1, 7):
        want = residual["uas"].sel(time=residual.time.dt.month == month).mean("time").values
        np.testing.assert_allclose(clim.values[month - 1, 1], want, atol=1e-5)
    assert clim.months_present == tuple(range(1, 13))
    assert clim.scale[0] == pytest.approx(float(residual["tas"].std()), rel=1e-4)
    # the held-out year never enters it: a climatology of other years differs
    other = training_climatology(select_years(open_truth(truth_url, SPEC.variables), (2002, 2002)), SPEC)
    assert np.abs(other.values - clim.values).max() > 1e-3


def test_missing_months_take_the_mean_of_the_months_present_and_grids_are_selected_by_cell(stores):
    truth_url, _ = stores
    truth = select_years(open_truth(truth_url, SPEC.variables), (2000, 2000))
    clim = training_climatology(truth.isel(time=slice(0, 3)), SPEC)  # Jan-Mar only
    assert clim.months_present == (1, 2, 3)
    np.testing.assert_allclose(clim.values[6], clim.values[:3].mean(axis=0), atol=1e-6)
    grid = Grid.from_dataset(truth)
    sub = Grid.from_dataset(truth.isel(lat=slice(8, 24), lon=slice(4, 36)))
    sub_jitter = replace(sub, south=sub.south + 7e-15, west=sub.west - 7e-15)
    got = clim.on(sub_jitter, [2], ["uas"])
    np.testing.assert_array_equal(got[0, 0], clim.values[1, 1, 8:24, 4:36])
    assert clim.on(grid, [1, 3], ["tas", "uas"]).shape == (2, 2, grid.nlat, grid.nlon)
    outside = replace(grid, south=grid.south + 10.0)
    with pytest.raises(ConditioningError, match="latitudes .* not all on it"):
        clim.on(outside, [1], ["tas"])


@pytest.mark.parametrize("name", ["dpdm", "corrdiff"])
def test_trained_with_a_climatology_stored_in_the_checkpoint_and_used_at_inference(stores, tmp_path, name):
    truth_url, static_url = stores
    ckpt = tmp_path / f"{name}.pt"
    cfg = tiny_config(
        truth_url, static_url, ckpt, 2, 2, ("orog",), name=name, extra=("method.climatology=true",)
    )
    (dpdm if name == "dpdm" else corrdiff).train(cfg)
    contents = read_checkpoint(ckpt)
    arrays = contents.arrays()
    assert tuple(arrays["climatology"].shape) == (12, 3, 40, 40)
    setup = dpdm.prepare_training(cfg, cfg.method, target="full")
    np.testing.assert_array_equal(arrays["climatology"].numpy(), setup.climatology.values)
    assert contents.metadata.data["climatology"]["months_present"] == list(range(1, 13))
    # the inference-only copy keeps it
    small = tmp_path / f"{name}-small.pt"
    strip_training_state(ckpt, small)
    np.testing.assert_array_equal(read_checkpoint(small).arrays()["climatology"], arrays["climatology"])

    held = select_years(open_truth(truth_url, ["tas", "uas", "vas"]), (2002, 2002)).isel(time=slice(0, 2))
    held = held.astype("float32").load()
    grid = Grid.from_dataset(held)
    inputs = perfect_model_inputs(coarsen_blocks(held, 4), grid, static_for_truth(static_url, held), ["orog"])
    m = methods.build({"name": name, "checkpoint": str(small)}, FAST)
    # the network sees the stored climatology of each time's month, scaled as in training
    _, _, z_cond, _, _ = m._network_inputs(inputs)
    k = m.spec.channel_names().index("vas_clim")
    scale = setup.climatology.scale[2]
    np.testing.assert_allclose(z_cond[1, k], setup.climatology.values[1, 2] / scale, rtol=1e-5, atol=1e-6)
    a = m.downscale(inputs, members=2, seed=5)
    b = m.downscale(inputs, members=2, seed=5)
    assert all(np.isfinite(a[v].values).all() for v in a.data_vars)
    assert all(np.array_equal(a[v].values, b[v].values) for v in a.data_vars)
    # a grid outside the climatology's region is refused at validation, naming the checkpoint
    moved = held.assign_coords(lat=held.lat + 20.0)
    far = perfect_model_inputs(
        coarsen_blocks(moved, 4),
        Grid.from_dataset(moved),
        static_for_truth(static_url, held).assign_coords(lat=moved.lat),
        ["orog"],
    )
    with pytest.raises(MethodError, match=f"{small.name}.*climatology"):
        m.validate(far)
