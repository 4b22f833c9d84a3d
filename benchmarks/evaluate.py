"""Benchmark: the perfect-model evaluation of every method on the sample catalog's synthetic reanalysis.

Runs :func:`climrecon.tasks.evaluate.run_evaluation` with the default ``evaluate`` section (tas, uas, vas, pr;
factors 4, 8, 16, 20; bilinear, BCSD, QM fitted on 1961-2005; the shipped x8 diffusion checkpoint with 1 and
16 members; held out 2011-2020) and only these changes, to stay affordable on a shared 2-core CPU: every
``--month-stride``-th held-out month, ``--num-steps`` Heun steps, ``--threads`` torch threads. Writes
``benchmarks/results/evaluation.json`` (config, records, timings, machine, versions, command),
``evaluation.md`` (the tables) and ``figures/*.png``.

    python benchmarks/evaluate.py [--month-stride 11] [--num-steps 8] [--set evaluate.key=value ...]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import command_line, machine, versions
from zero_shot import splice, zero_shot_block

from climrecon.config import load_config
from climrecon.tasks.evaluate import markdown_report, run_evaluation, write_figures, write_json

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--month-stride",
        type=int,
        default=11,
        help="score every n-th held-out month (11: 11 months, 11 calendar months, 2011-2020)",
    )
    parser.add_argument("--num-steps", type=int, default=8, help="Heun steps of the diffusion sampler")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the CPU is shared)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    overrides = [
        f"evaluate.month_stride={args.month_stride}",
        f"sampler.num_steps={args.num_steps}",
        f"evaluate.threads={args.threads}",
        f"evaluate.output={args.out}",
        *args.overrides,
    ]
    cfg = load_config(None, overrides)
    start = time.perf_counter()
    result = run_evaluation(cfg, log=lambda msg: print(msg, flush=True))
    wall = time.perf_counter() - start

    affordability = {}
    ensembles = {name for name, d in result.methods.items() if d.get("stochastic")}
    diffusion = [t for t in result.timings if t["step"].split(" ")[0] in ensembles]
    if diffusion:
        t = diffusion[0]
        per_item = t["downscale_seconds"] / (t["months"] * t["members"])
        full_100 = per_item * 100 * 120 / 3600
        affordability = {
            "seconds_per_month_member": round(per_item, 2),
            "hours_for_100_members_x_120_months": round(full_100, 1),
        }
        result.notes.append(
            f"Ensemble sizes 33 and 100 were not run: one (month, member) sample costs {per_item:.1f} s "
            f"here ({cfg.sampler.num_steps} Heun steps, {cfg.evaluate.threads} thread, shared 2-core CPU), "
            f"so 100 members x 120 held-out months would take ~{full_100:.0f} h; run them on a GPU "
            "(`--set evaluate.ensemble_sizes=[1,16,33,100] --set evaluate.month_stride=1`)."
        )
    result.notes.append(
        f"Affordable CPU settings: every {cfg.evaluate.month_stride}th held-out month "
        f"({len(result.months)} months: {', '.join(result.months)}), {cfg.sampler.num_steps} Heun steps, "
        f"{cfg.evaluate.threads} torch thread(s); whole run {wall:.0f} s."
    )
    args.out.mkdir(parents=True, exist_ok=True)
    extra = {
        "benchmark": "perfect-model evaluation on the synthetic reanalysis (NOT observations)",
        "command": command_line(),
        "machine": machine(),
        "wall_s": round(wall, 1),
        "versions": versions("numpy", "xarray", "torch", "xskillscore", "scipy"),
        "affordability": affordability,
    }
    write_json(result, args.out / "evaluation.json", extra)
    report = args.out / "evaluation.md"
    kept = zero_shot_block(report.read_text()) if report.exists() else None
    text = (
        markdown_report(result, "Perfect-model evaluation (benchmark)")
        + f"\nCommand: `{command_line()}`; machine: {machine()['cpu_model']}, "
        f"{machine()['usable_cores']} cores; {wall:.0f} s.\n"
    )
    report.write_text(text if kept is None else splice(text, kept))  # benchmarks/zero_shot.py's table stays
    figures = write_figures(result, args.out / "figures")
    print(f"wrote evaluation.json, evaluation.md and {len(figures)} figures to {args.out} in {wall:.0f} s")


if __name__ == "__main__":
    main()
