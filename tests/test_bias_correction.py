"""``method.bias_correction`` (methods/bias_correction.py): a trained model's coarse input quantile-mapped toward
the truth's coarse view before the model reads it. A coarse model with a known bias is mapped back onto the
truth's coarse fields exactly; the fine-grid view moves by the bilinear view of the adjustment; DPDM (with a
local-regression first guess), CorrDiff and ZSSD downscale a biased model as they downscale the unbiased one;
the correction is recorded, keyed and refused when it was never fitted; DPDM and CorrDiff have it on by default."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import xarray as xr
from test_corrdiff import tiny_config
from test_training_data import write_tiny_stores

from climrecon import methods
from climrecon.methods.base import Inputs, MethodError
from climrecon.methods.bias_correction import CoarseBiasCorrection
from climrecon.methods.corrdiff import train as train_corrdiff
from climrecon.methods.dpdm import train as train_dpdm
from climrecon.methods.features import with_coarse_static
from climrecon.methods.zssd import train as train_zssd
from climrecon.tasks.evaluate import perfect_model_inputs
from climrecon.tasks.grids import Grid
from climrecon.tasks.regrid import coarsen_blocks
from climrecon.tasks.training_data import open_truth, select_years, static_for_truth

pytestmark = pytest.mark.usefixtures("one_torch_thread")
VARIABLES = ["tas", "uas", "vas"]
SAMPLER = methods.SamplerConfig(num_steps=3, device="cpu")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("bias_correction")
    truth, static = write_tiny_stores(root)
    dpdm = root / "dpdm-fg.pt"
    train_dpdm(
        tiny_config(truth, static, dpdm, steps=2, name="dpdm", extra=("method.first_guess=local_regression",))
    )
    corrdiff = root / "corrdiff.pt"
    train_corrdiff(tiny_config(truth, static, corrdiff, reg_steps=2, steps=2))
    prior = root / "zssd-prior.pt"
    train_zssd(tiny_config(truth, static, prior, steps=1, static_coarse=(), name="zssd"))
    store = open_truth(truth, VARIABLES)
    train = select_years(store, (2000, 2001)).astype("float32").load()
    held = select_years(store, (2002, 2002)).isel(time=slice(0, 3)).astype("float32").load()
    return {
        "dpdm": str(dpdm),
        "corrdiff": str(corrdiff),
        "zssd": str(prior),
        "truth_url": truth,
        "static_url": static,
        "train": train,
        "held": held,
        "static": static,
    }


def _biased(coarse, shift=3.0, wind_scale=2.0):
    """A coarse 'model' whose tas is ``shift`` K warmer and whose winds are ``wind_scale`` times the truth's."""
    return coarse.assign(tas=coarse.tas + shift, uas=coarse.uas * wind_scale, vas=coarse.vas * wind_scale)


def _shifted(coarse):
    """A coarse 'model' with constant biases (3 K, 1.5 and -1 m/s): mapped back exactly at any value, held-out
    months beyond the training range included (an additive quantile mapping extrapolates its end shift)."""
    return coarse.assign(tas=coarse.tas + 3.0, uas=coarse.uas + 1.5, vas=coarse.vas - 1.0)


def _inputs(world, coarse):
    grid = Grid.from_dataset(world["held"], "truth")
    static = static_for_truth(world["static"], world["held"])
    # a GCM's fields on the perfect-model path: not the truth's own view, so the correction applies
    return perfect_model_inputs(coarse, grid, static, ["orog", "sftlf"], truth_view=False)


def test_a_biased_model_is_mapped_onto_the_truths_coarse_fields_and_the_fine_view_follows(world, caplog):
    reference = coarsen_blocks(world["train"], 4)
    with caplog.at_level("WARNING", logger="climrecon.methods.bias_correction"):
        correction = CoarseBiasCorrection(VARIABLES, "test").fit(reference, _biased(reference, shift=3.0))
    assert "test is fitted on 2 year(s) of the coarse input (2000-01..2001-12)" in caplog.text
    record = correction.record
    assert record["model_years"] == 2
    assert record["perfect_model"] is False and record["model_period"] == ["2000-01", "2001-12"]
    assert all(abs(v + 3.0) < 1e-5 for v in record["mean_adjustment"]["tas"].values())
    # a monotone distortion of the training values is undone exactly on them (every value is a quantile node)
    mapped = correction.coarse(_biased(reference))
    for v in VARIABLES:
        np.testing.assert_allclose(mapped[v].values, reference[v].values, atol=1e-4, err_msg=v)
    # held-out months of the same model: mapped like the training ones, and the fine view is the bilinear view
    # of the mapped coarse fields (what the stage would have made from them)
    held = coarsen_blocks(world["held"], 4)
    inputs = _inputs(world, _biased(held))
    fixed = correction.inputs(inputs)
    direct = Inputs.from_coarse(fixed.coarse, inputs.grid)
    for v in VARIABLES:
        np.testing.assert_allclose(fixed.coarse_on_fine[v].values, direct.coarse_on_fine[v].values, atol=1e-4)
    assert (
        abs(float((fixed.coarse.tas - held.tas).mean()))
        < 0.3
        < abs(float((inputs.coarse.tas - held.tas).mean()))
    )
    # a coarse cell without a value stays without one, and the fine view gains no NaN from it
    holed = inputs.coarse.copy(deep=True)
    holed["tas"][:, 4, 4] = np.nan
    fixed = correction.inputs(dataclasses.replace(inputs, coarse=holed))
    assert (
        np.isnan(fixed.coarse.tas.values[:, 4, 4]).all()
        and np.isfinite(fixed.coarse_on_fine.tas.values).all()
    )


def test_a_perfect_model_is_the_identity_bit_for_bit(world):
    reference = coarsen_blocks(world["train"], 4)
    correction = CoarseBiasCorrection(VARIABLES).fit(reference)  # no model fields: the truth's own view
    assert correction.record["perfect_model"] is True
    held = coarsen_blocks(world["held"], 4)
    inputs = _inputs(world, held)
    assert correction.inputs(inputs) is inputs and correction.coarse(held) is held
    with pytest.raises(MethodError, match="dpdm bias correction: .* not fitted"):
        CoarseBiasCorrection(VARIABLES, "dpdm bias correction").coarse(held)


@pytest.mark.parametrize("name", ["dpdm", "corrdiff", "zssd"])
def test_a_corrected_model_downscales_a_biased_gcm_like_the_unbiased_input(world, name):
    train, held = world["train"], world["held"]
    reference, biased_train = coarsen_blocks(train, 4), _shifted(coarsen_blocks(train, 4))
    held_coarse = coarsen_blocks(held, 4)
    config = {"name": name, "checkpoint": world[name], "bias_correction": True}
    method = methods.build(config, SAMPLER)
    assert method.needs.fit and method.needs.fit_model
    assert method.describe()["bias_correction"] and "bias correction" in method.describe()["report"]
    with pytest.raises(MethodError, match="not fitted"):
        method.downscale(_inputs(world, held_coarse), members=1, seed=3)
    method.fit(reference, train, model_train=biased_train)
    assert method.fitted()["perfect_model"] is False
    corrected = method.downscale(_inputs(world, _shifted(held_coarse)), members=2, seed=3)
    plain = methods.build({"name": name, "checkpoint": world[name], "bias_correction": False}, SAMPLER)
    assert not plain.needs.fit and plain.fitted() is None
    default = methods.build({"name": name, "checkpoint": world[name]}, SAMPLER)
    assert (default.correction is not None) == (name != "zssd")  # on by default for the supervised models
    assert plain.identity(2, 3) != method.identity(2, 3)
    unbiased = plain.downscale(_inputs(world, held_coarse), members=2, seed=3)
    uncorrected = plain.downscale(_inputs(world, _shifted(held_coarse)), members=2, seed=3)
    for v in VARIABLES:
        gap = float(np.abs(corrected[v] - unbiased[v]).max())
        # (zssd: the guidance's steps amplify the mapping's float rounding a little)
        assert gap < 0.01 < 0.5 < float(np.abs(uncorrected[v] - unbiased[v]).max()), (v, gap)


def test_the_stage_fits_the_correction_on_the_runs_own_years_records_it_and_undoes_a_constant_bias(
    world, tmp_path
):
    """Through the downscale stage (plan, fit on a worker, units, provenance): a coarse store 3 K too warm gives
    the members of the unbiased store; the fitted correction is in the store's provenance; a stage given no
    coarse store is refused with both remedies."""
    from test_spatiotemporal import _stage_config, _stores

    from climrecon.tasks.downscale import DownscaleError, plan_downscale, run_downscale

    here = {
        **world,
        "checkpoint": world["dpdm"],
        "static": with_coarse_static(
            static_for_truth(world["static_url"], world["held"]),
            Grid.from_dataset(coarsen_blocks(world["held"], 4)),
            ["orog", "sftlf"],
        ),
        "held": world["held"],
    }
    extra = {"method.name": "dpdm", "method.checkpoint": world["dpdm"], "sampler.overlap": 4}
    out = {}
    for bias in (0.0, 3.0):
        stores = _stores(here, tmp_path / f"in-{bias:g}", bias=bias)
        cfg = _stage_config(here, tmp_path / f"out-{bias:g}", **extra)
        plan = plan_downscale(cfg, stores["fine"], stores["static"], stores["coarse"])
        url, _ = run_downscale(plan)
        out[bias] = xr.open_zarr(url)
        record = json.loads(out[bias].attrs["climrecon_provenance"])["fitted"]
        assert record["perfect_model"] is False and record["model_period"] == ["2000-01", "2001-12"]
        assert all(abs(v + bias) < 1e-3 for v in record["mean_adjustment"]["tas"].values())
    for v in VARIABLES:
        np.testing.assert_allclose(out[3.0][v].values, out[0.0][v].values, atol=1e-3, err_msg=v)
    with pytest.raises(
        DownscaleError, match="give the stage the coarse store .* method.bias_correction: false"
    ):
        plan_downscale(cfg, stores["fine"], stores["static"], None)


@pytest.mark.parametrize("name", ["bcsd", "qm"])
def test_the_quantile_mapping_baselines_fit_on_the_inputs_own_years_in_the_stage(world, tmp_path, name):
    """BCSD's bias correction (and QM's mapping) is fitted on the GCM's own fields over the training years it
    covers, so a constant bias of the input is taken out; with ``bias_correction: false`` it is fitted on the
    truth's coarse view and the bias stays (what the stage did before)."""
    from test_spatiotemporal import _stores, fit_truth_overrides

    from climrecon.config import load_config
    from climrecon.tasks.downscale import plan_downscale, run_downscale

    here = {**world, "static": static_for_truth(world["static_url"], world["held"])}
    out = {}
    for bias, corrected in ((0.0, True), (3.0, True), (3.0, False)):
        stores = _stores(here, tmp_path / f"in-{bias:g}", bias=bias)
        overrides = {
            "storage.root": str(tmp_path / f"out-{bias:g}-{corrected}"),
            "method.name": name,
            "method.bias_correction": str(corrected).lower(),
            "downscale.members": 1,
            "downscale.months_per_unit": 12,
            "downscale.time_chunk": 12,
            **fit_truth_overrides(world),
        }
        cfg = load_config(overrides=[f"{k}={v}" for k, v in overrides.items()])
        url, _ = run_downscale(plan_downscale(cfg, stores["fine"], stores["static"], stores["coarse"]))
        store = xr.open_zarr(url)
        out[bias, corrected] = store.tas.load()
        record = json.loads(store.attrs["climrecon_provenance"])["fitted"]  # what the mapping was fitted on
        assert record["perfect_model"] is (not corrected)
        if corrected and name == "bcsd":  # on the coarse grid: the mean adjustment is the bias itself
            assert record["model_period"] == ["2000-01", "2001-12"]
            assert all(abs(v + bias) < 1e-3 for v in record["mean_adjustment"]["tas"].values())
    np.testing.assert_allclose(out[3.0, True].values, out[0.0, True].values, atol=1e-3)
    assert 2.5 < float((out[3.0, False] - out[0.0, True]).mean()) < 3.5  # the bias stays


def test_a_scenario_is_corrected_with_the_fit_on_its_historical_run(world, tmp_path):
    """A scenario store (2002 only, outside the training years) 3 K too warm: refused without a fit store (the
    message names downscale.fit_coarse), and fitted on the same model's historical coarse store it gives the
    members of the unbiased scenario; the historical store is in the key and the provenance."""
    from test_spatiotemporal import _stage_config, _stores

    from climrecon.tasks.downscale import DownscaleError, plan_downscale, run_downscale

    static = with_coarse_static(
        static_for_truth(world["static_url"], world["held"]),
        Grid.from_dataset(coarsen_blocks(world["held"], 4)),
        ["orog", "sftlf"],
    )
    here = {**world, "checkpoint": world["dpdm"], "static": static}
    scenario = {**here, "train": world["held"].isel(time=slice(0, 0))}  # the stores hold 2002 alone
    historical = _stores(here, tmp_path / "hist", bias=3.0)  # 2000-2002, the training years included
    extra = {"method.name": "dpdm", "method.checkpoint": world["dpdm"], "sampler.overlap": 4}
    out = {}
    for bias in (0.0, 3.0):
        stores = _stores(scenario, tmp_path / f"scen-{bias:g}", bias=bias)
        cfg = _stage_config(here, tmp_path / f"out-{bias:g}", **extra)
        if bias:
            with pytest.raises(DownscaleError, match="covers 2002-2002: .* give downscale.fit_coarse"):
                run_downscale(plan_downscale(cfg, stores["fine"], stores["static"], stores["coarse"]))
        fit = historical["coarse"] if bias else _stores(here, tmp_path / "hist0", bias=0.0)["coarse"]
        plan = plan_downscale(cfg, stores["fine"], stores["static"], stores["coarse"], fit_coarse_url=fit)
        url, _ = run_downscale(plan)
        out[bias] = xr.open_zarr(url)
        record = json.loads(out[bias].attrs["climrecon_provenance"])
        assert record["fitted"]["model_period"] == ["2000-01", "2001-12"]
        assert {"store": fit, "role": "bias correction fitted on"} in record["inputs"]
    assert plan.out_key != plan_downscale(cfg, stores["fine"], stores["static"], stores["coarse"]).out_key
    for v in VARIABLES:
        np.testing.assert_allclose(out[3.0][v].values, out[0.0][v].values, atol=1e-3, err_msg=v)


def test_scenarios_are_paired_with_the_historical_run_of_the_same_model_and_member():
    from climrecon.tasks.downscale import historical_fit_stores

    def ident(source, experiment, member="r1", frequency="mon"):
        return {"source_id": source, "experiment_id": experiment, "member_id": member, "frequency": frequency}

    stores = {
        "a-hist": ident("A", "historical"),
        "a-ssp585": ident("A", "ssp585"),
        "a-ssp245-r2": ident("A", "ssp245", "r2"),  # no historical run of member r2
        "b-ssp585": ident("B", "ssp585"),  # no historical run of model B
        "c-a1b": ident("C", "a1b"),
        "a-ssp585-day": ident("A", "ssp585", frequency="day"),  # no daily historical run
    }
    assert historical_fit_stores(stores) == {"a-ssp585": "a-hist"}
