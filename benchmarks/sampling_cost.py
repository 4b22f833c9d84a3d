"""Benchmark: what a member costs (network evaluations, seconds) and what the cheaper samplers keep (issue 19).

Two parts, one JSON (``benchmarks/results/sampling_cost.json``; each part keeps the other's figures):

``curve``: the NFE-vs-skill curve. The shipped DPDM checkpoint (and CorrDiff's, fewer points) sampled by
Heun (EDM Alg. 2) and Euler (DDIM, eta 0) at 4-32 steps, DPM-Solver++(2M) at 4-12 steps, Heun with EDM's
stochastic churn, and the distilled 4-step student (``checkpoints/distilled-dpdm-westus-x8.pt``), all
through :func:`climrecon.tasks.evaluate.run_evaluation` on the same held-out months (2011-2020, x8 perfect
model, synthetic reanalysis), members and seeds: CRPS, ensemble-mean MAE, spread-skill ratio and the
log-spectral distance per variable and overall (mean over tas, uas, vas). A sampler has *equal skill* with
18-step Heun (the demo's default) when its overall CRPS is within 3%, every variable's spread-skill ratio
within 0.05 and every variable's log-spectral distance within 18-step Heun's + 10%. The spread-skill test is
symmetric, as the issue states it, so a sampler whose ensemble is *better* calibrated than Heun's by more
than 0.05 fails it; a second verdict, *equal or better skill*, replaces that test by "calibration no worse":
every variable's ``|spread-skill - 1|`` within 18-step Heun's + 0.05 (CRPS and spectra tests unchanged).
Both verdicts are recorded side by side; ``speedup_at_equal_skill`` uses the strict one.

``speed``: months x members per hour of 18-step Heun, DPDM's shipped default sampler, the cheapest sampler
of each verdict and the distilled student, in one process, interleaved rounds (medians), the same inputs and
members; each network mode (eager, channels_last, compile) of the shipped default; a dense float32 matmul
measured between the rounds (its median is the ceiling) and the load average before and after. ``flops_fraction_of_matmul_shipped_path``:
FLOPs of a whole ``method.downscale`` call (counted once with ``FlopCounterMode`` on the eager network:
every network call of the sampler) over its wall time, over the matmul's FLOP/s: what the product reaches,
blending and bookkeeping included. The best patches-per-call is measured per device the same way.

    python benchmarks/sampling_cost.py curve [--month-stride 20] [--members 4] [--only LABEL ...]
    python benchmarks/sampling_cost.py confirm [--month-stride 5] [--members 8] --only LABEL ...
    python benchmarks/sampling_cost.py speed [--months 4] [--members 4] [--rounds 3]

``calibrated``: DPDM points as the product runs them. The product ships spread-calibrated ensembles
(``spread_inflation``, README "DPDM's spread") and a checkpoint's factors are fitted for one sampler, so each
``--only`` point (list ``dpdm/heun-18`` too) gets the factors fitted for its own sampler on validation months
(``--fit-months`` x ``--fit-members``, :func:`climrecon.tasks.calibrate.fit_spread_inflation`, the shipped
checkpoints' protocol; a checkpoint calibrated by that protocol for that sampler is taken as it is) and is
scored on the confirmation sample. Once it holds 18-step Heun this part decides the verdicts (the other
parts' verdicts stay beside them, ``equal_skill_network_only``), and ``speed`` times each sampler with the
factors it was scored with. Runs of different points may go side by side (they merge on writing):

    python benchmarks/sampling_cost.py calibrated --only dpdm/heun-18
    python benchmarks/sampling_cost.py calibrated --only dpdm/dpmpp2m-8 dpdm/distilled-4 dpdm/dpmpp2m-12

``confirm``: the candidate points of the curve again on a larger sample (default 24 months x 8 members, eight
times the curve's): the equal-skill tests are noisy at the curve's size, so when a confirmation run exists its
tests decide which samplers have equal skill (for ``speed`` and the top-level keys); the curve stays as the
overview. A confirm run on the sample of the recorded one extends it: the ``--only`` points are (re)run,
the others kept, and the recorded 18-step Heun reference is reused unless named (sampling is deterministic:
same config and seeds, same bytes). Every point records the checkpoint it sampled (file and content hash).

Runs on CPU (1 torch thread, a shared 2-core VM); a GPU part is recorded as not lent unless CUDA is present.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    add_evaluation_arguments,
    checkpoint_id,
    command_line,
    evaluation_overrides,
    machine,
    peak_rss_mib,
    versions,
    write_results,
)

from climrecon.config import MethodConfig, SamplerConfig, load_config  # noqa: E402
from climrecon.methods import build, parse_config  # noqa: E402
from climrecon.methods.dpdm import DPDM  # noqa: E402
from climrecon.models.checkpoint import read_checkpoint  # noqa: E402
from climrecon.models.fastpath import CompiledNetwork  # noqa: E402
from climrecon.tasks import plots  # noqa: E402
from climrecon.tasks.calibrate import FIT_SEED, fit_spread_inflation  # noqa: E402
from climrecon.tasks.evaluate import method_factory, run_evaluation  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
OUT = RESULTS / "sampling_cost.json"
FIGURE = RESULTS / "figures" / "sampling_cost_curve.png"
CHECKPOINTS = {
    "dpdm": REPO / "checkpoints" / "dpdm-westus-x8.pt",
    "corrdiff": REPO / "checkpoints" / "corrdiff-westus-x8.pt",
    "distilled": REPO / "checkpoints" / "distilled-dpdm-westus-x8.pt",
}
VARIABLES = ["tas", "uas", "vas"]
REFERENCE = "dpdm/heun-18"
# (family, steps, extra sampler settings); the reference is EDM's deterministic 18-step Heun
CURVE: dict[str, list[tuple[str, int, dict[str, Any]]]] = {
    "dpdm": [
        *(("heun", n, {}) for n in (4, 6, 9, 18, 32)),
        *(("euler", n, {}) for n in (4, 8, 16, 32)),
        *(("dpmpp2m", n, {}) for n in (4, 6, 8, 10, 12)),
        ("heun-churn", 18, {"S_churn": 20.0}),
    ],
    "corrdiff": [("heun", 18, {}), ("dpmpp2m", 8, {}), ("dpmpp2m", 12, {})],
}
SOLVER = {"heun": "heun", "heun-churn": "heun", "euler": "ddim", "dpmpp2m": "dpmpp2m"}
CRPS_TOL, SSR_TOL, LSD_TOL = 0.03, 0.05, 0.10


def sampler_for(base: SamplerConfig, family: str, steps: int, extra: dict[str, Any]) -> SamplerConfig:
    """``base`` with a curve point's solver, steps and settings."""
    return base.model_copy(update={"solver": SOLVER[family], "num_steps": steps, **extra})


def sampler_of(base: SamplerConfig, label: str) -> SamplerConfig:
    """The sampler of a curve label ``method/family-steps``."""
    name, point = label.split("/")
    family, steps = point.rsplit("-", 1)
    extra = next(e for f, n, e in CURVE[name] if f == family and n == int(steps))
    return sampler_for(base, family, int(steps), extra)


def _curve_cases(
    base: SamplerConfig, methods: Sequence[str]
) -> dict[str, tuple[MethodConfig, SamplerConfig]]:
    """label -> (method config, sampler) of every curve point, plus the distilled student when shipped."""
    cases = {}
    for name in methods:
        for family, steps, extra in CURVE[name]:
            label = f"{name}/{family}-{steps}"
            # the network itself under every solver: a checkpoint's spread calibration is fitted for one sampler
            # (README "Spread calibration"), so no factors here
            spec = {"name": name, "checkpoint": str(CHECKPOINTS[name]), "spread_inflation": {}}
            cases[label] = (parse_config(spec), sampler_for(base, family, steps, extra))
    if "dpdm" in methods and CHECKPOINTS["distilled"].exists():
        # the student's own levels and solver come from its checkpoint (methods/dpdm.py distilled_sampler)
        spec = {"name": "dpdm", "checkpoint": str(CHECKPOINTS["distilled"]), "spread_inflation": {}}
        method = parse_config(spec)
        cases["dpdm/distilled-4"] = (method, base.model_copy(update={"solver": None, "num_steps": None}))
    return cases


def same_sample(part: dict[str, Any] | None, args: argparse.Namespace) -> bool:
    """Whether a recorded curve/confirm ``part`` was run on the months, members and threads ``args`` asks for
    (so its points and the new ones are comparable: same inputs and seeds)."""
    want = {"month_stride": args.month_stride, "members": args.members, "threads": args.threads}
    return bool(part) and part.get("settings") == want


def equal_skill(point: dict[str, Any], ref: dict[str, Any]) -> dict[str, bool]:
    """The three equal-skill tests of a curve point against the reference (module docstring)."""
    return {
        "crps_within_3pct": point["crps"] <= ref["crps"] * (1 + CRPS_TOL),
        "spread_skill_within_0.05": all(
            abs(point["per_variable"][v]["spread_skill_ratio"] - ref["per_variable"][v]["spread_skill_ratio"])
            <= SSR_TOL
            for v in ref["per_variable"]
        ),
        "lsd_within_ref_plus_10pct": all(
            point["per_variable"][v]["log_spectral_distance"]
            <= ref["per_variable"][v]["log_spectral_distance"] * (1 + LSD_TOL)
            for v in ref["per_variable"]
        ),
    }


def calibration_no_worse(point: dict[str, Any], ref: dict[str, Any]) -> bool:
    """Every variable's spread-skill ratio at most 0.05 further from 1 than the reference's."""
    return all(
        abs(point["per_variable"][v]["spread_skill_ratio"] - 1)
        <= abs(ref["per_variable"][v]["spread_skill_ratio"] - 1) + SSR_TOL
        for v in ref["per_variable"]
    )


def evaluation_config(args: argparse.Namespace, method: str) -> Any:
    """The evaluation config every part scores with (months, members, threads of ``args``)."""
    overrides = evaluation_overrides(
        [{"name": "bilinear"}],
        VARIABLES + (["pr"] if method == "corrdiff" else []),  # CorrDiff's checkpoint downscales pr too
        members=args.members,
        month_stride=args.month_stride,
        threads=args.threads,
        steps=18,
    ) + list(args.overrides)
    return load_config(None, overrides)


def run_curve(
    args: argparse.Namespace,
    method: str,
    cases: dict[str, tuple[MethodConfig, SamplerConfig]] | None = None,
) -> dict[str, Any]:
    """The curve points of one method (``--only``: those labels only), scored in one evaluation; ``cases``
    (label -> method config, sampler) replaces the curve's own (:func:`_curve_cases`)."""
    cfg = evaluation_config(args, method)
    cases = cases if cases is not None else _curve_cases(cfg.sampler, [method])
    if args.only:
        cases = {k: v for k, v in cases.items() if k in args.only}
    factories = {label: method_factory(m, s) for label, (m, s) in cases.items()}
    result = run_evaluation(cfg, methods=factories, log=lambda msg: print(msg, flush=True))
    seconds = {
        t["step"].removesuffix(" x8"): t["downscale_seconds"]
        for t in result.timings
        if "downscale_seconds" in t
    }
    points: dict[str, dict[str, Any]] = {}
    for r in result.records:
        p = points.setdefault(r["method"], {"per_variable": {}})
        p["per_variable"][r["variable"]] = {
            k: r[k] for k in ("crps", "mae", "spread_skill_ratio", "log_spectral_distance", "rmse")
        }
    for label, p in points.items():
        sampler = factories[label](8).sampler  # what the method really ran (a student's own levels)
        p["nfe"] = sampler.network_calls()
        p["checkpoint"] = checkpoint_id(cases[label][0].checkpoint)
        p["sampler"] = sampler.describe()
        for k in ("crps", "mae", "spread_skill_ratio", "log_spectral_distance"):  # overall: tas, uas, vas
            p[k] = float(np.mean([p["per_variable"][v][k] for v in VARIABLES]))
        p["downscale_seconds"] = seconds.get(label)
    return {
        "points": points,
        "months": result.months,
        "members": args.members,
        "command": command_line(),
        "settings": {"month_stride": args.month_stride, "members": args.members, "threads": args.threads},
        "notes": result.notes,
    }


def compare_to_reference(points: dict[str, dict[str, Any]]) -> None:
    """Add each point's equal-skill tests against its method's 18-step Heun (in place)."""
    for label, p in points.items():
        ref = points.get(label.split("/")[0] + "/heun-18")
        if ref is not None:
            tests = equal_skill(p, ref)
            p["equal_skill_tests"] = tests
            p["equal_skill"] = all(tests.values())
            p["calibration_no_worse"] = calibration_no_worse(p, ref)
            p["equal_or_better_skill"] = (
                tests["crps_within_3pct"] and tests["lsd_within_ref_plus_10pct"] and p["calibration_no_worse"]
            )
            p["crps_vs_heun18"] = p["crps"] / ref["crps"] - 1


def cheapest_equal_skill(
    points: dict[str, dict[str, Any]], method: str = "dpdm", verdict: str = "equal_skill"
) -> tuple[str | None, str | None]:
    """(cheapest sampler of the curve with ``verdict`` other than the reference, the distilled one if it has
    it); ``verdict``: ``equal_skill`` (the strict tests) or ``equal_or_better_skill``."""
    ok = [
        (p["nfe"], label)
        for label, p in points.items()
        if label.startswith(f"{method}/")
        and p.get(verdict)
        and "distilled" not in label
        and label != REFERENCE
    ]
    distilled = next((k for k, p in points.items() if "distilled" in k and p.get(verdict)), None)
    return (min(ok)[1] if ok else None), distilled


# -- calibrated: every sampler with its own spread inflation ---------------------------------------------
def shipped_fit(
    spec: MethodConfig, sampler: SamplerConfig, members: int, months: int
) -> dict[str, Any] | None:
    """The checkpoint's own spread calibration when it was fitted by the protocol asked for (the same sampler
    as ``build(spec, sampler)`` runs, ``members`` members on ``months`` validation months, the default seed),
    else None."""
    data = read_checkpoint(spec.checkpoint).metadata.data
    how = data.get("spread_calibration")
    if not how or "spread_inflation" not in data:
        return None
    ran = build(spec.model_copy(update={"spread_inflation": {}}), sampler).describe()["sampler"]
    protocol = (how.get("members"), len(how.get("months", ())), how.get("seed"), how.get("sampler"))
    if protocol != (members, months, FIT_SEED, ran):
        return None
    return {"spread_inflation": data["spread_inflation"], "spread_calibration": how}


def calibrated_cases(
    args: argparse.Namespace, cfg: Any
) -> tuple[dict[str, tuple[MethodConfig, SamplerConfig]], dict[str, dict[str, Any]]]:
    """(label -> method config with the factors fitted for its own sampler, sampler; label -> the fit) for
    the ``--only`` points: each is fitted on ``--fit-months`` validation months x ``--fit-members`` members
    with :func:`climrecon.tasks.calibrate.fit_spread_inflation` (the protocol the shipped checkpoints were
    calibrated with), or takes the checkpoint's own factors when they were fitted that way."""
    curve = _curve_cases(cfg.sampler, ["dpdm"])
    cases, fits = {}, {}
    for label in args.only:
        spec, sampler = curve[label]
        fitted = shipped_fit(spec, sampler, args.fit_members, args.fit_months)
        source = "the checkpoint's own calibration (same protocol)"
        if fitted is None:
            print(f"fitting the spread inflation of {label} on validation months", flush=True)
            fitted = fit_spread_inflation(
                spec.checkpoint,
                cfg=cfg,
                months=args.fit_months,
                members=args.fit_members,
                sampler=sampler,
                seed=FIT_SEED,
            )
            source = "fitted by this benchmark"
        factors = dict(fitted["spread_inflation"])
        cases[label] = (spec.model_copy(update={"spread_inflation": factors}), sampler)
        how = fitted["spread_calibration"]
        fits[label] = {
            "spread_inflation": factors,
            "source": source,
            "spread_skill_ratio_before": how["spread_skill_ratio_before"],
            "years": how.get("years"),
            "months": len(how["months"]),
            "members": how["members"],
            "seed": how["seed"],
        }
    return cases, fits


def run_calibrated(args: argparse.Namespace) -> dict[str, Any]:
    """The ``calibrated`` part: the ``--only`` DPDM points (with 18-step Heun) scored on the confirmation
    sample, each with the spread inflation fitted for its own sampler."""
    cases, fits = calibrated_cases(args, evaluation_config(args, "dpdm"))
    part = run_curve(args, "dpdm", cases)
    for label, p in part["points"].items():
        p["spread_inflation"] = fits[label]["spread_inflation"]
    part["fits"] = fits
    part["settings"] = {**part["settings"], "fit_months": args.fit_months, "fit_members": args.fit_members}
    return part


def merge_part(doc: dict[str, Any], key: str, part: dict[str, Any]) -> None:
    """Put ``part`` under ``doc[key]``, keeping the recorded part's points (and fits) that ``part`` did not
    rerun when both were run on the same sample (same settings: same months, members and seeds)."""
    earlier = doc.get(key)
    if earlier and earlier.get("settings") == part["settings"]:
        for sub in ("points", "fits"):
            if sub in part:
                part[sub] = {**earlier.get(sub, {}), **part[sub]}
        if part["command"] not in earlier["command"]:
            part["command"] = f"{earlier['command']} && {part['command']}"
    doc[key] = part


# -- speed -----------------------------------------------------------------------------------------------
def matmul_gflops(n: int = 1024, repeat: int = 3) -> float:
    """Best-of-``repeat`` float32 ``n x n`` matmul FLOP/s (GFLOP/s): the dense ceiling of this process."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = min(_seconds(lambda: a @ b) for _ in range(repeat))
    return 2 * n**3 / best / 1e9


def _seconds(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def speed_inputs(cfg: Any, months: int) -> Any:
    """Perfect-model x8 inputs of the first ``months`` held-out months (what the curve's evaluation feeds)."""
    from climrecon.methods.features import perfect_model_coarse
    from climrecon.tasks.evaluate import evaluation_data, perfect_model_inputs

    data_at, _ = evaluation_data(cfg, VARIABLES, None, with_static=True)
    here = data_at(8)
    held = here.held.isel(time=slice(0, months))
    return perfect_model_inputs(
        perfect_model_coarse(held, 8), here.grid, here.static, ["orog", "sftlf"], time_step=here.time_step
    )


def downscale_flops(method: Any, inputs: Any, members: int) -> int:
    """FLOPs of one ``method.downscale`` call (every network call of the sampler), counted on eager networks."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        method.downscale(inputs, members=members, seed=0)
    return int(counter.get_total_flops())


def best_batch(method: Any, batches: Sequence[int], matmul: float, repeat: int = 3) -> dict[str, Any]:
    """Patches per second of the method's network at each call size (median of ``repeat``), and the network's
    GFLOP/s there as a fraction of ``matmul`` (GFLOP/s)."""
    from torch.utils.flop_counter import FlopCounterMode

    unet = method.metadata.networks["denoiser"].unet
    p = method.patch
    rows, fraction = {}, {}
    for n in batches:
        call = (
            torch.randn(n, unet.out_channels, p, p),
            torch.full((n,), 0.5),
            torch.randn(n, unet.cond_channels, p, p),
            torch.rand(n),
        )
        with torch.no_grad():
            method.net(*call)
            sec = statistics.median(_seconds(lambda call=call: method.net(*call)) for _ in range(repeat))
            with FlopCounterMode(display=False) as counter:
                eager = method.net.net if isinstance(method.net, CompiledNetwork) else method.net
                eager(*call)  # counted eagerly: a compiled graph hides its ops
        rows[str(n)] = n / sec
        fraction[str(n)] = counter.get_total_flops() / sec / 1e9 / matmul
    best = max(rows, key=rows.get)
    return {
        "patches_per_s": rows,
        "network_fraction_of_matmul": fraction,
        "best": int(best),
        "device": str(method.device),
        "network": method.sampler.network,
    }


def decision_part(doc: dict[str, Any]) -> str | None:
    """The part whose equal-skill tests decide: ``calibrated`` (the samplers as the product runs them, each
    with its own spread inflation) when it holds 18-step Heun, else the confirmation run, else the curve."""
    if REFERENCE in doc.get("calibrated", {}).get("points", {}):
        return "calibrated"
    return next((part for part in ("confirm", "curve") if part in doc), None)


def decision_points(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The points of :func:`decision_part`."""
    part = decision_part(doc)
    return doc[part].get("points", {}) if part else {}


def shipped_default() -> str:
    """The curve label of DPDM's default sampler (``DPDM.default_sampler``)."""
    solver, steps = DPDM.default_sampler
    return f"dpdm/{solver}-{steps}"


def speed_choices(
    rows: dict[str, dict[str, Any]], points: dict[str, dict[str, Any]], default: str
) -> dict[str, Any]:
    """The samplers the verdicts of ``points`` choose and their speedups over 18-step Heun from the timed
    ``rows`` (label -> row; ``"label [mode]"`` for a network mode), so a later confirm run's verdicts pick
    from the same timings. A chosen sampler that was not timed has speedup None (rerun ``speed``)."""
    strict, distilled = cheapest_equal_skill(points)
    better, _ = cheapest_equal_skill(points, verdict="equal_or_better_skill")
    ref_rate = rows[REFERENCE]["months_x_members_per_hour"]

    def fastest(label: str | None) -> str | None:
        """The fastest network mode of ``label`` that was timed (modes are timed for the default only)."""
        timed = [k for k in rows if label and (k == label or k.startswith(f"{label} ["))]
        return max(timed, key=lambda k: rows[k]["months_x_members_per_hour"]) if timed else None

    def speedup(label: str | None) -> float | None:
        return rows[label]["months_x_members_per_hour"] / ref_rate if label else None

    chosen = distilled if distilled in rows else fastest(strict)
    chosen_better = fastest(better)
    fastest_mode = fastest(default)
    return {
        "cheapest_equal_skill": strict,
        "cheapest_equal_or_better_skill": better,
        "distilled_equal_skill": distilled is not None,
        "chosen_fastest": chosen,
        "speedup_at_equal_skill": speedup(chosen),
        "chosen_fastest_equal_or_better_skill": chosen_better,
        "speedup_at_equal_or_better_skill": speedup(chosen_better),
        "speedup_shipped_default": {k: speedup(k) for k in rows if k.split(" [")[0] == default},
        "speedup_distilled": speedup("dpdm/distilled-4" if "dpdm/distilled-4" in rows else None),
        "fastest_network_mode": fastest_mode,
        "flops_fraction_of_matmul_shipped_path": rows[fastest_mode]["fraction_of_matmul"]
        if fastest_mode
        else None,
    }


def run_speed(args: argparse.Namespace, points: dict[str, dict[str, Any]]) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    cfg = load_config(None, ["sampler.device=cpu"])
    strict, _ = cheapest_equal_skill(points)
    better, _ = cheapest_equal_skill(points, verdict="equal_or_better_skill")
    default = args.sampler or shipped_default()
    base = cfg.sampler

    def spec(label: str) -> MethodConfig:
        """The method of ``label`` with the spread inflation its deciding point was scored with (none: the
        network alone), so the timed path is the one whose skill decided."""
        which = "distilled" if "distilled" in label else "dpdm"
        factors = points.get(label, {}).get("spread_inflation", {})
        return parse_config(
            {"name": "dpdm", "checkpoint": str(CHECKPOINTS[which]), "spread_inflation": factors}
        )

    samplers: dict[str, tuple[MethodConfig, SamplerConfig]] = {
        label: (spec(label), sampler_of(base, label))
        for label in dict.fromkeys([REFERENCE, default, strict, better])
        if label
    }
    if CHECKPOINTS["distilled"].exists():
        student = spec("dpdm/distilled-4")
        samplers["dpdm/distilled-4"] = (student, base.model_copy(update={"solver": None, "num_steps": None}))
    for mode in args.modes:
        samplers[f"{default} [{mode}]"] = (
            samplers[default][0],
            samplers[default][1].model_copy(update={"network": mode}),
        )
    inputs = speed_inputs(cfg, args.months)
    methods = {label: build(m, s) for label, (m, s) in samplers.items()}
    flops = {
        label: downscale_flops(methods[label], inputs, args.members) for label in methods if "[" not in label
    }
    warm = {}
    for label, method in methods.items():  # warm-up: compile, caches, first-touch of weights
        warm[label] = _seconds(lambda method=method: method.downscale(inputs, members=args.members, seed=0))
        print(f"warm-up {label}: {warm[label]:.1f} s", flush=True)
    times: dict[str, list[float]] = {label: [] for label in methods}
    ceiling: list[float] = []
    for r in range(args.rounds):
        ceiling.append(matmul_gflops())
        for label, method in methods.items():
            times[label].append(
                _seconds(lambda method=method: method.downscale(inputs, members=args.members, seed=0))
            )
            print(f"round {r} {label}: {times[label][-1]:.1f} s", flush=True)
    ceiling.append(matmul_gflops())
    matmul = statistics.median(ceiling)
    work = args.months * args.members
    rows = {}
    for label, method in methods.items():
        sec = statistics.median(times[label])
        count = flops[label.split(" [")[0]]
        rows[label] = {
            "seconds": sec,
            "timings_s": times[label],
            "warmup_s": warm[label],
            "months_x_members_per_hour": work * 3600 / sec,
            "nfe": method.sampler.network_calls(),
            "network": method.sampler.network,
            "spread_inflation": samplers[label][0].spread_inflation,
            "gflop_per_downscale": count / 1e9,  # padded patches of a last partial call count too
            "achieved_gflops": count / sec / 1e9,
            "fraction_of_matmul": count / sec / 1e9 / matmul,
        }
    return {
        "rows": rows,
        "reference": REFERENCE,
        "shipped_default": default,
        **speed_choices(rows, points, default),
        "flops_fraction_of_matmul_by_mode": {
            k: v["fraction_of_matmul"] for k, v in rows.items() if k.split(" [")[0] == default
        },
        "matmul_gflops": {"median": matmul, "runs": ceiling, "n": 1024},
        "best_batch": {
            "cpu": {
                # a compiled network compiles once per call shape (minutes each): its shipped chunk only
                mode: best_batch(
                    methods[label],
                    (methods[label].sampler.max_patches_per_batch,)
                    if mode == "compile"
                    else (8, 16, 32, 64, 128),
                    matmul,
                )
                for mode, label in (("eager", default), *((m, f"{default} [{m}]") for m in args.modes))
                if label in methods
            }
        },
        "load_average": {"before": list(load_before), "after": list(os.getloadavg())},
        "months": args.months,
        "members": args.members,
        "rounds": args.rounds,
        "threads": args.threads,
        "command": command_line(),
    }


def figure(points: dict[str, dict[str, Any]]) -> str:
    curves: dict[str, dict[str, list[tuple[float, float]]]] = {}
    for label, p in points.items():
        family = label.rsplit("-", 1)[0]
        for score in ("crps", "mae", "spread_skill_ratio", "log_spectral_distance"):
            curves.setdefault(score, {}).setdefault(family, []).append((p["nfe"], p[score]))
    path = plots.plot_cost_curves(
        curves, FIGURE, title="NFE vs skill, x8 held-out months (mean over tas, uas, vas)"
    )
    return str(path.relative_to(REPO))


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="part", required=True)
    c = sub.add_parser("curve")
    add_evaluation_arguments(c, month_stride=20, members=4)
    c.add_argument("--methods", nargs="+", default=["dpdm", "corrdiff"], choices=sorted(CURVE))
    c.add_argument("--only", nargs="*", default=None, help="curve labels to (re)run; the others are kept")
    f = sub.add_parser("confirm")
    add_evaluation_arguments(f, month_stride=5, members=8)
    f.add_argument("--methods", nargs="+", default=["dpdm"], choices=sorted(CURVE))
    f.add_argument("--only", nargs="+", required=True, help="curve labels to confirm (with heun-18)")
    k = sub.add_parser("calibrated")
    add_evaluation_arguments(k, month_stride=5, members=8)
    k.add_argument("--only", nargs="+", required=True, help="DPDM curve labels (list dpdm/heun-18 too)")
    k.add_argument("--fit-months", type=int, default=30, help="validation months of each fit")
    k.add_argument("--fit-members", type=int, default=8, help="members of each fit")
    s = sub.add_parser("speed")
    s.add_argument("--months", type=int, default=4)
    s.add_argument("--members", type=int, default=4)
    s.add_argument("--rounds", type=int, default=3)
    s.add_argument("--threads", type=int, default=1)
    s.add_argument(
        "--modes", nargs="*", default=["channels_last", "compile"], help="network modes besides eager"
    )
    s.add_argument(
        "--sampler", default=None, help="curve label whose network modes are timed (default: DPDM's default)"
    )
    for p in (c, f, k, s):
        p.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    doc = json.loads(args.out.read_text()) if args.out.exists() else {}
    if args.part == "confirm":
        candidates, earlier = list(args.only), doc.get("confirm")
        for method in args.methods:  # written after each method; summarize applies the tests
            reference = f"{method}/heun-18"
            args.only = sorted({*candidates, reference})
            if same_sample(earlier, args) and reference in earlier["points"] and reference not in candidates:
                args.only.remove(reference)  # deterministic: the recorded reference of the same sample stands
            if not [c for c in args.only if c.startswith(f"{method}/")]:
                continue
            confirm = run_curve(args, method)
            if same_sample(earlier, args):  # one confirmation table: earlier points not rerun are kept
                confirm["points"] = {**earlier["points"], **confirm["points"]}
                if confirm["command"] not in earlier["command"]:
                    confirm["command"] = f"{earlier['command']} && {confirm['command']}"
            doc["confirm"] = earlier = confirm
            summarize(doc)
            write_results(args.out, doc)
    elif args.part == "calibrated":
        part = run_calibrated(args)
        # reread: a calibrated run of other points may have finished meanwhile (they run side by side)
        doc = json.loads(args.out.read_text()) if args.out.exists() else {}
        merge_part(doc, "calibrated", part)
        summarize(doc)
        write_results(args.out, doc)
    elif args.part == "curve":
        for i, method in enumerate(args.methods):  # written after each method
            curve = run_curve(args, method)
            extend = doc.get("curve") if (args.only or i) else None
            if extend:  # same months, members and seeds: extend the earlier curve
                if (extend["months"], extend["members"]) != (curve["months"], curve["members"]):
                    raise SystemExit("--only extends a curve of the same months and members; rerun it whole")
                curve["points"] = {**extend["points"], **curve["points"]}
                if curve["command"] not in extend["command"]:
                    curve["command"] = f"{extend['command']} && {curve['command']}"
            doc["curve"] = curve
            summarize(doc)
            write_results(args.out, doc)
    else:
        doc["speed"] = run_speed(args, decision_points(doc))
        summarize(doc)
        write_results(args.out, doc)
    print(
        json.dumps(
            {k: v for k, v in doc.items() if k not in ("curve", "confirm", "calibrated", "speed")},
            indent=1,
            default=str,
        )
    )


def summarize(doc: dict[str, Any]) -> None:
    """The issue's top-level keys from the two parts (and the multi-host benchmark's figures)."""
    for part in (
        "curve",
        "confirm",
        "calibrated",
    ):  # (re)apply the tests: the verdicts follow this file's rules
        compare_to_reference(doc.get(part, {}).get("points", {}))
    points = doc.get("curve", {}).get("points", {})
    decide = decision_points(doc)
    speed = doc.get("speed", {})
    doc["benchmark"] = (
        "issue 19: sampling cost, x8 perfect model on the synthetic reanalysis (NOT observations)"
    )
    doc["nfe"] = {k: p["nfe"] for k, p in points.items()}
    doc["crps"] = {k: p["crps"] for k, p in points.items()}
    doc["spread_skill_ratio"] = {k: p["spread_skill_ratio"] for k, p in points.items()}
    doc["log_spectral_distance"] = {k: p["log_spectral_distance"] for k, p in points.items()}
    doc["equal_skill"] = {k: p.get("equal_skill") for k, p in decide.items()}
    part = decision_part(doc)
    doc["equal_skill_decided_by"] = (
        f"{part}: {len(doc[part]['months'])} months x {doc[part]['members']} members"
        + (
            ", each sampler with the spread inflation fitted for it on validation months"
            if part == "calibrated"
            else ""
        )
        if part
        else None
    )
    for key, name in (("confirm", "network_only"), ("calibrated", "calibrated")):
        if key in doc and key != part:  # the other verdicts, side by side
            doc[f"equal_skill_{name}"] = {k: p.get("equal_skill") for k, p in doc[key]["points"].items()}
            doc[f"equal_or_better_skill_{name}"] = {
                k: p.get("equal_or_better_skill") for k, p in doc[key]["points"].items()
            }
    if "calibrated" in doc:
        doc["spread_inflation_by_sampler"] = {
            k: f["spread_inflation"] for k, f in doc["calibrated"]["fits"].items()
        }
    doc["equal_or_better_skill"] = {k: p.get("equal_or_better_skill") for k, p in decide.items()}
    cheapest, distilled = cheapest_equal_skill(decide)
    doc["cheapest_equal_skill_sampler"] = cheapest
    doc["cheapest_equal_or_better_skill_sampler"] = cheapest_equal_skill(
        decide, verdict="equal_or_better_skill"
    )[0]
    doc["distilled_equal_skill"] = distilled is not None
    if speed:  # the current verdicts choose from the recorded timings
        speed.update(speed_choices(speed["rows"], decide, speed["shipped_default"]))
        for key in (
            "speedup_at_equal_skill",
            "chosen_fastest",
            "speedup_at_equal_or_better_skill",
            "chosen_fastest_equal_or_better_skill",
            "speedup_shipped_default",
            "speedup_distilled",
            "flops_fraction_of_matmul_shipped_path",
        ):
            doc[key] = speed.get(key)
        doc["months_x_members_per_hour"] = {
            k: v["months_x_members_per_hour"] for k, v in speed["rows"].items()
        }
    multi = RESULTS / "multi_host.json"
    if multi.exists():
        mh = json.loads(multi.read_text())
        doc["multi_host"] = {**mh.get("multi_host", {}), "command": mh.get("command"), "source": multi.name}
    if points:
        doc["figure"] = figure(points)
    doc["gpu"] = (
        f"CUDA present ({torch.cuda.get_device_name(0)}) but this run measured the CPU"
        if torch.cuda.is_available()
        else "not lent: no GPU device was lent to this task (device status: not drawn); CPU figures only"
    )
    doc["commands"] = {
        "curve": doc.get("curve", {}).get("command"),
        "confirm": doc.get("confirm", {}).get("command"),
        "calibrated": doc.get("calibrated", {}).get("command"),
        "speed": speed.get("command"),
        "multi_host": doc.get("multi_host", {}).get("command"),
    }
    doc["command"] = " && ".join(v for v in doc["commands"].values() if v)
    doc["machine"] = machine()
    doc["versions"] = versions("torch", "numpy", "xarray", "dask")
    doc["peak_rss_mib"] = peak_rss_mib()


if __name__ == "__main__":
    main()
