"""Benchmark: what spread calibration (climrecon.tasks.calibrate) does on held-out months.

The calibrated checkpoint against the same checkpoint with every factor forced to 1, side by side through
:func:`climrecon.tasks.evaluate.run_evaluation` (the same held-out months, members, seeds and sampler): the
spread-skill ratio should move to 1 and a proper score (CRPS) should not get worse; the ensemble mean's MAE
changes only by the finite-ensemble noise of the larger residuals (CorrDiff), or by how far the members' centre
(DPDM: the sampler's solution from a zero latent) lies from their mean. Default: the shipped CorrDiff and its
climatology variant; the shipped DPDM checkpoints with ``--checkpoint`` (README "Spread calibration"):

    python benchmarks/calibration.py [--month-stride 10] [--members 16] [--steps 12]
    python benchmarks/calibration.py --out benchmarks/results/calibration_dpdm.json \
        --checkpoint dpdm=checkpoints/dpdm-westus-x8.pt \
        --checkpoint dpdm_fg=checkpoints/first_guess/dpdm-fg-westus-x8.pt \
        --checkpoint dpdm_clim=checkpoints/climatology/dpdm-clim-westus-x8.pt
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    add_evaluation_arguments,
    command_line,
    machine,
    peak_rss_mib,
    run_side_by_side,
    versions,
    write_results,
)

from climrecon.models.checkpoint import read_checkpoint  # noqa: E402
from climrecon.tasks.calibrate import method_of  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "benchmarks" / "results" / "calibration.json"
SCORES = ("mae", "crps", "spread_skill_ratio")
DEFAULT = {
    "corrdiff": REPO / "checkpoints" / "corrdiff-westus-x8.pt",
    "corrdiff_clim": REPO / "checkpoints" / "climatology" / "corrdiff-clim-westus-x8.pt",
}


def compare(scores: dict[str, dict[str, dict[str, float]]], label: str) -> dict[str, Any]:
    """Per variable: calibrated and uncalibrated scores, and the relative change of CRPS and MAE."""
    cal, unit = scores[label], scores[f"{label}_uncalibrated"]
    return {
        v: {
            "calibrated": cal[v],
            "uncalibrated": unit[v],
            "crps_change": cal[v]["crps"] / unit[v]["crps"] - 1,
            "mae_change": cal[v]["mae"] / unit[v]["mae"] - 1,
            "abs_spread_skill_minus_1": {
                "calibrated": abs(cal[v]["spread_skill_ratio"] - 1),
                "uncalibrated": abs(unit[v]["spread_skill_ratio"] - 1),
            },
        }
        for v in cal
    }


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_evaluation_arguments(parser, month_stride=10, members=16)
    parser.add_argument(
        "--checkpoint",
        action="append",
        metavar="LABEL=PATH",
        help="calibrated checkpoints to score (default: the shipped CorrDiff and its climatology variant)",
    )
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    checkpoints = (
        {k: Path(p) for k, p in (c.split("=", 1) for c in args.checkpoint)} if args.checkpoint else DEFAULT
    )

    methods: list[Any] = []
    fitted: dict[str, Any] = {}
    variables: set[str] = set()
    for label, path in checkpoints.items():
        meta = read_checkpoint(path).metadata
        variables.update(meta.variables)
        if not meta.data.get("spread_inflation"):
            parser.error(
                f"{path} has no data.spread_inflation: calibrate it first (climrecon.tasks.calibrate)"
            )
        fitted[label] = {
            "checkpoint": str(path.relative_to(REPO) if path.is_relative_to(REPO) else path),
            "spread_inflation": meta.data["spread_inflation"],
            "fitted_on": {k: meta.data["spread_calibration"][k] for k in ("years", "members", "sampler")},
        }
        unit, name = {v: 1.0 for v in meta.variables}, method_of(meta.method)
        methods += [
            {"name": name, "label": label, "checkpoint": str(path)},
            {
                "name": name,
                "label": f"{label}_uncalibrated",
                "checkpoint": str(path),
                "spread_inflation": unit,
            },
        ]
    run = run_side_by_side(args, methods, sorted(variables), SCORES)
    cfg, result, wall, scores = run.cfg, run.result, run.wall_s, run.scores
    comparison = {label: compare(scores, label) for label in checkpoints}
    doc = {
        "benchmark": "spread calibration on held-out months: calibrated checkpoint vs the same with factors 1",
        "command": command_line(),
        "months": result.months,
        "n_months": len(result.months),
        "members": args.members,
        "heldout_years": list(cfg.evaluate.heldout_years),
        "sampler": cfg.sampler.model_dump(mode="json"),
        "fitted": fitted,
        "comparison": comparison,
        "spread_skill_ratio": {
            m: {v: s["spread_skill_ratio"] for v, s in sc.items()} for m, sc in scores.items()
        },
        "crps": {m: {v: s["crps"] for v, s in sc.items()} for m, sc in scores.items()},
        "methods": {m: d.get("report", "") for m, d in result.methods.items()},
        "notes": list(result.notes),
        "timings": result.timings,
        "wall_s": round(wall, 1),
        "peak_rss_mib": round(peak_rss_mib(), 1),
        "machine": machine(),
        "versions": versions("numpy", "xarray", "torch"),
    }
    write_results(args.out, doc)
    print(json.dumps({"spread_skill_ratio": doc["spread_skill_ratio"], "crps": doc["crps"]}, indent=1))
    print(f"wrote {args.out} in {wall:.0f} s")


if __name__ == "__main__":
    main()
