"""The methods seam: every registered method runs through the downscale stage and through the evaluation with
the same code path and gives the same bytes; a toy method registered in this module runs through both flows
with no edit anywhere else; the registry validates each method's own config keys."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import pytest
import torch
import xarray as xr
from pydantic import Field
from test_downscale import _stage_store
from test_evaluate import write_tiny_checkpoint
from test_training_data import write_tiny_stores

from climrecon import methods
from climrecon.config import ConfigError, MethodConfig, load_config
from climrecon.methods import Inputs, Needs, SamplerConfig, member_indices, month_index
from climrecon.models.samplers import seed_for
from climrecon.stores import content_key
from climrecon.tasks.downscale import plan_downscale, run_downscale
from climrecon.tasks.evaluate import perfect_model_inputs
from climrecon.tasks.grids import Grid
from climrecon.tasks.regrid import coarsen_blocks
from climrecon.tasks.training_data import open_truth, select_years, static_for_truth


# -- a method added by a test: one config, one class, one register() call --------------------------------
class ToyConfig(MethodConfig):
    """The coarse field on the fine grid plus an offset and seeded noise: a stochastic toy."""

    name: Literal["toy-shift"] = "toy-shift"
    offset: float = 1.0
    noise: float = Field(0.1, ge=0)


class ToyShift:
    name = "toy-shift"
    needs = Needs(stochastic=True, coarse=False)

    def __init__(self, config: ToyConfig, sampler: SamplerConfig):
        self.config = config

    def fit(self, coarse_train: xr.Dataset, fine_train: xr.Dataset) -> ToyShift:
        return self

    def validate(self, inputs: Inputs) -> None:
        inputs.require(self.needs, self.name)

    def downscale(self, inputs: Inputs, members: int | Sequence[int] = 1, seed: int = 0) -> xr.Dataset:
        index = member_indices(members)
        fine = inputs.coarse_on_fine[inputs.variables].load()
        months = month_index(fine["time"].values)
        out = {}
        for v in inputs.variables:
            base = fine[v].values.astype(np.float32) + np.float32(self.config.offset)
            noise = np.stack(
                [
                    np.stack(
                        [
                            torch.randn(
                                base.shape[1:], generator=torch.Generator().manual_seed(seed_for(seed, t, m))
                            ).numpy()
                            for t in months
                        ]
                    )
                    for m in index
                ]
            )
            out[v] = (
                ("member", "time", "lat", "lon"),
                base[None] + np.float32(self.config.noise) * noise,
                fine[v].attrs,
            )
        return xr.Dataset(
            out, coords={"member": index, "time": fine["time"], "lat": fine["lat"], "lon": fine["lon"]}
        )

    def identity(self, members: int, seed: int) -> list[Any]:
        return [self.config.model_dump(mode="json"), members, seed]

    def describe(self) -> dict[str, Any]:
        return {
            "method": self.name,
            "label": self.name,
            "stochastic": True,
            "report": f"toy-shift: coarse on fine + {self.config.offset:g}",
            "seeds": "seed_for(seed, month, m)",
        }


methods.register(ToyConfig, ToyShift, "a test's toy method")

FAST_SAMPLER = [
    "sampler.num_steps=2",
    "sampler.overlap=4",
    "sampler.device=cpu",
    "sampler.max_patches_per_batch=16",
]
FACTOR = 4


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny truth, a x4 checkpoint, and the stores the regrid stage would leave for the held-out months of
    that truth coarsened by 4 (the fine store IS the evaluation's bilinear view)."""
    root = tmp_path_factory.mktemp("methods")
    truth_url, static_url = write_tiny_stores(root)
    checkpoint = write_tiny_checkpoint(root / "tiny.pt", truth_url, static_url)
    variables = ["tas", "uas", "vas"]
    held = (
        select_years(open_truth(truth_url, variables), (2002, 2002))
        .isel(time=slice(0, 4))
        .astype("float32")
        .load()
    )
    train = select_years(open_truth(truth_url, variables), (2000, 2001)).astype("float32").load()
    grid = Grid.from_dataset(held, "truth")
    coarse = coarsen_blocks(held, FACTOR)
    inputs = perfect_model_inputs(coarse, grid, static_for_truth(static_url, held), [])
    fine = inputs.coarse_on_fine.assign_coords(time=held["time"])
    fine.attrs.update(source_id="TINY-GCM", experiment_id="historical", member_id="r1i1p1")
    stores = {
        "fine": _stage_store(
            str(root / "TINY-GCM.historical.r1i1p1.fine.zarr"),
            fine,
            content_key("m-fine"),
            {"source_id": "TINY-GCM", "experiment_id": "historical", "member_id": "r1i1p1"},
            time_chunk=2,
        ),
        "static": _stage_store(str(root / "static-fine.zarr"), inputs.static, content_key("m-static"), {}),
        "coarse": _stage_store(str(root / "coarse.zarr"), coarse, content_key("m-coarse"), {}, time_chunk=2),
    }
    return {
        "root": root,
        "truth": truth_url,
        "static_global": static_url,
        "checkpoint": checkpoint,
        "held": held,
        "train": train,
        "inputs": inputs,
        "stores": stores,
        "variables": variables,
    }


def _config(world, name: str, root) -> Any:
    overrides = [
        f"storage.root={root}",
        f"method.name={name}",
        *FAST_SAMPLER,
        "downscale.members=2",
        "downscale.time_chunk=2",
        "downscale.months_per_unit=2",
        "downscale.members_per_unit=1",
        f"train.truth={world['truth']}",
        "train.train_years=[2000, 2001]",
        "train.validation_years=[2001, 2001]",
        "train.heldout_years=[2002, 2002]",
        "train.factor=4",
    ]
    # the input (2002) does not cover the fit years (2000-2001): no bias correction for the methods that have
    # it on by default (a perfect-model evaluation leaves the truth's view unchanged anyway)
    if name in ("bcsd", "qm"):
        overrides += ["method.bias_correction=false"]
    if name == "dpdm":
        overrides += [f"method.checkpoint={world['checkpoint']}", "method.patch_size=16"]
        overrides += ["method.bias_correction=false"]
    if name == "corrdiff":
        overrides += [f"method.checkpoint={_tiny_corrdiff(world)}", "method.patch_size=16"]
        overrides += ["method.bias_correction=false"]
    if name == "zssd":
        overrides += [f"method.checkpoint={_tiny_zssd(world)}", "method.patch_size=16"]
    if name == "spatiotemporal":  # the input (2002) does not cover the fit years: no bias correction
        overrides += [f"method.checkpoint={_tiny_window_prior(world)}", "method.bias_correction=false"]
    return load_config(overrides=overrides)


def _tiny_window_prior(world) -> str:
    """A tiny spatiotemporal prior over windows of 3 months (2 steps) made by its own training recipe."""
    path = world["root"] / "tiny-window-prior.pt"
    if not path.exists():
        from test_corrdiff import tiny_config

        from climrecon.methods import spatiotemporal

        cfg = tiny_config(
            world["truth"],
            world["static_global"],
            path,
            steps=2,
            static_coarse=(),
            name="spatiotemporal",
            extra=("method.window=3",),
        )
        spatiotemporal.train(cfg)
    return str(path)


def _tiny_zssd(world) -> str:
    """A tiny ZSSD prior (2 steps) made by its own training recipe."""
    path = world["root"] / "tiny-zssd.pt"
    if not path.exists():
        from test_corrdiff import tiny_config

        from climrecon.methods import zssd

        zssd.train(
            tiny_config(world["truth"], world["static_global"], path, steps=2, static_coarse=(), name="zssd")
        )
    return str(path)


def _tiny_corrdiff(world) -> str:
    """A tiny x4 CorrDiff checkpoint (both networks, 2 steps each) made by its own training recipe."""
    path = world["root"] / "tiny-corrdiff.pt"
    if not path.exists():
        from test_corrdiff import write_tiny_corrdiff

        write_tiny_corrdiff(path, world["truth"], world["static_global"], static_coarse=())
    return str(path)


@pytest.mark.parametrize("name", sorted(methods.METHODS))
def test_every_registered_method_gives_the_same_members_in_the_stage_and_in_the_evaluation(
    world, name, tmp_path
):
    cfg = _config(world, name, tmp_path)
    s = world["stores"]
    plan = plan_downscale(cfg, s["fine"], s["static"], s["coarse"])
    url, reports = run_downscale(plan)
    assert len(reports) == 2 * 2  # 2 blocks of months x 2 members
    stage = xr.open_zarr(url, decode_times=xr.coders.CFDatetimeCoder(use_cftime=True))
    # the evaluation's path: the same method, fitted on the same training years, on the evaluation's inputs
    method = methods.build(cfg.method, cfg.sampler)
    if method.needs.fit:
        method.fit(coarsen_blocks(world["train"], FACTOR), world["train"])
    direct = method.downscale(world["inputs"], members=2, seed=cfg.downscale.seed)
    assert list(plan.variables) and set(plan.variables) <= set(direct.data_vars)
    for v in plan.variables:
        got = stage[v].transpose("member", "time", "lat", "lon").values
        want = direct[v].transpose("member", "time", "lat", "lon").values.astype(np.float32)
        assert got.tobytes() == want.tobytes(), (name, v)
    identical = np.array_equal(stage[plan.variables[0]].values[0], stage[plan.variables[0]].values[1])
    assert identical is (not method.needs.stochastic)
    prov = json.loads(stage.attrs["climrecon_provenance"])
    assert prov["method"]["method"] == name and json.loads(stage.attrs["climrecon_method"])["name"] == name


def test_a_method_registered_by_a_test_runs_through_both_flows(world, tmp_path, prefect_harness):
    from climrecon.flows.downscale import downscale_flow
    from climrecon.flows.evaluate import evaluate_flow
    from climrecon.flows.runtime import dask_client

    s = world["stores"]
    overrides = [
        f"storage.root={tmp_path}",
        "method.name=toy-shift",
        "method.offset=2.5",
        "downscale.members=2",
        "downscale.time_chunk=2",
        "downscale.months_per_unit=2",
    ]
    with dask_client(n_workers=1, processes=False) as client:  # workers in this process know the toy
        url = downscale_flow(
            overrides=overrides,
            fine_url=s["fine"],
            static_url=s["static"],
            coarse_url=s["coarse"],
            scheduler_address=client.scheduler.address,
        )
    assert ".toy-shift." in url
    members = xr.open_zarr(url, decode_times=xr.coders.CFDatetimeCoder(use_cftime=True))
    shift = members["tas"].mean("member") - world["inputs"].coarse_on_fine["tas"].values
    assert abs(float(shift.mean()) - 2.5) < 0.05
    evaluate = [
        f"storage.root={tmp_path}",
        f"evaluate.truth={world['truth']}",
        f"evaluate.static={world['static_global']}",
        "evaluate.variables=[tas, uas, vas]",
        "evaluate.factors=[4]",
        "evaluate.train_years=[2000, 2001]",
        "evaluate.heldout_years=[2002, 2002]",
        "evaluate.month_stride=3",
        "evaluate.ensemble_sizes=[2]",
        "evaluate.threads=1",
        "evaluate.methods=[bilinear, {name: toy-shift, offset: 0.0, noise: 0.0}]",
    ]
    out = evaluate_flow(overrides=evaluate)
    doc = json.loads(open(out["json"]).read())
    toy = {r["variable"]: r for r in doc["records"] if r["method"] == "toy-shift"}
    bilinear = {r["variable"]: r for r in doc["records"] if r["method"] == "bilinear"}
    assert set(toy) == {"tas", "uas", "vas"} and doc["methods"]["toy-shift"]["report"].startswith("toy-shift")
    for v in toy:  # offset 0, no noise: the toy is bilinear with edges clamped, scored by the same code
        assert toy[v]["mae"] == pytest.approx(bilinear[v]["mae"], rel=0.05)


def test_the_registry_validates_each_method_and_names_the_culprit(world):
    assert {"bilinear", "qm", "bcsd", "dpdm", "toy-shift"} <= set(methods.METHODS)
    with pytest.raises(ConfigError, match=r"method.offset: Input should be a valid number"):
        load_config(overrides=["method.name=toy-shift", "method.offset=abc"])
    with pytest.raises(ConfigError, match=r"method.checkpoint: unknown key"):
        load_config(overrides=["method.name=toy-shift", "method.checkpoint=x.pt"])
    with pytest.raises(ConfigError, match=r"unknown method 'nope'; registered methods: \[.*'toy-shift'"):
        load_config(overrides=["evaluate.methods=[bilinear, nope]"])
    with pytest.raises(
        ConfigError, match=r"sampler.num_steps: moved|downscale.num_steps: moved to sampler.num_steps"
    ):
        load_config(overrides=["downscale.num_steps=4"])
    cfg = load_config(overrides=["method.name=bcsd", "method.n_quantiles=20"])
    assert cfg.method.model_dump() == {
        "name": "bcsd",
        "label": None,
        "n_quantiles": 20,
        "bias_correction": True,
    }
    assert load_config(overrides=["method.name=toy-shift"]).model_dump(mode="json")["method"] == {
        "name": "toy-shift",
        "label": None,
        "offset": 1.0,
        "noise": 0.1,
    }


def test_inputs_refuse_what_a_method_needs_but_lacks(world):
    inputs = world["inputs"]
    no_static = Inputs(coarse_on_fine=inputs.coarse_on_fine, grid=inputs.grid, coarse=inputs.coarse)
    with pytest.raises(
        methods.MethodError, match=r"conditioned on static fields \['orog'\]; the static fields lack"
    ):
        no_static.require(Needs(static=("orog",)), "m")
    with pytest.raises(methods.MethodError, match="serves coarsening factor"):
        inputs.require(Needs(factors=(8,)), "m")
    only_fine = Inputs(coarse_on_fine=inputs.coarse_on_fine, grid=inputs.grid)
    with pytest.raises(methods.MethodError, match="reads the coarse grid itself"):
        only_fine.require(Needs(), "bilinear")


def test_fitted_methods_fit_on_the_data_section_in_the_downscale_stage(world, tmp_path):
    """``data:`` (the user's own fine data, split by dates) replaces train.truth/train_years for fitting in
    the stage: the same training months give the same bytes; another training selection another store."""
    s = world["stores"]
    legacy = _config(world, "delta", tmp_path / "legacy")
    data = {
        "path": world["truth"],
        "variables": world["variables"],
        "train": {"dates": ["2000-01", "2001-12"]},
        "heldout": {"dates": ["2002-01", "2002-12"]},
    }
    own = legacy.with_overrides([f"data={json.dumps(data)}", f"storage.root={tmp_path / 'own'}"])
    stores = {}
    for label, cfg in (("legacy", legacy), ("own", own)):
        plan = plan_downscale(cfg, s["fine"], s["static"], s["coarse"])
        url, _ = run_downscale(plan)
        stores[label] = xr.open_zarr(url)
    for v in world["variables"]:
        assert stores["own"][v].values.tobytes() == stores["legacy"][v].values.tobytes(), v
    fewer = own.with_overrides(['data.train={"dates": ["2000-01", "2000-12"]}'])
    plan = plan_downscale(fewer, s["fine"], s["static"], s["coarse"])
    assert plan.fit is not None and plan.fit.years == "dates 2000-01..2000-12"
    same = plan_downscale(own, s["fine"], s["static"], s["coarse"])
    assert plan.name == same.name and plan.out_key != same.out_key


def test_the_stage_masks_every_output_with_the_fine_datas_missing_cells(world, tmp_path):
    """A data: section with ocean cells: the downscale stage writes NaN there for any method (the mask is
    carried into the outputs) and the same bytes as before elsewhere."""
    s = world["stores"]
    truth = xr.open_zarr(world["truth"], decode_times=xr.coders.CFDatetimeCoder(use_cftime=True))[
        world["variables"]
    ]
    ocean = np.zeros((truth.sizes["lat"], truth.sizes["lon"]), bool)
    ocean[:6, :9] = True
    masked = str(tmp_path / "masked.zarr")
    truth.where(~xr.DataArray(ocean, dims=("lat", "lon"))).to_zarr(masked)
    data = {
        "path": masked,
        "variables": world["variables"],
        "train": {"years": [2000, 2001]},
        "heldout": {"years": [2002, 2002]},
    }
    for name in ("bilinear", "delta"):
        plain = _config(world, name, tmp_path / f"plain-{name}")
        own = plain.with_overrides([f"data={json.dumps(data)}", f"storage.root={tmp_path / name}"])
        outs = []
        for cfg in (plain, own):
            url, _ = run_downscale(plan_downscale(cfg, s["fine"], s["static"], s["coarse"]))
            outs.append(xr.open_zarr(url)["tas"].values)
        assert np.isnan(outs[1][..., ocean]).all() and np.isfinite(outs[1][..., ~ocean]).all(), name
        if name == "bilinear":  # not fitted: the valid cells are exactly the unmasked run's
            assert outs[1][..., ~ocean].tobytes() == outs[0][..., ~ocean].tobytes()


def test_unset_solver_and_steps_take_each_methods_default_from_the_cost_curve():
    """DPDM: 12 DPM-Solver++(2M) steps (equal or better skill than 18 Heun steps, sampling_cost.json);
    CorrDiff and the guided methods keep 18 Heun steps; explicit settings win; churn needs Heun."""
    from climrecon.config import SamplerConfig
    from climrecon.methods import MethodError, build, parse_config

    dpdm = build(parse_config({"name": "dpdm"}), SamplerConfig())
    assert (dpdm.sampler.solver, dpdm.sampler.num_steps, dpdm.sampler.network_calls()) == ("dpmpp2m", 12, 12)
    assert "12 dpmpp2m steps" in dpdm.describe()["report"]
    for name in ("corrdiff", "zssd"):
        m = build(parse_config({"name": name}), SamplerConfig())
        assert (m.sampler.solver, m.sampler.num_steps) == ("heun", 18), name
    mine = build(parse_config({"name": "dpdm"}), SamplerConfig(num_steps=18))
    assert (mine.sampler.solver, mine.sampler.num_steps) == ("dpmpp2m", 18)
    heun = build(parse_config({"name": "dpdm"}), SamplerConfig(solver="heun", S_churn=5.0))
    assert (heun.sampler.solver, heun.sampler.num_steps) == ("heun", 12)
    with pytest.raises(MethodError, match="S_churn needs solver heun"):
        build(parse_config({"name": "dpdm"}), SamplerConfig(S_churn=5.0))
    with pytest.raises(ValueError, match="a method fills them in"):
        SamplerConfig().sampling_kwargs()
