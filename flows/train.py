"""Prefect flow ``train``: perfect-model training of the DPDM-style conditional patch diffusion model.

Thin wrapper: the data come from :mod:`climrecon.tasks.training_data`, the loop from
:func:`climrecon.models.trainer.train`. Writes the (resumable) training checkpoint at ``train.checkpoint``,
the inference-only copy beside it (``<stem>.ema.pt``, EMA weights + metadata) and the loss curve
(``<stem>.loss.png``); returns the training checkpoint path.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from prefect import flow, get_run_logger

from climrecon.catalogs.sample import STATIC_SOURCE_ID, SYNTHETIC_SOURCE_ID
from climrecon.config import ClimReconConfig, TrainSection, load_config
from climrecon.models.checkpoint import CheckpointMetadata, GridSpec, strip_training_state
from climrecon.models.edm import EDMConfig, EDMPrecond
from climrecon.models.normalization import NormalizationStats
from climrecon.models.trainer import TrainConfig, TrainResult, train
from climrecon.models.unet import UNet, UNetConfig, count_parameters
from climrecon.storage import public_url
from climrecon.tasks.conditioning import STATIC_SCALING, ConditioningSpec
from climrecon.tasks.grids import Grid
from climrecon.tasks.training_data import (
    PatchBatches,
    fit_target_normalization,
    open_truth,
    residual_target,
    perfect_model_pairs,
    select_years,
    static_for_truth,
)

__all__ = ["TrainingSetup", "default_truth_url", "default_static_url", "prepare_training", "build_model",
           "plot_loss_curve", "run_training", "train_flow"]



def _catalog_path(cfg: ClimReconConfig, source_id: str) -> str:
    import pandas as pd

    csv = cfg.sample_dir() / "catalog.csv"
    if not csv.is_file():
        raise FileNotFoundError(
            f"no sample catalog at {csv}; run `climrecon catalog build-sample` or set train.truth/train.static"
        )
    rows = pd.read_csv(csv)
    paths = rows.loc[rows["source_id"] == source_id, "path"].unique()
    if len(paths) != 1:
        raise FileNotFoundError(f"sample catalog {csv} lists {len(paths)} store(s) for source_id {source_id!r}")
    return str(paths[0]).removeprefix("file://")


def default_truth_url(cfg: ClimReconConfig) -> str:
    """``train.truth``, or the synthetic reanalysis of the sample catalog."""
    return cfg.train.truth or _catalog_path(cfg, SYNTHETIC_SOURCE_ID)


def default_static_url(cfg: ClimReconConfig) -> str:
    """``train.static``, or the global static store of the sample catalog."""
    return cfg.train.static or _catalog_path(cfg, STATIC_SOURCE_ID)


@dataclass
class TrainingSetup:
    batches: PatchBatches
    stats: NormalizationStats  # of what the network generates (residuals or full fields)
    cond_stats: NormalizationStats  # full-field statistics, for the coarse conditioning channels
    spec: ConditioningSpec
    grid: Grid
    data: dict[str, Any]  # labelled description of the training data (goes into the checkpoint)


def prepare_training(section: TrainSection, truth_url: str, static_url: str) -> TrainingSetup:
    """Training-year pairs, their statistics and the crop sampler; held-out years are never opened."""
    spec = ConditioningSpec(tuple(section.variables), section.factor, static_coarse=tuple(section.static_coarse))
    truth = select_years(open_truth(truth_url, spec.variables), section.train_years, f"truth store {truth_url}")
    static = static_for_truth(static_url, truth)
    target, cond = perfect_model_pairs(truth, static, spec)
    cond_stats = fit_target_normalization(target, spec.variables)
    if section.target == "residual":
        target = residual_target(target, cond, spec.variables)
    stats = fit_target_normalization(target, spec.variables)
    batches = PatchBatches.from_pairs(
        target, cond, spec, stats, patch_size=section.patch_size, batch_size=section.batch_size,
        seed=section.seed, cond_stats=cond_stats,
    )
    attrs = open_truth(truth_url, spec.variables).attrs
    data = {
        "truth": public_url(truth_url),
        "truth_title": attrs.get("title", ""),
        "synthetic": str(attrs.get("synthetic", "false")).lower() == "true",
        "static": public_url(static_url),
        "train_years": list(section.train_years),
        "validation_years": list(section.validation_years),
        "heldout_years": list(section.heldout_years),
        "months": int(target.sizes["time"]),
        "conditioning": "perfect model: truth coarsened by area means, bilinear back to the fine grid",
        "target": section.target,
        "conditioning_normalization": cond_stats.to_dict(),
        "static_scaling": {k: list(v) for k, v in STATIC_SCALING.items()},
    }
    return TrainingSetup(batches, stats, cond_stats, spec, Grid.from_dataset(truth, "truth"), data)


def build_model(section: TrainSection, n_cond: int) -> EDMPrecond:
    unet = UNetConfig(
        out_channels=len(section.variables),
        cond_channels=n_cond,
        base_channels=section.base_channels,
        channel_mults=tuple(section.channel_mults),
        num_blocks=section.num_blocks,
        attention_levels=tuple(section.attention_levels),
        mid_attention=section.mid_attention,
        dropout=section.dropout,
        time_harmonics=section.time_harmonics,
    )
    torch.manual_seed(section.seed)
    return EDMPrecond(UNet(unet), EDMConfig(section.sigma_data, section.P_mean, section.P_std))


def plot_loss_curve(losses: list[float], path: str | Path, title: str = "training loss") -> Path:
    """Per-step loss (faint) and its 50-step running mean, log scale, as a PNG (Agg canvas, no pyplot)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig = Figure(figsize=(6.4, 4.0))
    ax = fig.add_subplot()
    y = np.asarray(losses, dtype=float)
    steps = np.arange(1, y.size + 1)
    ax.plot(steps, y, color="0.75", lw=0.6, label="per step")
    if y.size >= 50:
        ax.plot(steps[49:], np.convolve(y, np.ones(50) / 50, mode="valid"), color="C0", label="50-step mean")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("EDM loss")
    ax.set_title(title)
    ax.legend()
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=100, format="png")
    return path


def run_training(cfg: ClimReconConfig, *, progress: bool = False, log: logging.Logger | None = None) -> TrainResult:
    """Everything but Prefect: data, model, training loop, inference copy, loss plot."""
    section = cfg.train
    torch.set_num_threads(section.threads)
    setup = prepare_training(section, default_truth_url(cfg), default_static_url(cfg))
    model = build_model(section, len(setup.spec.channel_names()))
    if log:
        log.info("UNet: %d parameters; %d training months", count_parameters(model), setup.data["months"])
    metadata = CheckpointMetadata(
        method="dpdm-residual" if section.target == "residual" else "dpdm",
        unet=model.net.config,
        edm=model.config,
        variables=setup.spec.variables,
        cond_channels=tuple(setup.spec.channel_names()),
        normalization=setup.stats,
        grid=GridSpec(
            fine_resolution=setup.grid.dlat,
            coarsening_factor=section.factor,
            patch_size=section.patch_size,
            region={"lat_min": setup.grid.south, "lat_max": setup.grid.north,
                    "lon_min": setup.grid.west, "lon_max": setup.grid.east},
        ),
        data=setup.data,
    )
    tcfg = TrainConfig(
        max_steps=section.max_steps,
        lr=section.lr,
        warmup_steps=section.warmup_steps,
        lr_schedule=section.lr_schedule,
        ema_halflife_steps=section.ema_halflife_steps,
        checkpoint_every=section.checkpoint_every,
        log_every=50,
        seed=section.seed,
        device=section.device,
    )
    on_log = (lambda r: log.info("step %d loss %.4f lr %.2e %.2f steps/s", r["step"], r["loss"], r["lr"],
                                 r["steps_per_s"])) if log else None
    ckpt = Path(section.checkpoint)
    result = train(model, setup.batches, tcfg, checkpoint_path=ckpt, metadata=metadata, progress=progress,
                   on_log=on_log)
    strip_training_state(ckpt, ckpt.with_suffix(".ema.pt"))
    plot_loss_curve(result.losses, ckpt.with_suffix(".loss.png"),
                    f"{'/'.join(section.variables)} x{section.factor}, {section.max_steps} steps")
    return result


@flow(name="train")
def train_flow(config_path: str | None = None, overrides: list[str] | None = None) -> str:
    """Train the model the ``train`` section describes; returns the training checkpoint path."""
    cfg = load_config(config_path, list(overrides or ()))
    result = run_training(cfg, log=get_run_logger())
    return str(result.checkpoint_path)


def main(argv: list[str] | None = None) -> None:
    """``python -m climrecon.flows.train [CONFIG] [--set key=value ...]``: the same run without Prefect
    (for long background training; logs to stderr)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m climrecon.flows.train", description=main.__doc__)
    parser.add_argument("config", nargs="?", default=None)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", force=True)  # Prefect set one up
    result = run_training(load_config(args.config, args.overrides), log=logging.getLogger("climrecon.train"))
    print(f"{result.checkpoint_path} {result.content_sha256} steps={result.step} seconds={result.seconds:.0f}")


if __name__ == "__main__":
    main()
