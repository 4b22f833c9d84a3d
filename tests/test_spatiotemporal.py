"""Spatiotemporal method (Schmidt et al.): window folding is exact, a window prior gives sequences with the
right lag-1 correlation on a Gaussian AR(1) toy, the temporal aggregation is exact, windows of training
data never cross a gap, members are whole sequences with the same bytes per seed, annual input gives
monthly members whose annual means agree with it, and the bias correction is fitted and recorded."""

from __future__ import annotations

import json

import cftime
import numpy as np
import pytest
import torch
import xarray as xr
from test_corrdiff import tiny_config
from test_training_data import write_tiny_stores

from climrecon.config import SamplerConfig
from climrecon.methods import MethodError, build, spatiotemporal
from climrecon.models.checkpoint import read_checkpoint
from climrecon.models.operators import GroupMean, SeparableOperator
from climrecon.models.samplers import edm_sampler
from climrecon.models.windows import WindowDenoiser, fold, unfold, window_starts
from climrecon.tasks.evaluate import perfect_model_inputs
from climrecon.tasks.grids import Grid
from climrecon.tasks.regrid import coarsen_blocks
from climrecon.tasks.training_data import open_truth, select_years, static_for_truth
from climrecon.tasks.training_data import window_starts as training_starts

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("n, k", [(5, 5), (9, 5), (12, 3), (30, 7)])
def test_folding_windows_and_keeping_each_steps_centred_window_reproduces_the_sequence(n, k):
    x = torch.randn(2 * n, 3, 4, 5, dtype=torch.float64)  # 2 sequences of n steps, 3 variables
    w = fold(x, n, k)
    assert w.shape == (2 * (n - k + 1), 3 * k, 4, 5)
    # window s holds steps s .. s + k - 1, time-major along channels
    seq = x.reshape(2, n, 3, 4, 5)
    for b in range(2):
        for s in range(n - k + 1):
            np.testing.assert_array_equal(
                w[b * (n - k + 1) + s].numpy(), seq[b, s : s + k].reshape(3 * k, 4, 5).numpy()
            )
    assert torch.equal(unfold(w, n, k), x)  # exact: every step back from its own centred window
    starts = window_starts(n, k)
    assert (
        starts[0] == 0
        and starts[-1] == n - k
        and all(starts[t] == t - k // 2 for t in range(k // 2, n - k // 2))
    )


def test_windows_refuse_what_they_cannot_fold():
    with pytest.raises(ValueError, match="odd"):
        window_starts(10, 4)
    with pytest.raises(ValueError, match="shorter than the prior's window"):
        fold(torch.zeros(3, 1, 2, 2), 3, 5)


def _ar1_window_denoiser(k: int, phi: float):
    """The exact denoiser of windows of a unit-variance Gaussian AR(1) process (per cell, one variable):
    D(x; sigma) = S (S + sigma^2 I)^-1 x along the window's steps, S_ij = phi^|i - j|."""
    i = np.arange(k)
    cov = torch.from_numpy(phi ** np.abs(i[:, None] - i[None, :]))

    def denoise(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        s2 = float(sigma.reshape(-1)[0]) ** 2
        gain = cov @ torch.linalg.inv(cov + s2 * torch.eye(k, dtype=cov.dtype))
        return torch.einsum("ij,bj...->bi...", gain, x)

    return denoise


@pytest.mark.parametrize("phi", [0.5, 0.8])
def test_a_window_prior_samples_sequences_with_the_right_lag1_correlation(phi):
    """Gaussian AR(1) toy with known covariance: the sequences sampled with each step's centred window have
    lag-1 correlation phi (within sampling error); steps sampled on their own (window 1) have none."""
    n, k, cells = 24, 5, 48
    latents = torch.randn(
        (n, 1, cells, cells), generator=torch.Generator().manual_seed(0), dtype=torch.float64
    )
    x = edm_sampler(WindowDenoiser(_ar1_window_denoiser(k, phi), n, k), latents, num_steps=32).numpy()
    seq = x[:, 0].reshape(n, -1)  # [n steps, cells^2 independent sequences]
    lag1 = np.mean(seq[1:] * seq[:-1]) / np.mean(seq**2)
    assert abs(lag1 - phi) < 0.04
    assert abs(seq.std() - 1) < 0.05
    lag2 = np.mean(seq[2:] * seq[:-2]) / np.mean(seq**2)
    # longer lags are only approximate (a window of 5 sees 2 steps each side: measured 0.54 for 0.64 at phi
    # 0.8; a window of 9 gives 0.61), as in score-based data assimilation
    assert abs(lag2 - phi**2) < 0.12
    alone = edm_sampler(_ar1_window_denoiser(1, phi), latents, num_steps=32).numpy()[:, 0].reshape(n, -1)
    assert abs(np.mean(alone[1:] * alone[:-1]) / np.mean(alone**2)) < 0.05


def test_the_temporal_aggregation_is_the_exact_mean_of_each_year():
    months = torch.randn(36, 2, 6, 6, dtype=torch.float64)
    a = SeparableOperator(np.eye(6)[:3], np.eye(6)[1:4])
    out = GroupMean(a, 12)(months)
    want = months.reshape(3, 12, 2, 6, 6).mean(1)[..., :3, 1:4]
    assert torch.allclose(out, want, atol=1e-14, rtol=0)
    assert torch.equal(GroupMean(a, 1)(months), a(months))


def test_training_windows_never_cross_a_gap():
    consecutive = np.array([False, True, True, True, False, True, True, True, True])
    assert training_starts(consecutive, 9, 3).tolist() == [0, 1, 4, 5, 6]
    assert training_starts(None, 9, 3).tolist() == list(range(7))
    assert training_starts(consecutive, 9, 1).tolist() == list(range(9))


# -- the method on a tiny synthetic world --------------------------------------------------------------------
@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("spatiotemporal")
    truth, static = write_tiny_stores(root)
    ckpt = root / "tiny-window-prior.pt"
    cfg = tiny_config(
        truth, static, ckpt, steps=2, static_coarse=(), name="spatiotemporal", extra=("method.window=3",)
    )
    spatiotemporal.train(cfg)
    store = open_truth(truth, ["tas", "uas", "vas"])
    train = select_years(store, (2000, 2001)).astype("float32").load()
    held = select_years(store, (2002, 2002)).astype("float32").load()
    return {
        "checkpoint": str(ckpt),
        "train": train,
        "held": held,
        "static": static_for_truth(static, held),
        "truth_url": truth,
        "static_url": static,
    }


SAMPLER = SamplerConfig(num_steps=3, device="cpu", overlap=4, max_patches_per_batch=8)


def _method(world, **extra):
    method = build({"name": "spatiotemporal", "checkpoint": world["checkpoint"], **extra}, SAMPLER)
    train = world["train"]
    return method.fit(coarsen_blocks(train, 4), train) if method.needs.fit else method


def test_the_prior_is_over_windows_and_members_are_whole_sequences_with_the_same_bytes_per_seed(world):
    meta = read_checkpoint(world["checkpoint"]).metadata
    assert meta.method == "spatiotemporal-prior" and meta.data["window"] == 3
    assert meta.networks["denoiser"].unet.out_channels == 9  # 3 steps x 3 variables
    held = world["held"].isel(time=slice(0, 6))
    inputs = perfect_model_inputs(coarsen_blocks(held, 4), Grid.from_dataset(held), world["static"], [])
    method = _method(world)
    a = method.downscale(inputs, members=2, seed=3)
    b = method.downscale(inputs, members=[1], seed=3)
    assert a.tas.dims == ("member", "time", "lat", "lon") and a.sizes["time"] == 6
    assert np.isfinite(a.tas.values).all() and a.attrs["window"] == 3
    assert a.tas.isel(member=1).values.tobytes() == b.tas.isel(member=0).values.tobytes()
    assert not np.array_equal(a.tas.values[0], a.tas.values[1])
    assert method.fitted()["perfect_model"] is True
    short = perfect_model_inputs(
        coarsen_blocks(held.isel(time=slice(0, 2)), 4), Grid.from_dataset(held), world["static"], []
    )
    with pytest.raises(MethodError, match="fewer than the prior's window of 3"):
        method.downscale(short)


def test_an_annual_input_gives_monthly_members(world):
    held = world["held"]
    grid = Grid.from_dataset(held)
    annual = coarsen_blocks(held, 4).mean("time").expand_dims(time=held["time"].values[:1])
    inputs = perfect_model_inputs(annual, grid, world["static"], [], time_step="year")
    method = _method(world, bias_correction=False, items_per_call=24)
    out = method.downscale(inputs, members=2, seed=5)
    assert out.tas.shape == (2, 12, grid.nlat, grid.nlon) and out.attrs["months_per_input_step"] == 12
    assert [t.month for t in out["time"].values] == list(range(1, 13))
    assert out.tas.std("time").mean() > 0.1  # months, not 12 copies of the annual mean


def test_sequences_guided_by_annual_means_agree_with_them_and_stay_coherent():
    """The method's observation model on the AR(1) toy: 2 years of months sampled as one sequence with the
    window prior, guided through the mean of each year (Gaussian likelihood, exact observations): the annual
    means are the observations, the months still vary and keep their lag-1 correlation."""
    from climrecon.models.guidance import GuidedDenoiser

    n, k, cells, phi = 24, 5, 24, 0.8
    ident = SeparableOperator(np.eye(cells), np.eye(cells))
    y = torch.stack([torch.full((1, cells, cells), 0.6), torch.full((1, cells, cells), -0.3)]).double()
    guided = GuidedDenoiser(
        WindowDenoiser(_ar1_window_denoiser(k, phi), n, k),
        GroupMean(ident, 12),
        y,
        noise=(0.0, 1.0 / 12),  # sigma_y 0, ||A^T A|| of a 12-month mean
    )
    latents = torch.randn(
        (n, 1, cells, cells), generator=torch.Generator().manual_seed(1), dtype=torch.float64
    )
    x = edm_sampler(guided, latents, num_steps=24)
    np.testing.assert_allclose(x.reshape(2, 12, 1, cells, cells).mean(1).numpy(), y.numpy(), atol=0.02)
    seq = (x.reshape(2, 12, -1) - y.reshape(2, 1, -1)).reshape(n, -1).numpy()
    assert seq.std() > 0.3  # months, not copies of the annual mean
    assert np.mean(seq[1:] * seq[:-1]) / np.mean(seq**2) > 0.4  # still coherent in time


def test_the_bias_correction_maps_a_biased_model_toward_the_truth_and_is_recorded(world):
    train = world["train"]
    coarse = coarsen_blocks(train, 4)
    biased = coarse.assign(tas=coarse.tas + 3.0)
    method = build({"name": "spatiotemporal", "checkpoint": world["checkpoint"]}, SAMPLER)
    assert method.needs.fit and method.needs.fit_model
    method.fit(coarse, train, model_train=biased)
    record = method.fitted()
    assert record["perfect_model"] is False and record["n_quantiles"] >= 2
    assert all(abs(v + 3.0) < 1e-6 for v in record["mean_adjustment"]["tas"].values())
    fixed = method.correction.coarse(biased[["tas"]])
    np.testing.assert_allclose(fixed.tas.values, coarse.tas.values, atol=1e-4)
    unfitted = build({"name": "spatiotemporal", "checkpoint": world["checkpoint"]}, SAMPLER)
    with pytest.raises(MethodError, match="not fitted"):
        unfitted.correction.coarse(coarse)


def test_a_single_step_prior_is_refused(tmp_path, world):
    from climrecon.methods import zssd

    truth, static = write_tiny_stores(tmp_path)
    ckpt = tmp_path / "month-prior.pt"
    zssd.train(tiny_config(truth, static, ckpt, steps=1, static_coarse=(), name="zssd"))
    with pytest.raises(MethodError, match="prior of single time steps"):
        build({"name": "spatiotemporal", "checkpoint": str(ckpt)}, SAMPLER)


# -- the downscale stage: units with a halo, annual input to monthly members, the fitted bias correction ----
def _stores(world, root, annual: bool = False, bias: float = 0.0) -> dict:
    """Regrid-stage-like stores of the tiny truth (2000-2002) at x4: fine (bilinear), static, coarse."""
    from test_downscale import _stage_store

    from climrecon.methods.features import coarse_on_fine
    from climrecon.stores import content_key

    truth = xr.concat([world["train"], world["held"]], "time")
    coarse = coarsen_blocks(truth, 4)
    coarse = coarse.assign(tas=coarse.tas + bias)
    if annual:
        coarse = coarse.groupby("time.year").mean("time").rename(year="time")
        coarse = coarse.assign_coords(
            time=[cftime.DatetimeGregorian(int(y), 7, 1) for y in coarse["time"].values]
        )
    fine = coarse_on_fine(coarse, Grid.from_dataset(truth)).astype("float32")
    fine["time"].encoding.update(units="days since 1850-01-01", calendar="standard")
    attrs = {"source_id": "TOY", "experiment_id": "hist", "member_id": "r1", "history": "test"}
    fine.attrs.update(attrs)
    tag = f"{'annual' if annual else 'monthly'}-{bias:g}"
    return {
        "fine": _stage_store(str(root / f"fine-{tag}.zarr"), fine, content_key("fine", tag), attrs),
        "static": _stage_store(
            str(root / f"static-{tag}.zarr"), world["static"], content_key("static", tag), {}
        ),
        "coarse": _stage_store(
            str(root / f"coarse-{tag}.zarr"), coarse.astype("float32"), content_key("coarse", tag), {}
        ),
    }


def fit_truth_overrides(world) -> dict[str, str]:
    """The ``train.*`` keys that point a downscale stage at the tiny truth's training years (its fit data)."""
    return {
        "train.truth": world["truth_url"],
        "train.static": world["static_url"],
        "train.variables": "[tas, uas, vas]",
        "train.train_years": "[2000, 2001]",
        "train.validation_years": "[2001, 2001]",
        "train.heldout_years": "[2002, 2002]",
    }


def _stage_config(world, root, **extra):
    from climrecon.config import load_config

    overrides = {
        "storage.root": str(root),
        "method.name": "spatiotemporal",
        "method.checkpoint": world["checkpoint"],
        "sampler.num_steps": 2,
        "sampler.overlap": 4,
        "sampler.max_patches_per_batch": 8,
        "sampler.device": "cpu",
        "downscale.members": 2,
        "downscale.members_per_unit": 1,
        "downscale.months_per_unit": 12,
        "downscale.time_chunk": 12,
        **fit_truth_overrides(world),
        **extra,
    }
    return load_config(overrides=[f"{k}={v}" for k, v in overrides.items()])


def test_units_with_a_halo_give_the_same_bytes_for_one_or_two_workers_and_a_resumed_run(world, tmp_path):
    from climrecon.flows.runtime import dask_client
    from climrecon.stores import StageStore
    from climrecon.tasks.downscale import plan_downscale, run_downscale

    stores = _stores(world, tmp_path, bias=2.0)
    args = (stores["fine"], stores["static"], stores["coarse"])
    one = plan_downscale(_stage_config(world, tmp_path / "one"), *args)
    assert one.halo == spatiotemporal.HALO and one.refine == 1 and len(one.units()) == 3 * 2
    url, _ = run_downscale(one)
    out = xr.open_zarr(url, decode_times=xr.coders.CFDatetimeCoder(use_cftime=True))
    assert out.tas.shape == (2, 36, 40, 40) and np.isfinite(out.tas.values).all()
    record = json.loads(out.attrs["climrecon_provenance"])
    # the bias correction was fitted on the input's own 2000-2001 against the truth: it removes the +2 K
    assert record["fitted"]["perfect_model"] is False
    assert all(abs(v + 2.0) < 1e-3 for v in record["fitted"]["mean_adjustment"]["tas"].values())
    with dask_client(n_workers=2, processes=False) as client:
        two = plan_downscale(_stage_config(world, tmp_path / "two"), *args)
        url2, _ = run_downscale(two, client=client)
    for v in ("tas", "uas", "vas"):
        assert out[v].values.tobytes() == xr.open_zarr(url2)[v].values.tobytes(), v
    # a run that stopped after some units: the rest is sampled by the next run, same bytes
    three = plan_downscale(_stage_config(world, tmp_path / "three"), *args)
    from climrecon.tasks.downscale import prepare_downscale, run_units

    units = prepare_downscale(three)
    run_units(three, units[:3])
    assert not StageStore(three.out_url, three.out_key).is_complete()
    url3, reports = run_downscale(three)
    assert len(reports) == 3
    assert out.tas.values.tobytes() == xr.open_zarr(url3).tas.values.tobytes()


def test_an_annual_store_gives_a_monthly_member_store(world, tmp_path):
    from climrecon.tasks.downscale import plan_downscale, run_downscale

    stores = _stores(world, tmp_path, annual=True)
    plan = plan_downscale(
        _stage_config(world, tmp_path, **{"downscale.months_per_unit": 1, "downscale.time_chunk": 1}),
        stores["fine"],
        stores["static"],
        stores["coarse"],
    )
    assert plan.refine == 12 and plan.halo == 1 and plan.time_step == "year"
    url, _ = run_downscale(plan)
    out = xr.open_zarr(url, decode_times=xr.coders.CFDatetimeCoder(use_cftime=True))
    assert out.tas.shape == (2, 36, 40, 40) and np.isfinite(out.tas.values).all()
    assert [(t.year, t.month) for t in out["time"].values[:13]] == [(2000, m) for m in range(1, 13)] + [
        (2001, 1)
    ]
    assert out["time_bnds"].values[11, 1] == cftime.DatetimeGregorian(2001, 1, 1)


def test_a_sequence_with_gaps_is_refused(world):
    held = world["held"].isel(time=[0, 1, 2, 4, 5])
    inputs = perfect_model_inputs(coarsen_blocks(held, 4), Grid.from_dataset(held), world["static"], [])
    with pytest.raises(MethodError, match="gap between 2002-03 and 2002-05"):
        _method(world).downscale(inputs)
