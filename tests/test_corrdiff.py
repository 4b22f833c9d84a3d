"""CorrDiff (methods/corrdiff.py): the regression + residual split on a toy with a known mean and residual law,
both-stage training resume, a checkpoint missing a network refused by name, deterministic members."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from test_training_data import write_tiny_stores

from climrecon import methods
from climrecon.config import ClimReconConfig, SamplerConfig, load_config
from climrecon.methods import corrdiff
from climrecon.methods.corrdiff import RegressionLoss, regression_mean
from climrecon.models.checkpoint import CheckpointError, read_checkpoint, save_checkpoint
from climrecon.models.edm import EDMConfig, EDMPrecond
from climrecon.models.tiling import make_tiling
from climrecon.models.trainer import Batch, TrainConfig
from climrecon.models.trainer import train as train_loop
from climrecon.models.unet import UNet, UNetConfig
from climrecon.tasks.evaluate import perfect_model_inputs
from climrecon.tasks.grids import Grid
from climrecon.tasks.regrid import coarsen_blocks
from climrecon.tasks.training_data import open_truth, select_years, static_for_truth

FAST = SamplerConfig(num_steps=3, overlap=4, device="cpu", max_patches_per_batch=16)
TINY_NETWORK = "{base_channels: 8, channel_mults: [1, 2], attention_levels: [], mid_attention: false}"

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_config(
    truth: str,
    static: str,
    checkpoint: Path,
    reg_steps: int = 4,
    steps: int = 4,
    static_coarse: tuple[str, ...] = ("orog", "sftlf"),
    name: str = "corrdiff",
    extra: tuple[str, ...] = (),
) -> ClimReconConfig:
    """A x4 CorrDiff (or another patch method, ``name``) on the tiny synthetic truth (40 x 40 cells), a few
    steps per stage; ``extra`` overrides appended."""
    return load_config(
        overrides=[
            f"method.name={name}",
            f"method.static_coarse=[{', '.join(static_coarse)}]",
            "method.patch_size=16",
            f"method.network={TINY_NETWORK}",
            *([f"method.regression.max_steps={reg_steps}"] if name == "corrdiff" else []),
            f"train.max_steps={steps}",
            f"train.truth={truth}",
            f"train.static={static}",
            "train.variables=[tas, uas, vas]",
            "train.factor=4",
            "train.train_years=[2000, 2001]",
            "train.validation_years=[2001, 2001]",
            "train.heldout_years=[2002, 2002]",
            "train.batch_size=4",
            "train.warmup_steps=1",
            "train.checkpoint_every=2",
            "train.threads=1",
            "train.device=cpu",
            f"train.checkpoint={checkpoint}",
            *extra,
        ]
    )


def write_tiny_corrdiff(
    path: Path, truth: str, static: str, static_coarse: tuple[str, ...] = ("orog", "sftlf")
) -> str:
    """A CorrDiff checkpoint (both roles) made by the shipped recipe, 2 steps per stage."""
    corrdiff.train(tiny_config(truth, static, path, reg_steps=2, steps=2, static_coarse=static_coarse))
    return str(path)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("corrdiff")
    truth, static = write_tiny_stores(root)
    ckpt = write_tiny_corrdiff(root / "tiny-corrdiff.pt", truth, static)
    held = select_years(open_truth(truth, ["tas", "uas", "vas"]), (2002, 2002)).isel(time=slice(0, 3))
    held = held.astype("float32").load()
    grid = Grid.from_dataset(held, "truth")
    inputs = perfect_model_inputs(
        coarsen_blocks(held, 4), grid, static_for_truth(static, held), ["orog", "sftlf"]
    )
    return {"root": root, "truth": truth, "static": static, "checkpoint": ckpt, "inputs": inputs}


# -- the split on a toy with a known mean and residual law ------------------------------------------------
def test_regression_recovers_the_mean_and_the_residual_ensemble_has_the_noise_spread():
    """x = a * y + noise (std s): the regression (RegressionLoss, the trainer, the tiled blended mean) learns
    mu = a * y; the residual sampled with the exact denoiser of N(0, 1) and scaled by the residual std gives
    members whose spread is s."""
    a, s = 1.7, 0.3
    torch.manual_seed(0)
    unet = UNet(
        UNetConfig(
            out_channels=1,
            cond_channels=1,
            base_channels=8,
            channel_mults=(1,),
            num_blocks=1,
            attention_levels=(),
            mid_attention=False,
        )
    )
    net = EDMPrecond(unet, EDMConfig())
    gen = np.random.default_rng(0)

    def batches(first_step: int):
        step = first_step
        while True:
            rng = np.random.default_rng(step)
            y = rng.standard_normal((8, 1, 8, 8)).astype(np.float32)
            x = a * y + s * rng.standard_normal(y.shape).astype(np.float32)
            yield Batch(torch.from_numpy(x), torch.from_numpy(y), torch.zeros(8))
            step += 1

    cfg = TrainConfig(max_steps=300, lr=3e-3, warmup_steps=10, ema_halflife_steps=20, checkpoint_every=300)
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        train_loop(
            net,
            batches,
            cfg,
            loss=RegressionLoss(),
            checkpoint_path=Path(tmp) / "r.pt",
            role="regression",
            progress=False,
        )
    net.eval()
    y = gen.standard_normal((4, 1, 16, 16)).astype(np.float32)
    tiling = make_tiling(16, 16, 8, 2)
    mu = regression_mean(
        net, y, np.zeros(4, np.float32), tiling, n_out=1, scale=[1.0], target="full", chunk=8
    )
    slope = float((mu * y).sum() / (y * y).sum())
    assert slope == pytest.approx(a, rel=0.05)
    assert float(np.abs(mu - a * y).mean()) < 0.15 * a

    # residual: the exact EDM denoiser of unit-normal data, D(x; sigma) = x / (1 + sigma^2), through the tiler
    def exact(x, sigma, cond, toy):
        return x / (1 + sigma.reshape(-1, 1, 1, 1).to(x.dtype) ** 2)

    from climrecon.models.tiled import sample_tiled

    r = sample_tiled(exact, None, None, tiling, seeds=list(range(64)), out_channels=1, num_steps=18)
    members = mu[0][None] + s * r.numpy()  # 64 members of one month
    assert float(members.std(axis=0, ddof=1).mean()) == pytest.approx(s, rel=0.1)
    assert float(np.abs(members.mean(axis=0) - mu[0]).mean()) < 0.1


def test_the_method_composes_mean_and_residual_in_network_space(world):
    """Through CorrDiff.downscale: with the exact unit-normal residual denoiser, members scatter around the
    regression-only field with spread residual_scale * std per variable (physical units, identity transform)."""
    m = methods.build(
        {"name": "corrdiff", "checkpoint": world["checkpoint"]}, FAST.model_copy(update={"num_steps": 18})
    )
    mean = methods.build(
        {"name": "corrdiff", "checkpoint": world["checkpoint"], "regression_only": True}, FAST
    ).downscale(world["inputs"], members=1)
    m.net = lambda x, sigma, cond, toy: x / (1 + sigma.reshape(-1, 1, 1, 1).to(x.dtype) ** 2)
    ens = m.downscale(world["inputs"], members=24, seed=3)
    stats = m.metadata.normalization
    for i, v in enumerate(m.variables):
        want = m.res_scale[i] * stats.std[i]
        assert float(ens[v].std("member", ddof=1).mean()) == pytest.approx(want, rel=0.15), v
        bias = float(np.abs(ens[v].mean("member") - mean[v].isel(member=0)).mean())
        assert bias < 0.5 * want, v


# -- training: both stages, one checkpoint, resume at either stage ----------------------------------------
class Interrupt(Exception):
    pass


class CrashAt:
    """A logger that interrupts training when ``stage`` logs ``step`` (after that step's checkpoint)."""

    def __init__(self, stage: str, step: int):
        self.stage, self.step = stage, step

    def info(self, msg, *args):
        if len(args) == 5 and args[0] == self.stage and int(args[1]) == self.step:
            raise Interrupt


@pytest.mark.parametrize("stage", ["regression", "residual"])
def test_both_stages_resume_to_identical_bytes(world, tmp_path, monkeypatch, stage):
    monkeypatch.setattr(corrdiff, "LOG_EVERY", 1)
    truth, static = world["truth"], world["static"]
    ref = corrdiff.train(tiny_config(truth, static, tmp_path / "ref.pt"))
    path = tmp_path / "run.pt"
    with pytest.raises(Interrupt):
        corrdiff.train(tiny_config(truth, static, path), log=CrashAt(stage, 3))
    info = read_checkpoint(path).header["training"]
    assert (info["role"], info["step"]) == ({"regression": "regression", "residual": "denoiser"}[stage], 2)
    torch.manual_seed(12345)  # a fresh process: nothing but the checkpoint carries state
    resumed = corrdiff.train(tiny_config(truth, static, path))
    assert resumed.content_sha256 == ref.content_sha256
    assert resumed.losses == ref.losses
    meta = read_checkpoint(path).metadata
    assert set(meta.roles) == {"regression", "denoiser"} and meta.data["regression_stage"]["steps"] == 4


def test_a_checkpoint_missing_a_network_is_refused_naming_the_role(world, tmp_path):
    contents = read_checkpoint(world["checkpoint"])
    states = contents.ema_states()
    for keep, missing in (("regression", "denoiser"), ("denoiser", "regression")):
        meta = contents.metadata
        meta = type(meta)(**{**meta.__dict__, "networks": {keep: meta.networks[keep]}})
        path = tmp_path / f"only-{keep}.pt"
        save_checkpoint(path, {keep: states[keep]}, meta)
        with pytest.raises(CheckpointError, match=rf"lacks the network role\(s\) \['{missing}'\]"):
            methods.build({"name": "corrdiff", "checkpoint": str(path)}, FAST)
    # the regression alone needs only its own network
    only = methods.build(
        {"name": "corrdiff", "checkpoint": str(tmp_path / "only-regression.pt"), "regression_only": True},
        FAST,
    )
    assert only.downscale(world["inputs"], members=1)["tas"].notnull().all()


# -- determinism -----------------------------------------------------------------------------------------
def test_same_seed_same_bytes_and_regression_only_members_are_identical(world):
    m = methods.build({"name": "corrdiff", "checkpoint": world["checkpoint"]}, FAST)
    a = m.downscale(world["inputs"], members=2, seed=7)
    b = m.downscale(world["inputs"], members=[1], seed=7)  # member 1 alone: the same field
    c = m.downscale(world["inputs"], members=2, seed=8)
    for v in m.variables:
        assert a[v].isel(member=1).values.tobytes() == b[v].isel(member=0).values.tobytes()
        assert not np.array_equal(a[v].values, c[v].values)
        assert not np.array_equal(a[v].isel(member=0).values, a[v].isel(member=1).values)
    assert m.identity(2, 7) != m.identity(2, 8) and m.needs.stochastic
    reg = methods.build(
        {"name": "corrdiff", "checkpoint": world["checkpoint"], "regression_only": True}, FAST
    )
    r = reg.downscale(world["inputs"], members=3, seed=7)
    r2 = reg.downscale(world["inputs"], members=3, seed=99)
    assert not reg.needs.stochastic
    for v in reg.variables:
        assert r[v].isel(member=0).values.tobytes() == r[v].isel(member=2).values.tobytes()
        assert r[v].values.tobytes() == r2[v].values.tobytes()
    assert "regression_only" in reg.identity(3, 7) and reg.identity(3, 7) != m.identity(3, 7)
    assert m.identity(2, 7)[1] == read_checkpoint(world["checkpoint"]).header["content_sha256"]
    d = m.describe()
    assert d["years_seen"] == [[2000, 2001], [2001, 2001]] and d["report"].startswith("corrdiff: checkpoint")
    assert sorted(d["checkpoint"]["roles"]) == ["denoiser", "regression"]


# -- the shipped checkpoint --------------------------------------------------------------------------------
SHIPPED = Path(__file__).resolve().parents[1] / "checkpoints" / "corrdiff-westus-x8.pt"


@pytest.mark.skipif(not SHIPPED.exists(), reason="no shipped CorrDiff checkpoint")
def test_shipped_checkpoint_has_both_networks_and_its_recorded_hash():
    import re

    contents = read_checkpoint(SHIPPED)
    meta = contents.metadata
    assert contents.header["training"] is None and set(meta.roles) == {"regression", "denoiser"}
    assert meta.variables == ("tas", "uas", "vas", "pr") and meta.grid.coarsening_factor == 8
    assert meta.data["train_years"] == [1961, 2005] and meta.data["heldout_years"] == [2011, 2020]
    assert meta.data["regression_target"] == "residual" and meta.data["regression_stage"]["steps"] > 0
    calibration = meta.data["spread_calibration"]  # fitted on validation months, never held-out ones
    assert set(meta.data["spread_inflation"]) == set(meta.variables)
    assert calibration["years"] == meta.data["validation_years"] == [2006, 2010]
    readme = (SHIPPED.parent / "README.md").read_text()
    section = readme[readme.index("# Shipped checkpoint: `corrdiff-westus-x8.pt`") :]
    recorded = re.search(r"content_sha256: `([0-9a-f]{64})`", section)
    assert recorded and recorded.group(1) == contents.header["content_sha256"]
    assert methods.dpdm.default_checkpoint(None, method="corrdiff") == str(SHIPPED)


# -- spread calibration (climrecon.tasks.calibrate) --------------------------------------------------------
def test_inflation_factor_calibrates_a_simulated_ensemble():
    """truth = mu + e (std 1), members = mu + f r (r std 0.6, 8 members): the factor from the ratio measured
    at f = 1 brings the project's spread-skill ratio to 1."""
    import xarray as xr

    from climrecon.tasks import metrics
    from climrecon.tasks.calibrate import inflation_factor

    rng = np.random.default_rng(0)
    dims, shape = ("time", "lat", "lon"), (12, 40, 40)
    coords = {"lat": np.linspace(30, 50, 40), "lon": np.linspace(-125, -105, 40)}
    mu = rng.normal(size=shape)
    truth = xr.DataArray(mu + rng.normal(size=shape), dims=dims, coords=coords)
    r = rng.normal(scale=0.6, size=(8, *shape))

    def ssr(f: float) -> float:
        members = xr.DataArray(mu[None] + f * r, dims=("member", *dims), coords=coords)
        return float(metrics.spread_skill_ratio(members, truth))

    before = ssr(1.0)
    f = inflation_factor(before, 8)
    assert before < 0.7 and f == pytest.approx(1 / 0.6, rel=0.05)
    assert ssr(f) == pytest.approx(1.0, abs=0.02)
    assert inflation_factor(1.0, 8) == pytest.approx(1.0)  # calibrated: unchanged
    assert inflation_factor(0.1, 8) == 2.0 and inflation_factor(5.0, 8) == 0.5  # clipped
    with pytest.raises(ValueError, match="2 members"):
        inflation_factor(0.9, 1)


def test_spread_inflation_scales_the_residual_and_calibration_stores_it(world, tmp_path):
    from dataclasses import replace

    from climrecon.methods import MethodError
    from climrecon.tasks.calibrate import fit_spread_inflation, write_calibrated

    ckpt, inputs = world["checkpoint"], world["inputs"]
    mean = methods.build({"name": "corrdiff", "checkpoint": ckpt, "regression_only": True}, FAST)
    mu = mean.downscale(inputs, members=1).isel(member=0)
    plain = methods.build({"name": "corrdiff", "checkpoint": ckpt}, FAST)
    wide = methods.build({"name": "corrdiff", "checkpoint": ckpt, "spread_inflation": {"tas": 2.0}}, FAST)
    a, b = plain.downscale(inputs, members=2, seed=5), wide.downscale(inputs, members=2, seed=5)
    np.testing.assert_allclose((b["tas"] - mu["tas"]).values, 2 * (a["tas"] - mu["tas"]).values, atol=2e-3)
    assert b["uas"].values.tobytes() == a["uas"].values.tobytes()  # other variables untouched
    assert wide.identity(2, 5) != plain.identity(2, 5) and "tas 2.000" in wide.describe()["report"]
    with pytest.raises(MethodError, match=r"spread_inflation names \['pr'\]"):
        methods.build({"name": "corrdiff", "checkpoint": ckpt, "spread_inflation": {"pr": 1.1}}, FAST)

    cfg = tiny_config(world["truth"], world["static"], tmp_path / "unused.pt")
    fitted = fit_spread_inflation(ckpt, cfg=cfg, months=3, members=4, sampler=FAST)
    factors, how = fitted["spread_inflation"], fitted["spread_calibration"]
    assert set(factors) == {"tas", "uas", "vas"} and all(0.5 <= f <= 2.0 for f in factors.values())
    assert how["years"] == [2001, 2001] and how["members"] == 4 and len(how["months"]) == 3  # validation
    assert set(how["crps_before"]) == set(how["ensemble_mean_mae_before"]) == set(factors)
    out = tmp_path / "calibrated.pt"
    digest = write_calibrated(ckpt, out, fitted)
    calibrated = methods.build({"name": "corrdiff", "checkpoint": str(out)}, FAST)
    assert calibrated.inflation == [factors[v] for v in calibrated.variables]
    data = read_checkpoint(out).metadata.data
    assert (
        data["spread_calibration"]["source"]["content_sha256"] == plain.sha256 and calibrated.sha256 == digest
    )
    # the config still overrides the checkpoint's factors
    unit = {
        "name": "corrdiff",
        "checkpoint": str(out),
        "spread_inflation": {"tas": 1.0, "uas": 1.0, "vas": 1.0},
    }
    assert methods.build(unit, FAST).downscale(inputs, members=2, seed=5)["vas"].values.tobytes() == (
        a["vas"].values.tobytes()
    )
    contents = read_checkpoint(ckpt)
    other = tmp_path / "other.pt"
    save_checkpoint(other, contents.ema_states(), replace(contents.metadata, method="zssd-prior"))
    with pytest.raises(MethodError, match="spread calibration applies to"):
        fit_spread_inflation(other, cfg=cfg)


def test_dpdm_members_spread_about_a_common_centre_and_calibrate(world, tmp_path):
    """DPDM's factor scales each member's distance from the sample of a zero latent (the same centre for every
    member, so members stay independent of one another); calibration fits and stores it as for CorrDiff."""
    from climrecon.methods.dpdm import physical_fields, train
    from climrecon.tasks.calibrate import fit_spread_inflation, write_calibrated

    cfg = tiny_config(world["truth"], world["static"], tmp_path / "dpdm.pt", steps=2, name="dpdm")
    train(cfg)
    ckpt, inputs = str(tmp_path / "dpdm.pt"), world["inputs"]
    plain = methods.build({"name": "dpdm", "checkpoint": ckpt}, FAST)
    wide = methods.build({"name": "dpdm", "checkpoint": ckpt, "spread_inflation": {"tas": 2.0}}, FAST)
    assert plain.inflation == [1.0, 1.0, 1.0] and "spread inflation" not in plain.describe()["report"]
    a, b = plain.downscale(inputs, members=3, seed=5), wide.downscale(inputs, members=3, seed=5)
    values, _, z_cond, toy, tiling = plain._network_inputs(inputs)
    centre = physical_fields(
        plain.centre(z_cond, toy, tiling).float(), values, plain.spec.channel_names(), plain.metadata
    )
    c = centre[None, :, 0]  # tas, broadcast over members
    np.testing.assert_allclose(b["tas"].values - c, 2 * (a["tas"].values - c), atol=1e-4)
    assert not np.allclose(a["tas"].values, c, atol=1e-3)  # the members do spread about it
    assert b["uas"].values.tobytes() == a["uas"].values.tobytes()  # other variables untouched
    one = wide.downscale(inputs, members=[1], seed=5)  # a member alone: the same bytes as in the ensemble
    assert one["tas"].values.tobytes() == b["tas"].isel(member=[1]).values.tobytes()
    assert wide.identity(3, 5) != plain.identity(3, 5) and "tas 2.000" in wide.describe()["report"]

    fitted = fit_spread_inflation(ckpt, cfg=cfg, months=3, members=4, sampler=FAST)
    assert set(fitted["spread_inflation"]) == {"tas", "uas", "vas"}
    out = tmp_path / "calibrated.pt"
    write_calibrated(ckpt, out, fitted)
    calibrated = methods.build({"name": "dpdm", "checkpoint": str(out)}, FAST)
    assert calibrated.inflation == [fitted["spread_inflation"][v] for v in calibrated.variables]
    assert calibrated.describe()["spread_inflation"] == fitted["spread_inflation"]


def test_a_sampler_other_than_the_calibrations_is_warned_about(world, tmp_path, caplog):
    import logging

    from climrecon.tasks.calibrate import write_calibrated

    fitted = {
        "spread_inflation": {"tas": 1.2, "uas": 1.2, "vas": 1.2},
        "spread_calibration": {"sampler": {"solver": "heun", "num_steps": FAST.num_steps}},
    }
    out = tmp_path / "calibrated.pt"
    write_calibrated(world["checkpoint"], out, fitted)
    caplog.set_level(logging.WARNING, logger="climrecon.methods")
    methods.build({"name": "corrdiff", "checkpoint": str(out)}, FAST)
    assert "was fitted with" not in caplog.text  # the calibration's own sampler: quiet
    other = FAST.model_copy(update={"num_steps": FAST.num_steps + 1})
    methods.build({"name": "corrdiff", "checkpoint": str(out)}, other)
    assert f"fitted with {FAST.num_steps} heun steps" in caplog.text and "--steps" in caplog.text
    caplog.clear()  # a factor set in the config is the user's choice: quiet
    methods.build({"name": "corrdiff", "checkpoint": str(out), "spread_inflation": {"tas": 1.0}}, other)
    assert "was fitted with" not in caplog.text
    uncalibrated = methods.build({"name": "corrdiff", "checkpoint": str(out), "spread_inflation": {}}, other)
    assert uncalibrated.inflation == [1.0, 1.0, 1.0] and "was fitted with" not in caplog.text


def test_calibration_months_default_to_every_month_of_the_years(world):
    from climrecon.tasks.evaluate import heldout_inputs

    method = methods.build({"name": "corrdiff", "checkpoint": world["checkpoint"]}, FAST)
    every, inputs = heldout_inputs(method, world["truth"], world["static"], (2001, 2001), None)
    some, _ = heldout_inputs(method, world["truth"], world["static"], (2001, 2001), 3)
    assert every.sizes["time"] == 12 and {t.year for t in every["time"].values} == {2001}
    assert inputs.coarse_on_fine.sizes["time"] == 12 and some.sizes["time"] == 3
