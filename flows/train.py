"""Prefect flow ``train``: train the configured method (``method:``) on the ``train:`` section's data.

Thin wrapper: the method's own recipe (e.g. :func:`climrecon.methods.dpdm.train`, registered with the
method) does the work. It writes the (resumable) training checkpoint at ``train.checkpoint``, the
inference-only copy beside it (``<stem>.ema.pt``) and the loss curve (``<stem>.loss.png``); the flow
returns the training checkpoint path.
"""

from __future__ import annotations

import logging
from pathlib import Path

from prefect import flow, get_run_logger

from climrecon.config import ClimReconConfig, load_config, resolve_config
from climrecon.methods import METHODS, MethodError
from climrecon.models.checkpoint import strip_training_state
from climrecon.models.trainer import TrainResult
from climrecon.tasks.plots import plot_loss_curve

__all__ = ["run_training", "train_flow"]


def run_training(
    cfg: ClimReconConfig, *, progress: bool = False, log: logging.Logger | None = None
) -> TrainResult:
    """The configured method's training recipe, then the inference copy and the loss curve; no Prefect."""
    entry = METHODS[cfg.method.name]
    recipe = entry.distill if cfg.train.distill is not None else entry.train
    if recipe is None:
        what = "cannot be distilled (train.distill)" if cfg.train.distill else "has nothing to train"
        raise MethodError(f"method {cfg.method.name!r} {what}; it is fitted, pretrained or guided")
    result = recipe(cfg, progress=progress, log=log)
    t, ckpt = cfg.train, Path(result.checkpoint_path)
    strip_training_state(ckpt, ckpt.with_suffix(".ema.pt"))
    plot_loss_curve(
        result.losses,
        ckpt.with_suffix(".loss.png"),
        f"{cfg.method.name} {'/'.join(cfg.train_variables())} x{t.factor}, {t.max_steps} steps",
    )
    return result


@flow(name="train")
def train_flow(
    config_path: str | None = None, overrides: list[str] | None = None, config: ClimReconConfig | None = None
) -> str:
    """Train the method the config describes; returns the training checkpoint path."""
    cfg = resolve_config(config, config_path, list(overrides or ()))
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
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(message)s", force=True
    )  # Prefect set one up
    result = run_training(load_config(args.config, args.overrides), log=logging.getLogger("climrecon.train"))
    print(
        f"{result.checkpoint_path} {result.content_sha256} steps={result.step} seconds={result.seconds:.0f}"
    )


if __name__ == "__main__":
    main()
