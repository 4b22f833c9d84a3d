"""The shipped checkpoint: loads with the expected metadata, verifies, and samples deterministically."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from climrecon.config import SamplerConfig, load_config
from climrecon.methods import Inputs, build
from climrecon.models.checkpoint import CheckpointError, load_networks, read_checkpoint
from climrecon.tasks.grids import Grid

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "checkpoints" / "dpdm-westus-x8.pt"
README = REPO / "checkpoints" / "README.md"
EXPECT = {"variables": ["tas", "uas", "vas"], "grid.coarsening_factor": 8}


def test_shipped_checkpoint_loads_verifies_and_is_inference_only():
    nets, meta = load_networks(SHIPPED, expect=EXPECT)
    model = nets["denoiser"]
    contents = read_checkpoint(SHIPPED)  # recomputes and checks the content hash (format 1, read as 2)
    assert contents.header["training"] is None and all(
        k.startswith("ema.denoiser.") for k in contents.tensors
    )
    calibration = meta.data[
        "spread_calibration"
    ]  # spread-calibrated on validation months, never held-out ones
    assert set(meta.data["spread_inflation"]) == set(meta.variables)
    assert (
        calibration["years"] == meta.data["validation_years"]
        and calibration["sampler"]["solver"] == "dpmpp2m"
    )
    recorded = re.search(r"content_sha256: `([0-9a-f]{64})`", README.read_text())
    assert recorded and recorded.group(1) == contents.header["content_sha256"]
    assert SHIPPED.stat().st_size < 8 * 2**20
    assert meta.grid.patch_size == 32 and meta.grid.fine_resolution == 0.25 and meta.step > 0
    assert meta.data["train_years"] == [1961, 2005] and meta.data["heldout_years"] == [2011, 2020]
    assert meta.cond_channels[6:8] == ("orog_coarse", "sftlf_coarse")  # the coarse grid's view of the terrain
    assert not model.training and sum(p.numel() for p in model.parameters()) < 2_000_000
    with pytest.raises(CheckpointError, match="grid coarsening_factor 8 but 4 was requested"):
        load_networks(SHIPPED, expect={"grid.coarsening_factor": 4})


def test_shipped_checkpoint_samples_a_heldout_patch_deterministically():
    from climrecon.tasks.evaluate import heldout_inputs
    from climrecon.tasks.training_data import default_static_url, default_truth_url

    cfg = load_config()
    try:
        truth_url, static_url = default_truth_url(cfg), default_static_url(cfg)
    except FileNotFoundError as exc:
        pytest.skip(f"sample catalog not built ({exc}); run `climrecon catalog build-sample`")
    torch.set_num_threads(1)
    method = build(
        {"name": "dpdm", "checkpoint": str(SHIPPED)}, SamplerConfig(num_steps=4, overlap=8, device="cpu")
    )
    meta = method.metadata
    truth, inputs = heldout_inputs(method, truth_url, static_url, (2015, 2015), 1)  # one held-out month
    window = {"lat": slice(24, 56), "lon": slice(24, 56)}  # a 32 x 32 patch over the Great Basin
    truth = truth.isel(window)
    fine = inputs.coarse_on_fine.isel(window)
    patch = Inputs(  # the truth's own coarse view: nothing for the bias correction to map
        coarse_on_fine=fine, grid=Grid.from_dataset(fine), static=inputs.static.isel(window), truth_view=True
    )
    run = lambda: method.downscale(patch, members=2, seed=7)  # noqa: E731
    first, second = run(), run()
    for v in meta.variables:
        assert first[v].dims == ("member", "time", "lat", "lon") and first[v].shape == (2, 1, 32, 32)
        assert np.isfinite(first[v].values).all()
        np.testing.assert_array_equal(first[v].values, second[v].values)
        assert not np.array_equal(first[v].values[0], first[v].values[1])  # members differ
    # physical plausibility: samples stay near the truth (K, m/s)
    assert float(abs(first["tas"] - truth["tas"]).mean()) < 3.0
