"""Skill of a trained method (default: the shipped DPDM checkpoint) on held-out years of the synthetic
reanalysis, x8 perfect model, through the code that ships.

For a subset of held-out months (``--months`` spread evenly over the held-out decade, 2011-2020 by default,
years the model never saw), the truth is coarsened by the method's factor and handed to the method as the
evaluation stage hands it (:func:`climrecon.tasks.evaluate.perfect_model_inputs`: the coarse fields, their
bilinear view on the fine grid, which is also the bilinear baseline, and the static fields with their coarse
views); a ``--members`` ensemble over the FULL 80 x 80 domain comes from ``method.downscale`` (the
registry's method, the one tiled sampler, ``blend="every_step"``, Heun, ``--steps`` steps; member m of month
t from ``seed_for(seed, year * 12 + month - 1, m)``, as in the downscale stage).
Metrics (:mod:`climrecon.tasks.metrics`, latitude-weighted, physical units, per variable and the mean of
the per-variable ratios): MAE of the ensemble mean vs MAE of bilinear, CRPS, spread-skill ratio.

Usage::

    python benchmarks/skill_core.py [--method dpdm] [--checkpoint checkpoints/dpdm-westus-x8.pt] [--months 24]
        [--members 16] [--steps 12] [--out benchmarks/results/skill_core.json]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import xarray as xr

from climrecon.config import SamplerConfig, load_config
from climrecon.methods import build
from climrecon.tasks import metrics
from climrecon.tasks.evaluate import heldout_inputs, spread_months
from climrecon.tasks.training_data import (
    default_static_url,
    default_truth_url,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import command_line, machine, peak_rss_mib, versions, write_results  # noqa: E402

__all__ = ["spread_months", "heldout_inputs", "skill"]

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CHECKPOINT = REPO / "checkpoints" / "dpdm-westus-x8.pt"


def skill(ensemble: xr.Dataset, truth: xr.Dataset, bilinear: xr.Dataset) -> dict[str, Any]:
    """Per-variable and overall metrics; 'overall' figures are means over variables of per-variable ones."""
    mean = metrics.ensemble_mean(ensemble)
    per: dict[str, dict[str, float]] = {}
    for v in ensemble.data_vars:
        per[str(v)] = {
            "ensemble_mean_mae": float(metrics.mae(mean[v], truth[v])),
            "bilinear_mae": float(metrics.mae(bilinear[v], truth[v])),
            "crps": float(metrics.crps(ensemble[v], truth[v])),
            "spread_skill_ratio": float(metrics.spread_skill_ratio(ensemble[v], truth[v])),
            "units": truth[v].attrs.get("units", ""),
        }
        per[str(v)]["mae_ratio_vs_bilinear"] = per[str(v)]["ensemble_mean_mae"] / per[str(v)]["bilinear_mae"]
        per[str(v)]["crps_over_ensemble_mean_mae"] = per[str(v)]["crps"] / per[str(v)]["ensemble_mean_mae"]
    avg = lambda key: float(np.mean([p[key] for p in per.values()]))  # noqa: E731
    return {
        "per_variable": per,
        "mae_ratio_vs_bilinear_x8": avg("mae_ratio_vs_bilinear"),
        "crps_over_ensemble_mean_mae": avg("crps_over_ensemble_mean_mae"),
        "spread_skill_ratio": avg("spread_skill_ratio"),
        "ensemble_mean_mae": {v: p["ensemble_mean_mae"] for v, p in per.items()},
        "bilinear_mae": {v: p["bilinear_mae"] for v, p in per.items()},
        "crps": {v: p["crps"] for v, p in per.items()},
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--method", default="dpdm", help="a registered method with a trained checkpoint")
    parser.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT))
    parser.add_argument(
        "--config", default=None, help="climrecon config (truth/static stores); default: built-in"
    )
    parser.add_argument("--years", type=int, nargs=2, default=None, help="default: train.heldout_years")
    parser.add_argument("--months", type=int, default=24)
    parser.add_argument("--members", type=int, default=16)
    parser.add_argument(
        "--steps", type=int, default=12, help="Heun steps (2 network calls each, 1 for the last)"
    )
    parser.add_argument("--overlap", type=int, default=8, help="tile overlap in cells")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "skill_core.json"))
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    cfg = load_config(args.config)
    years = tuple(args.years or cfg.train.heldout_years)
    sampler = SamplerConfig(num_steps=args.steps, overlap=args.overlap, device="cpu")
    method = build({"name": args.method, "checkpoint": args.checkpoint}, sampler)
    description = method.describe()
    for a, b in description.get("years_seen", ()):
        if not (years[1] < a or years[0] > b):
            raise SystemExit(f"evaluation years {years} overlap the checkpoint's training years {a}-{b}")
    t0 = time.perf_counter()
    truth, inputs = heldout_inputs(
        method, default_truth_url(cfg), default_static_url(cfg), years, args.months
    )
    variables = list(description["variables"])
    bilinear = inputs.coarse_on_fine[variables]
    t1 = time.perf_counter()
    ens = method.downscale(inputs, members=args.members, seed=args.seed)[variables]
    t2 = time.perf_counter()
    ckpt = description.get("checkpoint", {})
    result = {
        **skill(ens, truth, bilinear),
        "members": args.members,
        "months": [str(t)[:7] for t in truth["time"].values],
        "n_months": int(truth.sizes["time"]),
        "years": list(years),
        "method": args.method,
        "sampler": {
            **sampler.model_dump(mode="json"),
            "taper": "hann",
            "patch_size": description.get("grid", {}).get("patch_size"),
            "seeds": description.get("seeds"),
        },
        "checkpoint": {
            "path": str(Path(args.checkpoint).resolve().relative_to(REPO))
            if Path(args.checkpoint).resolve().is_relative_to(REPO)
            else args.checkpoint,
            "sha256": ckpt.get("sha256"),
            "step": ckpt.get("step"),
            "method": ckpt.get("method"),
            "train_years": (ckpt.get("data") or {}).get("train_years"),
            "target": ckpt.get("target"),
        },
        "goals": {"mae_ratio_vs_bilinear_x8": "<= 0.35", "crps": "< ensemble_mean_mae (each variable)"},
        "seconds": {"inputs": round(t1 - t0, 2), "sampling": round(t2 - t1, 2)},
        "torch_threads": args.threads,
        "peak_rss_mib": peak_rss_mib(),
        "machine": machine(),
        "versions": versions("torch", "numpy", "xarray"),
        "command": command_line(),
    }
    if args.out:
        write_results(args.out, result)
    print(
        f"mae ratio vs bilinear {result['mae_ratio_vs_bilinear_x8']:.3f}; per variable "
        + ", ".join(
            f"{v}: {p['mae_ratio_vs_bilinear']:.3f} (crps/mae {p['crps_over_ensemble_mean_mae']:.2f}, "
            f"ssr {p['spread_skill_ratio']:.2f})"
            for v, p in result["per_variable"].items()
        )
        + f"; sampling {t2 - t1:.0f} s"
    )
    return result


if __name__ == "__main__":
    main()
