"""Benchmark: every method side by side at x8 on held-out years of the synthetic reanalysis (issue 14).

bilinear, QM, BCSD and the local regression (fitted on 1961-2005), the CorrDiff regression alone
("regression"), DPDM (the shipped checkpoint: tas, uas, vas only) and CorrDiff (regression + residual
diffusion), and DPDM, CorrDiff and its regression on the local-regression first guess (``dpdm_fg``,
``corrdiff_fg``, ``regression_fg``: ``checkpoints/first_guess/``; issue 14's goals for them under
``goals_corrdiff_first_guess``) run through
:func:`climrecon.tasks.evaluate.run_evaluation` (the evaluation stage's code: the same held-out months, the
same perfect-model inputs, the same members, seeds and sampler for every method) and are scored with
:mod:`climrecon.tasks.metrics`: ensemble-mean MAE and its ratio to bilinear, RMSE, CRPS, spread-skill ratio,
99th-percentile error, log-spectral distance per variable; "overall" is the mean over variables of the
per-variable figures (for DPDM over its three variables; ``*_tas_uas_vas`` gives every method on those
three). Also the pr wet-cell fraction and a rank histogram PNG per ensemble method and variable. Affordable on
a shared 2-core CPU: every ``--month-stride``-th held-out month, ``--members`` members, ``--steps`` Heun steps.

    python benchmarks/methods_x8.py [--month-stride 10] [--members 16] [--steps 12]

``--reuse dpdm`` takes a method's figures from the recorded run instead of sampling it again (only when that
run scored the same months, members and sampler with the same checkpoint content; every other method reruns):

    python benchmarks/methods_x8.py --month-stride 5 --members 16 --steps 12 --set sampler.solver=heun --reuse dpdm

``ablation`` scores CorrDiff checkpoints' regression alone on VALIDATION months (2006-2010; never the
held-out years) and stores the table under ``ablation`` in the same JSON (kept by the main run):

    python benchmarks/methods_x8.py ablation --label full=outputs/train/ablation/reg-full.pt ...
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    add_evaluation_arguments,
    checkpoint_id,
    command_line,
    machine,
    peak_rss_mib,
    score_table,
    side_by_side_config,
    versions,
    write_results,
)

from climrecon.config import load_config  # noqa: E402
from climrecon.methods import build  # noqa: E402
from climrecon.tasks import metrics, plots  # noqa: E402
from climrecon.tasks.evaluate import (  # noqa: E402
    heldout_months,
    method_factory,
    open_evaluation_truth,
    run_evaluation,
)

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
OUT = RESULTS / "methods_x8.json"
FIGURES = RESULTS / "figures"
CORRDIFF = REPO / "checkpoints" / "corrdiff-westus-x8.pt"
DPDM = REPO / "checkpoints" / "dpdm-westus-x8.pt"
DPDM_FG = REPO / "checkpoints" / "first_guess" / "dpdm-fg-westus-x8.pt"  # first_guess: local_regression
CORRDIFF_FG = REPO / "checkpoints" / "first_guess" / "corrdiff-fg-westus-x8.pt"
VARIABLES = ["tas", "uas", "vas", "pr"]
WET = 1.0 / 86400.0  # 1 mm/day in kg m-2 s-1: a "wet" cell-month
SCORES = (
    "mae",
    "rmse",
    "crps",
    "crps_fair",
    "spread_skill_ratio",
    "q99_error",
    "log_spectral_distance",
    "bias",
)

# Training cost, from checkpoints/README.md (both on this 2-core shared VM, 1 torch thread, CPU only).
TRAINING = {
    "dpdm": {
        "steps": 10000,
        "wall_s": 3658,
        "cores": "1 torch thread on a shared 2-core VM",
        "parameters": 1196355,
        "variables": ["tas", "uas", "vas"],
    },
    "corrdiff": {
        "steps": {"regression": 5000, "residual": 5500},
        "wall_s": 3152,
        "wall_s_by_stage": {
            "startup_and_data": 30,
            "regression_and_mean_of_training_months": 1495,
            "residual_to_2500": 710,
            "continuation_startup_and_mean": 41,
            "residual_2500_to_5500": 894,
        },
        "note": "two runs: configs/train-corrdiff-westus-x8.yaml (regression 5000 + residual 2500; a 1-thread "
        "calibration job on the other core) and configs/train-corrdiff-westus-x8-longer.yaml (the residual "
        "continued to 5500 steps, a warm restart of the cosine schedule); 3.3-3.6 steps/s",
        "cores": "1 torch thread on a shared 2-core VM",
        "parameters": {"regression": 1197220, "denoiser": 1198372},
        "variables": VARIABLES,
    },
}


# the two first-guess runs (configs/train-*-fg-westus-x8.yaml) ran side by side, one torch thread each
TRAINING["dpdm_fg"] = {
    **TRAINING["dpdm"],
    "wall_s": 2993,
    "note": "configs/train-dpdm-fg-westus-x8.yaml beside the CorrDiff first-guess run; 2.2-3.7 steps/s",
}
TRAINING["corrdiff_fg"] = {
    "steps": {"regression": 5000, "residual": 5500},
    "wall_s": 3246,
    "wall_s_by_stage": {"startup_data_first_guess_regression_and_mean": 1616, "residual": 1630},
    "note": "configs/train-corrdiff-fg-westus-x8.yaml (one run) beside the DPDM first-guess run",
    "cores": TRAINING["corrdiff"]["cores"],
    "parameters": TRAINING["corrdiff"]["parameters"],
    "variables": VARIABLES,
}


class Capture:
    """A method that keeps what it produced (for rank histograms and wet fractions beyond the records)."""

    def __init__(self, inner: Any, store: dict[str, xr.Dataset], name: str):
        self._inner, self._store, self._name = inner, store, name

    def __getattr__(self, item: str) -> Any:
        return getattr(self._inner, item)

    def downscale(self, inputs: Any, members: Any = 1, seed: int = 0) -> xr.Dataset:
        out = self._inner.downscale(inputs, members=members, seed=seed).load()
        self._store[self._name] = out
        return out


def _capturing(factory: Any, store: dict[str, xr.Dataset], name: str) -> Any:
    def make(factor: int) -> Any:
        method = factory(factor)
        return None if method is None else Capture(method, store, name)

    return make


def _training_cost(path: Path) -> dict[str, Any]:
    from climrecon.models.checkpoint import read_checkpoint

    cost = dict(TRAINING["corrdiff"])
    try:
        meta = read_checkpoint(path).metadata
    except Exception:  # noqa: BLE001 - a cost summary, not a requirement
        return cost
    stage = meta.data.get("regression_stage", {})
    cost["steps"] = {"regression": stage.get("steps"), "residual": meta.step}
    return cost


def method_label(method: str | dict[str, Any]) -> str:
    """The label a method's figures are recorded under (``label`` or ``name``; a plain string is both)."""
    return method if isinstance(method, str) else str(method.get("label", method["name"]))


def reusable(
    previous: dict[str, Any], labels: Sequence[str], sample: dict[str, Any], checkpoints: dict[str, Any]
) -> list[str]:
    """Why the recorded run ``previous`` cannot stand in for ``labels`` (empty: it can).

    Reuse is exact or refused: the recorded run must have scored the same ``sample`` (months, members and,
    on every sampler key it recorded, the sampler) and, for a method with a checkpoint, the same weights
    (``checkpoints[label]["sha256"]`` equal to the recorded one)."""
    problems = []
    for key in ("months", "members"):
        if previous.get(key) != sample[key]:
            problems.append(f"the recorded {key} differ")
    recorded = previous.get("sampler") or {}
    changed = sorted(k for k, v in recorded.items() if sample["sampler"].get(k) != v)
    if changed or not recorded:
        problems.append(f"the recorded sampler differs in {changed or 'everything'}")
    for label in labels:
        if label not in previous.get("per_variable", {}):
            problems.append(f"{label} has no recorded figures")
        ident = checkpoints.get(label)
        if ident is not None and (previous.get("checkpoints") or {}).get(label) != ident:
            problems.append(
                f"{label}'s checkpoint is not the recorded one ({ident['file']} {ident['sha256'][:12]})"
            )
    return problems


def _crps_over_regression(
    per_variable: dict[str, Any], ensemble: str, regression: str, key: str = "crps"
) -> dict[str, float]:
    """Per variable, the ensemble's CRPS (``key``: "crps" or "crps_fair") over the regression's MAE."""
    return {v: per_variable[ensemble][v][key] / per_variable[regression][v]["mae"] for v in VARIABLES}


def _goals(per_variable: dict[str, Any], label: str, crps_over_reg: dict[str, float]) -> dict[str, Any]:
    """Issue 14's goals for the CorrDiff figures recorded under ``label`` (``crps_over_reg``: its
    :func:`_crps_over_regression`). The CRPS goal is also stated with the fair CRPS (unbiased for the
    ensemble size: the empirical CRPS of M members exceeds it by mean|x_i - x_j| / 2M, so a perfectly
    calibrated Gaussian residual has empirical CRPS / regression MAE = 0.707 (1 + 1/M), 0.751 at 16 members)."""
    scores = per_variable[label]
    regression = label.replace("corrdiff", "regression")  # corrdiff_fg -> regression_fg
    fair = list(_crps_over_regression(per_variable, label, regression, "crps_fair").values())
    return {
        "crps_fair_over_regression_mae_le_0.75": bool(np.mean(fair) <= 0.75)
        if np.all(np.isfinite(fair))
        else None,
        "corrdiff_mae_ratio_vs_bilinear_overall_le_0.30": float(
            np.mean([scores[v]["mae_ratio_vs_bilinear"] for v in VARIABLES])
        )
        <= 0.30,
        "corrdiff_mae_below_bcsd_every_variable": {
            v: scores[v]["mae"] < per_variable["bcsd"][v]["mae"] for v in VARIABLES
        },
        "corrdiff_crps_below_bcsd_pr_mae": scores["pr"]["crps"] < per_variable["bcsd"]["pr"]["mae"],
        "crps_over_regression_mae_le_0.75": float(np.mean(list(crps_over_reg.values()))) <= 0.75,
        "spread_skill_0.9_to_1.1_every_variable": {
            v: 0.9 <= scores[v]["spread_skill_ratio"] <= 1.1 for v in VARIABLES
        },
    }


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_evaluation_arguments(parser, month_stride=10, members=16)
    parser.add_argument("--corrdiff", type=Path, default=CORRDIFF)
    parser.add_argument("--dpdm", type=Path, default=DPDM)
    parser.add_argument(
        "--dpdm-fg", type=Path, default=DPDM_FG, help="DPDM on the local-regression first guess"
    )
    parser.add_argument("--corrdiff-fg", type=Path, default=CORRDIFF_FG, help="CorrDiff on that first guess")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument(
        "--reuse",
        action="append",
        default=[],
        metavar="METHOD",
        help="take METHOD's figures from the recorded run in --out (same months, members, sampler, checkpoint)",
    )
    args = parser.parse_args(argv)

    every_method = [
        "bilinear",
        "qm",
        "bcsd",
        "local_regression",
        {
            "name": "corrdiff",
            "label": "regression",
            "regression_only": True,
            "checkpoint": str(args.corrdiff),
        },
        {"name": "dpdm", "checkpoint": str(args.dpdm)},
        {"name": "dpdm", "label": "dpdm_fg", "checkpoint": str(args.dpdm_fg)},
        {"name": "corrdiff", "checkpoint": str(args.corrdiff)},
        {
            "name": "corrdiff",
            "label": "regression_fg",
            "regression_only": True,
            "checkpoint": str(args.corrdiff_fg),
        },
        {"name": "corrdiff", "label": "corrdiff_fg", "checkpoint": str(args.corrdiff_fg)},
    ]
    checkpoints = {
        method_label(m): checkpoint_id(m["checkpoint"]) for m in every_method if isinstance(m, dict)
    }
    methods = [m for m in every_method if method_label(m) not in args.reuse]
    cfg = side_by_side_config(args, methods, VARIABLES)
    truth, _ = open_evaluation_truth(cfg)
    held = heldout_months(truth, cfg.evaluate)[VARIABLES].astype("float32").load()
    previous = json.loads(args.out.read_text()) if args.out.exists() else {}
    sample = {
        "months": [f"{t.year:04d}-{t.month:02d}" for t in held["time"].values],
        "members": args.members,
        "sampler": cfg.sampler.model_dump(mode="json"),
    }
    if args.reuse and (problems := reusable(previous, args.reuse, sample, checkpoints)):
        parser.error(f"cannot reuse {', '.join(args.reuse)} from {args.out}: " + "; ".join(problems))
    fields: dict[str, xr.Dataset] = {}
    factories = {
        m.key: _capturing(method_factory(m, cfg.sampler), fields, m.key) for m in cfg.evaluate.methods
    }
    start = time.perf_counter()
    result = run_evaluation(cfg, methods=factories, log=lambda msg: print(msg, flush=True))
    wall = time.perf_counter() - start
    assert result.months == sample["months"], (result.months, sample["months"])

    per_variable = score_table(result.records, SCORES)
    for label in args.reuse:  # the recorded figures (the ratio to bilinear is recomputed below)
        per_variable[label] = {
            v: {k: s.get(k, np.nan) for k in SCORES} for v, s in previous["per_variable"][label].items()
        }
    bilinear = per_variable["bilinear"]
    for scores in per_variable.values():
        for v, s in scores.items():
            s["mae_ratio_vs_bilinear"] = s["mae"] / bilinear[v]["mae"]

    def overall(method: str, key: str, variables: Sequence[str] | None = None) -> float:
        got = per_variable[method]
        names = [v for v in (variables or got) if v in got]
        return float(np.mean([got[v][key] for v in names]))

    three = ["tas", "uas", "vas"]
    stochastic = [m for m, d in result.methods.items() if d.get("stochastic")]
    stochastic += [m for m in args.reuse if m in previous.get("spread_skill_ratio", {})]
    wet = {"truth": float((held["pr"] > WET).mean())}
    pr_min = {}
    for name, ds in fields.items():
        if "pr" in ds:
            wet[name] = float((ds["pr"] > WET).mean())
            pr_min[name] = float(ds["pr"].min())
    FIGURES.mkdir(parents=True, exist_ok=True)
    rank_figures = []
    rank_counts: dict[str, dict[str, list[int]]] = {}
    for name in args.reuse:
        for key, store in (("pr_wet_fraction", wet), ("pr_min_over_members_kg_m-2_s-1", pr_min)):
            if name in previous.get(key, {}):
                store[name] = previous[key][name]
        if name in previous.get("rank_histograms", {}):
            rank_counts[name] = previous["rank_histograms"][name]
            rank_figures += [f for f in previous.get("figures", []) if f"methods_x8_rank_{name}_" in f]
    for name in [m for m in stochastic if m not in args.reuse]:
        for v in fields[name].data_vars:
            counts = metrics.rank_histogram(fields[name][v], held[v], seed=0)
            rank_counts.setdefault(name, {})[str(v)] = [int(c) for c in counts.values]
            path = plots.plot_rank_histogram(
                counts,
                FIGURES / f"methods_x8_rank_{name}_{v}.png",
                title=f"{name} {v}: rank of truth among {args.members} members (x8, {len(result.months)} months)",
            )
            rank_figures.append(str(path.relative_to(REPO)))
    crps_over_reg = _crps_over_regression(per_variable, "corrdiff", "regression")
    corrdiff_ratio = {v: per_variable["corrdiff"][v]["mae_ratio_vs_bilinear"] for v in VARIABLES}
    goals = _goals(per_variable, "corrdiff", crps_over_reg)
    # the same goals for CorrDiff on the local-regression first guess (checkpoints/first_guess/)
    crps_over_reg_fg = (
        _crps_over_regression(per_variable, "corrdiff_fg", "regression_fg")
        if "corrdiff_fg" in per_variable
        else None
    )
    goals_first_guess = _goals(per_variable, "corrdiff_fg", crps_over_reg_fg) if crps_over_reg_fg else None
    # not a goal of the issue, but the question a user asks first: does the model beat the strongest simple
    # baseline (a ridge regression per fine cell on the surrounding coarse anomalies)?
    below_local_regression = {
        m: {
            v: per_variable[m][v]["mae"] < per_variable["local_regression"][v]["mae"] for v in per_variable[m]
        }
        for m in ("regression", "dpdm", "dpdm_fg", "corrdiff", "regression_fg", "corrdiff_fg")
        if m in per_variable
    }
    reports = {m: d.get("report", "") for m, d in result.methods.items()}
    timings = list(result.timings)
    for label in args.reuse:
        reports[label] = previous.get("methods", {}).get(label, "")
        timings += [
            {**t, "reused_from_recorded_run": True}
            for t in previous.get("timings", [])
            if t.get("step") == f"{label} x8"
        ]
    doc = {
        "benchmark": "issue 14: methods side by side, x8 perfect model, synthetic reanalysis (NOT observations)",
        "command": command_line(),
        "months": result.months,
        "n_months": len(result.months),
        "members": args.members,
        "heldout_years": list(cfg.evaluate.heldout_years),
        "train_years": list(cfg.evaluate.train_years),
        "factor": 8,
        "sampler": cfg.sampler.model_dump(mode="json"),
        "affordable_settings": (
            f"every {args.month_stride}th held-out month ({len(result.months)} months over 2011-2020), "
            f"{args.members} members, {args.steps} Heun steps, {args.threads} torch thread(s): chosen to fit a "
            "shared 2-core CPU; the full protocol is evaluate.month_stride=1 and more members on a GPU"
        ),
        "mae_ratio_vs_bilinear": {m: overall(m, "mae_ratio_vs_bilinear") for m in per_variable},
        "mae_ratio_vs_bilinear_tas_uas_vas": {
            m: overall(m, "mae_ratio_vs_bilinear", three) for m in per_variable
        },
        "mae_ratio_vs_bilinear_per_variable": {
            m: {v: s["mae_ratio_vs_bilinear"] for v, s in sc.items()} for m, sc in per_variable.items()
        },
        "spread_skill_ratio": {
            m: {v: s["spread_skill_ratio"] for v, s in per_variable[m].items()} for m in stochastic
        },
        "crps_over_regression_mae": float(np.mean(list(crps_over_reg.values()))),
        "crps_over_regression_mae_per_variable": crps_over_reg,
        "corrdiff_mae_ratio_vs_bilinear_per_variable": corrdiff_ratio,
        "per_variable": per_variable,
        "pr_wet_fraction": {"threshold_kg_m-2_s-1": WET, "threshold": "1 mm/day", **wet},
        "pr_min_over_members_kg_m-2_s-1": pr_min,
        "rank_histograms": rank_counts,
        "figures": rank_figures,
        "goals": goals,
        "goals_corrdiff_first_guess": goals_first_guess,
        "crps_over_regression_mae_first_guess": (
            float(np.mean(list(crps_over_reg_fg.values()))) if crps_over_reg_fg else None
        ),
        "crps_fair_over_regression_mae": {
            label: float(np.mean(list(_crps_over_regression(per_variable, label, reg, "crps_fair").values())))
            for label, reg in (("corrdiff", "regression"), ("corrdiff_fg", "regression_fg"))
            if label in per_variable
        },
        "mae_below_local_regression": below_local_regression,
        "training_cost": {
            "dpdm": TRAINING["dpdm"],
            "corrdiff": _training_cost(args.corrdiff),
            "dpdm_fg": TRAINING["dpdm_fg"],
            "corrdiff_fg": TRAINING["corrdiff_fg"],
        },
        "notes": [
            "overall = mean over variables of the per-variable figure; DPDM's shipped checkpoint has no pr, so "
            "its overall figures are over tas, uas, vas (compare with *_tas_uas_vas)",
            "regression = the CorrDiff checkpoint's regression network alone (corrdiff regression_only: true)",
            "metrics: climrecon.tasks.metrics via run_evaluation (latitude-weighted); crps is the empirical-CDF "
            "CRPS, crps_fair the fair (ensemble-size-unbiased) CRPS; spread_skill_ratio sqrt((M+1)/M) spread / RMSE of the ensemble mean",
            *result.notes,
        ],
        "methods": reports,
        "checkpoints": checkpoints,
        "reused": {
            label: "figures of the recorded run (same months, members, sampler and checkpoint content)"
            for label in args.reuse
        },
        "timings": timings,
        "wall_s": round(wall, 1),
        "peak_rss_mib": round(peak_rss_mib(), 1),
        "machine": machine(),
        "versions": versions("numpy", "xarray", "torch", "scipy"),
    }
    for key in previous:
        if key.startswith("ablation"):
            doc[key] = previous[key]
    write_results(args.out, doc)
    print(
        json.dumps(
            {
                k: doc[k]
                for k in ("mae_ratio_vs_bilinear", "spread_skill_ratio", "crps_over_regression_mae", "goals")
            },
            indent=1,
        )
    )
    print(f"wrote {args.out} in {wall:.0f} s")


def ablation(argv: Sequence[str]) -> None:
    """Regression-only skill of CorrDiff checkpoints on validation months (pick the regression target)."""
    from climrecon.config import SamplerConfig
    from climrecon.tasks.evaluate import heldout_inputs

    parser = argparse.ArgumentParser(prog="methods_x8.py ablation")
    parser.add_argument("--label", action="append", required=True, metavar="NAME=CHECKPOINT")
    parser.add_argument("--months", type=int, default=24)
    parser.add_argument("--years", default="2006,2010")
    parser.add_argument("--note", default="")
    parser.add_argument(
        "--members", type=int, default=0, help="also score the full method with this ensemble"
    )
    parser.add_argument("--steps", type=int, default=12, help="Heun steps (with --members)")
    parser.add_argument("--key", default="ablation", help="JSON key of the table")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    years = tuple(int(y) for y in args.years.split(","))
    cfg = load_config(None, [])
    from climrecon.tasks.training_data import default_static_url, default_truth_url

    table: dict[str, Any] = {}
    for item in args.label:
        name, path = item.split("=", 1)
        method = build(
            {"name": "corrdiff", "checkpoint": path, "regression_only": True}, SamplerConfig(device="cpu")
        )
        truth, inputs = heldout_inputs(
            method, default_truth_url(cfg), default_static_url(cfg), years, args.months
        )
        out = method.downscale(inputs, members=1).isel(member=0)
        row = {}
        for v in method.describe()["variables"]:
            mae = float(metrics.mae(out[v], truth[v]))
            base = float(metrics.mae(inputs.coarse_on_fine[v].assign_coords(time=truth.time), truth[v]))
            row[v] = round(mae / base, 4)
        row["overall"] = round(float(np.mean([row[v] for v in method.describe()["variables"]])), 4)
        if args.members:
            full = build(
                {"name": "corrdiff", "checkpoint": path},
                SamplerConfig(device="cpu", num_steps=args.steps),
            )
            ens = full.downscale(inputs, members=args.members, seed=20261121)
            for v in full.describe()["variables"]:
                base = float(metrics.mae(inputs.coarse_on_fine[v].assign_coords(time=truth.time), truth[v]))
                mean_mae = float(metrics.mae(ens[v].mean("member"), truth[v]))
                row[f"{v}_ensemble_mean"] = round(mean_mae / base, 4)
                row[f"{v}_spread_skill"] = round(float(metrics.spread_skill_ratio(ens[v], truth[v])), 4)
                row[f"{v}_crps_over_regression_mae"] = round(
                    float(metrics.crps(ens[v], truth[v])) / (row[v] * base), 4
                )
            names = full.describe()["variables"]
            row["ensemble_mean_overall"] = round(
                float(np.mean([row[f"{v}_ensemble_mean"] for v in names])), 4
            )
            row["P_mean"] = full.metadata.method_config["edm"]["P_mean"]
            row["residual_steps"] = full.metadata.step
        meta = method.metadata
        in_stage_1 = "denoiser" not in meta.roles  # a training checkpoint still in its regression stage
        row["steps"] = meta.step if in_stage_1 else meta.data.get("regression_stage", {}).get("steps")
        row["regression_target"] = meta.data["regression_target"]
        table[name] = row
        print(name, row, flush=True)
    doc = json.loads(args.out.read_text()) if args.out.exists() else {}
    doc[args.key] = {
        "what": "MAE / bilinear MAE on validation months: the regression alone (<var>), and with --members the "
        "ensemble mean (<var>_ensemble_mean), spread-skill ratio and CRPS / regression-only MAE",
        "members": args.members,
        "years": list(years),
        "months": args.months,
        "command": command_line(),
        "note": args.note,
        "table": table,
    }
    write_results(args.out, doc)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "ablation":
        ablation(sys.argv[2:])
    else:
        main()
