"""Short-training ablation: which train-config change moves the ensemble-mean skill, at equal steps?

Each case trains the shipped config (``configs/train-dpdm-westus-x8.yaml``) with ``--set`` overrides for
``--steps`` steps (cosine schedule over those steps, 1 thread) with the method's own training recipe (the
registry's ``train``), then scores it on held-out patches through the method's ``downscale`` (the code that
ships): 12 months drawn from 2011-2020 (seed 123), 4 random 32 x 32 patches each (one tile: no blending),
8 members, 12 Heun steps. The figure is the ensemble-mean MAE of the residual (members minus the bilinear
coarse input) over its bilinear MAE, per variable and averaged, like ``skill_core.py`` but on interior
patches only.

A case with ``--regression`` is scored by one denoiser call at sigma = 20 from noise instead of sampling
(``sampler.num_steps=1``, ``sampler.sigma_max=20``: one Euler step to sigma 0 returns D): train it with
``method.edm.P_mean=3 method.edm.P_std=0.05`` and it is a plain regression (CorrDiff's mean network).

    python benchmarks/train_ablation.py --steps 2500 --set method.edm.P_mean=0.0 --out benchmarks/results/ablation-pmean0.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from climrecon.config import SamplerConfig, load_config
from climrecon.methods import METHODS, Inputs, Method, build
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import command_line, machine, versions, write_results  # noqa: E402

CONFIG = "configs/train-dpdm-westus-x8.yaml"


def patch_skill(
    method: Method,
    truth_url: str,
    static_url: str,
    heldout_years: tuple[int, int],
    *,
    months: int = 12,
    patches: int = 4,
    members: int = 8,
) -> dict[str, Any]:
    """Ensemble-mean MAE / bilinear MAE of the residual on random held-out patches (see module doc)."""
    variables = list(method.describe()["variables"])
    patch = int(method.describe()["grid"]["patch_size"])
    (factor,) = method.needs.factors
    held = select_years(open_truth(truth_url, variables), heldout_years)
    rng = np.random.default_rng(123)
    held = (
        held.isel(time=np.sort(rng.choice(held.sizes["time"], months, replace=False)))
        .astype("float32")
        .load()
    )
    views = [n.removesuffix("_coarse") for n in method.needs.static if n.endswith("_coarse")]
    full = perfect_model_inputs(
        coarsen_blocks(held, factor),
        Grid.from_dataset(held, "truth"),
        static_for_truth(static_url, held),
        views,
    )
    err, base = [], []
    for t in range(months):
        for _ in range(patches):
            r, c = (int(i) for i in rng.integers(0, held.sizes["lat"] - patch + 1, 2))
            window = {"time": [t], "lat": slice(r, r + patch), "lon": slice(c, c + patch)}
            fine = full.coarse_on_fine.isel(window)
            inputs = Inputs(
                coarse_on_fine=fine,
                grid=Grid.from_dataset(fine),
                static=full.static.isel(lat=window["lat"], lon=window["lon"]),
                truth_view=True,  # the truth's own coarse view: nothing for a bias correction to map
            )
            out = method.downscale(inputs, members=members, seed=t)
            mean = np.stack([(out[v].mean("member") - fine[v]).values[0] for v in variables])
            truth = np.stack([(held[v].isel(window) - fine[v]).values[0] for v in variables])
            err.append(np.abs(mean - truth).mean(axis=(1, 2)))
            base.append(np.abs(truth).mean(axis=(1, 2)))
    ratio = np.mean(err, 0) / np.mean(base, 0)
    return {
        "ratio_per_variable": {v: round(float(x), 4) for v, x in zip(variables, ratio, strict=True)},
        "mae_ratio_vs_bilinear": round(float(ratio.mean()), 4),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=2500)
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="config override")
    ap.add_argument("--regression", action="store_true", help="score D(noise; sigma=20) instead of sampling")
    ap.add_argument("--checkpoint", help="score this checkpoint instead of training one")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(args.checkpoint) if args.checkpoint else Path(tmp) / "ablation.pt"
        cfg = load_config(
            CONFIG,
            [
                f"train.max_steps={args.steps}",
                f"train.checkpoint={path}",
                "train.device=cpu",
                *args.overrides,
            ],
        )
        result = None
        if not args.checkpoint:
            result = METHODS[cfg.method.name].train(cfg, progress=False)
        train_s = time.perf_counter() - t0
        sampler = (
            SamplerConfig(num_steps=1, sigma_max=20.0, device="cpu")
            if args.regression
            else SamplerConfig(num_steps=12, device="cpu")
        )
        method = build(cfg.method.model_copy(update={"checkpoint": str(path)}), sampler)
        skill = patch_skill(
            method, default_truth_url(cfg), default_static_url(cfg), tuple(cfg.train.heldout_years)
        )
        step = method.describe()["checkpoint"]["step"]
    out = {
        "command": command_line(),
        "steps": args.steps if not args.checkpoint else step,
        "overrides": args.overrides,
        "checkpoint": args.checkpoint,
        "scored_by": "one denoiser call at sigma 20"
        if args.regression
        else "Heun sampler, 12 steps, 8 members",
        **skill,
        "final_loss_200_steps": None if result is None else round(float(np.mean(result.losses[-200:])), 4),
        "train_s": round(train_s, 1),
        "machine": machine(),
        "versions": versions("torch", "numpy", "xarray"),
    }
    write_results(args.out, out)
    print(json.dumps({k: out[k] for k in ("overrides", "mae_ratio_vs_bilinear", "ratio_per_variable")}))
    return out


if __name__ == "__main__":
    main()
