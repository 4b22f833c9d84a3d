"""Experiment: at which spatial scales is DPDM's spread missing, and what does inflating it cost the spectra?

DPDM's spread calibration (``spread_inflation``, README "DPDM's spread") scales every member's deviation from
the common centre ``c`` (the sampler's solution from a zero latent) by one factor per variable:
``member = c + f (z - c)``. That brings the spread-skill ratio to 1, but ``z - c`` holds most of a member's
fine-scale detail (the centre is smooth), so the factor also raises the power spectrum at the finest scales.
This experiment compares, on the same members:

- ``none``: the network's own ensemble (factors 1);
- ``full``: the shipped rule, ``c + f (z - c)``;
- ``lowpass_<s>``: only the large scales of the deviation are inflated, ``z + (f - 1) G_s(z - c)``, with
  ``G_s`` a Gaussian filter of ``s`` fine cells (the coarse cell at x8 is 8 cells).

For each rule and variable the factor is fitted on VALIDATION months (2006-2010) to spread-skill 1 (by
bisection; the closed form holds for ``full`` only) and scored on held-out months (2011-2020): spread-skill
ratio, CRPS, ensemble-mean MAE and log-spectral distance (climrecon.tasks.metrics). The centre comes out of
two samplings with the same seeds, factors 1 (``z``) and 2 (``2 z - c``): ``c = 2 z - m2``.

    python benchmarks/spread_scales.py [--months 8] [--members 8]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import scipy.ndimage
import xarray as xr

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import command_line, machine, peak_rss_mib, versions, write_results  # noqa: E402

from climrecon.config import SamplerConfig, load_config  # noqa: E402
from climrecon.methods import build  # noqa: E402
from climrecon.tasks import metrics  # noqa: E402
from climrecon.tasks.evaluate import heldout_inputs, use_threads  # noqa: E402
from climrecon.tasks.training_data import default_static_url, default_truth_url  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "benchmarks" / "results" / "spread_scales.json"
CHECKPOINT = REPO / "checkpoints" / "dpdm-westus-x8.pt"
VARIABLES = ("tas", "uas", "vas")
SCALES = (2, 4, 8)  # Gaussian filter sigma in fine cells
SEED = 20261203


def sample(months: int, members: int, years: tuple[int, int], threads: int) -> dict[str, xr.Dataset]:
    """Truth, members ``z`` (factors 1) and the centre ``c`` on ``months`` months of ``years``."""
    cfg = load_config(None, [f"evaluate.threads={threads}"])
    use_threads(threads)
    sampler = SamplerConfig(device="cpu")  # DPDM's default: 12 DPM-Solver++(2M) steps
    out: dict[str, xr.Dataset] = {}
    for f in (1.0, 2.0):
        spec = {"name": "dpdm", "checkpoint": str(CHECKPOINT), "bias_correction": False}
        method = build({**spec, "spread_inflation": dict.fromkeys(VARIABLES, f)}, sampler)
        truth, inputs = heldout_inputs(method, default_truth_url(cfg), default_static_url(cfg), years, months)
        out["truth"] = truth
        out[str(f)] = method.downscale(inputs, members=members, seed=SEED).load()
    z = out.pop("1.0")
    return {"truth": out["truth"], "z": z, "c": (2 * z - out.pop("2.0")).mean("member")}


def lowpass(d: xr.DataArray, sigma: float) -> xr.DataArray:
    """Gaussian low-pass of each (member, time) map over (lat, lon), ``sigma`` fine cells, edges reflected."""
    axes = [d.dims.index("lat"), d.dims.index("lon")]
    sig = [0.0] * d.ndim
    for a in axes:
        sig[a] = sigma
    return d.copy(data=scipy.ndimage.gaussian_filter(d.values, sig, mode="reflect"))


Rule = Callable[[xr.DataArray, xr.DataArray, float], xr.DataArray]


def rules() -> dict[str, Rule]:
    """name -> (members z, centre c, factor f) -> inflated members."""
    out: dict[str, Rule] = {"full": lambda z, c, f: c + f * (z - c)}
    for s in SCALES:
        out[f"lowpass_{s}"] = lambda z, c, f, s=s: z + (f - 1) * lowpass(z - c, s)
    return out


def fit(rule: Rule, z: xr.DataArray, c: xr.DataArray, truth: xr.DataArray) -> float:
    """The factor in [1, 10] that brings the spread-skill ratio to 1 (bisection; 1 if already >= 1)."""
    ssr = lambda f: float(metrics.spread_skill_ratio(rule(z, c, f), truth))  # noqa: E731
    lo, hi = 1.0, 10.0
    if ssr(lo) >= 1:
        return 1.0
    for _ in range(30):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if ssr(mid) < 1 else (lo, mid)
    return 0.5 * (lo + hi)


def scores(members: xr.DataArray, truth: xr.DataArray) -> dict[str, float]:
    return {
        "spread_skill_ratio": float(metrics.spread_skill_ratio(members, truth)),
        "crps": float(metrics.crps(members, truth)),
        "mae": float(metrics.mae(members.mean("member"), truth)),
        "log_spectral_distance": float(metrics.log_spectral_distance(members, truth)),
    }


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--months", type=int, default=8)
    parser.add_argument("--members", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    val = sample(args.months, args.members, (2006, 2010), args.threads)
    held = sample(args.months, args.members, (2011, 2020), args.threads)
    table: dict[str, Any] = {"none": {}, **{name: {} for name in rules()}}
    for v in VARIABLES:
        table["none"][v] = {"factor": 1.0, **scores(held["z"][v], held["truth"][v])}
        for name, rule in rules().items():
            f = fit(rule, val["z"][v], val["c"][v], val["truth"][v])
            table[name][v] = {
                "factor": round(f, 4),
                **scores(rule(held["z"][v], held["c"][v], f), held["truth"][v]),
            }
        print(v, {k: round(t[v]["log_spectral_distance"], 4) for k, t in table.items()}, flush=True)
    doc = {
        "benchmark": "where DPDM's spread is missing: inflation of the whole deviation vs its large scales only",
        "checkpoint": CHECKPOINT.name,
        "sampler": "12 DPM-Solver++(2M) steps (DPDM's default)",
        "fit": {"years": [2006, 2010], "months": [str(t)[:7] for t in val["truth"]["time"].values]},
        "heldout": {"years": [2011, 2020], "months": [str(t)[:7] for t in held["truth"]["time"].values]},
        "members": args.members,
        "rules": {
            "none": "factors 1",
            "full": "c + f (z - c)",
            **{f"lowpass_{s}": f"z + (f - 1) G_{s}(z - c), Gaussian sigma {s} fine cells" for s in SCALES},
        },
        "table": table,
        "wall_s": round(time.perf_counter() - start, 1),
        "command": command_line(),
        "machine": machine(),
        "versions": versions("torch", "numpy", "xarray", "scipy"),
        "peak_rss_mib": peak_rss_mib(),
    }
    write_results(args.out, doc)
    print(doc["table"])


if __name__ == "__main__":
    main()
