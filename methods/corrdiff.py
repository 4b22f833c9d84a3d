"""CorrDiff (Mardani et al., arXiv 2309.15214): a regression network predicts the conditional mean
``mu = E[x | y]``, an EDM diffusion model generates the residual ``r = x - mu``; member = ``mu + r``.

Both networks are the project's UNet inside EDM preconditioning, conditioned on the features DPDM sees
(:mod:`climrecon.methods.features`: the coarse fields on the fine grid, orog, orog_std, sftlf, the coarse
grid's views, position, time of year); the residual network also sees ``mu`` as extra channels. One
checkpoint holds both (roles ``regression`` and ``denoiser``).

Network space (one home for it): every variable is mapped with the full-field statistics of the training
years, ``z = (T(x) - mean) / std`` with ``T`` = log1p(x / 1 mm day-1) for pr, identity otherwise
(:class:`~climrecon.models.normalization.NormalizationStats`); the coarse channels ``z_c`` go through the same
map. In that space:

- the regression gives ``mu_z = z_c + s_reg * D_reg(0; sigma_fixed, cond)`` (``regression.target:
  residual``) or ``mu_z = s_reg * D_reg(...)`` (``full``), ``D_reg`` an :class:`EDMPrecond` evaluated at the
  fixed noise level :data:`~climrecon.models.edm.REGRESSION_SIGMA` on a zero input
  (:class:`~climrecon.models.edm.RegressionLoss`), tiled and blended over the whole domain once per month;
- the residual network generates ``(z - mu_z) / s_res`` with conditioning ``[<var>_coarse, <var>_mean, static,
  position]`` (``<var>_mean`` = ``mu_z``), sampled per member with the one tiled sampler;
- a member is ``denormalize(mu_z + f * s_res * r)``: pr comes back through expm1 clipped at 0, never negative;
  ``f`` is 1 unless the checkpoint carries calibrated ``data.spread_inflation`` (fitted on validation months
  by :mod:`climrecon.tasks.calibrate` so that the spread matches the error) or ``spread_inflation`` is set.

``regression_only: true`` gives the regression alone (deterministic; every member identical): the
"regression-only" product and baseline. Seeds: member ``m`` of month ``t`` starts from
``seed_for(seed, year * 12 + month - 1, m)`` exactly as DPDM.

Training (:func:`train`, the registered recipe; ``climrecon train`` with ``method.name: corrdiff``): stage 1
trains the regression (MSE, ``regression.max_steps``, role ``regression``); stage 2 computes ``mu`` for every
training month with the frozen EMA regression (tiled, blended, as at inference) and trains the residual EDM
model (``train.max_steps``, role ``denoiser``, ``P_mean`` 0.0 by default as in CorrDiff) with the regression
written unchanged into every checkpoint (``frozen``). Both stages resume from the one ``train.checkpoint``;
a finished regression stage is skipped.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
import xarray as xr
from pydantic import Field

from climrecon.methods.base import (
    Inputs,
    MethodError,
    SamplerConfig,
    member_indices,
)
from climrecon.methods.dpdm import (
    BIAS_CORRECTION_HELP,
    DPDM,
    STATIC_SCALING,
    EDMSection,
    InflatableConfig,
    _Section,
    build_model,
    grid_spec,
    train_config,
)
from climrecon.methods.features import (
    ConditioningSpec,
)
from climrecon.models.checkpoint import (
    CheckpointError,
    CheckpointMetadata,
    NetworkSpec,
    read_checkpoint,
)
from climrecon.models.edm import REGRESSION_SIGMA, EDMLoss, RegressionLoss
from climrecon.models.tiled import denoise_zero
from climrecon.models.tiling import Tiling, make_tiling
from climrecon.models.trainer import Batch

if TYPE_CHECKING:
    from climrecon.config import ClimReconConfig
    from climrecon.models.trainer import TrainResult

__all__ = [
    "CorrDiffConfig",
    "RegressionSection",
    "CorrDiff",
    "regression_mean",
    "denoiser_conditioning",
    "train",
    "ROLES",
]

ROLES = ("regression", "denoiser")
MEAN_SUFFIX = "_mean"
LOG_EVERY = 50  # training log interval (steps) of both stages


class RegressionSection(_Section):
    """The regression stage (training only; a checkpoint records what it was trained with)."""

    max_steps: int = Field(3000, ge=1, description="regression training steps (stage 1)")
    target: Literal["residual", "full"] = Field(
        "residual",
        description="what the regression predicts in network space: truth minus the coarse input, or truth",
    )
    lr: float | None = Field(None, gt=0, description="learning rate; default train.lr")


class CorrDiffConfig(InflatableConfig):
    """CorrDiff: regression mean + EDM residual diffusion (:class:`~climrecon.methods.dpdm.PatchModelConfig`:
    default checkpoint the one ``corrdiff-*.pt`` in ``<repo>/checkpoints/``)."""

    name: Literal["corrdiff"] = "corrdiff"
    # on by default, as DPDM's (README "Bias correction of the coarse input")
    bias_correction: bool = Field(True, description=BIAS_CORRECTION_HELP)
    regression_only: bool = Field(
        False, description="the regression mean alone (deterministic: every member is the mean)"
    )
    edm: EDMSection = EDMSection(P_mean=0.0)
    regression: RegressionSection = RegressionSection()


# -- the two networks in network space (training and inference share these) ------------------------------
@torch.no_grad()
def regression_mean(
    net: torch.nn.Module,
    z_cond: np.ndarray,
    toy: np.ndarray,
    tiling: Tiling,
    *,
    n_out: int,
    scale: Sequence[float],
    target: str,
    chunk: int = 32,
    months_per_call: int = 16,
    device: torch.device | str = "cpu",
) -> np.ndarray:
    """``mu_z`` [T, V, H, W] float32 of conditioning ``z_cond`` [T, C, H, W] (network space; the first ``n_out``
    channels are the coarse ones): the regression on every tile in calls of exactly ``chunk`` patches,
    blended over the domain with the tiling's weights, then scaled and (``target`` residual) added to ``z_c``."""
    scale_t = torch.tensor(list(scale), dtype=torch.float64).reshape(1, -1, 1, 1)
    d = denoise_zero(
        net,
        z_cond,
        toy,
        tiling,
        n_out=n_out,
        sigma=REGRESSION_SIGMA,
        chunk=chunk,
        months_per_call=months_per_call,
        device=device,
    )
    d = d * scale_t
    if target == "residual":
        d = d + torch.from_numpy(z_cond[:, :n_out]).to(torch.float64)
    return d.to(torch.float32).numpy()


def denoiser_conditioning(z_cond: np.ndarray, mu_z: np.ndarray) -> np.ndarray:
    """The residual network's conditioning: ``[<var>_coarse, <var>_mean, static..., position...]``."""
    n = mu_z.shape[1]
    return np.ascontiguousarray(np.concatenate([z_cond[:, :n], mu_z, z_cond[:, n:]], axis=1), np.float32)


def _check_data(metadata: CheckpointMetadata, path: str) -> dict[str, Any]:
    data = metadata.data
    missing = [k for k in ("regression_target", "regression_scale", "residual_scale") if k not in data]
    if missing or metadata.method != "corrdiff":
        raise MethodError(
            f"checkpoint {path} ({metadata.method}) is not a CorrDiff checkpoint: its data lacks {missing}"
        )
    return data


class CorrDiff(DPDM):
    """A trained CorrDiff checkpoint as a :class:`~climrecon.methods.base.Method` (module docstring)."""

    name = "corrdiff"
    # On the NFE-vs-skill curve (benchmarks/results/sampling_cost.json) 12 DPM-Solver++(2M) steps keep 18-step
    # Heun's CRPS and spread-skill but not its pr spectra (log-spectral distance 0.25 vs 0.17): Heun stays
    default_sampler: tuple[str, int] = ("heun", 18)

    def __init__(self, config: CorrDiffConfig, sampler: SamplerConfig):
        networks = self._load(config, sampler, roles=("regression",) if config.regression_only else ROLES)
        self.reg, self.net = networks["regression"], networks.get("denoiser")
        data = _check_data(self.metadata, self.checkpoint)
        self.reg_target = str(data["regression_target"])
        self.reg_scale = [float(s) for s in data["regression_scale"]]
        residual = data.get("residual_scale")  # None in a checkpoint still in its regression stage
        self.res_scale = [float(s) for s in residual] if residual else None
        self._set_inflation(config, sampled=not config.regression_only)
        self.needs = self._needs(stochastic=not config.regression_only)

    def mean(self, z_cond: np.ndarray, toy: np.ndarray, tiling: Tiling) -> np.ndarray:
        """``mu_z`` [T, V, H, W] of the months of ``z_cond`` (network space)."""
        return regression_mean(
            self.reg,
            z_cond,
            toy,
            tiling,
            n_out=len(self.variables),
            scale=self.reg_scale,
            target=self.reg_target,
            chunk=self.sampler.max_patches_per_batch,
            device=self.device,
        )

    def _physical(self, z: torch.Tensor | np.ndarray) -> np.ndarray:
        z = torch.as_tensor(z)
        x = self.metadata.normalization.denormalize(z.cpu().to(torch.float64), channel_dim=1)
        return x.numpy().astype(np.float32)

    def downscale(self, inputs: Inputs, members: int | Sequence[int] = 1, seed: int = 0) -> xr.Dataset:
        index = member_indices(members)
        inputs = self._corrected_inputs(inputs)
        _, _, z_cond, toy, tiling = self._network_inputs(inputs)
        mu_z = self.mean(z_cond, toy, tiling)  # once per time step, whatever the members
        if self.config.regression_only:
            out = np.empty((len(index), *mu_z.shape), np.float32)
            out[:] = self._physical(mu_z)[None]
        else:
            scale = [s * f for s, f in zip(self.res_scale, self.inflation, strict=True)]
            res = torch.tensor(scale, dtype=torch.float64).reshape(1, -1, 1, 1)

            def to_physical(t_idx: np.ndarray, r: torch.Tensor) -> np.ndarray:
                return self._physical(
                    torch.from_numpy(mu_z[t_idx]).to(torch.float64) + r.cpu().to(torch.float64) * res
                )

            out = self._sample(
                denoiser_conditioning(z_cond, mu_z),
                toy,
                tiling,
                inputs.time_index(),
                index,
                seed,
                to_physical,
            )
        return self._dataset(inputs, out, index, seed, regression_only=int(self.config.regression_only))

    def identity(self, members: int, seed: int) -> list[Any]:
        parts: list[Any] = [self.name, self.sha256, members, seed, self.patch, self.overlap]
        if self.correction is not None:
            parts.append("bias_correction")
        if self.config.regression_only:
            # the mean is deterministic: only the tiling's call shape can change its bytes
            return [*parts, "regression_only", self.sampler.max_patches_per_batch]
        if self.inflation_configured:  # the checkpoint's own factors are in its hash
            parts.append(self.inflation)
        return [*parts, self.sampler.sampling_kwargs()]

    def describe(self) -> dict[str, Any]:
        m = self.metadata
        kind = "regression only" if self.config.regression_only else "regression + residual diffusion"
        sampling = (
            "one deterministic regression call per tile"
            if self.config.regression_only
            else self.sampler.describe()
        )
        return {
            "method": self.name,
            "label": self.config.key,
            "stochastic": not self.config.regression_only,
            "variables": list(self.variables),
            "grid": m.grid.to_dict(),
            **self._seen(),
            "report": (
                f"{self.config.key}: checkpoint `{Path(self.checkpoint).name}` (corrdiff, {kind}, x{self.factor}, "
                f"regression {m.data.get('regression_stage', {}).get('steps', '?')} + residual step {m.step}, "
                f"regression target {self.reg_target}), {sampling}, overlap {self.overlap}"
                + ("" if self.config.regression_only else self._inflation_report())
                + (", quantile-mapping bias correction" if self.correction is not None else "")
            ),
            "spread_inflation": dict(zip(self.variables, self.inflation, strict=True)),
            "checkpoint": {
                "path": self.checkpoint,
                "sha256": self.sha256,
                "method": m.method,
                "step": m.step,
                "factor": self.factor,
                "variables": list(self.variables),
                "roles": list(m.roles),
                "train": m.train,
                "data": m.data,
                "grid": m.grid.to_dict(),
            },
            "regression_only": self.config.regression_only,
            "sampler": self.sampler.model_dump(mode="json"),
            "seeds": "seed_for(base_seed, year * 12 + month - 1, member)",
            "bias_correction": self.correction is not None,
        }


# -- training ----------------------------------------------------------------------------------------------
def _regression_batches(
    base: Any, n_out: int, scale: np.ndarray, target: str
) -> Callable[[int], Iterator[Batch]]:
    """The crop stream of ``base`` (a PatchBatches of full-field targets) with the regression's target."""
    s = torch.from_numpy(scale.astype(np.float32)).reshape(1, -1, 1, 1)

    def stream(first_step: int) -> Iterator[Batch]:
        step = first_step
        while True:
            b = base.batch(step)
            y = b.target - b.cond[:, :n_out] if target == "residual" else b.target
            yield Batch(
                target=(y / s).contiguous(), cond=b.cond, time_of_year=b.time_of_year, weight=b.weight
            )
            step += 1

    return stream


def _std(x: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
    """Per-variable std of [T, V, H, W] (float64) over the ``valid`` [H, W] cells (default all), floored so
    a constant field cannot divide by zero."""
    x = x.astype(np.float64)
    if valid is not None:
        x = np.where(valid, x, np.nan)
        return np.maximum(np.nanstd(x, axis=(0, 2, 3)), 1e-6)
    return np.maximum(x.std(axis=(0, 2, 3)), 1e-6)


def _curve(losses: Sequence[float], every: int = 50) -> list[float]:
    y = np.asarray(losses, dtype=float)
    n = y.size // every
    return [round(float(v), 6) for v in y[: n * every].reshape(n, every).mean(axis=1)] if n else []


def _train_config(section: Any, max_steps: int, lr: float) -> Any:
    """DPDM's :func:`~climrecon.methods.dpdm.train_config`, the warm-up kept shorter than a short stage."""
    warmup = min(section.warmup_steps, max_steps - 1) if max_steps > 1 else 0
    return train_config(section, max_steps, lr, warmup_steps=warmup, log_every=LOG_EVERY)


def _stage(checkpoint: Path) -> tuple[str | None, int]:
    """(role in training, step) of an existing training checkpoint; (None, 0) when there is none."""
    if not checkpoint.exists():
        return None, 0
    info = read_checkpoint(checkpoint).header.get("training")
    if info is None:
        raise CheckpointError(
            f"checkpoint {checkpoint} holds no training state (inference-only); cannot resume from it: "
            "remove it or set train.checkpoint to another path"
        )
    return str(info.get("role", "denoiser")), int(info["step"])


def train(cfg: ClimReconConfig, *, progress: bool = False, log: logging.Logger | None = None) -> TrainResult:
    """Train both CorrDiff networks of ``cfg.method`` on ``cfg.train`` into the one resumable
    ``train.checkpoint``: the regression (stage 1, skipped when finished), then the residual diffusion model
    with the regression frozen (stage 2). Returns stage 2's result."""
    from climrecon.methods.dpdm import prepare_training
    from climrecon.models.trainer import train as train_loop

    section, config = cfg.train, cfg.method
    torch.set_num_threads(section.threads)
    # full-field targets: the recipe forms both networks' targets itself
    setup = prepare_training(cfg, config, target="full")
    spec, base = setup.spec, setup.batches
    n_out, n_cond = len(spec.variables), len(spec.channel_names())
    ckpt = Path(section.checkpoint)
    reg_target = config.regression.target
    z_dyn = base.cond_dynamic  # coarse channels, then their climatology (if any)
    z_c = z_dyn[:, :n_out]
    reg_scale = _std(base.target - z_c, base.valid) if reg_target == "residual" else np.ones(n_out)
    data = {
        **setup.data,
        "target": "corrdiff",
        "static_scaling": {k: list(v) for k, v in STATIC_SCALING.items()},
        "regression_target": reg_target,
        "regression_scale": [float(s) for s in reg_scale],
        "regression_sigma": REGRESSION_SIGMA,
        "denoiser_channels": _denoiser_channel_names(spec),
    }
    reg_model = build_model(config, n_out, n_cond, section.seed)
    meta = CheckpointMetadata(
        method="corrdiff",
        networks={"regression": NetworkSpec.of(reg_model)},
        variables=spec.variables,
        cond_channels=tuple(spec.channel_names()),
        normalization=setup.stats,
        grid=grid_spec(setup, section.factor, config.patch_size),
        method_config=config.model_dump(mode="json", exclude={"checkpoint", "label", "regression_only"}),
        data={**data, "residual_scale": None},
    )

    def on_log(stage: str) -> Callable[[dict[str, float]], None] | None:
        if not log:
            return None
        return lambda r: log.info(
            "%s step %d loss %.4f lr %.2e %.2f steps/s",
            stage,
            r["step"],
            r["loss"],
            r["lr"],
            r["steps_per_s"],
        )

    role, _ = _stage(ckpt)
    if role not in (None, *ROLES):
        raise CheckpointError(f"checkpoint {ckpt} is training a network {role!r}; CorrDiff trains {ROLES}")
    # -- stage 1: the regression (skipped when the checkpoint is already in stage 2) --
    reg_steps = config.regression.max_steps
    if role != "denoiser":
        if log:
            log.info(
                "stage 1 (regression, target %s): %d parameters, %d training months, %d steps",
                reg_target,
                sum(p.numel() for p in reg_model.parameters()),
                setup.data["months"],
                reg_steps,
            )
        stage1 = train_loop(
            reg_model,
            _regression_batches(base, n_out, reg_scale, reg_target),
            _train_config(section, reg_steps, config.regression.lr or section.lr),
            loss=RegressionLoss(),
            checkpoint_path=ckpt,
            metadata=meta,
            role="regression",
            arrays=setup.arrays(),
            progress=progress,
            on_log=on_log("regression"),
        )
        reg_summary = {
            "steps": stage1.step,
            "loss_every_50": _curve(stage1.losses),
            "final_loss_50": float(np.mean(stage1.losses[-50:])),
        }
    contents = read_checkpoint(ckpt)
    if role == "denoiser":
        reg_summary = contents.metadata.data["regression_stage"]
    frozen = {"regression": contents.ema_states()["regression"]}
    reg_net = NetworkSpec.of(reg_model).build()
    reg_net.load_state_dict(frozen["regression"], strict=True)
    reg_net.eval().requires_grad_(False)
    # -- stage 2: mu of every training month (tiled, blended, as at inference), residual diffusion --
    z_full = np.concatenate(
        [z_dyn, np.broadcast_to(base.cond_static, (z_c.shape[0], *base.cond_static.shape))], axis=1
    )
    tiling = make_tiling(setup.grid.nlat, setup.grid.nlon, config.patch_size, config.patch_size // 4)
    mu_z = regression_mean(
        reg_net, z_full, base.time_of_year, tiling, n_out=n_out, scale=reg_scale, target=reg_target
    )
    del z_full
    residual = base.target - mu_z
    res_scale = _std(residual, base.valid)
    if log:
        log.info(
            "regression mean of %d training months: residual std %s (network space; 1 = the field's std)",
            mu_z.shape[0],
            np.round(res_scale, 4).tolist(),
        )
    res_batches = type(base)(
        target=np.ascontiguousarray((residual / res_scale.reshape(1, -1, 1, 1)).astype(np.float32)),
        cond_dynamic=np.ascontiguousarray(np.concatenate([z_c, mu_z, z_dyn[:, n_out:]], axis=1)),
        cond_static=base.cond_static,
        time_of_year=base.time_of_year,
        years=base.years,
        patch_size=base.patch_size,
        batch_size=base.batch_size,
        seed=section.seed + 1,
        valid=base.valid,
    )
    den_model = build_model(config, n_out, n_cond + n_out, section.seed + 1)
    meta2 = replace(
        meta,
        networks={"regression": meta.networks["regression"], "denoiser": NetworkSpec.of(den_model)},
        data={
            **data,
            "residual_scale": [float(s) for s in res_scale],
            "regression_stage": reg_summary,
        },
    )
    if log:
        log.info(
            "stage 2 (residual diffusion, P_mean %g): %d parameters, %d steps",
            config.edm.P_mean,
            sum(p.numel() for p in den_model.parameters()),
            section.max_steps,
        )
    return train_loop(
        den_model,
        res_batches,
        _train_config(section, section.max_steps, section.lr),
        loss=EDMLoss(den_model.config),
        checkpoint_path=ckpt,
        metadata=meta2,
        role="denoiser",
        frozen=frozen,
        arrays=setup.arrays(),
        resume=_stage(ckpt)[0] == "denoiser",
        progress=progress,
        on_log=on_log("residual"),
    )


def _denoiser_channel_names(spec: ConditioningSpec) -> list[str]:
    names = spec.channel_names()
    n = len(spec.variables)
    return names[:n] + [f"{v}{MEAN_SUFFIX}" for v in spec.variables] + names[n:]


def _register() -> None:
    from climrecon.methods import register

    register(
        CorrDiffConfig,
        CorrDiff,
        "CorrDiff: UNet regression mean + EDM residual diffusion (regression_only: the mean alone)",
        needs="coarse fields on the fine grid; orog, orog_std, sftlf (+ coarse views); the checkpoint's factor",
        train=train,
    )


_register()
