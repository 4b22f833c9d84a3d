"""ZSSD: zero-shot downscaling by posterior sampling of one prior, for any input grid.

The prior (role ``denoiser``) is an EDM patch model of the FINE fields conditioned only on what never
changes: terrain (``orog``, ``orog_std``), land fraction, position and time of year; it never sees a coarse
field, so one checkpoint serves every GCM at any resolution. Sampling is guided toward the coarse input ``y``
by :class:`climrecon.models.guidance.GuidedDenoiser` around the tiled full-domain denoiser, at every sampler
step (the blended estimate, so tiles agree):

- ``guidance: dps`` (vanilla DPS, Chung et al. 2023, the baseline): ``A`` is the area-weighted mean onto the
  input's own coarse cells, the loss the UNSQUARED residual norm ``||y - A(x0)||`` (the reference code's
  step rule, ``zeta / ||residual||``); its signal per fine cell shrinks like ``1 / factor**2``.
- ``guidance: zssd`` (unified coordinate guidance): ``y`` and ``A(x0)`` are both conservatively averaged onto
  the unified coarse grid (``unified_resolution``: ``null``, the default, is the input's own grid, i.e. the
  regrid stage's unified grid in a reconstruction; 5 is the paper's 5-deg lattice) and projected back to the
  fine grid bilinearly; the loss is the latitude-weighted sum of squared differences there, whose gradient
  per fine cell does not shrink with the factor; the step is ``zeta / ||A^T W A||``.

Both are one linear operator (:class:`climrecon.models.operators.SeparableOperator`, built here from the
regrid stage's conservative and bilinear weights) and one loss. The Jacobian of ``x0`` with respect to
``x_t`` is taken isotropic for zssd (``jacobian: identity``: no backprop through the network, memory of one
full field; Climate2Weather's ``use_exact_grad: false``); ``jacobian: network`` (dps's default)
backpropagates through every tile of the step (exact DPS, memory of all tiles' activations).

Training (:func:`train`): the project's trainer on the fine truth's training years, full-field targets,
conditioning without coarse planes.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
import xarray as xr
from pydantic import Field

from climrecon.methods.base import Inputs, MethodError, Needs, SamplerConfig, member_indices, per_step
from climrecon.methods.dpdm import DPDM, PatchModelConfig, prepare_training, train_denoiser
from climrecon.models.guidance import GuidedDenoiser
from climrecon.models.operators import GroupMean, SeparableOperator
from climrecon.tasks.grids import Grid

if TYPE_CHECKING:
    from climrecon.config import ClimReconConfig
    from climrecon.models.trainer import TrainResult

__all__ = ["ZSSDConfig", "ZSSD", "observation_operator", "train"]

PRIOR_LABEL = "zssd-prior"
# zssd's default step, in units of 1 / ||A^T W A|| (stable below 2): on validation months (2006-2010, x8 and
# x20, 4 members) 0.5 / 1.0 / 1.4 / 1.8 gave 0.561 / 0.486 / 0.466 / 0.459 x bilinear MAE at x8
ZETA = 1.5
DPS_ZETA = 0.3  # vanilla DPS: the reference's super-resolution scale, per observed cell
COVERED = 0.999  # a coarse cell is observed when the fine domain covers this fraction of its area


class ZSSDConfig(PatchModelConfig):
    """A ZSSD prior (:class:`PatchModelConfig`) and how it is guided (module docstring)."""

    name: Literal["zssd"] = "zssd"
    static_coarse: list[Literal["orog", "orog_std", "sftlf"]] = Field(
        [], description="none: the prior knows no coarse grid"
    )
    guidance: Literal["zssd", "dps"] = Field(
        "zssd", description="unified coordinate guidance, or vanilla DPS"
    )
    unified_resolution: float | None = Field(
        None,
        gt=0,
        description="unified coarse grid (deg) of zssd guidance, e.g. 5 (the paper's); null: the input's own "
        "grid (the regrid stage's unified grid in a reconstruction)",
    )
    zeta: float | None = Field(
        None,
        gt=0,
        description="guidance step; default: 1.5 for zssd (in units of 1 / ||A^T W A||), 0.3 x sqrt(observed "
        "cells) for dps (the reference's 0.3, per cell)",
    )
    jacobian: Literal["identity", "network"] | None = Field(
        None,
        description="d x0 / d x_t: isotropic (cheap, memory of one field) or through the network (exact); "
        "default: network for dps (the reference), identity for zssd",
    )

    def resolved_jacobian(self) -> str:
        return self.jacobian or ("network" if self.guidance == "dps" else "identity")


def observation_operator(
    fine: Grid,
    coarse: Grid | xr.Dataset,
    guidance: str = "zssd",
    unified_resolution: float | None = None,
) -> tuple[SeparableOperator, np.ndarray, SeparableOperator]:
    """``(A, observed, Y)`` of a guidance: ``A`` maps a fine field to what the loss compares, ``Y`` maps the
    coarse input there, ``observed`` marks the compared cells (the coarse cells the fine domain covers wholly
    for dps; every fine cell for zssd).

    ``coarse`` is any rectilinear grid (a Grid, or a dataset with ``lat``/``lon`` and optional CF bounds: a
    GCM's Gaussian latitudes too; longitudes in either convention). dps: ``A = C``, the conservative
    (area-weighted) mean onto the observed coarse cells, ``Y`` picks those cells. zssd: with ``U`` the
    conservative mean of the observed cells onto the unified lattice of ``unified_resolution`` degrees (None:
    ``U`` = identity, the input's own cells) and ``P`` the bilinear interpolation of that grid's centres onto
    the fine grid, ``A = P U C`` and ``Y = P U``: the loss compares ``P U (y - C x)`` on the fine grid.
    """
    from climrecon.tasks.regrid import bilinear_weights, cell_edges, conservative_weights

    f_lat, f_lon = cell_edges(fine)
    c_lat, c_lon = _coarse_edges(coarse, fine)
    w_lat, w_lon = conservative_weights(f_lat, f_lon, c_lat, c_lon)  # [fine, coarse], columns sum to 1
    rows = np.flatnonzero(_coverage(f_lat, c_lat, sphere=True) >= COVERED)
    cols = np.flatnonzero(_coverage(f_lon, c_lon, sphere=False) >= COVERED)
    if not len(rows) or not len(cols):
        raise MethodError(
            f"no cell of the coarse input (lat {c_lat[0]:g}..{c_lat[-1]:g}, lon {c_lon[0]:g}..{c_lon[-1]:g}, "
            f"{len(c_lat) - 1} x {len(c_lon) - 1} cells) lies wholly inside the target domain "
            f"({fine.describe()}): enlarge the region to cover at least one coarse cell"
        )
    to_coarse = SeparableOperator(w_lat[:, rows].T, w_lon[:, cols].T)  # fine -> observed coarse cells
    pick = SeparableOperator(np.eye(len(c_lat) - 1)[rows], np.eye(len(c_lon) - 1)[cols])
    if guidance == "dps":
        return to_coarse, np.ones((len(rows), len(cols)), bool), pick
    if guidance != "zssd":
        raise MethodError(f"guidance must be 'zssd' or 'dps', got {guidance!r}")
    o_lat, o_lon = c_lat[rows[0] : rows[-1] + 2], c_lon[cols[0] : cols[-1] + 2]  # the observed cells' edges
    if unified_resolution is None:
        uni = SeparableOperator(np.eye(len(rows)), np.eye(len(cols)))
        u_lat, u_lon = o_lat, o_lon
    else:
        u_lat, u_lon = (_lattice(e, unified_resolution) for e in (o_lat, o_lon))
        a_lat, a_lon = conservative_weights(o_lat, o_lon, u_lat, u_lon)
        uni = SeparableOperator(a_lat.T, a_lon.T)
    centres = [(e[:-1] + e[1:]) / 2 for e in (u_lat, u_lon)]
    back = bilinear_weights(centres[0], centres[1], fine.lat, fine.lon)
    project = SeparableOperator(
        _dense(back.lat, back.rows, len(centres[0])), _dense(back.lon, back.cols, len(centres[1]))
    )
    return project @ uni @ to_coarse, np.ones((fine.nlat, fine.nlon), bool), project @ uni @ pick


def _coarse_edges(coarse: Grid | xr.Dataset, fine: Grid) -> tuple[np.ndarray, np.ndarray]:
    """Cell edges of the coarse input, its longitudes moved by a multiple of 360 into the fine domain's frame."""
    from climrecon.tasks.regrid import cell_edges

    lat, lon = cell_edges(coarse)
    centre = (fine.west + fine.east) / 2
    return lat, lon + 360.0 * math.floor((centre - lon[0]) / 360.0)


def _coverage(fine_edges: np.ndarray, coarse_edges: np.ndarray, sphere: bool) -> np.ndarray:
    """Fraction of each coarse interval covered by the fine domain (in sin(lat) for latitudes)."""
    f = np.sin(np.radians(fine_edges)) if sphere else fine_edges
    c = np.sin(np.radians(coarse_edges)) if sphere else coarse_edges
    lo, hi = np.maximum(c[:-1], f[0]), np.minimum(c[1:], f[-1])
    return np.clip(hi - lo, 0, None) / (c[1:] - c[:-1])


def _lattice(edges: np.ndarray, resolution: float) -> np.ndarray:
    """Edges of the global ``resolution``-degree lattice cells (the regrid stage's unified grid) that overlap
    ``[edges[0], edges[-1]]``."""
    lo = math.floor(edges[0] / resolution + 1e-9) * resolution
    n = max(1, math.ceil((edges[-1] - lo) / resolution - 1e-9))
    return lo + resolution * np.arange(n + 1)


def _dense(weights: np.ndarray, index: np.ndarray, n: int) -> np.ndarray:
    out = np.zeros((weights.shape[0], n))
    out[:, index] = weights
    return out


class ZSSD(DPDM):
    """A ZSSD prior checkpoint guided toward the coarse input (module docstring)."""

    name = "zssd"
    # guidance acts once per network call and its strengths were tuned at EDM's 18 Heun steps; the
    # NFE-vs-skill curve (benchmarks/sampling_cost.py) covers the supervised methods only
    default_sampler: tuple[str, int] = ("heun", 18)

    def __init__(self, config: ZSSDConfig, sampler: SamplerConfig):
        if config.climatology:
            raise MethodError("zssd: method.climatology needs a coarse input in training; a prior has none")
        self.net = self._load(config, sampler, roles=("denoiser",))["denoiser"]
        if self.spec.coarse:
            raise MethodError(
                f"checkpoint {self.checkpoint} is conditioned on coarse fields ({self.metadata.method}); ZSSD "
                "samples a prior trained without them (configs/train-zssd-prior-westus.yaml)"
            )
        logs = [
            v
            for v, t in zip(self.variables, self.metadata.normalization.transforms, strict=True)
            if t != "identity"
        ]
        if logs:
            raise MethodError(
                f"zssd guides in network space, where an area mean is only exact for untransformed variables; "
                f"{logs} are transformed in checkpoint {self.checkpoint}"
            )
        self.needs = Needs(
            static=tuple(self.spec.static_names()),
            stochastic=True,
            coarse=True,
            fit=self.correction is not None,
            fit_model=self.correction is not None,
        )

    def validate(self, inputs: Inputs) -> None:
        path = self.checkpoint
        if not self.observed(inputs):
            raise MethodError(
                f"prior {path} generates {list(self.variables)}; the input has none of them ({inputs.variables})"
            )
        self._check_resolution(inputs)
        inputs.require(self.needs, f"zssd prior {path}")
        step = self.time_step
        if inputs.time_step != step and (inputs.time_step, step) != ("year", "month"):
            raise MethodError(
                f"prior {path} was trained on {per_step(step)} fields; the input is {per_step(inputs.time_step)}: "
                f"average the input to {per_step(step)} steps or train a prior on {per_step(inputs.time_step)} data"
            )
        self._check_tiling(inputs)

    def observed(self, inputs: Inputs) -> list[str]:
        """The prior's variables the input has: those are guided and returned (the others are not observed)."""
        return [v for v in self.variables if v in inputs.coarse_on_fine.data_vars]

    def operator(self, inputs: Inputs) -> tuple[SeparableOperator, np.ndarray, SeparableOperator]:
        return observation_operator(
            inputs.grid, inputs.coarse, self.config.guidance, self.config.unified_resolution
        )

    def guidance_target(
        self, inputs: Inputs, coarse: xr.Dataset
    ) -> tuple[SeparableOperator, np.ndarray, np.ndarray, float]:
        """``(A, y, weight, ||A^T W A||)`` of guidance toward ``coarse`` (the input's observed variables on its
        own grid): ``y`` [T, V, *out] the input in ``A``'s output space and network units (0 where a variable
        is absent), ``weight`` [T, V, *out] the loss weight (0: not compared; latitude-weighted for zssd)."""
        a, compared, y_op = self.operator(inputs)
        stats = self.metadata.normalization
        coarse = coarse.transpose("time", "lat", "lon").load()
        shape = (coarse.sizes["time"], coarse.sizes["lat"], coarse.sizes["lon"])
        y_phys = np.stack(  # [T, V, h, w]; a variable the input lacks is NaN: never guided, not returned
            [coarse[v].values if v in coarse else np.full(shape, np.nan) for v in self.variables], axis=1
        ).astype(np.float64)
        valid = np.isfinite(y_phys)
        y_obs = y_op(torch.from_numpy(stats.normalize(np.nan_to_num(y_phys), channel_dim=1))).numpy()
        weight = (y_op(torch.from_numpy(valid.astype(np.float64))).numpy() > 1 - 1e-6) & compared
        if self.config.guidance == "dps":
            return a, y_obs, weight.astype(np.float64), a.gram_norm()
        lat_w = np.cos(np.radians(inputs.grid.lat))  # latitude-weighted loss on the fine grid
        return a, y_obs, weight * lat_w[:, None], a.gram_norm(lat_w)

    def downscale(self, inputs: Inputs, members: int | Sequence[int] = 1, seed: int = 0) -> xr.Dataset:
        """Members guided toward ``inputs.coarse``. Annual inputs to a monthly prior: the 12 months of each
        year are sampled together (time of year and seeds of each month) and guided so that their MEAN agrees
        with the annual input; a member is the mean of its 12 months (the input's time step)."""
        index = member_indices(members)
        inputs = self._corrected_inputs(inputs)
        _, _, z_cond, toy, tiling = self._network_inputs(inputs)
        cfg = self.config
        present = self.observed(inputs)
        a, y_obs, weight, gram = self.guidance_target(inputs, inputs.coarse[present])
        if cfg.guidance == "zssd":
            # the step is zeta / ||A^T W A||, so zeta = 1 is a full correction of the best-observed pattern and
            # never overshoots, whatever the grids (a small domain where many fine cells lean on one edge cell
            # has a large ||A^T W A||)
            zeta = (cfg.zeta or ZETA) / gram
        else:  # vanilla DPS: the reference's rule, zeta / ||residual|| (the loss is the unsquared norm)
            zeta = cfg.zeta or DPS_ZETA * math.sqrt(y_obs.shape[-2] * y_obs.shape[-1])
        stats = self.metadata.normalization
        time_index = inputs.time_index()
        # k prior time steps per input time step: 12 months of each year for an annual input, else 1
        k = 12 if (inputs.time_step, self.time_step) == ("year", "month") else 1
        if k > 1:
            z_cond = np.repeat(z_cond, k, axis=0)
            toy = np.tile(((np.arange(1, 13) - 0.5) / 12).astype(np.float32), len(time_index))
            time_index = [i - i % 12 + m for i in time_index for m in range(12)]  # year * 12 + month - 1

        def wrap(t_idx: np.ndarray):
            groups = t_idx[::k] // k  # the input time step of each group of k consecutive items
            target = torch.from_numpy(y_obs[groups])
            w = torch.from_numpy(np.ascontiguousarray(weight[groups], dtype=np.float64))
            return lambda denoise: GuidedDenoiser(
                denoise,
                GroupMean(a, k),
                target,
                weight=w,
                zeta=zeta * k,  # each item carries 1/k of its group's mean: the group moves by the full step
                loss="norm" if cfg.guidance == "dps" else "mse",
                jacobian=cfg.resolved_jacobian(),
                shape=(tiling.height, tiling.width),
            )

        out = self._sample(
            z_cond,
            toy,
            tiling,
            time_index,
            index,
            seed,
            lambda t_idx, z: (
                stats.denormalize(z.cpu().to(torch.float64), channel_dim=1).numpy().astype(np.float32)
            ),
            wrap=wrap,
            items_per_call=k * max(1, self.config.items_per_call // k),  # a call holds whole groups
        )
        if k > 1:
            out = (
                out.reshape(out.shape[0], -1, k, *out.shape[2:]).mean(2, dtype=np.float64).astype(np.float32)
            )
        keep = [self.variables.index(v) for v in present]
        return self._dataset(
            inputs, out[:, :, keep], index, seed, present, guidance=cfg.guidance, months_per_input_step=k
        )

    def identity(self, members: int, seed: int) -> list[Any]:
        c = self.config
        return [
            *super().identity(members, seed),
            c.guidance,
            c.unified_resolution,
            c.zeta
            or {"zssd": ZETA, "dps": DPS_ZETA}[c.guidance],  # the default's value: a new default, new key
            c.resolved_jacobian(),
        ]

    def describe(self) -> dict[str, Any]:
        out = super().describe()
        c = self.config
        where = (
            "the input's own grid"
            if c.unified_resolution is None
            else f"the {c.unified_resolution:g}-deg unified grid"
        )
        out["report"] = (
            f"{c.key}: prior `{out['checkpoint']['path'].rsplit('/', 1)[-1]}` (step {self.metadata.step}), guidance "
            f"{c.guidance}"
            + (f" on {where}" if c.guidance == "zssd" else " on the input's cells")
            + f", jacobian {c.resolved_jacobian()}, {self.sampler.describe()}"
            + (", quantile-mapping bias correction" if self.correction is not None else "")
        )
        out["guidance"] = {
            **c.model_dump(include={"guidance", "unified_resolution", "zeta"}),
            "jacobian": c.resolved_jacobian(),
        }
        return out


# -- training ----------------------------------------------------------------------------------------------
def train(cfg: ClimReconConfig, *, progress: bool = False, log: logging.Logger | None = None) -> TrainResult:
    """Train the ZSSD prior of ``cfg.method`` on ``cfg.train``: full fine fields, conditioned on terrain,
    land fraction, position and time of year only (no coarse planes), into ``train.checkpoint``."""
    if cfg.method.climatology:
        raise MethodError("zssd: method.climatology needs a coarse input; a prior has none")
    torch.set_num_threads(cfg.train.threads)
    setup = prepare_training(cfg, cfg.method, target="full", coarse=False)
    data = {"conditioning": "prior: static fields, position and time of year only (no coarse input)"}
    return train_denoiser(cfg, setup, PRIOR_LABEL, data=data, progress=progress, log=log)


def _register() -> None:
    from climrecon.methods import register

    register(
        ZSSDConfig,
        ZSSD,
        "zero-shot posterior sampling of a terrain/time prior (unified coordinate guidance, or DPS)",
        needs="the coarse input on its own grid (any resolution); orog, orog_std, sftlf",
        train=train,
    )


_register()
