"""Spread calibration: a per-variable inflation of a method's generated part, fitted on validation months.

An ensemble whose spread is smaller than the error of its mean (spread-skill ratio below 1) is over-confident.
For a method whose members are a deterministic conditional mean plus a generated part (CorrDiff: member =
``mu + f * s * r``, ``mu`` its regression; DPDM: member = ``c + f * (z - c)`` in network space, ``c`` its
sampler's solution from a zero latent, the same for every member), the factor ``f`` scales every member's
deviation, hence the spread, and leaves the mean where it is (CorrDiff) or close to it (DPDM). Under that
model (truth = mu + e, members = mu + f r_i, e and r independent and zero-mean), the spread-skill ratio of an
M-member ensemble is
``SSR(f)^2 = (M + 1) f^2 var(r) / (M var(e) + f^2 var(r))``, so the ratio ``SSR_1`` measured with ``f = 1``
gives the calibrating factor in closed form (:func:`inflation_factor`):

    f = sqrt(((M + 1) / SSR_1^2 - 1) / M)        (SSR(f) = 1)

:func:`fit_spread_inflation` samples the method with no inflation on VALIDATION months (never the held-out
ones), measures ``SSR_1`` per variable with :func:`climrecon.tasks.metrics.spread_skill_ratio`, and
:func:`write_calibrated` stores the factors in a copy of the checkpoint (``data.spread_inflation``, with how
they were fitted in ``data.spread_calibration``); the method applies them from then on.

    python -m climrecon.tasks.calibrate outputs/train/corrdiff-westus-x8.ema.pt checkpoints/corrdiff-westus-x8.pt \
        --members 8 --steps 12

A generated part's spread depends on the sampler (its solver and steps): fit with the sampler you run
(``--steps``, ``--solver``); the fit records it in ``data.spread_calibration.sampler``.

With a ``data:`` section in ``--config`` (the user's own fine data) the fit uses its ``validation`` selection,
grid and valid-cell mask (:func:`climrecon.tasks.evaluate.data_section_inputs`) instead of ``train.truth`` and
validation years; without ``data.validation`` it refuses, naming it.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from climrecon.config import ClimReconConfig, SamplerConfig, load_config
from climrecon.methods import MethodError, build, parse_config
from climrecon.models.checkpoint import read_checkpoint, save_checkpoint
from climrecon.tasks import metrics
from climrecon.tasks.evaluate import (
    EvaluationError,
    data_section_inputs,
    heldout_inputs,
    time_label,
    use_threads,
)
from climrecon.tasks.training_data import default_static_url, default_truth_url

__all__ = ["FIT_SEED", "inflation_factor", "method_of", "fit_spread_inflation", "write_calibrated", "main"]

BOUNDS = (0.5, 2.0)  # a factor outside these says the model is wrong, not under-dispersed
FIT_SEED = 20261202  # the members' seed of every fit (the shipped checkpoints' calibrations used it)


def inflation_factor(ssr: float, members: int, bounds: tuple[float, float] = BOUNDS) -> float:
    """The factor ``f`` that brings an ``members``-member ensemble of spread-skill ratio ``ssr`` (measured
    at ``f = 1``) to 1 (module docstring), clipped to ``bounds``."""
    if not (ssr > 0 and members >= 2):
        raise ValueError(f"need a positive spread-skill ratio and >= 2 members, got {ssr} and {members}")
    ratio = ((members + 1) / ssr**2 - 1) / members  # var(e) / var(r)
    return float(min(max(math.sqrt(max(ratio, 0.0)), bounds[0]), bounds[1]))


def method_of(label: str) -> str:
    """The registered method a checkpoint's ``metadata.method`` label belongs to (``dpdm-residual``: dpdm)."""
    return label.split("-", 1)[0]


def _inflatable(name: str) -> bool:
    """Whether the registered method ``name`` takes ``spread_inflation`` in its config."""
    try:
        config = parse_config({"name": name})
    except Exception:  # noqa: BLE001 - not a registered method name: not calibratable
        return False
    return "spread_inflation" in type(config).model_fields


def fit_spread_inflation(
    checkpoint: str | Path,
    *,
    cfg: ClimReconConfig | None = None,
    years: tuple[int, int] | None = None,
    months: int | None = None,
    members: int = 8,
    sampler: SamplerConfig | None = None,
    seed: int = FIT_SEED,
) -> dict[str, Any]:
    """Sample ``checkpoint``'s method with no inflation on ``months`` months spread over ``years`` (default:
    every month of the checkpoint's validation years) of ``cfg``'s fine truth, or over ``data.validation``
    when ``cfg`` has a ``data:`` section, and return ``{"spread_inflation": {var: f}, "spread_calibration":
    {how it was fitted; the spread-skill ratio, CRPS and ensemble-mean MAE before}}``."""
    cfg = cfg or load_config()
    meta = read_checkpoint(checkpoint).metadata
    name = method_of(meta.method)
    if not _inflatable(name):
        raise MethodError(
            f"checkpoint {checkpoint} is a {meta.method!r} model; spread calibration applies to methods whose "
            "config takes spread_inflation (a conditional mean plus a generated part: dpdm, corrdiff)"
        )
    if cfg.data is not None and years:
        raise MethodError(
            "years select years of train.truth; with a data: section the fit uses data.validation instead"
        )
    years = years or tuple(meta.data.get("validation_years") or ())
    if cfg.data is None and len(years) != 2:
        raise MethodError(f"checkpoint {checkpoint} records no validation years: pass years=(first, last)")
    use_threads(cfg.evaluate.threads)  # as the evaluation does
    sampler = sampler or SamplerConfig(device="cpu")
    unit = {v: 1.0 for v in meta.variables}
    spec = {"name": name, "checkpoint": str(checkpoint), "spread_inflation": unit, "bias_correction": False}
    method = build(spec, sampler)
    if cfg.data is not None:  # the user's own fine data: its validation selection, mask and grid
        try:
            truth, inputs = data_section_inputs(method, cfg, "validation", months)
        except EvaluationError as exc:
            raise MethodError(f"spread calibration of {checkpoint}: {exc}") from None
        period: dict[str, Any] = {"data_validation": cfg.data.validation.describe()}
    else:
        truth, inputs = heldout_inputs(method, default_truth_url(cfg), default_static_url(cfg), years, months)
        period = {"years": list(years)}
    ensemble = method.downscale(inputs, members=members, seed=seed)
    ssr = {v: float(metrics.spread_skill_ratio(ensemble[v], truth[v])) for v in meta.variables}
    crps = {v: float(metrics.crps(ensemble[v], truth[v])) for v in meta.variables}
    mae = {v: float(metrics.mae(ensemble[v].mean("member"), truth[v])) for v in meta.variables}
    return {
        "spread_inflation": {v: round(inflation_factor(r, members), 4) for v, r in ssr.items()},
        "spread_calibration": {
            "rule": "f = sqrt(((M + 1) / SSR^2 - 1) / M), clipped to [0.5, 2] (climrecon.tasks.calibrate)",
            "spread_skill_ratio_before": ssr,
            "crps_before": crps,  # of the uncalibrated ensemble: compare checkpoints on validation months
            "ensemble_mean_mae_before": mae,
            **period,
            "months": [time_label(t, inputs.time_step) for t in truth["time"].values],
            "members": members,
            "seed": seed,
            "sampler": method.describe()["sampler"],
        },
    }


def write_calibrated(src: str | Path, dst: str | Path, fitted: Mapping[str, Any]) -> str:
    """Write ``dst``: the inference copy of ``src`` (weights, arrays, metadata) with ``fitted`` (what
    :func:`fit_spread_inflation` returns) merged into its ``data``; returns the new content hash."""
    contents = read_checkpoint(src)
    meta = contents.metadata
    data = {
        **meta.data,
        **fitted,
        "spread_calibration": {
            **fitted["spread_calibration"],
            "source": {"file": Path(src).name, "content_sha256": contents.header["content_sha256"]},
        },
    }
    return save_checkpoint(dst, contents.ema_states(), replace(meta, data=data), arrays=contents.arrays())


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m climrecon.tasks.calibrate",
        description="Fit a checkpoint's spread inflation on its validation months and write a calibrated copy.",
    )
    parser.add_argument("checkpoint", type=Path, help="the trained checkpoint (read only)")
    parser.add_argument("out", type=Path, help="the calibrated copy to write")
    parser.add_argument(
        "--config", type=Path, default=None, help="config whose fine truth (train.truth or data:) is used"
    )
    parser.add_argument(
        "--years",
        default=None,
        help="FIRST,LAST of train.truth (default: the checkpoint's validation years; not with a data: section)",
    )
    parser.add_argument(
        "--months",
        type=int,
        default=None,
        help="time steps spread over the years or data.validation (default: every one of them)",
    )
    parser.add_argument("--members", type=int, default=8)
    parser.add_argument("--steps", type=int, default=None, help="sampler steps (default: the method's)")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads on CPU (default: the config's evaluate.threads)",
    )
    parser.add_argument(
        "--solver", choices=["heun", "ddim", "dpmpp2m"], default=None, help="sampler (default: the method's)"
    )
    args = parser.parse_args(argv)
    years = tuple(int(y) for y in args.years.split(",")) if args.years else None
    fitted = fit_spread_inflation(
        args.checkpoint,
        cfg=load_config(args.config, [f"evaluate.threads={args.threads}"] if args.threads else []),
        years=years,
        months=args.months,
        members=args.members,
        sampler=SamplerConfig(device="cpu", num_steps=args.steps, solver=args.solver),
    )
    digest = write_calibrated(args.checkpoint, args.out, fitted)
    how = fitted["spread_calibration"]
    for v, f in fitted["spread_inflation"].items():
        print(
            f"{v}: spread-skill {how['spread_skill_ratio_before'][v]:.3f} -> inflation {f:.4f} (uncalibrated CRPS {how['crps_before'][v]:.4g}, "
            f"ensemble-mean MAE {how['ensemble_mean_mae_before'][v]:.4g})"
        )
    print(f"wrote {args.out} (content_sha256 {digest})")


if __name__ == "__main__":
    main()
