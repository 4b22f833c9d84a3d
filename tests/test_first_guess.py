"""``method.first_guess: local_regression``: DPDM and CorrDiff trained on, and sampling from, the local-regression
baseline's fine field instead of the bilinear one; the regression is fitted on the training pairs only, stored in
the checkpoint and rebuilt exactly at inference; other grids are refused naming the first guess."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_corrdiff import FAST, tiny_config
from test_training_data import write_tiny_stores

from climrecon import methods
from climrecon.methods.base import MethodError
from climrecon.methods.corrdiff import train as train_corrdiff
from climrecon.methods.dpdm import train as train_dpdm
from climrecon.methods.local_regression import LocalRegression
from climrecon.models.checkpoint import read_checkpoint
from climrecon.tasks.evaluate import perfect_model_inputs
from climrecon.tasks.grids import Grid
from climrecon.tasks.regrid import coarsen_blocks
from climrecon.tasks.training_data import open_truth, select_years, static_for_truth

pytestmark = pytest.mark.usefixtures("one_torch_thread")
VARIABLES = ["tas", "uas", "vas"]
FIRST_GUESS = ("method.first_guess=local_regression",)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("first_guess")
    truth, static = write_tiny_stores(root)
    corrdiff = root / "corrdiff-fg.pt"
    train_corrdiff(tiny_config(truth, static, corrdiff, reg_steps=2, steps=2, extra=FIRST_GUESS))
    dpdm = root / "dpdm-fg.pt"
    train_dpdm(tiny_config(truth, static, dpdm, steps=2, name="dpdm", extra=FIRST_GUESS))
    store = open_truth(truth, VARIABLES)
    train = select_years(store, (2000, 2001)).astype("float32").load()
    held = select_years(store, (2002, 2002)).isel(time=slice(0, 3)).astype("float32").load()
    grid = Grid.from_dataset(held, "truth")
    inputs = perfect_model_inputs(
        coarsen_blocks(held, 4), grid, static_for_truth(static, held), ["orog", "sftlf"]
    )
    return {"corrdiff": str(corrdiff), "dpdm": str(dpdm), "train": train, "inputs": inputs, "static": static}


def test_the_checkpoint_holds_the_regression_fitted_on_the_training_pairs(world):
    direct = LocalRegression(VARIABLES, {v: VARIABLES for v in VARIABLES}).fit(
        coarsen_blocks(world["train"], 4), world["train"]
    )
    for name in ("corrdiff", "dpdm"):
        contents = read_checkpoint(world[name])
        description = contents.metadata.data["first_guess"]
        assert description["method"] == "local_regression" and description["variables"] == VARIABLES
        stored = LocalRegression.from_checkpoint(contents.arrays(), description)
        for v in VARIABLES:
            np.testing.assert_array_equal(stored.weights[v], direct.weights[v])
            np.testing.assert_array_equal(stored.residual_climatology[v], direct.residual_climatology[v])
        assert stored.ridge == direct.ridge and stored.coarse_grid == direct.coarse_grid


@pytest.mark.parametrize("name", ["dpdm", "corrdiff"])
def test_the_coarse_planes_are_the_first_guess_and_sampling_is_deterministic(world, name):
    method = methods.build({"name": name, "checkpoint": world[name]}, FAST)
    assert method.needs.coarse  # it regresses on the coarse grid's own cells
    inputs = world["inputs"]
    values = method._network_inputs(inputs)[0]
    channels = method.spec.channel_names()
    want = method.first_guess.first_guess(inputs.coarse_on_fine, inputs.coarse)
    for v in VARIABLES:
        plane = values[:, channels.index(f"{v}_coarse")]
        np.testing.assert_allclose(plane, want[v].transpose("time", "lat", "lon").values, rtol=1e-6)
        assert float(np.abs(plane - inputs.coarse_on_fine[v].values).mean()) > 0  # not the bilinear field
    a = method.downscale(inputs, members=2, seed=4)
    b = methods.build({"name": name, "checkpoint": world[name]}, FAST).downscale(inputs, members=2, seed=4)
    for v in VARIABLES:
        np.testing.assert_array_equal(a[v].values, b[v].values)
        assert np.isfinite(a[v].values).all()


def test_another_grid_is_refused_naming_the_first_guess(world):
    method = methods.build({"name": "dpdm", "checkpoint": world["dpdm"]}, FAST)
    held = world["inputs"]
    cropped = held.coarse.isel(lat=slice(1, None))
    grid = Grid.from_dataset(held.coarse_on_fine.isel(lat=slice(4, None)), "cropped")
    inputs = type(held).from_coarse(cropped, grid, held.static.isel(lat=slice(4, None)))
    with pytest.raises(MethodError, match="local-regression first guess fitted on"):
        method.validate(inputs)


def test_a_coarse_input_on_a_shifted_grid_is_averaged_onto_the_training_blocks(world):
    """A reconstruction's unified grid need not line up with the training's coarse blocks: the first guess
    averages the input conservatively onto them, and refuses an input that does not cover them."""
    from climrecon.tasks import regrid

    method = methods.build({"name": "dpdm", "checkpoint": world["dpdm"]}, FAST)
    held = world["inputs"]
    blocks = Grid.from_dataset(held.coarse, "blocks")
    shifted = Grid(
        blocks.south - blocks.dlat / 2,
        blocks.west - blocks.dlon / 2,
        blocks.dlat,
        blocks.dlon,
        blocks.nlat + 1,
        blocks.nlon + 1,
    )
    fine_truth = held.coarse_on_fine  # any smooth field will do: its block structure is not the point
    coarse = regrid.conservative(fine_truth, shifted)
    inputs = type(held).from_coarse(coarse, held.grid, held.static, truth_view=True)
    out = method.downscale(inputs, members=1, seed=0)
    assert all(np.isfinite(out[v].values).all() for v in VARIABLES)
    onto = regrid.conservative(coarse, blocks)
    want = method.first_guess.first_guess(inputs.coarse_on_fine, onto)
    values = method._network_inputs(inputs)[0]
    channels = method.spec.channel_names()
    np.testing.assert_allclose(
        values[:, channels.index("tas_coarse")], want["tas"].transpose("time", "lat", "lon").values, rtol=1e-6
    )
    short = coarse.isel(lon=slice(1, None))  # no longer covers the westernmost training block
    with pytest.raises(MethodError, match="coarse input that covers its coarse cells"):
        method.validate(type(held).from_coarse(short, held.grid, held.static))


@pytest.mark.parametrize("name", ["dpdm-fg-westus-x8.pt", "corrdiff-fg-westus-x8.pt"])
def test_shipped_first_guess_checkpoints_and_their_recorded_hashes(name):
    import re
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "checkpoints" / "first_guess" / name
    contents = read_checkpoint(path)
    data = contents.metadata.data
    assert data["train_years"] == [1961, 2005] and data["heldout_years"] == [2011, 2020]
    stored = LocalRegression.from_checkpoint(contents.arrays(), data["first_guess"])
    assert stored.fine_grid.nlat == stored.fine_grid.nlon == 80 and stored.coarse_grid.nlat == 10
    assert all(
        contents.arrays()[k].dtype == torch.float32 for k in contents.arrays() if k.startswith("first_")
    )
    readme = (path.parents[1] / "README.md").read_text()
    section = readme[readme.index("# First-guess variants") :]
    assert contents.header["content_sha256"] in re.findall(r"`([0-9a-f]{64})`", section)
