"""DPDM: conditional patch diffusion downscaling (EDM), conditioned on the coarse field on the fine grid,
terrain, land fraction, the coarse grid's view of them, position and time of year.

The network (role ``denoiser``) generates the fine field, or by default its RESIDUAL over the bilinear
coarse input (``target: residual``, as CorrDiff's generative part does), on ``patch_size`` patches; inference
covers any domain with the one tiled sampler (:func:`climrecon.models.tiled.sample_tiled`) and the
``sampler:`` settings. Member ``m`` of month ``t`` starts from ``seed_for(seed, year * 12 + month - 1, m)``.

Inference recipe (one home; the downscale stage, the evaluation and the benchmarks all call
:meth:`DPDM.downscale`): conditioning stack (:func:`~climrecon.methods.features.conditioning_stack`) ->
network space with the statistics the checkpoint recorded (:func:`network_conditioning`) -> tiled sampling
-> physical fields (:func:`physical_fields`: denormalised, plus ``<var>_coarse`` for a residual model).

Training recipe (:func:`train`): perfect-model pairs of the fine truth's training years
(:mod:`climrecon.tasks.training_data`), random patch crops, EDM loss with the configured ``P_mean``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
import xarray as xr
from pydantic import BaseModel, ConfigDict, Field, field_validator

from climrecon.methods.base import (
    Inputs,
    MethodConfig,
    MethodError,
    Needs,
    SamplerConfig,
    item_seeds,
    member_indices,
    per_step,
)
from climrecon.methods.baselines import BaselineError
from climrecon.methods.bias_correction import CoarseBiasCorrection
from climrecon.methods.features import (
    STATIC_SCALING,
    TARGET_KINDS,
    Climatology,
    ConditioningError,
    ConditioningSpec,
    conditioning_stack,
    normalize_conditioning,
    time_of_year,
)
from climrecon.methods.local_regression import LocalRegression
from climrecon.models.checkpoint import (
    CheckpointMetadata,
    GridSpec,
    NetworkSpec,
    load_networks,
    read_checkpoint,
)
from climrecon.models.edm import EDMConfig, EDMLoss, EDMPrecond
from climrecon.models.fastpath import auto_patch_batch, prepare_network
from climrecon.models.normalization import NormalizationStats
from climrecon.models.tiled import sample_tiled
from climrecon.models.tiling import Tiling, TilingError, make_tiling
from climrecon.models.unet import UNet, UNetConfig
from climrecon.tasks.grids import Grid

if TYPE_CHECKING:
    from climrecon.config import ClimReconConfig, TrainSection
    from climrecon.models.trainer import TrainResult

__all__ = [
    "PatchModelConfig",
    "InflatableConfig",
    "DPDMConfig",
    "grid_spec",
    "train_config",
    "NetworkSection",
    "EDMSection",
    "DPDM",
    "default_checkpoint",
    "network_conditioning",
    "physical_fields",
    "checkpoint_spec",
    "build_model",
    "prepare_training",
    "train",
    "train_denoiser",
]

REPO_ROOT = Path(__file__).resolve().parent.parent
_log = logging.getLogger(__name__)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class NetworkSection(_Section):
    """The UNet of the denoiser (training only; a checkpoint records its own)."""

    base_channels: int = Field(32, ge=1)
    channel_mults: list[int] = [1, 2, 2]
    num_blocks: int = Field(1, ge=1)
    attention_levels: list[int] = [2]
    mid_attention: bool = True
    dropout: float = Field(0.0, ge=0, lt=1)
    time_harmonics: int = Field(2, ge=0)


class EDMSection(_Section):
    """EDM preconditioning and training noise levels (training only)."""

    sigma_data: float = Field(1.0, gt=0, description="std of the normalised targets")
    P_mean: float = Field(
        0.6, description="training ln(sigma) mean; EDM's -1.2 undertrains the ensemble mean here"
    )
    P_std: float = Field(1.2, gt=0)


BIAS_CORRECTION_HELP = (
    "quantile-map the coarse input toward the truth's coarse view per calendar month and coarse cell, fitted on "
    "the training years the input covers, before the model reads it (methods/bias_correction.py); a "
    "perfect-model evaluation is left unchanged. Off: the model reads the GCM's own values"
)


class PatchModelConfig(MethodConfig):
    """What every trained patch-diffusion method configures (DPDM, CorrDiff): ``checkpoint`` is what sampling
    loads (default: the one ``<name>-*.pt`` in ``<repo>/checkpoints/``); the other keys describe what
    ``climrecon train`` builds."""

    checkpoint: str | None = Field(
        None, description="model checkpoint; default: the one <name>-*.pt in <repo>/checkpoints/"
    )
    static_coarse: list[Literal["orog", "orog_std", "sftlf"]] = Field(
        ["orog", "sftlf"], description="static fields also given as the coarse grid sees them (<name>_coarse)"
    )
    climatology: bool = Field(
        False,
        description="condition on the training period's mean residual per cell and calendar month "
        "(<var>_clim, stored in the checkpoint): what the climatological-delta baseline knows",
    )
    first_guess: Literal["bilinear", "local_regression"] = Field(
        "bilinear",
        description="what the coarse input becomes on the fine grid (the <var>_coarse planes, and the base of a "
        "residual target): bilinear interpolation, or the local_regression baseline fitted on the training "
        "pairs and stored in the checkpoint (bilinear + the regression's fine-scale residual)",
    )
    bias_correction: bool = Field(False, description=BIAS_CORRECTION_HELP)
    patch_size: int = Field(32, ge=8, description="training patch (a multiple of train.factor)")
    network: NetworkSection = NetworkSection()
    edm: EDMSection = EDMSection()
    items_per_call: int = Field(
        64, ge=1, description="(month, member) items sampled together (memory bound only)"
    )


SPREAD_INFLATION_HELP = (
    "factor on each variable's spread about the members' common centre (member = centre + factor x (sample - "
    "centre); corrdiff: its regression mean, dpdm: the sample from a zero latent): None takes the checkpoint's "
    "calibrated data.spread_inflation (python -m climrecon.tasks.calibrate; 1 where absent), {} none"
)


class InflatableConfig(PatchModelConfig):
    """A patch model whose members are a conditional mean plus a generated part (DPDM, CorrDiff): the spread of
    that part can be calibrated (:mod:`climrecon.tasks.calibrate`)."""

    spread_inflation: dict[str, float] | None = Field(None, description=SPREAD_INFLATION_HELP)

    @field_validator("spread_inflation")
    @classmethod
    def _positive(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        bad = {k: f for k, f in (value or {}).items() if not f > 0}
        if bad:
            raise ValueError(f"spread_inflation factors must be > 0, got {bad}")
        return value


class DPDMConfig(InflatableConfig):
    """DPDM-style conditional patch diffusion (:class:`PatchModelConfig`)."""

    name: Literal["dpdm"] = "dpdm"
    # on by default: a GCM's climate is not the training truth's (README "Bias correction": on the demo's
    # MPI-ESM-LR 2005 the fine-scale RMSE of the time mean drops from 0.62 K, 0.41, 0.33 m/s to 0.38, 0.12, 0.13)
    bias_correction: bool = Field(True, description=BIAS_CORRECTION_HELP)
    target: Literal["residual", "full"] = Field(
        "residual", description="what the network generates: truth minus the bilinear coarse input, or truth"
    )


def default_checkpoint(configured: str | None, method: str = "dpdm") -> str:
    """The configured checkpoint (relative paths: to the working directory, else the repo root), or the one
    ``<method>-*.pt`` file shipped in ``<repo>/checkpoints/`` (each trained method ships its own)."""
    if configured:
        path = Path(configured)
        if not path.is_absolute() and not path.exists() and (REPO_ROOT / path).exists():
            path = REPO_ROOT / path
        return str(path)
    found = sorted((REPO_ROOT / "checkpoints").glob(f"{method}-*.pt"))
    if len(found) != 1:
        raise MethodError(
            f"method.checkpoint is not set and {REPO_ROOT / 'checkpoints'} holds {len(found)} {method}-*.pt "
            f"file(s) {[p.name for p in found]}; set method.checkpoint to the model to sample with"
        )
    return str(found[0])


def checkpoint_spec(metadata: CheckpointMetadata, path: str) -> ConditioningSpec:
    """The ConditioningSpec whose channel names are the checkpoint's ``cond_channels``."""
    factor = int(metadata.grid.coarsening_factor or 1)
    try:
        return ConditioningSpec.from_channel_names(metadata.variables, factor, metadata.cond_channels)
    except ConditioningError as exc:
        raise MethodError(
            f"checkpoint {path} expects conditioning channels {list(metadata.cond_channels)}, which cannot be "
            f"built: {exc}"
        ) from None


def network_conditioning(
    stack: np.ndarray, channels: Sequence[str], metadata: CheckpointMetadata
) -> np.ndarray:
    """[T, C, H, W] conditioning in physical units -> network space, exactly as in training."""
    if metadata.normalization is None:
        raise MethodError("checkpoint has no normalization statistics; it cannot be used for sampling")
    recorded = metadata.data.get("conditioning_normalization")
    stats = NormalizationStats.from_dict(recorded) if recorded else metadata.normalization
    clim = metadata.data.get("climatology")
    clim_scale = dict(zip(clim["variables"], clim["scale"], strict=True)) if clim else None
    return normalize_conditioning(stack, channels, stats, clim_scale).astype(np.float32)


def physical_fields(
    z: torch.Tensor, cond: np.ndarray, channels: Sequence[str], metadata: CheckpointMetadata
) -> np.ndarray:
    """Network output [N, V, H, W] -> physical fields [N, V, H, W], given the items' physical conditioning
    [N, C, H, W]: denormalised with the target statistics, plus ``<v>_coarse`` for a residual model."""
    x = metadata.normalization.denormalize(z.cpu(), channel_dim=1).numpy().astype(np.float32)
    kind = metadata.data.get("target", "full")
    if kind not in TARGET_KINDS:
        raise MethodError(f"checkpoint records target kind {kind!r}; this code knows {TARGET_KINDS}")
    if kind == "residual":
        coarse = np.stack([cond[:, list(channels).index(f"{v}_coarse")] for v in metadata.variables], axis=1)
        x = x + coarse
    return x


_SCHEDULE_FIELDS = ("num_steps", "solver", "sigmas", "sigma_min", "sigma_max", "rho", "S_churn", "eta")


def distilled_sampler(sampler: SamplerConfig, distilled: dict[str, Any], path: str) -> SamplerConfig:
    """The sampler a distilled checkpoint needs: DDIM (Euler) on the noise levels it was distilled for.

    Schedule settings at their defaults are replaced; one set to anything else is refused (a student is only
    correct on its own levels)."""
    levels = tuple(float(v) for v in distilled["sigmas"])
    want = {"num_steps": len(levels) - 1, "solver": "ddim", "sigmas": levels, "S_churn": 0.0, "eta": 0.0}
    given = sampler.model_dump(include=set(_SCHEDULE_FIELDS))
    default = {k: SamplerConfig.model_fields[k].default for k in given}
    clash = {k: v for k, v in given.items() if v != default[k] and v != want.get(k, default[k])}
    if clash.get("sigmas") is not None and tuple(float(v) for v in clash["sigmas"]) == levels:
        del clash["sigmas"]
    if clash:
        raise MethodError(
            f"checkpoint {path} is a {want['num_steps']}-step student distilled from "
            f"{distilled.get('teacher', 'a teacher')}: it samples with {want['num_steps']} ddim steps on its "
            f"own noise levels {list(levels)}; unset sampler {sorted(clash)} (got {clash})"
        )
    return sampler.model_copy(update=want)


def _device(requested: str) -> torch.device:
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise MethodError("sampler.device is 'cuda' but torch sees no CUDA device here")
        return torch.device("cuda")
    return torch.device("cpu")


class DPDM:
    """A trained DPDM checkpoint as a :class:`~climrecon.methods.base.Method` (module docstring)."""

    name = "dpdm"
    # (solver, steps) when the sampler leaves them unset: of the samplers with equal or better skill than EDM's
    # 18 Heun steps (benchmarks/results/sampling_cost.json, 24 months x 8 members; README "Sampling cost"), the
    # one with the CRPS closest to Heun's (+0.8 %, 12 NFE); 8 steps are 1.4x faster at +1.9 %
    default_sampler: tuple[str, int] = ("dpmpp2m", 12)

    def __init__(self, config: DPDMConfig, sampler: SamplerConfig):
        self.net = self._load(config, sampler, roles=("denoiser",))["denoiser"]
        self._set_inflation(config)
        self.needs = self._needs(stochastic=True)

    def _load(
        self, config: PatchModelConfig, sampler: SamplerConfig, roles: tuple[str, ...]
    ) -> dict[str, torch.nn.Module]:
        """Read and verify the checkpoint (default: this method's ``<name>-*.pt``) and set what every patch
        model knows of it (metadata, conditioning spec, patch, overlap, device); its networks of ``roles``."""
        self.config, self.sampler = config, sampler
        self.checkpoint = default_checkpoint(config.checkpoint, method=self.name)
        self.device = _device(sampler.device)
        contents = read_checkpoint(self.checkpoint)  # verified: raises CheckpointError naming the file
        self.sha256 = str(contents.header["content_sha256"])
        networks, self.metadata = load_networks(self.checkpoint, map_location=self.device, roles=roles)
        g = self.metadata.grid
        if not g.coarsening_factor or not g.patch_size:
            raise MethodError(
                f"checkpoint {self.checkpoint} records no grid.coarsening_factor / grid.patch_size"
            )
        self.spec = checkpoint_spec(self.metadata, self.checkpoint)
        self.climatology = None
        if self.spec.climatology:
            try:
                self.climatology = Climatology.from_arrays(
                    contents.arrays(), self.metadata.data.get("climatology") or {}
                )
            except (ConditioningError, KeyError) as exc:
                raise MethodError(f"checkpoint {self.checkpoint}: {exc}") from None
        self.first_guess: LocalRegression | None = None
        if "first_guess" in self.metadata.data:
            try:
                self.first_guess = LocalRegression.from_checkpoint(
                    contents.arrays(), self.metadata.data["first_guess"]
                )
            except (BaselineError, KeyError) as exc:
                raise MethodError(f"checkpoint {self.checkpoint}: {exc}") from None
        self.correction = (
            CoarseBiasCorrection(self.variables, f"{self.name} bias correction")
            if config.bias_correction
            else None
        )
        self.inflation, self.inflation_configured = [1.0] * len(self.variables), False
        self.patch = int(g.patch_size)
        self.overlap = sampler.overlap if sampler.overlap is not None else self.patch // 4
        distilled = self.metadata.data.get("distilled")
        try:  # a student samples on its own levels; otherwise unset solver / steps take the method's default
            self.sampler = (
                distilled_sampler(sampler, distilled, self.checkpoint)
                if distilled
                else sampler.with_defaults(*self.default_sampler)
            )
        except ValueError as exc:
            raise MethodError(f"{self.name}: {exc}") from None
        if sampler.max_patches_per_batch == "auto":
            batch = (
                auto_patch_batch(networks["denoiser"], self._probe_call(), self.device)
                if "denoiser" in networks
                else SamplerConfig.model_fields["max_patches_per_batch"].default  # a regression alone
            )
            self.sampler = self.sampler.model_copy(update={"max_patches_per_batch": batch})
        return {role: prepare_network(net, sampler.network) for role, net in networks.items()}

    def _set_inflation(self, config: InflatableConfig, sampled: bool = True) -> None:
        """``self.inflation``, each variable's factor on the generated part: the config's, else the checkpoint's
        calibrated ``data.spread_inflation``, else 1. Factors fitted with another solver or step count than
        this run samples with are warned about (``sampled``): the generated part's spread depends on them."""
        configured, data = config.spread_inflation, self.metadata.data
        factors = configured if configured is not None else (data.get("spread_inflation") or {})
        unknown = sorted(set(factors) - set(self.variables))
        if unknown:
            raise MethodError(
                f"{self.name} spread_inflation names {unknown}, which checkpoint {self.checkpoint} does not "
                f"predict (its variables: {list(self.variables)})"
            )
        self.inflation = [float(factors.get(v, 1.0)) for v in self.variables]
        self.inflation_configured = configured is not None
        fitted = (data.get("spread_calibration") or {}).get("sampler") or {}
        now = self.sampler.sampling_kwargs()
        if (
            sampled
            and configured is None
            and fitted
            and (fitted.get("solver"), fitted.get("num_steps")) != (now["solver"], now["num_steps"])
        ):
            _log.warning(
                "%s: checkpoint %s's spread_inflation was fitted with %s %s steps, this run samples with "
                "%s %s steps; its spread may not be calibrated (refit: python -m climrecon.tasks.calibrate "
                "--solver %s --steps %s, or set spread_inflation)",
                self.name,
                Path(self.checkpoint).name,
                fitted.get("num_steps"),
                fitted.get("solver"),
                now["num_steps"],
                now["solver"],
                now["solver"],
                now["num_steps"],
            )

    def _probe_call(self) -> tuple[torch.Tensor, ...]:
        """A one-patch call of the denoiser on the device (what :func:`auto_patch_batch` sizes)."""
        unet = self.metadata.networks["denoiser"].unet
        p, dev = self.patch, self.device
        return (
            torch.zeros(1, unet.out_channels, p, p, device=dev),
            torch.ones(1, device=dev),
            torch.zeros(1, unet.cond_channels, p, p, device=dev),
            torch.zeros(1, device=dev),
        )

    def _needs(self, stochastic: bool) -> Needs:
        return Needs(
            static=tuple(self.spec.static_names()),
            factors=(self.spec.factor,),
            stochastic=stochastic,
            # the first guess regresses on the coarse grid's own cells (the bias correction maps them too, except
            # for the truth's own view: validate checks that)
            coarse=self.first_guess is not None,
            fit=self.correction is not None,
            fit_model=self.correction is not None,
        )

    # -- what the checkpoint is --
    @property
    def variables(self) -> tuple[str, ...]:
        return self.spec.variables

    @property
    def factor(self) -> int:
        return self.spec.factor

    @property
    def time_step(self) -> str:
        """The time step the checkpoint was trained on ("month" for checkpoints that predate the record)."""
        return self.metadata.data.get("time_step", "month")

    def years_seen(self) -> list[tuple[int, int]]:
        """Inclusive year ranges the model was trained or validated on (from its metadata)."""
        data = self.metadata.data
        return [tuple(data[k]) for k in ("train_years", "validation_years") if data.get(k)]

    def _seen(self) -> dict[str, Any]:
        """What the evaluation checks against its held-out times: the years (older checkpoints) and the runs
        of time steps (``YYYYMMDDHH``) the model was trained or validated on."""
        return {
            "years_seen": [list(y) for y in self.years_seen()],
            "seen_periods": self.metadata.data.get("seen_periods", []),
        }

    def fit(
        self, coarse_train: xr.Dataset, fine_train: xr.Dataset, model_train: xr.Dataset | None = None
    ) -> DPDM:
        """Nothing to fit but the bias correction, when on (the networks are trained by `climrecon train`):
        ``model_train`` (the coarse input over the fit years) mapped toward ``coarse_train``; None: a perfect
        model (the input is the truth's coarse view)."""
        missing = [v for v in self.variables if v not in fine_train.data_vars]
        if missing:
            raise MethodError(
                f"checkpoint {self.checkpoint} downscales {list(self.variables)}; the truth lacks {missing}"
            )
        if self.correction is not None:
            self.correction.fit(coarse_train, model_train)
        return self

    def fitted(self) -> dict[str, Any] | None:
        """The fitted bias correction (what the stage's provenance records), or None without one."""
        return None if self.correction is None else self.correction.record

    def _corrected_inputs(self, inputs: Inputs) -> Inputs:
        """``inputs`` validated, with the coarse fields (and their fine-grid view) bias-corrected when on."""
        self.validate(inputs)
        return inputs if self.correction is None else self.correction.inputs(inputs)

    def validate(self, inputs: Inputs) -> None:
        path = self.checkpoint
        missing = [v for v in self.variables if v not in inputs.coarse_on_fine.data_vars]
        if missing:
            raise MethodError(
                f"checkpoint {path} downscales {list(self.variables)} but the input lacks {missing} (it has "
                f"{inputs.variables}); ingest and regrid those variables"
            )
        self._check_resolution(inputs)
        grid = inputs.grid
        factor = inputs.factor()
        if factor is not None and not math.isclose(factor, self.factor, rel_tol=1e-6):
            wanted = grid.dlat * self.factor
            raise MethodError(
                f"checkpoint {path} was trained to downscale by x{self.factor} ({wanted:g} deg -> {grid.dlat:g} deg); "
                f"the coarse input is x{factor:g} coarser than the target: re-run regrid with "
                f"regrid.coarse_resolution={wanted:g} (or use a checkpoint trained for that factor)"
            )
        if self.correction is not None and inputs.coarse is None and not inputs.truth_view:
            raise MethodError(
                f"{self.name}: bias_correction maps the coarse input on its own grid, and this stage has only its "
                "view on the fine grid: give the stage the coarse store the regrid stage wrote, or set "
                "method.bias_correction: false"
            )
        inputs.require(self.needs, f"checkpoint {path}")
        if inputs.time_step != self.time_step:
            raise MethodError(
                f"checkpoint {path} was trained on {per_step(self.time_step)} fields; the input is "
                f"{per_step(inputs.time_step)} "
                "(time features and statistics differ): train a model on data of this time step"
            )
        if self.climatology is not None:
            try:
                self.climatology.on(grid, [1], self.variables)
            except ConditioningError as exc:
                raise MethodError(f"checkpoint {path}: {exc}") from None
        if self.first_guess is not None:
            self._check_first_guess(inputs)
        self._check_tiling(inputs)

    def _check_first_guess(self, inputs: Inputs) -> None:
        """A first guess fitted on the training grids needs the fine grid it was fitted on and a coarse input
        that covers its coarse cells (another coarse grid is averaged onto them conservatively)."""
        fg, path = self.first_guess, self.checkpoint
        coarse = Grid.from_dataset(inputs.coarse, "coarse input")
        shift = 360.0 * round((fg.coarse_grid.west - coarse.west) / 360.0)  # another longitude convention
        coarse = replace(coarse, west=coarse.west + shift)
        covered = all(
            lo - 1e-6 <= t_lo and t_hi <= hi + 1e-6
            for lo, hi, t_lo, t_hi in (
                (coarse.south, coarse.north, fg.coarse_grid.south, fg.coarse_grid.north),
                (coarse.west, coarse.east, fg.coarse_grid.west, fg.coarse_grid.east),
            )
        )
        if not (fg.fine_grid.same_cells(inputs.grid) and covered):
            raise MethodError(
                f"checkpoint {path} is conditioned on a local-regression first guess fitted on "
                f"{fg.coarse_grid.describe()} -> {fg.fine_grid.describe()}; the input is {coarse.describe()} -> "
                f"{inputs.grid.describe()}: such a model downscales the fine grid it was trained on, from a "
                "coarse input that covers its coarse cells"
            )

    def _check_resolution(self, inputs: Inputs) -> None:
        """The target grid has the fine resolution the checkpoint was trained at (both axes)."""
        trained, grid = self.metadata.grid.fine_resolution, inputs.grid
        if trained and not (
            math.isclose(grid.dlat, trained, rel_tol=1e-6) and math.isclose(grid.dlon, trained, rel_tol=1e-6)
        ):
            raise MethodError(
                f"the target grid is {grid.dlat:g} x {grid.dlon:g} deg but checkpoint {self.checkpoint} was "
                f"trained at {trained:g} deg: re-run regrid with regrid.resolution={trained:g}"
            )

    def _check_tiling(self, inputs: Inputs) -> None:
        """The checkpoint's patches with ``sampler.overlap`` tile the target grid."""
        try:
            make_tiling(inputs.grid.nlat, inputs.grid.nlon, self.patch, self.overlap)
        except TilingError as exc:
            raise MethodError(f"sampler.overlap / checkpoint patch size {self.patch}: {exc}") from None

    def downscale(self, inputs: Inputs, members: int | Sequence[int] = 1, seed: int = 0) -> xr.Dataset:
        index = member_indices(members)
        inputs = self._corrected_inputs(inputs)
        values, _, z_cond, toy, tiling = self._network_inputs(inputs)
        channels = self.spec.channel_names()
        inflate = self._inflated(z_cond, toy, tiling)
        out = self._sample(
            z_cond,
            toy,
            tiling,
            inputs.time_index(),
            index,
            seed,
            lambda t_idx, z: physical_fields(inflate(t_idx, z), values[t_idx], channels, self.metadata),
        )
        return self._dataset(inputs, out, index, seed)

    def centre(self, z_cond: np.ndarray, toy: np.ndarray, tiling: Tiling) -> torch.Tensor:
        """The members' centre [T, V, H, W] float64 in network space: this sampler's solution from a zero
        latent (no churn, no eta), the image of the noise distribution's centre; the same for every member and
        seed, so inflating about it keeps members independent of one another. Sampled in calls of
        ``items_per_call`` time steps (one extra member per time step)."""
        n_v, n_t = len(self.variables), z_cond.shape[0]
        kwargs = {**self.sampler.sampling_kwargs(), "S_churn": 0.0, "eta": 0.0}
        out = torch.empty((n_t, n_v, tiling.height, tiling.width), dtype=torch.float64)
        for start in range(0, n_t, self.config.items_per_call):
            s = slice(start, min(start + self.config.items_per_call, n_t))
            out[s] = (
                sample_tiled(
                    self.net,
                    torch.from_numpy(z_cond[s]),
                    torch.from_numpy(toy[s]),
                    tiling,
                    seeds=[0] * (s.stop - s.start),
                    out_channels=n_v,
                    device=self.device,
                    zero_start=True,
                    **kwargs,
                )
                .cpu()
                .to(torch.float64)
            )
        return out

    def _inflated(
        self, z_cond: np.ndarray, toy: np.ndarray, tiling: Tiling
    ) -> Callable[[np.ndarray, torch.Tensor], torch.Tensor]:
        """``inflate(time indices, z)``: the network-space samples ``z`` of a call spread about their centre by
        ``self.inflation`` (``c + f (z - c)``); the identity, bit for bit, when every factor is 1."""
        if all(f == 1.0 for f in self.inflation):
            return lambda t_idx, z: z
        centre = self.centre(z_cond, toy, tiling)
        factor = torch.tensor(self.inflation, dtype=torch.float64).reshape(1, -1, 1, 1)

        def inflate(t_idx: np.ndarray, z: torch.Tensor) -> torch.Tensor:
            c = centre[torch.from_numpy(t_idx)]
            return (c + factor * (z.cpu().to(torch.float64) - c)).to(torch.float32)

        return inflate

    def _network_inputs(
        self, inputs: Inputs
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, Tiling]:
        """Validated inputs in network space: (physical conditioning [T, C, H, W], time labels, network-space
        conditioning, time of year [T], the tiling of the target grid); NaN/inf conditioning is refused
        naming the months."""
        self.validate(inputs)
        coarse_fine = inputs.coarse_on_fine[
            [v for v in self.variables if self.spec.coarse or v in inputs.coarse_on_fine]
        ].load()
        if self.first_guess is not None:
            coarse_fine = self._with_first_guess(inputs, coarse_fine)
        try:
            cond = conditioning_stack(
                coarse_fine,
                inputs.static[self.spec.static_names()].load(),
                self.spec,
                self.climatology,
            )
        except ConditioningError as exc:
            raise MethodError(str(exc)) from None
        values, times = cond.values, cond["time"].values
        bad = ~np.isfinite(values).all(axis=(1, 2, 3))
        if bad.any():
            labels = [f"{t.year:04d}-{t.month:02d}" for t in times[bad]]
            raise MethodError(
                f"the conditioning has NaN/inf at {labels} (channels {self.spec.channel_names()})"
            )
        z_cond = network_conditioning(values, self.spec.channel_names(), self.metadata)
        tiling = make_tiling(inputs.grid.nlat, inputs.grid.nlon, self.patch, self.overlap)
        return values, times, z_cond, time_of_year(times, inputs.time_step), tiling

    def _with_first_guess(self, inputs: Inputs, coarse_fine: xr.Dataset) -> xr.Dataset:
        """``coarse_fine`` improved by the checkpoint's first guess, exactly as training built it."""
        try:
            return self.first_guess.first_guess(coarse_fine, inputs.coarse, list(self.variables))
        except KeyError as exc:
            raise MethodError(
                f"checkpoint {self.checkpoint}: the coarse input lacks {exc}, a predictor of its first guess"
            ) from None

    def _sample(
        self,
        z_cond: np.ndarray,
        toy: np.ndarray,
        tiling: Tiling,
        time_index: Sequence[int],
        index: Sequence[int],
        seed: int,
        to_physical: Callable[[np.ndarray, torch.Tensor], np.ndarray],
        wrap: Callable[[np.ndarray], Callable | None] | None = None,
        items_per_call: int | None = None,
    ) -> np.ndarray:
        """(member, time, V, H, W) float32: ``self.net`` sampled with the one tiled sampler for every (member,
        time) item, ``config.items_per_call`` items per call, seeded by ``time_index`` (the inputs'
        :meth:`~climrecon.methods.base.Inputs.time_index`); ``to_physical(time indices, samples)`` maps a
        call's samples to physical fields; ``wrap(time indices)`` (optional) gives the call's denoiser wrapper
        (guidance, :func:`~climrecon.models.tiled.sample_tiled`'s ``wrap``); ``items_per_call`` overrides the
        config's."""
        n_t, n_v = len(time_index), len(self.variables)
        seeds = item_seeds(seed, time_index, index)  # member-major
        items = [(k, t) for k in range(len(index)) for t in range(n_t)]
        out = np.empty((len(index), n_t, n_v, tiling.height, tiling.width), np.float32)
        step = items_per_call or self.config.items_per_call
        for start in range(0, len(items), step):
            chunk = items[start : start + step]
            t_idx = np.array([t for _, t in chunk])
            z = sample_tiled(
                self.net,
                torch.from_numpy(z_cond[t_idx]),
                torch.from_numpy(toy[t_idx]),
                tiling,
                seeds=seeds[start : start + len(chunk)],
                out_channels=n_v,
                device=self.device,
                wrap=None if wrap is None else wrap(t_idx),
                **self.sampler.sampling_kwargs(),
            )
            for (k, t), field_ in zip(chunk, to_physical(t_idx, z), strict=True):
                out[k, t] = field_
        return out

    def _dataset(
        self,
        inputs: Inputs,
        out: np.ndarray,
        index: Sequence[int],
        seed: int,
        variables: Sequence[str] | None = None,
        **attrs: Any,
    ) -> xr.Dataset:
        """(member, time, lat, lon) dataset of ``out`` (its variable axis: ``variables``, default the model's)
        on the inputs' grid, with this method's attributes."""
        variables, grid = list(variables or self.variables), inputs.grid
        coords = {
            "member": np.array(index),
            "time": inputs.coarse_on_fine["time"],
            "lat": grid.lat,
            "lon": grid.lon,
        }
        result = xr.Dataset(
            {
                v: (("member", "time", "lat", "lon"), out[:, :, i], inputs.coarse_on_fine[v].attrs)
                for i, v in enumerate(variables)
            },
            coords=coords,
        )
        return result.assign_attrs(
            downscaling_method=self.name, base_seed=seed, **self._sampling_attrs(), **attrs
        )

    def _sampling_attrs(self) -> dict[str, Any]:
        return {
            "num_steps": self.sampler.num_steps,
            "blend": self.sampler.blend,
            "solver": self.sampler.solver,
        }

    def identity(self, members: int, seed: int) -> list[Any]:
        s = self.sampler
        parts: list[Any] = [self.sha256, members, seed, s.num_steps, s.blend, self.patch, self.overlap]
        extra = {
            k: v
            for k, v in s.model_dump(
                include={"solver", "S_churn", "eta", "sigma_max", "sigma_min", "rho", "sigmas", "network"}
            ).items()
            if v != SamplerConfig.model_fields[k].default
        }
        if extra:  # the first releases knew the default deterministic Heun schedule only: same keys for it
            parts.append(extra)
        if self.correction is not None:
            parts.append("bias_correction")
        if self.inflation_configured:  # the checkpoint's own factors are in its hash
            parts.append({"spread_inflation": self.inflation})
        return parts

    def _inflation_report(self) -> str:
        if all(f == 1.0 for f in self.inflation):
            return ""
        return ", spread inflation " + ", ".join(
            f"{v} {f:.3f}" for v, f in zip(self.variables, self.inflation, strict=True)
        )

    def describe(self) -> dict[str, Any]:
        m = self.metadata
        target = m.data.get("target", "full")
        return {
            "method": self.name,
            "label": m.method,
            "stochastic": True,
            "variables": list(self.variables),
            "grid": m.grid.to_dict(),
            **self._seen(),
            "report": (
                f"{self.name}: checkpoint `{Path(self.checkpoint).name}` ({m.method}, x{self.factor}, "
                f"step {m.step}, target {target}), {self.sampler.describe()}, overlap {self.overlap}"
                + self._inflation_report()
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
                "target": target,
                "train": m.train,
                "data": m.data,
                "grid": m.grid.to_dict(),
            },
            "sampler": self.sampler.model_dump(mode="json"),
            "seeds": "seed_for(base_seed, year * 12 + month - 1, member)",
            "bias_correction": self.correction is not None,
        }


# -- training ----------------------------------------------------------------------------------------------
def build_model(config: DPDMConfig, n_out: int, n_cond: int, seed: int) -> EDMPrecond:
    """A fresh denoiser (seeded init) for ``n_out`` target variables and ``n_cond`` conditioning channels."""
    net = config.network
    unet = UNetConfig(
        out_channels=n_out,
        cond_channels=n_cond,
        base_channels=net.base_channels,
        channel_mults=tuple(net.channel_mults),
        num_blocks=net.num_blocks,
        attention_levels=tuple(net.attention_levels),
        mid_attention=net.mid_attention,
        dropout=net.dropout,
        time_harmonics=net.time_harmonics,
    )
    torch.manual_seed(seed)
    return EDMPrecond(UNet(unet), EDMConfig(config.edm.sigma_data, config.edm.P_mean, config.edm.P_std))


def prepare_training(
    cfg: ClimReconConfig,
    config: PatchModelConfig,
    target: Literal["residual", "full"] | None = None,
    coarse: bool = True,
    window: int = 1,
) -> Any:
    """Training-time perfect-model pairs of ``cfg``'s fine data (``data:``, else ``train.truth``; held-out
    times never opened), their statistics and the crop sampler; the targets are ``target`` (default: the
    config's own, DPDM's residual or full fields); ``coarse=False``: no coarse planes (a prior, ZSSD);
    ``window``: targets of that many consecutive time steps (a window prior, the spatiotemporal method)."""
    from climrecon.tasks.training_data import TrainingDataError, training_setup, training_source

    section = cfg.train
    if config.patch_size % section.factor:
        raise MethodError(
            f"method.patch_size ({config.patch_size}) must be a multiple of train.factor ({section.factor})"
        )
    variables = cfg.train_variables()
    try:
        source = training_source(cfg, variables, section.factor)
        spec = ConditioningSpec(
            tuple(variables),
            section.factor,
            static_coarse=tuple(config.static_coarse),
            climatology=config.climatology,
            diurnal=source.time_step == "hour",
            coarse=coarse,
        )
        first_guess = None
        if config.first_guess == "local_regression":
            if not coarse:
                raise MethodError("first_guess: local_regression needs coarse planes; a prior has none")
            first_guess = LocalRegression(list(variables), {v: list(variables) for v in variables})
        return training_setup(
            section,
            spec,
            source,
            target=target or config.target,
            patch_size=config.patch_size,
            window=window,
            first_guess=first_guess,
        )
    except TrainingDataError as exc:
        raise MethodError(str(exc)) from None


def grid_spec(setup: Any, factor: int, patch_size: int) -> GridSpec:
    """The GridSpec a checkpoint records for a training setup (``setup``: a TrainingSetup)."""
    g = setup.grid
    return GridSpec(
        fine_resolution=g.dlat,
        coarsening_factor=factor,
        patch_size=patch_size,
        region={"lat_min": g.south, "lat_max": g.north, "lon_min": g.west, "lon_max": g.east},
    )


def train_config(
    section: TrainSection, max_steps: int, lr: float, warmup_steps: int | None = None, log_every: int = 50
) -> Any:
    """The trainer's TrainConfig for one network: ``train:``'s loop settings with these steps and rate."""
    from climrecon.models.trainer import TrainConfig

    return TrainConfig(
        max_steps=max_steps,
        lr=lr,
        warmup_steps=section.warmup_steps if warmup_steps is None else warmup_steps,
        lr_schedule=section.lr_schedule,
        ema_halflife_steps=section.ema_halflife_steps,
        checkpoint_every=section.checkpoint_every,
        log_every=log_every,
        seed=section.seed,
        device=section.device,
    )


def train(cfg: ClimReconConfig, *, progress: bool = False, log: logging.Logger | None = None) -> TrainResult:
    """Train the DPDM denoiser of ``cfg.method`` on ``cfg.train`` into the resumable ``train.checkpoint``."""
    torch.set_num_threads(cfg.train.threads)
    setup = prepare_training(cfg, cfg.method)
    label = "dpdm-residual" if cfg.method.target == "residual" else "dpdm"
    return train_denoiser(cfg, setup, label, progress=progress, log=log)


def distill(
    cfg: ClimReconConfig, *, progress: bool = False, log: logging.Logger | None = None
) -> TrainResult:
    """Train a ``train.distill.steps``-step student of the teacher checkpoint (``train.distill.teacher``, else
    ``method.checkpoint``, else the shipped one) into the resumable ``train.checkpoint``
    (:mod:`climrecon.models.distill`). The student starts from the teacher's weights and keeps its
    metadata (networks, variables, statistics, grid); ``data.distilled`` records the teacher and the levels."""
    import copy

    from climrecon.models.distill import DistillationLoss
    from climrecon.models.trainer import train as train_loop

    torch.set_num_threads(cfg.train.threads)
    section, spec = cfg.train, cfg.train.distill
    teacher_path = default_checkpoint(spec.teacher or cfg.method.checkpoint, method=cfg.method.name)
    contents = read_checkpoint(teacher_path)
    networks, meta = load_networks(teacher_path, roles=("denoiser",))
    if meta.data.get("distilled"):
        raise MethodError(f"checkpoint {teacher_path} is itself a distilled student; distil its teacher")
    teacher = networks["denoiser"].requires_grad_(False)
    setup = prepare_training(cfg, cfg.method, target=meta.data.get("target", "full"))
    if tuple(setup.spec.channel_names()) != tuple(meta.cond_channels) or setup.stats != meta.normalization:
        raise MethodError(
            f"train: data does not match the teacher {teacher_path}: conditioning {list(meta.cond_channels)} "
            f"vs {setup.spec.channel_names()}, or other normalisation statistics; distil on the teacher's "
            "own training data and method settings"
        )
    loss = DistillationLoss(teacher, spec.steps, spec.teacher_steps, sigma_data=teacher.config.sigma_data)
    record = {
        "teacher": Path(teacher_path).name,
        "teacher_sha256": str(contents.header["content_sha256"]),
        "teacher_sampler": f"{spec.teacher_steps} heun steps (EDM Eq. 5 levels)",
        "recipe": "progressive distillation (Salimans & Ho 2022), one round of factor "
        f"{spec.teacher_steps // spec.steps} from a Heun teacher",
        "sigmas": list(loss.levels),
    }
    if spec.student:
        student, record["continued_from"] = _student_to_continue(spec.student, record)
    else:
        student = copy.deepcopy(teacher)
    student.requires_grad_(True)
    metadata = replace(meta, data={**meta.data, "distilled": record})
    tcfg = train_config(section, section.max_steps, section.lr)
    on_log = _log_progress(log)
    return train_loop(
        student,
        setup.batches,
        tcfg,
        loss=loss,
        checkpoint_path=Path(section.checkpoint),
        metadata=metadata,
        arrays=contents.arrays() or None,
        progress=progress,
        on_log=on_log,
    )


def _student_to_continue(path: str, record: dict[str, Any]) -> tuple[EDMPrecond, dict[str, Any]]:
    """The network of the student checkpoint ``path`` and a record of it, refused unless it was distilled
    from the same teacher file onto the same levels as ``record`` (the new run's ``data.distilled``)."""
    contents = read_checkpoint(path)
    networks, meta = load_networks(path, roles=("denoiser",))
    earlier = meta.data.get("distilled")
    if not earlier:
        raise MethodError(f"train.distill.student: {path} is not a distilled student (no data.distilled)")
    for key in ("teacher_sha256", "sigmas"):
        if earlier.get(key) != record[key]:
            raise MethodError(
                f"train.distill.student: {path} was distilled with {key}={earlier.get(key)!r}, this run "
                f"uses {record[key]!r}; continue a student of the same teacher and steps only"
            )
    steps = [*earlier.get("continued_from", {}).get("steps", []), int(meta.step or 0)]
    return networks["denoiser"], {
        "student": Path(path).name,
        "student_sha256": str(contents.header["content_sha256"]),
        "steps": steps,  # training steps of each earlier run, oldest first
    }


def _log_progress(log: logging.Logger | None) -> Callable[[dict[str, float]], None] | None:
    if log is None:
        return None
    return lambda r: log.info(
        "step %d loss %.4f lr %.2e %.2f steps/s", r["step"], r["loss"], r["lr"], r["steps_per_s"]
    )


def train_denoiser(
    cfg: ClimReconConfig,
    setup: Any,
    label: str,
    *,
    data: dict[str, Any] | None = None,
    progress: bool = False,
    log: logging.Logger | None = None,
) -> TrainResult:
    """Train one EDM denoiser (role ``denoiser``) of ``cfg.method`` on ``setup`` (:func:`prepare_training`)
    into the resumable ``train.checkpoint``, recorded as method ``label``; ``data`` adds to (or replaces)
    the setup's description in the checkpoint."""
    from climrecon.models.trainer import train as train_loop

    section, config = cfg.train, cfg.method
    n_out = len(setup.spec.variables) * setup.batches.window  # a window prior: k steps x V, time-major
    model = build_model(config, n_out, len(setup.spec.channel_names()), section.seed)
    if log:
        log.info(
            "UNet: %d parameters; %d training months",
            sum(p.numel() for p in model.parameters()),
            setup.data["months"],
        )
    metadata = CheckpointMetadata(
        method=label,
        networks={"denoiser": NetworkSpec.of(model)},
        variables=setup.spec.variables,
        cond_channels=tuple(setup.spec.channel_names()),
        normalization=setup.stats,
        grid=grid_spec(setup, section.factor, config.patch_size),
        method_config=config.model_dump(mode="json", exclude={"checkpoint"}),
        data={
            **setup.data,
            "static_scaling": {k: list(v) for k, v in STATIC_SCALING.items()},
            **(data or {}),
        },
    )
    tcfg = train_config(section, section.max_steps, section.lr)
    on_log = _log_progress(log)
    ckpt = Path(section.checkpoint)
    return train_loop(
        model,
        setup.batches,
        tcfg,
        loss=EDMLoss(model.config),
        checkpoint_path=ckpt,
        metadata=metadata,
        arrays=setup.arrays(),
        progress=progress,
        on_log=on_log,
    )


def _register() -> None:
    from climrecon.methods import register

    register(
        DPDMConfig,
        DPDM,
        "conditional patch diffusion (EDM) on the coarse field, terrain, land fraction",
        needs="coarse fields on the fine grid; orog, orog_std, sftlf (+ coarse views); the checkpoint's factor",
        train=train,
        distill=distill,
    )


_register()
