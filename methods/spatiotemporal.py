"""Spatiotemporally coherent downscaling (Schmidt et al., arXiv 2412.15361; schmidtjonathan/Climate2Weather).

A prior over WINDOWS of ``window`` consecutive months (role ``denoiser``: an EDM patch model of the fine
fields of k months stacked time-major along channels, conditioned only on terrain, land fraction, position
and the time of year of the window's centre, no coarse input) is sampled as a whole sequence:

- Sequence denoiser (:class:`climrecon.models.windows.WindowDenoiser`): at every sampler step each month's
  denoised estimate comes from the window centred on it (the first/last ``window // 2`` months from the
  first/last window), as the reference code does, so consecutive months share one score model and their
  fine-scale detail is coherent in time.
- Observation model ``A = T o S``: ``S`` ZSSD's unified-coordinate operator on the input's own coarse cells
  (:func:`climrecon.methods.zssd.observation_operator`; ``guidance: dps`` gives the plain area mean), ``T``
  the temporal aggregation that matches the input's time step: identity for monthly input, the mean of the
  12 months of each year for annual input (:class:`~climrecon.models.operators.GroupMean`); an annual input
  then gives MONTHLY members (12 per input step).
- Likelihood (Climate2Weather's ``condition_on``; :class:`~climrecon.models.guidance.GuidedDenoiser` with
  ``noise``): ``log p(y | x_t) ~ -||y - A x0||^2_W / 2 (sigma_y^2 + g v(sigma))``, ``g = ||A^T W A||``,
  ``v`` the variance of x0 given x_t, isotropic Jacobian (no backprop through the network:
  ``use_exact_grad: false``). ``likelihood_std`` is ``sigma_y`` in normalised units (default 0: exact
  observations, where the rule is ZSSD's step ``zeta / ||A^T W A||``); ``zeta`` scales the step (1 = the
  Gaussian rule; default 1.5 as ZSSD's; both picked by a sweep on validation years).
- Bias correction (``bias_correction: true``, default): before guidance, the coarse input is quantile-mapped
  toward the fine truth's coarse view per calendar month and coarse cell over the fit years (the training
  years the input also covers; annual input against the truth's annual means), with the project's one
  empirical quantile mapping (:mod:`climrecon.methods.bias_correction`, shared with DPDM, CorrDiff and ZSSD's
  ``bias_correction``; the same mapping as the ``qm``/``bcsd`` baselines; xsdba was measured too heavy for
  this stack, see :mod:`climrecon.methods.baselines`); fitted once per
  process from the stage's fit data (``Needs.fit_model``: the input's own fields over those years), its
  record (period, quantiles, mean adjustment per month, hash of the fitted quantiles) goes into the member
  store's provenance (:meth:`SpatioTemporal.fitted`).

Long sequences are split by the downscale stage into units of ``downscale.months_per_unit`` input steps with
``halo`` months of context on each side (``Needs.time_halo``; the stage reads whole input steps: 6 months of
monthly input, 1 year of annual input), and only each unit's own steps are written, so bytes depend on the
configured unit length, never on the number of workers.

Training (:func:`train`): the project's trainer on windows of the fine truth's training years, drawn at batch
time from the monthly array (never materialised k times), ``configs/train-spatiotemporal-westus.yaml``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
import xarray as xr
from pydantic import Field

from climrecon.methods.base import (
    Inputs,
    MethodError,
    Needs,
    SamplerConfig,
    item_seeds,
    member_indices,
    month_starts,
)
from climrecon.methods.dpdm import prepare_training, train_denoiser
from climrecon.methods.zssd import ZETA, ZSSD, ZSSDConfig
from climrecon.models.guidance import GuidedDenoiser
from climrecon.models.operators import GroupMean
from climrecon.models.tiled import sample_tiled

if TYPE_CHECKING:
    from climrecon.config import ClimReconConfig
    from climrecon.models.trainer import TrainResult

__all__ = ["SpatioTemporalConfig", "SpatioTemporal", "train"]

PRIOR_LABEL = "spatiotemporal-prior"
# sigma_y (normalised units): on validation months 2006-2007 (x8, 2 members, 12 steps) sigma_y 0 / 0.05 with
# zeta 1 / 1.5 gave CRPS 0.436 / 0.431 / 0.453 / 0.439 (benchmarks/spatiotemporal.py sweep): exact observations
LIKELIHOOD_STD = 0.0
HALO = 6  # months of context on each side of a unit (the stage rounds up to whole input steps)


class SpatioTemporalConfig(ZSSDConfig):
    """A window prior (:class:`ZSSDConfig`'s checkpoint and guidance keys) sampled as whole sequences."""

    name: Literal["spatiotemporal"] = "spatiotemporal"  # type: ignore[assignment]
    window: int = Field(5, ge=3, description="consecutive time steps of the prior's windows (odd; training)")
    likelihood_std: float = Field(
        LIKELIHOOD_STD, ge=0, description="observation error sigma_y (normalised units) of the likelihood"
    )
    bias_correction: bool = Field(
        True,
        description="quantile-map the coarse input toward the truth's coarse view per calendar month over "
        "the fit years (empirical quantile mapping) before guidance",
    )
    halo: int | None = Field(
        None,
        ge=0,
        description="months of context read on each side of a downscale unit (rounded up to whole input "
        "steps: default 6, i.e. 6 months of monthly input, 1 year of annual input)",
    )


def train(cfg: ClimReconConfig, *, progress: bool = False, log: logging.Logger | None = None) -> TrainResult:
    """Train the window prior of ``cfg.method`` on ``cfg.train``: windows of ``method.window`` consecutive
    fine fields, conditioned on terrain, land fraction, position and the centre's time of year only."""
    method = cfg.method
    if method.window % 2 == 0:
        raise MethodError(f"method.window must be odd (a centre step), got {method.window}")
    torch.set_num_threads(cfg.train.threads)
    setup = prepare_training(cfg, method, target="full", coarse=False, window=method.window)
    data = {
        "conditioning": "prior over windows: static fields, position and the centre's time of year only",
        "window": method.window,
    }
    return train_denoiser(cfg, setup, PRIOR_LABEL, data=data, progress=progress, log=log)


class SpatioTemporal(ZSSD):
    """A window prior sampled as whole sequences, guided toward the (bias-corrected) coarse input (module
    docstring)."""

    name = "spatiotemporal"

    def __init__(self, config: SpatioTemporalConfig, sampler: SamplerConfig):
        super().__init__(config, sampler)
        self.window = int(self.metadata.data.get("window", 1))
        if self.window < 3:
            raise MethodError(
                f"checkpoint {self.checkpoint} is a prior of single time steps ({self.metadata.method}); the "
                "spatiotemporal method samples a prior over windows (configs/train-spatiotemporal-westus.yaml), "
                "or use method zssd with this one"
            )
        self.needs = Needs(
            static=tuple(self.spec.static_names()),
            stochastic=True,
            coarse=True,
            fit=config.bias_correction,
            fit_model=config.bias_correction,
            time_halo=config.halo if config.halo is not None else HALO,
            refine={"year": ("month", 12)} if self.time_step == "month" else {},
        )

    # -- bias correction (methods/bias_correction.py; fit, fitted and corrected are DPDM's) --
    def fit(
        self, coarse_train: xr.Dataset, fine_train: xr.Dataset, model_train: xr.Dataset | None = None
    ) -> SpatioTemporal:
        """The quantile mapping of the coarse model toward the truth's coarse view ``coarse_train`` per
        calendar month (per cell), fitted on ``model_train``: the coarse input's own fields over the same years
        (None: the input is the truth's coarse view itself, a perfect model). Annual model fields are mapped
        toward the truth's annual means. A prior needs no other fit data."""
        if self.correction is not None:
            self.correction.fit(coarse_train, model_train)
        return self

    # -- sampling --
    def downscale(self, inputs: Inputs, members: int | Sequence[int] = 1, seed: int = 0) -> xr.Dataset:
        """Members as whole sequences: monthly members for monthly and for annual input (12 per year)."""
        index = member_indices(members)
        inputs = self._corrected_inputs(inputs)
        _, _, z_cond, toy, tiling = self._network_inputs(inputs)
        present = self.observed(inputs)
        coarse = inputs.coarse[present].transpose("time", "lat", "lon").load()
        a, y_obs, weight, gram = self.guidance_target(inputs, coarse)
        k = self.steps_per_input(inputs)
        self._check_consecutive(inputs)
        time_index = inputs.time_index()
        if k > 1:
            z_cond = np.repeat(z_cond, k, axis=0)
            toy = np.tile(((np.arange(1, 13) - 0.5) / 12).astype(np.float32), len(time_index))
            time_index = [i - i % 12 + m for i in time_index for m in range(12)]
        n = len(time_index)
        if n < self.window:
            raise MethodError(
                f"spatiotemporal: the input has {n} time steps, fewer than the prior's window of {self.window}: "
                f"downscale at least {self.window} consecutive steps together"
            )
        cfg, stats = self.config, self.metadata.normalization
        seeds = item_seeds(seed, time_index, index)  # member-major: each member's n steps in a row
        per_call = max(1, self.config.items_per_call // n)
        out = np.empty((len(index), n, len(self.variables), tiling.height, tiling.width), np.float32)
        zeta = cfg.zeta or ZETA
        for m0 in range(0, len(index), per_call):
            b = min(per_call, len(index) - m0)
            target = torch.from_numpy(np.tile(y_obs, (b, 1, 1, 1)))
            w = torch.from_numpy(np.tile(weight, (b, 1, 1, 1)))

            def wrap(denoise, target=target, w=w):
                return GuidedDenoiser(
                    denoise,
                    GroupMean(a, k),
                    target,
                    weight=w,
                    zeta=zeta,
                    loss="mse",
                    jacobian=cfg.resolved_jacobian(),
                    shape=(tiling.height, tiling.width),
                    # Gaussian likelihood: sigma_y^2 + ||A^T W A|| v(sigma); the group mean divides A's norm by k
                    noise=(cfg.likelihood_std, gram / k),
                )

            z = sample_tiled(
                self.net,
                torch.from_numpy(np.tile(z_cond, (b, 1, 1, 1))),
                torch.from_numpy(np.tile(toy, b)),
                tiling,
                seeds=seeds[m0 * n : (m0 + b) * n],
                out_channels=len(self.variables),
                device=self.device,
                wrap=wrap,
                window=self.window,
                sequence_length=n,
                **self.sampler.sampling_kwargs(),
            )
            x = stats.denormalize(z.cpu().to(torch.float64), channel_dim=1).numpy().astype(np.float32)
            out[m0 : m0 + b] = x.reshape(b, n, *x.shape[1:])
        keep = [self.variables.index(v) for v in present]
        result = self._dataset(
            inputs if k == 1 else _monthly(inputs),
            out[:, :, keep],
            index,
            seed,
            present,
            guidance=cfg.guidance,
            window=self.window,
            likelihood_std=cfg.likelihood_std,
            months_per_input_step=k,
            bias_corrected=int(self.correction is not None),
        )
        return result

    def _check_consecutive(self, inputs: Inputs) -> None:
        """A sequence is sampled whole: its input steps must follow one another without gaps."""
        from climrecon.tasks.training_data import consecutive_steps

        times = inputs.time.values
        gaps = np.flatnonzero(~consecutive_steps(times, inputs.time_step)[1:])
        if len(gaps):
            t0, t1 = times[gaps[0]], times[gaps[0] + 1]
            raise MethodError(
                f"spatiotemporal samples whole sequences, but the input's time steps have a gap between "
                f"{t0.year:04d}-{t0.month:02d} and {t1.year:04d}-{t1.month:02d}: downscale consecutive "
                "steps (evaluate.month_stride: 1)"
            )

    def steps_per_input(self, inputs: Inputs) -> int:
        """Output (prior) time steps per input step: 12 for annual input to a monthly prior, else 1."""
        return self.needs.output_step(inputs.time_step)[1]

    def identity(self, members: int, seed: int) -> list[Any]:
        c = self.config
        return [*super().identity(members, seed), self.window, c.likelihood_std]

    def describe(self) -> dict[str, Any]:
        out = super().describe()
        c = self.config
        out["report"] = out["report"].replace(
            "guidance", f"window {self.window}, likelihood std {c.likelihood_std:g}, guidance", 1
        )
        out["guidance"].update(window=self.window, likelihood_std=c.likelihood_std)
        return out


def _monthly(inputs: Inputs) -> Inputs:
    """``inputs`` with a monthly time axis: the 12 month starts of each annual step (for the output)."""
    import dataclasses

    times = month_starts(inputs.time.values)
    fine = inputs.coarse_on_fine.isel(time=np.repeat(np.arange(inputs.time.size), 12))
    return dataclasses.replace(
        inputs, coarse_on_fine=fine.assign_coords(time=times).drop_vars("time_bnds", errors="ignore")
    )


def _register() -> None:
    from climrecon.methods import register

    register(
        SpatioTemporalConfig,
        SpatioTemporal,
        "posterior sampling of whole sequences with a prior over windows of months (space-time observation "
        "model, quantile-mapping bias correction)",
        needs="the coarse input on its own grid, monthly or annual; orog, orog_std, sftlf; fit data (QM)",
        train=train,
    )


_register()
