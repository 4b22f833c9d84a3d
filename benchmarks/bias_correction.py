"""Bias correction of the coarse input (``method.bias_correction``) on a free-running GCM, side by side.

Question: a model trained on a reanalysis and its own coarse view reads a GCM whose climate is another one.
How much does quantile-mapping the GCM's coarse fields toward the truth's coarse view (per calendar month and
coarse cell, fitted on the training years the run covers; :mod:`climrecon.methods.bias_correction`) change
what downscaling adds?

Method: the README's main job itself (``climrecon demo``: MPI-ESM-LR 2005 tas/uas/vas over the western US,
regrid to 2 deg, downscale to 0.25 deg, aggregate, score against the synthetic truth), once per variant, in
one run, each in its own storage root; the scores are the reconstruct flow's own records
(:mod:`climrecon.tasks.added_value`: time means of the ensemble mean against the truth's, split into 8 x
8-cell block means, "large", set by the driving model, and the rest, "fine", what downscaling adds). The
reference period of the correction is the run's own year (2005, a training year) against the truth's
1961-2005: the large scale moves toward the truth's climate by construction, so the fine scale is the figure
that tells whether the downscaling itself improved. CorrDiff is not run: the shipped checkpoint downscales pr
too, which the sample GCMs lack.

Usage::

    python benchmarks/bias_correction.py [--members 8] [--out benchmarks/results/bias_correction.json]
"""

from __future__ import annotations

import argparse
import glob
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from common import command_line, machine, versions, write_results

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "benchmarks" / "results" / "bias_correction.json"
FG = "checkpoints/first_guess/dpdm-fg-westus-x8.pt"
FULL_RUN = "python benchmarks/bias_correction.py"
VARIANTS: dict[str, list[str]] = {
    "dpdm": ["method.bias_correction=false"],
    "dpdm+bc": ["method.bias_correction=true"],
    "dpdm_fg": [f"method.checkpoint={FG}", "method.bias_correction=false"],
    "dpdm_fg+bc": [f"method.checkpoint={FG}", "method.bias_correction=true"],
    "bcsd": ["method.name=bcsd", "regrid.coarse_resolution=2"],  # the 2-deg grid the x8 models read
    "bcsd_no_bc": ["method.name=bcsd", "regrid.coarse_resolution=2", "method.bias_correction=false"],
    "zssd": ["method.name=zssd"],
    "zssd+bc": ["method.name=zssd", "method.bias_correction=true"],
}


def run_variant(label: str, overrides: Sequence[str], root: Path, members: int) -> dict[str, Any]:
    """``climrecon demo`` with ``overrides`` under ``root``; the flow's skill records and the wall time."""
    store = root / label
    argv = [str(Path(sys.executable).parent / "climrecon"), "demo", "--set", f"storage.root={store}"]
    for o in [*overrides, f"downscale.members={members}"]:
        argv += ["--set", o]
    start = time.perf_counter()
    done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{label}: climrecon demo exited {done.returncode}:\n{done.stdout[-3000:]}")
    (skill,) = glob.glob(str(store / "evaluate" / "*.skill.json"))
    records = json.loads(Path(skill).read_text())["records"]
    table: dict[str, dict[str, dict[str, float]]] = {}
    for r in records:
        table.setdefault(r["method"], {}).setdefault(r["variable"], {})[r["scale"]] = round(r["rmse"], 4)
    return {"overrides": list(overrides), "wall_s": round(wall, 1), "rmse": table}


def climatology_reference(year: int = 2005, years: tuple[int, int] = (1961, 2005)) -> dict[str, Any]:
    """The truth's own monthly climatology over ``years`` taken as the reconstruction of ``year``, scored as the
    flow scores (:mod:`climrecon.tasks.added_value`): the fine-scale error no method driven by a GCM, whose
    weather is not the truth's, can avoid (the truth's fine-scale anomaly of that very year)."""
    import xarray as xr

    from climrecon.config import load_config
    from climrecon.tasks.added_value import added_value_records, climatologies
    from climrecon.tasks.training_data import default_truth_url

    truth = xr.open_zarr(default_truth_url(load_config()))[["tas", "uas", "vas"]]
    target = truth.sel(time=slice(f"{year}-01", f"{year}-12")).load()
    monthly = truth.sel(time=slice(str(years[0]), str(years[1]))).groupby("time.month").mean("time").load()
    reference = (
        monthly.sel(month=target["time"].dt.month).drop_vars("month").assign_coords(time=target["time"])
    )
    records = added_value_records(climatologies(reference, reference, target), 8)
    table: dict[str, dict[str, float]] = {}
    for r in records:
        if r["method"] == "downscaled":
            table.setdefault(r["variable"], {})[r["scale"]] = round(r["rmse"], 4)
    return {"years": list(years), "year": year, "rmse": table}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--members", type=int, default=8)
    parser.add_argument("--only", nargs="*", default=None, choices=sorted(VARIANTS))
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    before = machine()
    previous = json.loads(args.out.read_text()) if args.only and args.out.exists() else {}
    results: dict[str, Any] = dict(previous.get("variants", {}))  # --only: the other variants as recorded
    with tempfile.TemporaryDirectory(prefix="bias-correction-") as tmp:
        for label, overrides in VARIANTS.items():
            if args.only is None or label in args.only:
                results[label] = run_variant(label, overrides, Path(tmp), args.members)
                print(label, json.dumps(results[label]["rmse"].get("downscaled")), flush=True)
    fine = {
        label: {v: r["rmse"]["downscaled"][v]["fine"] for v in r["rmse"]["downscaled"]}
        for label, r in results.items()
    }
    interpolated = results["dpdm"]["rmse"]["interpolated"] if "dpdm" in results else {}
    floor = climatology_reference()
    write_results(
        args.out,
        {
            "benchmark": "bias correction of the coarse input on a free-running GCM (MPI-ESM-LR 2005, the demo), "
            "scored on time means against the synthetic truth (NOT observations)",
            "command": command_line(),
            "commands": {  # what ran each variant: --only reruns some and keeps the others' record
                **{k: previous.get("commands", {}).get(k, FULL_RUN) for k in previous.get("variants", {})},
                **{label: command_line() for label in args.only or VARIANTS},
            },
            "members": args.members,
            "variants": results,
            "fine_rmse": fine,
            "fine_rmse_interpolated": {v: s["fine"] for v, s in interpolated.items()},
            "fine_rmse_truth_climatology": {v: s["fine"] for v, s in floor["rmse"].items()},
            "truth_climatology_reference": floor,
            "notes": [
                "bcsd: its quantile mapping fitted on the GCM's own fields over the training years the run covers "
                "(bias_correction, the default); bcsd_no_bc: fitted on the truth's coarse view, so the GCM's bias "
                "stays (what the stage did before bias_correction existed)",
                "truth_climatology_reference: the truth's 1961-2005 monthly climatology scored as a reconstruction of "
                "2005, the fine-scale error a GCM-driven method cannot avoid (the truth's own 2005 anomaly)",
            ],
            "machine": before,
            "load_after": machine()["load_average_1_5_15min"],
            "versions": versions("torch", "xarray", "dask", "prefect"),
        },
    )


if __name__ == "__main__":
    main()
