"""Perfect-model evaluation on a tiny synthetic truth: records, tables equal to direct metrics, held-out years
never fitted on, the diffusion adapter (a random-init checkpoint built like the train stage's), writers."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import xarray as xr
from PIL import Image
from test_training_data import write_tiny_stores

from climrecon.config import (
    ClimReconConfig,
    ConfigError,
    EvaluateConfig,
    SamplerConfig,
    TrainSection,
    load_config,
)
from climrecon.methods import Inputs, MethodError, build
from climrecon.methods.baselines import BCSDDownscaler, BilinearDownscaler
from climrecon.methods.dpdm import DPDMConfig, build_model, prepare_training
from climrecon.models.checkpoint import CheckpointMetadata, GridSpec, NetworkSpec, save_checkpoint
from climrecon.tasks import metrics
from climrecon.tasks.evaluate import (
    METRICS,
    EvaluationError,
    evaluation_document,
    markdown_report,
    perfect_model_inputs,
    records_frame,
    run_evaluation,
    write_figures,
    write_json,
    write_records_csv,
)
from climrecon.tasks.grids import Grid
from climrecon.tasks.regrid import coarsen_blocks
from climrecon.tasks.training_data import open_truth, perfect_model_pairs, select_years, static_for_truth

VARIABLES = ["tas", "uas", "vas"]
# the tiny truth covers 2000-2002 on a 40 x 40 grid of 0.5 deg: baselines fit 2000-2001, 2002 is held out
EVALUATE = {
    "variables": VARIABLES,
    "factors": [4, 8],
    "train_years": [2000, 2001],
    "heldout_years": [2002, 2002],
    "month_stride": 2,
    "ensemble_sizes": [1, 3],
    "seed": 7,
    "threads": 1,
}
SAMPLER = SamplerConfig(num_steps=2, overlap=4, device="cpu", max_patches_per_batch=16)
# qm is left out here only for time: its per-cell quantile fit is slow (np.nanquantile);
# tests/test_baselines.py covers it, and it goes through the same Method interface as bcsd


def write_tiny_checkpoint(
    path: Path,
    truth: str,
    static: str,
    train_years=(2000, 2000),
    validation_years=(2001, 2001),
    heldout_years=(2002, 2002),
    static_coarse=(),
) -> str:
    """A random-init x4 residual model whose metadata is exactly what the train stage records."""
    section = TrainSection(
        truth=truth,
        static=static,
        variables=VARIABLES,
        factor=4,
        train_years=train_years,
        validation_years=validation_years,
        heldout_years=heldout_years,
    )
    config = DPDMConfig(
        patch_size=16,
        static_coarse=list(static_coarse),
        network={"base_channels": 8, "channel_mults": [1, 2], "attention_levels": [1], "num_blocks": 1},
    )
    setup = prepare_training(ClimReconConfig(train=section), config)
    model = build_model(config, len(VARIABLES), len(setup.spec.channel_names()), seed=0)
    meta = CheckpointMetadata(
        method="dpdm-residual",
        networks={"denoiser": NetworkSpec.of(model)},
        variables=setup.spec.variables,
        cond_channels=tuple(setup.spec.channel_names()),
        normalization=setup.stats,
        grid=GridSpec(fine_resolution=setup.grid.dlat, coarsening_factor=4, patch_size=16),
        data=setup.data,
    )
    save_checkpoint(path, {"denoiser": model.state_dict()}, meta)
    return str(path)


def evaluate_config(truth: str, static: str, checkpoint: str, **changes) -> ClimReconConfig:
    methods = ["bilinear", "bcsd", {"name": "dpdm", "checkpoint": checkpoint}]
    methods = [
        {"name": "dpdm", "checkpoint": checkpoint} if m == "dpdm" else m
        for m in changes.pop("methods", methods)
    ]
    return ClimReconConfig(
        evaluate=EvaluateConfig(
            **{**EVALUATE, "truth": truth, "static": static, "methods": methods, **changes}
        ),
        sampler=SAMPLER,
    )


def dpdm(checkpoint: str):
    return build({"name": "dpdm", "checkpoint": checkpoint}, SAMPLER)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    truth, static = write_tiny_stores(root)
    checkpoint = write_tiny_checkpoint(root / "tiny.pt", truth, static)
    cfg = evaluate_config(truth, static, checkpoint)
    return {
        "root": root,
        "truth": truth,
        "static": static,
        "checkpoint": checkpoint,
        "cfg": cfg,
        "result": run_evaluation(cfg),
    }


@pytest.fixture(scope="module")
def held(setup) -> xr.Dataset:
    truth = open_truth(setup["truth"], VARIABLES)
    return select_years(truth, (2002, 2002)).isel(time=slice(None, None, 2)).astype("float32").load()


@pytest.fixture(scope="module")
def train(setup) -> xr.Dataset:
    return select_years(open_truth(setup["truth"], VARIABLES), (2000, 2001)).astype("float32").load()


def _record(result, **where) -> dict:
    hits = [r for r in result.records if all(r[k] == v for k, v in where.items())]
    assert len(hits) == 1, (where, len(hits))
    return hits[0]


def test_records_cover_every_method_factor_variable_and_ensemble_size(setup):
    result = setup["result"]
    # 2 baselines x 2 factors x 3 variables (one member) + dpdm at its x4 only, N = 1 and 3
    assert len(result.records) == 2 * 2 * 3 + 3 * 2
    assert {(r["method"], r["factor"], r["members"]) for r in result.records if r["method"] == "dpdm"} == {
        ("dpdm", 4, 1),
        ("dpdm", 4, 3),
    }
    assert "dpdm: not run at x8 (it serves x4 only)" in result.notes
    for r in result.records:
        assert set(METRICS) <= set(r)
        finite = {m for m in METRICS if math.isfinite(r[m])}
        expected = set(METRICS) - ({"spread_skill_ratio", "crps_fair"} if r["members"] == 1 else set())
        assert finite == expected, (r["method"], r["factor"], r["variable"], r["members"])
        assert r["rmse"] >= r["mae"] > 0 and -1 <= r["acc"] <= 1 and r["ssim"] <= 1
    assert result.months == ["2002-01", "2002-03", "2002-05", "2002-07", "2002-09", "2002-11"]
    assert result.figure_factor == 4 and result.methods["dpdm"]["checkpoint"]["factor"] == 4
    # area means of the truth lose detail: the coarser the input, the larger the bilinear error
    for v in VARIABLES:
        assert (
            _record(result, method="bilinear", factor=8, variable=v)["rmse"]
            > _record(result, method="bilinear", factor=4, variable=v)["rmse"]
        )


def test_records_equal_metrics_computed_directly(setup, held, train):
    result, cfg = setup["result"], setup["cfg"]
    grid = Grid.from_dataset(held)
    climatology = metrics.monthly_climatology(train)
    coarse8 = coarsen_blocks(held, 8)
    bilinear = BilinearDownscaler().downscale(Inputs.from_coarse(coarse8, grid))
    bcsd = BCSDDownscaler().fit(coarsen_blocks(train, 8), train).downscale(Inputs.from_coarse(coarse8, grid))
    for v in VARIABLES:
        rec = _record(result, method="bilinear", factor=8, variable=v)
        assert rec["rmse"] == pytest.approx(
            float(metrics.rmse(bilinear[v].isel(member=0), held[v])), rel=1e-6
        )
        assert rec["ssim"] == pytest.approx(float(metrics.ssim(bilinear[v], held[v])), rel=1e-6)
        rec = _record(result, method="bcsd", factor=8, variable=v)
        assert rec["acc"] == pytest.approx(
            float(metrics.acc(bcsd[v].isel(member=0), held[v], climatology[v])), rel=1e-6
        )
    model = dpdm(setup["checkpoint"])
    inputs = perfect_model_inputs(coarsen_blocks(held, 4), grid, static_for_truth(setup["static"], held), [])
    three = model.downscale(inputs, members=3, seed=cfg.evaluate.seed)
    one = model.downscale(inputs, members=1, seed=cfg.evaluate.seed)
    np.testing.assert_array_equal(one["tas"].values[0], three["tas"].values[0])  # member m is m, whatever N
    assert float(three["tas"].std("member").mean()) > 0  # members differ
    for v in VARIABLES:
        rec = _record(result, method="dpdm", factor=4, variable=v, members=3)
        assert rec["crps"] == pytest.approx(float(metrics.crps(three[v], held[v])), rel=1e-5)
        assert rec["spread_skill_ratio"] == pytest.approx(
            float(metrics.spread_skill_ratio(three[v], held[v])), rel=1e-5
        )
        assert rec["rmse"] == pytest.approx(float(metrics.rmse(three[v].mean("member"), held[v])), rel=1e-5)


def _table_after(markdown: str, marker: str) -> list[list[str]]:
    lines = markdown.splitlines()
    start = lines.index(marker) + 2
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split("|")])
    return rows


def test_markdown_tables_have_the_papers_shape_and_the_record_values(setup):
    result = setup["result"]
    md = markdown_report(result)
    zssd = _table_after(md, "**tas** [K]")
    assert zssd[0] == ["method", "x4 (2°) MAE", "x4 (2°) RMSE", "x8 (4°) MAE", "x8 (4°) RMSE"]
    assert [r[0] for r in zssd[2:]] == ["bilinear", "bcsd", "dpdm (N=1)", "dpdm (N=3)"]
    bcsd = zssd[3]
    assert bcsd[3] == f"{_record(result, method='bcsd', factor=8, variable='tas')['mae']:.4g}"
    assert zssd[5][2] == f"{_record(result, method='dpdm', factor=4, variable='tas', members=3)['rmse']:.4g}"
    assert zssd[5][3:] == ["—", "—"]  # the x4 model is not run at x8
    dpdm = _table_after(md, "**x4** (0.5° from 2°)")
    assert dpdm[0] == ["variable", "method", "N", "RMSE", "ACC", "SSIM", "PSNR [dB]"]
    assert len(dpdm) == 2 + 3 * 4
    row = next(r for r in dpdm if r[:3] == ["uas", "dpdm", "3"])
    rec = _record(result, method="dpdm", factor=4, variable="uas", members=3)
    assert row[3:] == [f"{rec[m]:.4g}" for m in ("rmse", "acc", "ssim", "psnr")]
    assert "SYNTHETIC" in md or "fine truth" in md
    assert "- dpdm: checkpoint `tiny.pt` (dpdm-residual, x4, step 0, target residual), 2 dpmpp2m steps" in md


def test_heldout_years_are_never_fitted_on(setup):
    seen: dict[str, list[set[int]]] = {"fit": [], "downscale": []}

    class RecordingBCSD(BCSDDownscaler):
        def fit(self, coarse_train, fine_train):
            seen["fit"] += [
                {t.year for t in coarse_train.time.values},
                {t.year for t in fine_train.time.values},
            ]
            return super().fit(coarse_train, fine_train)

        def downscale(self, inputs, **kw):
            seen["downscale"].append({t.year for t in inputs.coarse.time.values})
            return super().downscale(inputs, **kw)

    cfg = evaluate_config(setup["truth"], setup["static"], setup["checkpoint"], factors=[8])
    result = run_evaluation(cfg, methods={"bcsd": lambda factor: RecordingBCSD()})
    assert seen["fit"] == [{2000, 2001}, {2000, 2001}] and seen["downscale"] == [{2002}]
    assert {r["method"] for r in result.records} == {"bcsd"}
    with pytest.raises(ConfigError, match="overlap heldout_years"):
        load_config(None, ["evaluate.train_years=[1961, 2011]"])


def test_a_checkpoint_trained_on_heldout_years_is_refused(setup, tmp_path):
    leaky = write_tiny_checkpoint(
        tmp_path / "leaky.pt",
        setup["truth"],
        setup["static"],
        train_years=(2000, 2000),
        validation_years=(2002, 2002),
        heldout_years=(2001, 2001),
    )
    cfg = evaluate_config(setup["truth"], setup["static"], leaky, methods=["dpdm"], factors=[4])
    with pytest.raises(
        EvaluationError,
        match=r"trained/validated on 6 of the held-out time steps \(the first 2002-01-01T00\)",
    ):
        run_evaluation(cfg)


def test_dpdm_checks_factor_and_static(setup, held):
    model = dpdm(setup["checkpoint"])
    assert (
        model.factor == 4
        and model.variables == tuple(VARIABLES)
        and model.describe()["checkpoint"]["target"] == "residual"
    )
    grid = Grid.from_dataset(held)
    with pytest.raises(MethodError, match="x4 .*the coarse input is x8"):
        model.downscale(
            Inputs.from_coarse(coarsen_blocks(held, 8), grid, static_for_truth(setup["static"], held))
        )
    with pytest.raises(MethodError, match="is conditioned on static fields"):
        model.downscale(Inputs.from_coarse(coarsen_blocks(held, 4), grid))


def test_evaluation_builds_the_coarse_views_as_training_does(setup, held, tmp_path):
    path = write_tiny_checkpoint(
        tmp_path / "views.pt", setup["truth"], setup["static"], static_coarse=("orog", "sftlf")
    )
    model = dpdm(path)
    assert model.spec.static_coarse == ("orog", "sftlf")
    assert {"orog_coarse", "sftlf_coarse"} <= set(model.needs.static)
    grid, coarse = Grid.from_dataset(held), coarsen_blocks(held, 4)
    static = static_for_truth(setup["static"], held)
    own = model.downscale(
        perfect_model_inputs(coarse, grid, static, ["orog", "sftlf"]), members=2, seed=3
    )  # evaluation's views
    _, cond = perfect_model_pairs(held, static, model.spec)  # the training path's views
    views = {
        f"{n}_coarse": cond.sel(channel=f"{n}_coarse", drop=True).isel(time=0, drop=True)
        for n in ("orog", "sftlf")
    }
    given = model.downscale(
        Inputs.from_coarse(coarse, grid, static.assign(views), truth_view=True), members=2, seed=3
    )
    for v in VARIABLES:
        np.testing.assert_allclose(own[v].values, given[v].values, rtol=1e-5, atol=1e-4)


def test_writers_round_trip(setup, tmp_path):
    result = setup["result"]
    csv = pd.read_csv(write_records_csv(result, tmp_path / "e.csv"))
    frame = records_frame(result)
    assert list(csv.columns) == list(frame.columns) and len(csv) == len(frame)
    np.testing.assert_allclose(csv["rmse"], frame["rmse"], rtol=1e-5)
    doc = json.loads(write_json(result, tmp_path / "e.json", {"command": "pytest"}).read_text())
    assert doc["command"] == "pytest" and len(doc["records"]) == len(result.records)
    one = next(r for r in doc["records"] if r["members"] == 1)
    assert one["spread_skill_ratio"] is None  # NaN -> null: valid JSON
    assert doc == json.loads(json.dumps({**evaluation_document(result), "command": "pytest"}, default=str))
    paths = write_figures(result, tmp_path / "fig")
    names = sorted(p.name for p in paths)
    assert names == sorted(
        [f"{k}_{v}_x4.png" for k in ("maps", "spectra", "rank_histogram") for v in VARIABLES]
    )
    with Image.open(tmp_path / "fig" / "rank_histogram_tas_x4.png") as png:
        assert png.size == (500, 350)
    counts = result.rank_histograms["tas"]
    assert counts.size == 4 and int(counts.sum()) == 6 * 40 * 40  # 3 members -> 4 ranks, every held-out cell


def test_truth_from_netcdf_or_catalog_query_gives_the_same_scores(setup, tmp_path, make_catalog, catalog_row):
    base = {"methods": ["bilinear"], "factors": [8]}
    zarr = run_evaluation(evaluate_config(setup["truth"], setup["static"], setup["checkpoint"], **base))
    netcdf = tmp_path / "truth.nc"
    xr.open_zarr(setup["truth"]).to_netcdf(netcdf)
    from_nc = run_evaluation(evaluate_config(str(netcdf), setup["static"], setup["checkpoint"], **base))
    rows = [
        catalog_row(f"file://{setup['truth']}", v, source_id="TinyTruth", format="zarr", synthetic=True)
        for v in VARIABLES
    ]
    query = {"catalog": make_catalog(rows), "truth_query": {"source_id": "TinyTruth"}}
    from_catalog = run_evaluation(
        evaluate_config(None, setup["static"], setup["checkpoint"], **base, **query)
    )
    assert from_nc.source["how"] == "netCDF file" and from_catalog.source["how"].startswith("catalog query")
    for other in (from_nc, from_catalog):
        assert [r["rmse"] for r in other.records] == pytest.approx(
            [r["rmse"] for r in zarr.records], rel=1e-6
        )
    for truth in (setup["truth"], str(netcdf)):  # a missing variable is named, whichever the store
        with pytest.raises(EvaluationError, match=r"lacks .*\['pr'\]"):
            run_evaluation(
                evaluate_config(truth, setup["static"], setup["checkpoint"], **base, variables=["tas", "pr"])
            )
