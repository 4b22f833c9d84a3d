"""Benchmark: zero-shot downscaling (issue 15): ONE prior at every factor, beside the baselines and the
supervised models.

The shipped ZSSD prior (``checkpoints/zssd-prior-westus.pt``, trained on 1961-2005 fine fields without any
coarse input) is guided toward perfect-model inputs at x4, x8, x16 and x20 (1, 2, 4 and 5 deg) on the held-out
years 2011-2020: vanilla DPS (the observation on the input's own cells, gradient of the unsquared residual norm
through the network), ZSSD's unified coordinate guidance on the input's own grid (the default; in a
reconstruction that is the regrid stage's unified grid) and on the 5-deg unified grid ("zssd-5deg"). bilinear and BCSD (fitted on 1961-2005) at every factor, the supervised DPDM
and CorrDiff at the factor they were trained for (x8). Everything runs through
:func:`climrecon.tasks.evaluate.run_evaluation` (the evaluation stage's code: the same months, inputs,
members, seeds and sampler for every method) and is scored by :mod:`climrecon.tasks.metrics`.

Writes ``benchmarks/results/zero_shot.json`` and the ZSSD-style table (MAE/RMSE by factor) into
``benchmarks/results/evaluation.md`` (between the ``zero-shot`` markers, kept by ``benchmarks/evaluate.py``).

    python benchmarks/zero_shot.py [--month-stride 10] [--members 8] [--steps 12] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import command_line, evaluation_overrides, machine, peak_rss_mib, versions, write_results  # noqa: E402

from climrecon.config import load_config  # noqa: E402
from climrecon.tasks.evaluate import markdown_report, run_evaluation  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
OUT = RESULTS / "zero_shot.json"
REPORT = RESULTS / "evaluation.md"
PRIOR = REPO / "checkpoints" / "zssd-prior-westus.pt"
DPDM = REPO / "checkpoints" / "dpdm-westus-x8.pt"
CORRDIFF = REPO / "checkpoints" / "corrdiff-westus-x8.pt"
VARIABLES = ["tas", "uas", "vas"]
FACTORS = (4, 8, 16, 20)
SCORES = ("mae", "rmse", "crps", "spread_skill_ratio", "q99_error", "log_spectral_distance", "bias")
BEGIN, END = "<!-- zero-shot: benchmarks/zero_shot.py -->", "<!-- /zero-shot -->"


def methods_of(prior: Path, dpdm: Path, corrdiff: Path) -> list[Any]:
    return [
        "bilinear",
        "bcsd",
        {"name": "zssd", "label": "dps", "checkpoint": str(prior), "guidance": "dps"},
        {"name": "zssd", "label": "zssd", "checkpoint": str(prior)},
        {"name": "zssd", "label": "zssd-5deg", "checkpoint": str(prior), "unified_resolution": 5.0},
        {"name": "dpdm", "checkpoint": str(dpdm)},
        {"name": "corrdiff", "checkpoint": str(corrdiff)},
    ]


def splice(report: str, section: str) -> str:
    """``report`` with its zero-shot block replaced by ``section`` (appended when there is none)."""
    block = f"{BEGIN}\n{section.strip()}\n{END}\n"
    pattern = re.compile(re.escape(BEGIN) + r".*?" + re.escape(END) + r"\n?", re.S)
    if pattern.search(report):
        return pattern.sub(lambda _m: block, report)
    return report.rstrip("\n") + "\n\n" + block


def zero_shot_block(report: str) -> str | None:
    """The zero-shot section of ``report`` (between the markers), or None."""
    found = re.search(re.escape(BEGIN) + r"\n(.*?)" + re.escape(END), report, re.S)
    return found.group(1) if found else None


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--month-stride", type=int, default=10, help="10: 12 months over 2011-2020")
    parser.add_argument("--members", type=int, default=8)
    parser.add_argument("--steps", type=int, default=12, help="Heun steps (every diffusion method)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prior", type=Path, default=PRIOR)
    parser.add_argument("--dpdm", type=Path, default=DPDM)
    parser.add_argument("--corrdiff", type=Path, default=CORRDIFF)
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--report", type=Path, default=REPORT)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)

    overrides = evaluation_overrides(
        methods_of(args.prior, args.dpdm, args.corrdiff),
        VARIABLES,
        members=args.members,
        month_stride=args.month_stride,
        threads=args.threads,
        steps=args.steps,
        factors=FACTORS,
    ) + list(args.overrides)
    cfg = load_config(None, overrides)
    start = time.perf_counter()
    result = run_evaluation(cfg, log=lambda msg: print(msg, flush=True))
    wall = time.perf_counter() - start

    # per method, factor and variable: the scores of the largest ensemble (the only size run here)
    table: dict[str, dict[str, dict[str, dict[str, float]]]] = {}
    for r in result.records:
        table.setdefault(r["method"], {}).setdefault(f"x{r['factor']}", {})[r["variable"]] = {
            k: r[k] for k in SCORES
        }
    for by_factor in table.values():
        for fx, scores in by_factor.items():
            for v, s in scores.items():
                s["mae_ratio_vs_bilinear"] = s["mae"] / table["bilinear"][fx][v]["mae"]

    def overall(method: str, fx: str, key: str) -> float:
        return float(np.mean([table[method][fx][v][key] for v in VARIABLES]))

    ratio = {m: {fx: overall(m, fx, "mae_ratio_vs_bilinear") for fx in by} for m, by in table.items()}
    mae = {m: {fx: overall(m, fx, "mae") for fx in by} for m, by in table.items()}
    crps = {
        m: {fx: overall(m, fx, "crps") for fx in by}
        for m, by in table.items()
        if m not in ("bilinear", "bcsd")
    }
    supervised = [m for m in ("dpdm", "corrdiff") if "x8" in table.get(m, {})]
    best_supervised = min(ratio[m]["x8"] for m in supervised) if supervised else float("nan")
    goals = {
        "zssd_below_bcsd_every_factor": {
            fx: all(table["zssd"][fx][v]["mae"] < table["bcsd"][fx][v]["mae"] for v in VARIABLES)
            for fx in ratio["zssd"]
        },
        "zssd_below_dps_at_x16_and_x20": {fx: ratio["zssd"][fx] < ratio["dps"][fx] for fx in ("x16", "x20")},
        "zssd_x20_le_0.5_bilinear": ratio["zssd"]["x20"] <= 0.5,
        "zssd_x8_within_1.3_of_supervised": ratio["zssd"]["x8"] <= 1.3 * best_supervised,
    }
    cost = {
        t["step"]: round(t["downscale_seconds"] / (t["months"] * t["members"]), 3)
        for t in result.timings
        if "downscale_seconds" in t
        and t["step"].split(" ")[0] in ("dps", "zssd", "zssd-5deg", "dpdm", "corrdiff")
    }
    doc = {
        "benchmark": "issue 15: zero-shot downscaling, one prior at x4-x20, synthetic reanalysis (NOT observations)",
        "command": command_line(),
        "months": result.months,
        "n_months": len(result.months),
        "members": args.members,
        "factors": list(FACTORS),
        "heldout_years": list(cfg.evaluate.heldout_years),
        "train_years": list(cfg.evaluate.train_years),
        "sampler": cfg.sampler.model_dump(mode="json"),
        "mae_ratio_vs_bilinear": ratio,
        "mae": mae,
        "crps": crps,
        "per_variable": table,
        "goals": goals,
        "seconds_per_month_member": cost,
        "methods": {m: d.get("report", "") for m, d in result.methods.items()},
        "notes": [
            "overall = mean over tas, uas, vas of the per-variable figure; ratios are to bilinear at the same factor",
            "dps: the observation on the input's own cells, gradient of ||y - A(x0)|| through the network "
            "(jacobian network); zssd / zssd-5deg: unified coordinate guidance on the input's own grid (the "
            "default) / on the 5-deg unified grid, jacobian identity (no backprop: memory of one field, cost of the unguided sampler)",
            *result.notes,
        ],
        "timings": result.timings,
        "wall_s": round(wall, 1),
        "peak_rss_mib": round(peak_rss_mib(), 1),
        "machine": machine(),
        "versions": versions("numpy", "xarray", "torch", "scipy"),
    }
    write_results(args.out, doc)
    section = markdown_report(
        result, "Zero-shot downscaling: one prior at every factor (benchmarks/zero_shot.py)"
    )
    section = re.sub(r"^(#+) ", r"#\1 ", section, flags=re.M)  # one level below evaluation.md's title
    section += f"\nCommand: `{command_line()}`; {wall:.0f} s on {machine()['cpu_model']}.\n"
    old = args.report.read_text() if args.report.exists() else ""
    args.report.write_text(splice(old, section))
    print(
        json.dumps(
            {k: doc[k] for k in ("mae_ratio_vs_bilinear", "goals", "seconds_per_month_member")}, indent=1
        )
    )
    print(f"wrote {args.out} and the zero-shot block of {args.report} in {wall:.0f} s")


if __name__ == "__main__":
    main()
