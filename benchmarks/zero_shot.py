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

    python benchmarks/zero_shot.py [--month-stride 15] [--members 8] [--steps 12] [--threads 1]
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
import xarray as xr

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    add_evaluation_arguments,
    command_line,
    evaluation_overrides,
    machine,
    peak_rss_mib,
    versions,
    write_results,
)

from climrecon.config import load_config  # noqa: E402
from climrecon.tasks.evaluate import markdown_report, run_evaluation  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
OUT = RESULTS / "zero_shot.json"
REPORT = RESULTS / "evaluation.md"
PRIOR = REPO / "checkpoints" / "zssd-prior-westus.pt"
DPDM = REPO / "checkpoints" / "dpdm-westus-x8.pt"
CORRDIFF = REPO / "checkpoints" / "corrdiff-westus-x8.pt"
VARIABLES = ["tas", "uas", "vas"]  # what the prior generates: "overall" is over these
EVALUATED = [*VARIABLES, "pr"]  # the shipped CorrDiff needs pr in its input (scored, not in "overall")
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
    add_evaluation_arguments(parser, month_stride=15, members=8)
    parser.add_argument("--prior", type=Path, default=PRIOR)
    parser.add_argument("--dpdm", type=Path, default=DPDM)
    parser.add_argument("--corrdiff", type=Path, default=CORRDIFF)
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--report", type=Path, default=REPORT)
    args = parser.parse_args(argv)

    overrides = evaluation_overrides(
        methods_of(args.prior, args.dpdm, args.corrdiff),
        EVALUATED,
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
        "zssd_below_bcsd_overall_every_factor": {
            fx: ratio["zssd"][fx] < ratio["bcsd"][fx] for fx in ratio["zssd"]
        },
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


# -- unpaired real GCMs: scored on climatology, as the reconstruct flow does -----------------------------------
GCM_OUT = RESULTS / "zero_shot_gcm.json"


def _catalog_files(cfg: Any, source_id: str, experiment: str, variables: Sequence[str]) -> dict[str, str]:
    import pandas as pd

    rows = pd.read_csv(cfg.sample_dir() / "catalog.csv")
    rows = rows[(rows.source_id == source_id) & (rows.experiment_id == experiment)]
    return {v: str(rows.loc[rows.variable_id == v, "path"].iloc[0]) for v in variables}


def open_gcm(cfg: Any, source_id: str, experiment: str, variables: Sequence[str]) -> xr.Dataset:
    """The sample catalog's files of one GCM run, merged, on their native grid (bounds kept, lat ascending)."""
    coder = xr.coders.CFDatetimeCoder(use_cftime=True)
    parts = []
    for v, path in _catalog_files(cfg, source_id, experiment, variables).items():
        ds = xr.open_dataset(path, decode_times=coder)
        keep = [v] + [b for b in ("lat_bnds", "lon_bnds") if b in ds]
        parts.append(ds[keep].drop_vars([c for c in ds.coords if c not in ("time", "lat", "lon")]))
    out = xr.merge(parts, compat="override", join="exact").sortby("lat")
    return out.load()


def overlapping_cells(ds: xr.Dataset, grid: Any) -> xr.Dataset:
    """The cells of ``ds`` (0..360 or -180..180 longitudes) that overlap ``grid``'s domain, longitudes moved
    into its frame (what ZSSD reads: its operator keeps the cells the domain covers wholly)."""
    from climrecon.tasks.regrid import cell_edges

    lat_e, lon_e = cell_edges(ds)
    shift = 360.0 * np.floor(((grid.west + grid.east) / 2 - lon_e[0]) / 360.0)
    lon_e = lon_e + shift
    rows = np.flatnonzero((lat_e[1:] > grid.south) & (lat_e[:-1] < grid.north))
    cols = np.flatnonzero((lon_e[1:] > grid.west) & (lon_e[:-1] < grid.east))
    out = ds.isel(lat=rows, lon=cols)
    out = out.assign_coords(lon=out.lon + shift)
    if "lon_bnds" in out:
        out["lon_bnds"] = out["lon_bnds"] + shift
    return out


def _climatology_rows(
    name: str, members: xr.Dataset, interpolated: xr.Dataset, truth: xr.Dataset, factor: int
) -> list[dict[str, Any]]:
    """The added-value records of one method (time means vs the truth's, whole / large / fine scale), plus
    ``large_departure_from_input``: the RMSE between the method's and the interpolated input's large scales
    (a free-running GCM sets the large scale: a method should keep it, not replace it by the climate its prior
    learnt)."""
    from climrecon.tasks import metrics
    from climrecon.tasks.added_value import added_value_records, climatologies, split_scales

    mean = members.mean("member") if "member" in members.dims else members
    records = added_value_records(climatologies(mean, interpolated, truth), factor)
    which = "interpolated" if name == "bilinear" else "downscaled"
    large_mean = split_scales(mean.mean("time"), factor)[0]
    large_input = split_scales(interpolated.mean("time"), factor)[0]
    rows = []
    for r in records:
        if r["method"] != which:
            continue
        row = dict(r, method=name)
        if r["scale"] == "large":
            v = r["variable"]
            row["large_departure_from_input"] = float(metrics.rmse(large_mean[v], large_input[v]))
        rows.append(row)
    return rows


def gcm(argv: Sequence[str]) -> None:
    """Unpaired GCMs of the sample catalog through the same prior: MPI-ESM-LR 2005 (monthly tas, uas, vas on
    its native 1.875-deg Gaussian grid) and UM A1B (annual tas, 1.25 x 1.875 deg): scored on time means
    against the fine truth (:mod:`climrecon.tasks.added_value`, what the reconstruct flow reports)."""
    import torch

    from climrecon.config import SamplerConfig
    from climrecon.methods import MethodError, build
    from climrecon.methods.base import Inputs
    from climrecon.tasks.added_value import matching_truth
    from climrecon.tasks.evaluate import evaluation_data, perfect_model_inputs
    from climrecon.tasks.regrid import coarsen_blocks, conservative

    parser = argparse.ArgumentParser(description=gcm.__doc__)
    parser.add_argument("--members", type=int, default=8)
    parser.add_argument("--annual-members", type=int, default=4)
    parser.add_argument(
        "--annual-years", default="2011,2020,2", help="first,last,stride of the UM years scored"
    )
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--prior", type=Path, default=PRIOR)
    parser.add_argument("--dpdm", type=Path, default=DPDM)
    parser.add_argument("--out", type=Path, default=GCM_OUT)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    cfg = load_config(None, ['evaluate.variables=["tas","uas","vas"]', "evaluate.heldout_years=[2011, 2020]"])
    data_at, _ = evaluation_data(cfg, VARIABLES, None, with_static=True)
    here = data_at(8)
    grid, static = here.grid, here.static
    truth = xr.concat([here.train, here.held], "time")
    sampler = SamplerConfig(num_steps=args.steps, device="cpu")
    diffusion = {
        "zssd": {"name": "zssd", "checkpoint": str(args.prior)},
        "zssd-5deg": {"name": "zssd", "checkpoint": str(args.prior), "unified_resolution": 5.0},
        "dps": {"name": "zssd", "checkpoint": str(args.prior), "guidance": "dps"},
    }
    cases: dict[str, Any] = {}

    def run_case(
        key: str,
        native: xr.Dataset,
        variables: list[str],
        time_step: str,
        members: int,
        years: tuple[int, int],
    ) -> None:
        wide = overlapping_cells(native, grid)
        zs_inputs = Inputs.from_coarse(wide[variables], grid, static, time_step=time_step)
        # bilinear, BCSD and DPDM read the GCM as the regrid stage puts it: conservatively on a 2-deg grid
        coarse2 = conservative(native[variables], grid.coarsened(8))
        inputs = perfect_model_inputs(
            coarse2, grid, static, ["orog", "sftlf"], time_step=time_step, truth_view=False
        )
        if time_step == "year":  # the truth's annual means of the same years, and of the training years
            sel = truth[variables].sel(time=truth["time.year"].isin(range(years[0], years[1] + 1)))
            ref = sel.groupby("time.year").mean().rename(year="time")
            ref = ref.sel(time=[t.year for t in inputs.time.values]).assign_coords(time=inputs.time.values)
            train = truth[variables].sel(time=truth["time.year"] <= 2005)
            train = train.groupby("time.year").mean().rename(year="time")
            label = type(inputs.time.values[0])
            train = train.assign_coords(time=[label(int(y), 7, 1) for y in train["time"].values])
        else:
            ref = matching_truth(truth, inputs.coarse_on_fine, variables, "synthetic reanalysis")
            train = truth[variables].sel(time=truth["time.year"] <= 2005)
        interpolated = inputs.coarse_on_fine[variables]
        rows = _climatology_rows("bilinear", interpolated, interpolated, ref, 8)
        timing: dict[str, float] = {}
        # BCSD fitted on the truth's training steps (annual means for an annual input) on the 2-deg cells
        bcsd = build("bcsd").fit(coarsen_blocks(train, 8), train)
        rows += _climatology_rows("bcsd", bcsd.downscale(inputs).load(), interpolated, ref, 8)
        for name, method_cfg in diffusion.items():
            method = build(method_cfg, sampler)
            t0 = time.perf_counter()
            out = method.downscale(zs_inputs, members=members, seed=0).load()
            timing[name] = round(time.perf_counter() - t0, 1)
            rows += _climatology_rows(name, out.assign_coords(time=inputs.time.values), interpolated, ref, 8)
            print(f"{key} {name}: {timing[name]} s", flush=True)
        # DPDM serves x8 only: the GCM conservatively on the 2-deg grid, as the regrid stage would put it
        notes = []
        try:
            # the GCM as it is (bias correction off: its effect on this input is benchmarks/bias_correction.py's)
            dpdm_cfg = {"name": "dpdm", "checkpoint": str(args.dpdm), "bias_correction": False}
            dpdm = build(dpdm_cfg, sampler)
            t0 = time.perf_counter()
            out = dpdm.downscale(inputs, members=members, seed=0).load()
            timing["dpdm"] = round(time.perf_counter() - t0, 1)
            rows += _climatology_rows("dpdm", out, interpolated, ref, 8)
        except MethodError as exc:
            notes.append(f"dpdm refused the input: {exc}")
        cases[key] = {
            "input": f"zssd/dps: {wide.sizes['lat']} x {wide.sizes['lon']} native cells overlapping the domain "
            f"(guided on those it covers wholly); bilinear/bcsd/dpdm: the GCM conservatively on 2 deg; "
            f"{inputs.time.size} {time_step} step(s)",
            "members": members,
            "records": rows,
            "seconds": timing,
            "notes": notes,
        }

    mpi = open_gcm(cfg, "MPI-ESM-LR", "historical", VARIABLES)
    run_case(
        "MPI-ESM-LR historical 2005 (monthly, native 1.875-deg Gaussian grid)",
        mpi,
        VARIABLES,
        "month",
        args.members,
        (2005, 2005),
    )
    first, last, stride = (int(x) for x in args.annual_years.split(","))
    um = open_gcm(cfg, "UM605", "A1B", ["tas"])
    um = um.sel(time=um["time.year"].isin(range(first, last + 1, stride)))
    run_case(
        f"UM A1B {first}-{last} every {stride} years (annual tas, 1.25 x 1.875 deg)",
        um,
        ["tas"],
        "year",
        args.annual_members,
        (first, last),
    )

    summary: dict[str, dict[str, dict[str, float | None]]] = {}
    for key, case in cases.items():
        for r in case["records"]:
            summary.setdefault(key, {}).setdefault(r["method"], {})[f"{r['variable']}_{r['scale']}_rmse"] = r[
                "rmse"
            ]
    doc = {
        "benchmark": "issue 15: unpaired GCMs through the ZSSD prior, time means against the synthetic truth",
        "command": command_line(),
        "cases": cases,
        "climatology_rmse": summary,
        "notes": [
            "records: climrecon.tasks.added_value (time means of the ensemble mean vs the truth's time mean of the "
            "shared months / years; whole field, large = 8 x 8-cell block means, fine = the rest)",
            "annual input to the monthly prior: the 12 months of each year are sampled together and guided so that "
            "their mean matches the annual field (models.operators.GroupMean); a member is that mean",
            "bcsd is fitted on the truth's 1961-2005 steps conservatively averaged onto the input's own cells (the "
            "downscale stage's rule); for the annual case on annual means",
            "free-running GCMs: their weather is their own, so only time means are compared; the truth is SYNTHETIC",
        ],
        "wall_s": round(time.perf_counter() - start, 1),
        "machine": machine(),
        "versions": versions("numpy", "xarray", "torch"),
    }
    write_results(args.out, doc)
    print(json.dumps(summary, indent=1)[:4000])


# -- memory of the two Jacobians ----------------------------------------------------------------------------
MEMORY_VARIANTS = {
    "load only (no sampling)": None,
    "zssd, jacobian identity": {"guidance": "zssd", "jacobian": "identity"},
    "zssd, jacobian network": {"guidance": "zssd", "jacobian": "network"},
    "dps, jacobian identity": {"guidance": "dps", "jacobian": "identity"},
    "dps, jacobian network": {"guidance": "dps", "jacobian": "network"},
}


def memory_child(argv: Sequence[str]) -> None:
    """One variant in a fresh process: 1 held-out month at x8, ``--items`` members in one sampler call."""
    import os

    import torch

    from climrecon.config import SamplerConfig
    from climrecon.methods import build
    from climrecon.methods.features import perfect_model_coarse
    from climrecon.tasks.evaluate import evaluation_data, perfect_model_inputs

    parser = argparse.ArgumentParser()
    parser.add_argument("--variant", required=True)
    parser.add_argument("--items", type=int, default=4)
    parser.add_argument("--prior", type=Path, default=PRIOR)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    cfg = load_config(None, ['evaluate.variables=["tas","uas","vas"]', "evaluate.month_stride=120"])
    data_at, _ = evaluation_data(cfg, VARIABLES, None, with_static=True)
    here = data_at(8)
    held = here.held.isel(time=[0])
    inputs = perfect_model_inputs(perfect_model_coarse(held, 8), here.grid, here.static, [])
    extra = MEMORY_VARIANTS[args.variant]
    seconds = 0.0
    if extra is not None:
        method = build(
            {"name": "zssd", "checkpoint": str(args.prior), **extra},
            SamplerConfig(num_steps=12, device="cpu"),
        )
        t0 = time.perf_counter()
        method.downscale(inputs, members=args.items)
        seconds = time.perf_counter() - t0
    Path(os.environ["BENCH_RESULT"]).write_text(
        json.dumps({"variant": args.variant, "sampling_s": round(seconds, 2)})
    )


def memory(argv: Sequence[str]) -> None:
    """Peak memory and time of guidance with each Jacobian (each variant in its own process, same inputs):
    what ``jacobian: network`` costs over the isotropic Jacobian."""
    from common import run_isolated

    parser = argparse.ArgumentParser(description=memory.__doc__)
    parser.add_argument("--items", type=int, default=4)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    runs = {}
    for variant in MEMORY_VARIANTS:
        got = run_isolated(
            [sys.executable, __file__, "memory-child", "--variant", variant, "--items", str(args.items)],
            env={"OMP_NUM_THREADS": "1"},
        )
        runs[variant] = {k: got[k] for k in ("peak_rss_mib", "sampling_s", "wall_s")}
        print(variant, runs[variant], flush=True)
    base = runs["load only (no sampling)"]["peak_rss_mib"]
    for r in runs.values():
        r["sampling_rss_mib"] = round(r["peak_rss_mib"] - base, 1)
    doc = json.loads(args.out.read_text()) if args.out.exists() else {}
    doc["jacobian_memory"] = {
        "command": command_line(),
        "what": f"one held-out month at x8 (80 x 80 fine cells, 16 tiles of 32 x 32), {args.items} members in "
        "one sampler call, 12 Heun steps, 1 thread; peak RSS of a fresh process per variant (os.wait4), "
        "sampling_rss_mib = peak minus the load-only process's",
        "runs": runs,
    }
    write_results(args.out, doc)


if __name__ == "__main__":
    commands = {"gcm": gcm, "memory": memory, "memory-child": memory_child}
    if sys.argv[1:2] and sys.argv[1] in commands:
        commands[sys.argv[1]](sys.argv[2:])
    else:
        main()
