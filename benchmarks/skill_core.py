"""Skill of the shipped DPDM patch model on held-out years of the synthetic reanalysis, x8 perfect model.

For a subset of held-out months (``--months`` spread evenly over the held-out decade, 2011-2020 by default,
years the model never saw), the truth is coarsened by 8, put back on the fine grid (the bilinear baseline
and the model's conditioning), and a ``--members`` ensemble is sampled over the FULL 80 x 80 domain with
:func:`climrecon.tasks.patch_sampling.sample_domain` (``blend="every_step"``; Heun, ``--steps`` steps).
Metrics (:mod:`climrecon.tasks.metrics`, latitude-weighted, physical units, per variable and the mean of
the per-variable ratios): MAE of the ensemble mean vs MAE of bilinear, CRPS, spread-skill ratio.

Usage::

    python benchmarks/skill_core.py [--checkpoint checkpoints/dpdm-westus-x8.pt] [--months 24] [--members 16]
        [--steps 12] [--out benchmarks/results/skill_core.json]
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

from climrecon.config import load_config
from climrecon.flows.train import default_static_url, default_truth_url
from climrecon.models.checkpoint import CheckpointMetadata, load_checkpoint
from climrecon.models.samplers import seed_for
from climrecon.tasks import metrics
from climrecon.methods.features import ConditioningSpec, time_of_year
from climrecon.tasks.patch_sampling import sample_domain
from climrecon.models.tiling import make_tiling
from climrecon.tasks.downscale import network_conditioning, physical_fields
from climrecon.tasks.training_data import (
    open_truth,
    perfect_model_pairs,
    select_years,
    static_for_truth,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import command_line, machine, peak_rss_mib, versions, write_results  # noqa: E402

__all__ = ["spread_months", "heldout_inputs", "sample_ensemble", "skill"]

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CHECKPOINT = REPO / "checkpoints" / "dpdm-westus-x8.pt"


def spread_months(n_available: int, n: int) -> np.ndarray:
    """``n`` month indices spread evenly over ``n_available`` (all of them if ``n >= n_available``)."""
    if n >= n_available:
        return np.arange(n_available)
    return np.unique(np.round(np.linspace(0, n_available - 1, n)).astype(int))


def heldout_inputs(
    meta: CheckpointMetadata, truth_url: str, static_url: str, years: tuple[int, int], n_months: int
) -> tuple[xr.Dataset, xr.DataArray, ConditioningSpec]:
    """(truth, physical conditioning, spec) for ``n_months`` months spread over ``years``."""
    spec = ConditioningSpec.from_channel_names(meta.variables, int(meta.grid.coarsening_factor), meta.cond_channels)
    truth = select_years(open_truth(truth_url, spec.variables), years, f"truth store {truth_url}")
    truth = truth.isel(time=spread_months(truth.sizes["time"], n_months))
    target, cond = perfect_model_pairs(truth, static_for_truth(static_url, truth), spec)
    return target, cond, spec


def sample_ensemble(
    model: torch.nn.Module,
    meta: CheckpointMetadata,
    cond: xr.DataArray,
    *,
    members: int,
    num_steps: int,
    overlap: int,
    seed: int = 0,
    max_patches_per_batch: int = 64,
) -> xr.Dataset:
    """Ensemble (member, time, lat, lon) of fine fields in physical units (residual models: plus the coarse
    input); member ``m`` of month ``t`` uses ``seed_for(seed, t, m)``."""
    h, w = cond.sizes["lat"], cond.sizes["lon"]
    tiling = make_tiling(h, w, int(meta.grid.patch_size), overlap)
    channels = list(cond.channel.values)
    z_cond = torch.from_numpy(network_conditioning(cond.values, channels, meta))  # exactly as the stage does
    toy = torch.from_numpy(time_of_year(cond["time"].values))
    out = np.empty((members, cond.sizes["time"], len(meta.variables), h, w), np.float32)
    for t in range(cond.sizes["time"]):
        seeds = [seed_for(seed, t, m) for m in range(members)]
        z = sample_domain(
            model,
            z_cond[t : t + 1].expand(members, -1, -1, -1),
            toy[t : t + 1].expand(members),
            tiling,
            seeds=seeds,
            num_steps=num_steps,
            blend="every_step",
            max_patches_per_batch=max_patches_per_batch,
        )
        out[:, t] = physical_fields(z, np.repeat(cond.values[t : t + 1], members, axis=0), channels, meta)
    coords = {"time": cond["time"], "lat": cond["lat"], "lon": cond["lon"]}
    return xr.Dataset(
        {v: (("member", "time", "lat", "lon"), out[:, :, i]) for i, v in enumerate(meta.variables)}, coords=coords
    )


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
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT))
    parser.add_argument("--config", default=None, help="climrecon config (truth/static stores); default: built-in")
    parser.add_argument("--years", type=int, nargs=2, default=None, help="default: train.heldout_years")
    parser.add_argument("--months", type=int, default=24)
    parser.add_argument("--members", type=int, default=16)
    parser.add_argument("--steps", type=int, default=12, help="Heun steps (2 network calls each, 1 for the last)")
    parser.add_argument("--overlap", type=int, default=8, help="tile overlap in cells")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "skill_core.json"))
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    cfg = load_config(args.config)
    years = tuple(args.years or cfg.train.heldout_years)
    model, meta = load_checkpoint(args.checkpoint)
    trained = tuple(meta.data.get("train_years", ()))
    if trained and not (years[1] < trained[0] or years[0] > trained[1]):
        raise SystemExit(f"evaluation years {years} overlap the checkpoint's training years {trained}")
    t0 = time.perf_counter()
    truth, cond, spec = heldout_inputs(meta, default_truth_url(cfg), default_static_url(cfg), years, args.months)
    bilinear = xr.Dataset(
        {v: cond.sel(channel=f"{v}_coarse", drop=True).rename(v) for v in spec.variables}
    )
    t1 = time.perf_counter()
    ens = sample_ensemble(model, meta, cond, members=args.members, num_steps=args.steps, overlap=args.overlap,
                          seed=args.seed)
    t2 = time.perf_counter()
    result = {
        **skill(ens, truth, bilinear),
        "members": args.members,
        "months": [str(t)[:7] for t in truth["time"].values],
        "n_months": int(truth.sizes["time"]),
        "years": list(years),
        "sampler": {"name": "heun (EDM Algorithm 2, deterministic)", "num_steps": args.steps,
                    "blend": "every_step", "taper": "hann", "overlap": args.overlap,
                    "patch_size": meta.grid.patch_size},
        "checkpoint": {"path": str(Path(args.checkpoint).resolve().relative_to(REPO))
                       if Path(args.checkpoint).resolve().is_relative_to(REPO) else args.checkpoint,
                       "step": meta.step, "train_years": list(trained), "method": meta.method,
                       "target": meta.data.get("target", "full")},
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
    print(f"mae ratio vs bilinear {result['mae_ratio_vs_bilinear_x8']:.3f}; per variable "
          + ", ".join(f"{v}: {p['mae_ratio_vs_bilinear']:.3f} (crps/mae {p['crps_over_ensemble_mean_mae']:.2f}, "
                      f"ssr {p['spread_skill_ratio']:.2f})" for v, p in result["per_variable"].items())
          + f"; sampling {t2 - t1:.0f} s")
    return result


if __name__ == "__main__":
    main()
