"""Issue 16: spatiotemporally coherent downscaling against month-by-month methods, on held-out years.

Perfect-model inputs (the synthetic reanalysis coarsened by 8 x 8 area means, consecutive held-out months),
every method through its ``downscale`` (the code the stages run), the same members, seed and sampler:

- ``spatiotemporal`` (the shipped window prior, sequences sampled whole), ``zssd`` (its month-by-month
  sibling: a prior of single months, the same guidance), ``dpdm`` and ``corrdiff`` (supervised, month by
  month), and ``bilinear`` (reference for the MAE ratio).
- Temporal coherence, on the FINE-SCALE part of each field (field minus the bilinear view of its own 8 x 8
  coarse means: the detail a method generates; the large scales are pinned by the input for every method),
  de-seasonalised per cell by its own calendar-month means over the period:
  ``lag1_autocorr``: the lag-1 autocorrelation per cell, averaged over cells (and members);
  ``lag1_autocorr_error``: |method - truth| of that average, mean over tas/uas/vas (per-cell maps from 60
  months carry ~0.13 sampling noise, which the domain average removes; the per-cell mean absolute error is
  reported too); ``month_to_month_w1``: Wasserstein-1 distance between the method's and the truth's
  month-to-month changes of the fine-scale part (all cells, months and members pooled), per variable, and
  over variables as the mean of W1 / std of the truth's changes.
- Per month: ensemble-mean MAE (and / bilinear), CRPS, spread-skill ratio (tasks.metrics, latitude-weighted),
  the rank (PIT) histogram of the spatiotemporal members as PNG and its deviation from uniform (mean
  |frequency x (M + 1) - 1| over ranks).
- Observation consistency: the same years' ANNUAL coarse means as input; the monthly members' annual means,
  coarsened the same way, against the input (mean and max |difference| per variable).

Subcommand ``showcase``: the UM A1B annual tas 1860-2099 (the sample catalog's) through the reconstruct flow's
stages (ingest, regrid to 0.25 deg over the western US, downscale with the spatiotemporal method: monthly
members), wall time, months x members per hour, and the peak RSS of 10 vs 240 years (fresh processes); a
map and a point series as PNG. Writes into ``benchmarks/results/spatiotemporal.json`` (the ``showcase`` key).

    python benchmarks/spatiotemporal.py --members 4 --steps 12
    python benchmarks/spatiotemporal.py showcase --members 2 --steps 6
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

from common import command_line, machine, peak_rss_mib, run_isolated, versions, write_results  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
OUT = RESULTS / "spatiotemporal.json"
CHECKPOINTS = REPO / "checkpoints"
PRIOR = CHECKPOINTS / "spatiotemporal-prior-westus.pt"
VARIABLES = ["tas", "uas", "vas"]
FACTOR = 8


def _methods(prior: Path, extra: dict[str, Any]) -> dict[str, Any]:
    return {
        "spatiotemporal": {
            "name": "spatiotemporal",
            "checkpoint": str(prior),
            "bias_correction": False,
            **extra,
        },
        "zssd": {"name": "zssd", "checkpoint": str(CHECKPOINTS / "zssd-prior-westus.pt")},
        "dpdm": {"name": "dpdm", "checkpoint": str(CHECKPOINTS / "dpdm-westus-x8.pt")},
        "corrdiff": {"name": "corrdiff", "checkpoint": str(CHECKPOINTS / "corrdiff-westus-x8.pt")},
        "bilinear": "bilinear",
    }


def fine_scale(ds: xr.Dataset, factor: int = FACTOR) -> xr.Dataset:
    """The fine-scale part: each field minus the bilinear view of its own ``factor`` x ``factor`` means."""
    from climrecon.methods.features import coarse_on_fine
    from climrecon.tasks.grids import Grid
    from climrecon.tasks.regrid import coarsen_blocks

    return ds - coarse_on_fine(coarsen_blocks(ds, factor), Grid.from_dataset(ds, "fields"))


def deseasonalised(x: np.ndarray, months: np.ndarray) -> np.ndarray:
    """[..., T, H, W] minus each cell's calendar-month mean over T (axis -3)."""
    out = np.array(x, dtype=np.float64)
    for m in np.unique(months):
        sel = months == m
        out[..., sel, :, :] -= out[..., sel, :, :].mean(axis=-3, keepdims=True)
    return out


def lag1_map(a: np.ndarray) -> np.ndarray:
    """Per-cell lag-1 autocorrelation of [..., T, H, W] anomalies along T (members averaged)."""
    r = (a[..., 1:, :, :] * a[..., :-1, :, :]).sum(-3) / (a**2).sum(-3)
    return r.reshape(-1, *r.shape[-2:]).mean(0)


def temporal_scores(out: xr.Dataset, truth: xr.Dataset) -> dict[str, dict[str, float]]:
    """lag-1 autocorrelation (domain mean, error vs truth, per-cell MAE) and W1 of month-to-month changes of
    the fine-scale part, per variable."""
    from scipy.stats import wasserstein_distance

    months = np.array([t.month for t in truth["time"].values])
    f_out, f_truth = fine_scale(out[VARIABLES]), fine_scale(truth[VARIABLES])
    scores: dict[str, dict[str, float]] = {}
    for v in VARIABLES:
        a = deseasonalised(f_out[v].transpose("member", "time", "lat", "lon").values, months)
        b = deseasonalised(f_truth[v].transpose("time", "lat", "lon").values, months)
        ra, rb = lag1_map(a), lag1_map(b)
        da = np.diff(f_out[v].transpose("member", "time", "lat", "lon").values, axis=1).ravel()
        db = np.diff(f_truth[v].transpose("time", "lat", "lon").values, axis=0).ravel()
        w1 = wasserstein_distance(da, db)
        scores[v] = {
            "lag1_autocorr": float(ra.mean()),
            "lag1_autocorr_truth": float(rb.mean()),
            "lag1_autocorr_error": float(abs(ra.mean() - rb.mean())),
            "lag1_autocorr_cell_mae": float(np.abs(ra - rb).mean()),
            "month_to_month_w1": float(w1),
            "month_to_month_w1_over_std": float(w1 / db.std()),
            "month_to_month_std_ratio": float(da.std() / db.std()),
        }
    return scores


def skill_scores(out: xr.Dataset, truth: xr.Dataset) -> dict[str, dict[str, float]]:
    from climrecon.tasks import metrics

    scores: dict[str, dict[str, float]] = {}
    for v in VARIABLES:
        f, t = out[v], truth[v]
        row = {"mae": float(metrics.mae(f.mean("member"), t))}
        if f.sizes["member"] > 1:
            row["crps"] = float(metrics.crps(f, t))
            row["spread_skill_ratio"] = float(metrics.spread_skill_ratio(f, t))
        scores[v] = row
    return scores


def rank_deviation(out: xr.Dataset, truth: xr.Dataset) -> tuple[dict[str, float], dict[str, xr.DataArray]]:
    from climrecon.tasks import metrics

    dev, hist = {}, {}
    for v in VARIABLES:
        h = metrics.rank_histogram(out[v], truth[v])
        freq = h.values / h.values.sum()
        dev[v] = float(np.abs(freq * len(freq) - 1).mean())
        hist[v] = h
    total = sum(hist.values())  # all variables pooled: the figure
    return dev, {**hist, "all": total}


def observation_consistency(method: Any, truth: xr.Dataset, static: xr.Dataset, members: int, seed: int):
    """Annual coarse means as input; |annual means of the monthly members, coarsened - input|."""
    from climrecon.tasks.evaluate import perfect_model_inputs
    from climrecon.tasks.grids import Grid
    from climrecon.tasks.regrid import coarsen_blocks

    coarse = coarsen_blocks(truth[VARIABLES], FACTOR)
    t0 = truth["time"].values[0]
    annual = coarse.groupby("time.year").mean("time")
    annual = annual.rename(year="time").assign_coords(
        time=[type(t0)(int(y), 7, 1) for y in annual["year"].values]
    )
    inputs = perfect_model_inputs(annual, Grid.from_dataset(truth), static, [], time_step="year")
    start = time.perf_counter()
    out = method.downscale(inputs, members=members, seed=seed)
    seconds = time.perf_counter() - start
    means = coarsen_blocks(out[VARIABLES], FACTOR)
    years = np.array([t.year for t in out["time"].values])
    result = {}
    for v in VARIABLES:
        got = means[v].values.reshape(members, -1, 12, *means[v].shape[-2:]).mean(2)
        diff = np.abs(got - annual[v].values[None])
        result[v] = {"mean_abs": float(diff.mean()), "max_abs": float(diff.max())}
    result["months"] = int(len(years))
    result["seconds"] = round(seconds, 1)
    return result, out


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--years", default="2011,2015", help="first,last held-out year (consecutive months)")
    parser.add_argument("--members", type=int, default=4)
    parser.add_argument("--steps", type=int, default=12, help="Heun steps (every diffusion method)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=20261201)
    parser.add_argument("--prior", type=Path, default=PRIOR)
    parser.add_argument("--methods", default="spatiotemporal,zssd,dpdm,corrdiff,bilinear")
    parser.add_argument(
        "--set",
        dest="extra",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="spatiotemporal method options, e.g. likelihood_std=0.1",
    )
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)

    import torch

    from climrecon.config import SamplerConfig, load_config
    from climrecon.methods import build
    from climrecon.tasks.evaluate import perfect_model_inputs
    from climrecon.tasks.grids import Grid
    from climrecon.tasks.plots import plot_rank_histogram
    from climrecon.tasks.regrid import coarsen_blocks
    from climrecon.tasks.training_data import (
        default_static_url,
        default_truth_url,
        open_truth,
        select_years,
        static_for_truth,
    )

    torch.set_num_threads(args.threads)
    extra = {k: json.loads(v) for k, v in (s.split("=", 1) for s in args.extra)}
    cfg = load_config()
    first, last = (int(y) for y in args.years.split(","))
    truth = select_years(open_truth(default_truth_url(cfg), [*VARIABLES, "pr"]), (first, last))
    truth = truth.astype("float32").load()
    static = static_for_truth(default_static_url(cfg), truth)
    grid = Grid.from_dataset(truth, "truth")
    inputs = perfect_model_inputs(coarsen_blocks(truth, FACTOR), grid, static, ["orog", "sftlf"])
    sampler = SamplerConfig(num_steps=args.steps, device="cpu")
    wanted = args.methods.split(",")
    outputs, seconds, reports = {}, {}, {}
    for name, spec in _methods(args.prior, extra).items():
        if name not in wanted:
            continue
        method = build(spec, sampler)
        members = args.members if method.needs.stochastic else 1
        print(f"{name}: {inputs.time.size} months x {members} members", flush=True)
        start = time.perf_counter()
        outputs[name] = method.downscale(inputs, members=members, seed=args.seed).load()
        seconds[name] = time.perf_counter() - start
        reports[name] = method.describe().get("report", name)
        print(f"  {seconds[name]:.0f} s", flush=True)

    temporal = {m: temporal_scores(o, truth) for m, o in outputs.items() if o.sizes["member"] > 1}
    skill = {m: skill_scores(o, truth) for m, o in outputs.items()}
    ref = skill.get("bilinear")

    def overall(table: dict, key: str) -> dict[str, float]:
        return {
            m: float(np.mean([rows[v][key] for v in VARIABLES]))
            for m, rows in table.items()
            if key in rows[VARIABLES[0]]
        }

    mae = overall(skill, "mae")
    ratio = (
        {m: float(np.mean([skill[m][v]["mae"] / ref[v]["mae"] for v in VARIABLES])) for m in skill}
        if ref
        else {}
    )
    lag1_error = overall(temporal, "lag1_autocorr_error")
    pictures = {}
    deviation = {}
    for name in [m for m in ("spatiotemporal", "dpdm") if m in outputs]:
        dev, hist = rank_deviation(outputs[name], truth)
        deviation[name] = dev
        path = RESULTS / f"spatiotemporal_rank_{name}.png"
        plot_rank_histogram(hist["all"], path, title=f"{name}: rank histogram, x{FACTOR}, {first}-{last}")
        pictures[name] = str(path.relative_to(REPO))
    consistency = None
    if "spatiotemporal" in outputs:
        method = build(_methods(args.prior, extra)["spatiotemporal"], sampler)
        consistency, _ = observation_consistency(method, truth, static, args.members, args.seed)
    month_by_month = [m for m in ("zssd", "dpdm", "corrdiff") if m in temporal]
    best_mae = min((mae[m] for m in month_by_month), default=float("nan"))
    goals = {}
    if "spatiotemporal" in temporal:
        goals = {
            "lag1_autocorr_error_le_0.05": lag1_error["spatiotemporal"] <= 0.05,
            "lag1_autocorr_error_below_every_month_by_month_method": all(
                lag1_error["spatiotemporal"] < lag1_error[m] for m in month_by_month
            ),
            "mae_within_10pct_of_best_month_by_month": mae["spatiotemporal"] <= 1.1 * best_mae,
        }
    doc = {
        "benchmark": "issue 16: spatiotemporal coherence on held-out years, x8 perfect-model input, synthetic "
        "reanalysis (NOT observations)",
        "command": command_line(),
        "years": [first, last],
        "months": int(truth.sizes["time"]),
        "members": args.members,
        "sampler": sampler.model_dump(mode="json"),
        "spatiotemporal_options": extra,
        "lag1_autocorr_error": lag1_error,
        "lag1_autocorr": overall(temporal, "lag1_autocorr"),
        "lag1_autocorr_truth": overall(temporal, "lag1_autocorr_truth"),
        "lag1_autocorr_cell_mae": overall(temporal, "lag1_autocorr_cell_mae"),
        "month_to_month_w1_over_std": overall(temporal, "month_to_month_w1_over_std"),
        "mae": mae,
        "mae_ratio_vs_bilinear": ratio,
        "crps": overall(skill, "crps"),
        "spread_skill_ratio": {
            m: {v: rows[v]["spread_skill_ratio"] for v in VARIABLES}
            for m, rows in skill.items()
            if "spread_skill_ratio" in rows[VARIABLES[0]]
        },
        "per_variable": {"temporal": temporal, "skill": skill},
        "rank_histogram_deviation": deviation,
        "rank_histograms_png": pictures,
        "observation_consistency_annual": consistency,
        "goals": goals,
        "seconds_per_month_member": {
            m: round(seconds[m] / (truth.sizes["time"] * outputs[m].sizes["member"]), 3) for m in outputs
        },
        "methods": reports,
        "notes": [
            "fine-scale part = field - bilinear(8x8 means of the field); anomalies per cell and calendar month",
            "lag1_autocorr_error: |domain-mean lag-1 autocorrelation of the method - the truth's|, mean over "
            "tas/uas/vas; lag1_autocorr_cell_mae: the per-cell version (sampling noise ~0.13 at 60 months)",
            "overall = mean over tas, uas, vas; spatiotemporal without bias correction (a perfect-model input)",
        ],
        "peak_rss_mib": round(peak_rss_mib(), 1),
        "machine": machine(),
        "versions": versions("numpy", "xarray", "torch", "scipy"),
    }
    old = json.loads(args.out.read_text()) if args.out.exists() else {}
    doc.update({k: old[k] for k in ("showcase", "sweep") if k in old})
    write_results(args.out, doc)
    print(
        json.dumps(
            {
                k: doc[k]
                for k in (
                    "lag1_autocorr_error",
                    "mae",
                    "mae_ratio_vs_bilinear",
                    "goals",
                    "observation_consistency_annual",
                    "seconds_per_month_member",
                )
            },
            indent=1,
        )
    )


# -- the default's sweep: likelihood std and guidance strength on validation years ----------------------------
def sweep(argv: Sequence[str]) -> None:
    """MAE / bilinear, CRPS, spread-skill and lag-1 error of the spatiotemporal method for each
    (likelihood_std, zeta) on VALIDATION years (never the held-out ones); into the ``sweep`` key."""
    import torch

    from climrecon.config import SamplerConfig, load_config
    from climrecon.methods import build
    from climrecon.tasks.evaluate import perfect_model_inputs
    from climrecon.tasks.grids import Grid
    from climrecon.tasks.regrid import coarsen_blocks
    from climrecon.tasks.training_data import (
        default_static_url,
        default_truth_url,
        open_truth,
        select_years,
        static_for_truth,
    )

    parser = argparse.ArgumentParser(description="sweep of the spatiotemporal defaults (validation years)")
    parser.add_argument("--years", default="2006,2007")
    parser.add_argument("--members", type=int, default=2)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--likelihood-std", default="0,0.05,0.2")
    parser.add_argument("--zeta", default="1.0,1.5")
    parser.add_argument("--prior", type=Path, default=PRIOR)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    cfg = load_config()
    first, last = (int(y) for y in args.years.split(","))
    truth = (
        select_years(open_truth(default_truth_url(cfg), VARIABLES), (first, last)).astype("float32").load()
    )
    static = static_for_truth(default_static_url(cfg), truth)
    inputs = perfect_model_inputs(coarsen_blocks(truth, FACTOR), Grid.from_dataset(truth), static, [])
    bilinear = skill_scores(build("bilinear").downscale(inputs), truth)
    sampler = SamplerConfig(num_steps=args.steps, device="cpu")
    rows = []
    for std in (float(x) for x in args.likelihood_std.split(",")):
        for zeta in (float(x) for x in args.zeta.split(",")):
            spec = {"name": "spatiotemporal", "checkpoint": str(args.prior), "bias_correction": False}
            method = build({**spec, "likelihood_std": std, "zeta": zeta}, sampler)
            out = method.downscale(inputs, members=args.members, seed=1)
            skill, temporal = skill_scores(out, truth), temporal_scores(out, truth)
            row = {
                "likelihood_std": std,
                "zeta": zeta,
                "mae_ratio_vs_bilinear": float(
                    np.mean([skill[v]["mae"] / bilinear[v]["mae"] for v in VARIABLES])
                ),
                "crps": float(np.mean([skill[v]["crps"] for v in VARIABLES])),
                "spread_skill_ratio": {v: round(skill[v]["spread_skill_ratio"], 3) for v in VARIABLES},
                "lag1_autocorr_error": float(
                    np.mean([temporal[v]["lag1_autocorr_error"] for v in VARIABLES])
                ),
            }
            print(json.dumps(row), flush=True)
            rows.append(row)
    doc = json.loads(args.out.read_text()) if args.out.exists() else {}
    doc["sweep"] = {
        "command": command_line(),
        "years": [first, last],
        "members": args.members,
        "steps": args.steps,
        "rows": rows,
        "best_by_crps": min(rows, key=lambda r: r["crps"]),
    }
    write_results(args.out, doc)


# -- the A1B showcase: the reconstruct flow on 240 years of annual input --------------------------------------
SHOWCASE_CONFIG = REPO / "configs" / "showcase-a1b-spatiotemporal.yaml"


def _worker_peak_rss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _stores(root: Path, stage: str) -> list[Path]:
    return sorted(
        p for p in (root / stage).rglob("*.zarr") if (p / "zarr.json").exists() or (p / ".zgroup").exists()
    )


def _reconstruct(root: Path, args: argparse.Namespace, years: tuple[int, int] | None) -> dict[str, Any]:
    """One reconstruct run in a fresh CLI process on a fresh Dask cluster of ``args.workers`` 1-thread
    workers: wall time, peak RSS of the CLI process and of the largest worker (they sample), the member
    store's shape."""
    from climrecon.flows.runtime import dask_client

    sets = [
        f"storage.root={root}",
        f"downscale.members={args.members}",
        f"sampler.num_steps={args.steps}",
        *([f'ingest.query.time=["{years[0]}", "{years[1]}"]'] if years else []),
        *args.overrides,
    ]
    with dask_client(n_workers=args.workers, threads_per_worker=1) as client:
        argv = [
            sys.executable,
            str(Path(__file__).resolve()),
            "showcase-child",
            "reconstruct",
            "-c",
            str(SHOWCASE_CONFIG),
            "--scheduler",
            client.scheduler.address,
            "--no-evaluate",
            *[a for s in sets for a in ("--set", s)],
        ]
        run = run_isolated(argv, timeout_s=args.timeout, env={"OMP_NUM_THREADS": "1"})
        worker_peak = max(client.run(_worker_peak_rss_mib).values())
    members = _stores(root, "downscale")[-1]
    ds = xr.open_zarr(members, decode_times=xr.coders.CFDatetimeCoder(use_cftime=True))  # plain xarray
    months = int(ds.sizes["time"])
    return {
        "wall_s": run["wall_s"],
        "cli_peak_rss_mib": run["peak_rss_mib"],
        "worker_peak_rss_mib": round(worker_peak, 1),
        "months": months,
        "members": int(ds.sizes["member"]),
        "first_last": [str(ds["time"].values[0])[:7], str(ds["time"].values[-1])[:7]],
        "variables": sorted(str(v) for v in ds.data_vars if v != "time_bnds"),
        "months_x_members_per_hour": round(months * ds.sizes["member"] / run["wall_s"] * 3600, 1),
        "store": str(members.relative_to(REPO) if members.is_relative_to(REPO) else members),
        "aggregate": str(_stores(root, "aggregate")[-1]),
    }


def showcase(argv: Sequence[str]) -> None:
    from climrecon.tasks.plots import ensemble_maps, point_series

    parser = argparse.ArgumentParser(description="the A1B showcase (module docstring)")
    parser.add_argument("--members", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--workers", type=int, default=2, help="Dask worker processes (1 thread each)")
    parser.add_argument("--root", type=Path, default=REPO / "outputs" / "showcase-a1b")
    parser.add_argument(
        "--short-years", default="1996,2005", help="the 10-year run (inside the bias correction's fit years)"
    )
    parser.add_argument("--timeout", type=float, default=5 * 3600)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    a, b = (int(y) for y in args.short_years.split(","))
    short = _reconstruct(args.root / "10y", args, (a, b))
    print(json.dumps(short, indent=1), flush=True)
    full = _reconstruct(args.root / "240y", args, None)
    print(json.dumps(full, indent=1), flush=True)
    pictures = {}
    for name, fn in (("map", ensemble_maps), ("point_series", point_series)):
        png = fn(full["aggregate"], RESULTS)
        target = RESULTS / f"spatiotemporal_showcase_{name}.png"
        png.replace(target)
        pictures[name] = str(target.relative_to(REPO))
    doc = json.loads(args.out.read_text()) if args.out.exists() else {}
    doc["showcase"] = {
        "command": command_line(),
        "config": str(SHOWCASE_CONFIG.relative_to(REPO)),
        "months": full["months"],
        "members": full["members"],
        "wall_s": full["wall_s"],
        "months_x_members_per_hour": full["months_x_members_per_hour"],
        "peak_rss_ratio_240y_vs_10y": round(full["worker_peak_rss_mib"] / short["worker_peak_rss_mib"], 3),
        "runs": {"10y": short, "240y": full},
        "pictures": pictures,
        "notes": [
            "fresh CLI process and a fresh Dask cluster (--workers processes, 1 thread each) per run; the "
            "workers sample; peak RSS of the CLI process (wait4) and of the largest worker (getrusage there)",
            "wall time covers ingest, regrid, downscale and aggregate (the reconstruct flow)",
        ],
        "machine": machine(),
        "versions": versions("numpy", "xarray", "torch", "dask"),
    }
    write_results(args.out, doc)
    print(json.dumps({k: v for k, v in doc["showcase"].items() if k != "runs"}, indent=1))


def showcase_child(argv: Sequence[str]) -> None:
    """``climrecon <argv>`` in this process (the CLI the README shows), then the result file run_isolated
    waits for."""
    import os

    from climrecon.cli import app

    code = app(list(argv), standalone_mode=False)
    if code:
        sys.exit(code)
    Path(os.environ["BENCH_RESULT"]).write_text(json.dumps({"argv": list(argv)}))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "showcase":
        showcase(sys.argv[2:])
    elif len(sys.argv) > 1 and sys.argv[1] == "sweep":
        sweep(sys.argv[2:])
    elif len(sys.argv) > 1 and sys.argv[1] == "showcase-child":
        showcase_child(sys.argv[2:])
    else:
        main()
