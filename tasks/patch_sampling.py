"""Sampling a whole domain with a patch-trained diffusion model, and measuring the seams it leaves.

Two ways to cover a domain larger than the training patch with the tiles of :mod:`climrecon.tasks.tiling`:

- ``blend="once"`` (DPDM-style): every tile is sampled as an independent chain (all tiles of one batch item
  in one sampler call); the final patches are blended once with the tiling's weights.
- ``blend="every_step"`` (multi-diffusion; CorrDiff's patch-based inference): the sampler integrates the
  FULL-domain latent; the denoiser it sees extracts the tiles, runs the network on all of them and blends
  the denoised patches back into one full-domain D(x; sigma), so overlapping tiles agree at every step.

Determinism (the contract the downscale stage relies on for resumable, per-(time, member) seeds):
- The initial noise of batch item ``i`` is a unit normal drawn on the full (canvas) domain from a CPU
  ``torch.Generator`` seeded with ``seeds[i]``, then moved to ``device``: it does not depend on the device,
  the batch, or the tiling's chunking. With ``blend="once"`` each tile starts from its window of that noise.
- Stochastic samplers (Heun with ``S_churn > 0``, DDIM with ``eta > 0``) draw their fresh noise from a
  generator on ``device`` seeded with ``seed_for(seeds[i], 1)`` (the sampler draws it inside
  :func:`climrecon.models.samplers.edm_sampler`), so such runs are reproducible per device type.
- Items are sampled one after another and network calls never mix items: the result for item ``i`` is
  bit-identical whatever the batch size or the other items. ``max_patches_per_batch`` only splits the
  network calls over tiles; results agree to float rounding (bitwise where the backend's kernels do not
  depend on the batch size; the tests state what they see on CPU).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from climrecon.models.samplers import ddim_sampler, edm_sampler, make_generator, seed_for
from climrecon.tasks.tiling import Tiling, blend_patches, blend_weights, extract_patches, pad_to_canvas

__all__ = ["PatchNet", "sample_domain", "seam_ratio"]

# net(x_noisy [n, C_out, ph, pw], sigma [n], cond [n, C_cond, ph, pw], time_of_year [n] | None)
#   -> D(x) [n, C_out, ph, pw]
PatchNet = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]

_STOCHASTIC_STREAM = 1  # seed_for(seed, 1): the sampler's fresh noise, independent of the initial noise


def _out_channels(net: Any, out_channels: int | None) -> int:
    if out_channels is not None:
        return int(out_channels)
    for holder in (getattr(net, "net", None), net):  # EDMPrecond(UNet) or a bare UNet
        config = getattr(holder, "config", None)
        if hasattr(config, "out_channels"):
            return int(config.out_channels)
    raise ValueError("cannot tell how many channels the model outputs: pass out_channels=")


def _check_inputs(
    net: Any,
    cond: torch.Tensor,
    time_of_year: torch.Tensor | None,
    tiling: Tiling,
    seeds: Sequence[int],
    sampler: str,
    blend: str,
    max_patches_per_batch: int,
) -> None:
    if isinstance(net, torch.nn.Module) and net.training:
        raise ValueError(
            "net is in training mode (dropout would make sampling non-deterministic): call net.eval() first"
        )
    if cond.ndim != 4 or tuple(cond.shape[-2:]) != tiling.domain_shape:
        raise ValueError(
            f"cond must be [B, C, H, W] with (H, W) = {tiling.domain_shape} of the tiling, "
            f"got {tuple(cond.shape)}"
        )
    b = cond.shape[0]
    if len(seeds) != b or any(
        not isinstance(s, (int, np.integer)) or isinstance(s, bool) or s < 0 for s in seeds
    ):
        raise ValueError(
            f"seeds must be {b} non-negative ints (one per batch item of cond), got {list(seeds)!r}"
        )
    if time_of_year is not None and tuple(time_of_year.shape) != (b,):
        raise ValueError(f"time_of_year must be [B] = [{b}], got {tuple(time_of_year.shape)}")
    if sampler not in ("heun", "ddim"):
        raise ValueError(f"sampler must be 'heun' or 'ddim', got {sampler!r}")
    if blend not in ("once", "every_step"):
        raise ValueError(f"blend must be 'once' or 'every_step', got {blend!r}")
    if max_patches_per_batch < 1:
        raise ValueError(f"max_patches_per_batch must be >= 1, got {max_patches_per_batch}")


def _to_tiles(field: torch.Tensor, tiling: Tiling) -> torch.Tensor:
    """[C, H, W] (domain or canvas) -> [n_tiles, C, ph, pw]."""
    return extract_patches(field, tiling).transpose(0, 1)


def _from_tiles(patches: torch.Tensor, tiling: Tiling, weights: torch.Tensor, crop: bool) -> torch.Tensor:
    """[n_tiles, C, ph, pw] -> [C, H, W] (or the canvas when ``crop`` is False)."""
    return blend_patches(patches.transpose(0, 1), tiling, weights, crop=crop)


@dataclass(frozen=True)
class _TiledDenoiser:
    """D(x; sigma) on the tiles of one batch item, whose conditioning is cut into the same tiles."""

    net: PatchNet
    tiling: Tiling
    weights: torch.Tensor  # [n_tiles, ph, pw] blending weights on the sampling device
    cond_tiles: torch.Tensor  # [n_tiles, C_cond, ph, pw]
    toy_tiles: torch.Tensor | None  # [n_tiles]
    chunk: int  # at most this many tiles per network call

    def tiles(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """x [n_tiles, C_out, ph, pw], sigma [n_tiles] -> D(x) per tile (blend="once")."""
        out = []
        for start in range(0, x.shape[0], self.chunk):
            s = slice(start, start + self.chunk)
            toy = None if self.toy_tiles is None else self.toy_tiles[s]
            out.append(self.net(x[s], sigma[s], self.cond_tiles[s], toy).to(x.dtype))
        return torch.cat(out)

    def full_domain(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """x [1, C_out, *canvas], sigma [1] -> the blended D of all tiles on the canvas ("every_step")."""
        d_tiles = self.tiles(_to_tiles(x[0], self.tiling), sigma[0].expand(self.tiling.n_tiles))
        return _from_tiles(d_tiles, self.tiling, self.weights, crop=False)[None]


@torch.no_grad()
def sample_domain(
    net: PatchNet,
    cond: torch.Tensor,
    time_of_year: torch.Tensor | None,
    tiling: Tiling,
    *,
    seeds: Sequence[int],
    num_steps: int = 18,
    sampler: Literal["heun", "ddim"] = "heun",
    blend: Literal["once", "every_step"] = "every_step",
    taper: Literal["hann", "uniform"] = "hann",
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    rho: float = 7.0,
    S_churn: float = 0.0,
    S_min: float = 0.0,
    S_max: float = math.inf,
    S_noise: float = 1.0,
    eta: float = 0.0,
    out_channels: int | None = None,
    device: torch.device | str | None = None,
    max_patches_per_batch: int = 64,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """Sample ``cond.shape[0]`` full-domain fields with a patch model: [B, C_out, H, W] float32 on ``device``.

    ``net(x, sigma, cond, time_of_year)`` is the preconditioned denoiser D (e.g. ``EDMPrecond``) working on
    ``tiling.patch``-sized tiles; ``cond`` [B, C_cond, H, W] is the conditioning on the domain (padded by
    reflection with the tiles where the domain is smaller than a patch); ``time_of_year`` [B] or None.
    ``seeds[i]`` fixes item ``i`` completely (module docstring). ``sampler="heun"`` is EDM's Algorithm 2
    (``S_*`` churn settings), ``"ddim"`` uses ``eta``. ``device`` defaults to the device of ``net``'s
    parameters (CPU for a plain callable).
    """
    _check_inputs(net, cond, time_of_year, tiling, seeds, sampler, blend, max_patches_per_batch)
    if device is None:
        param = next(net.parameters(), None) if isinstance(net, torch.nn.Module) else None
        device = param.device if param is not None else torch.device("cpu")
    device = torch.device(device)
    c_out = _out_channels(net, out_channels)
    weights = torch.as_tensor(blend_weights(tiling, taper), dtype=dtype, device=device)
    schedule = {
        "num_steps": num_steps,
        "sigma_min": sigma_min,
        "sigma_max": sigma_max,
        "rho": rho,
        "dtype": dtype,
    }
    if sampler == "heun":
        run_sampler = functools.partial(
            edm_sampler, **schedule, S_churn=S_churn, S_min=S_min, S_max=S_max, S_noise=S_noise
        )
    else:
        run_sampler = functools.partial(ddim_sampler, **schedule, eta=eta)

    samples = []
    for i, seed in enumerate(seeds):
        # Initial noise on the full canvas, from a CPU generator: independent of device, batch and chunking.
        latents = torch.randn((c_out, *tiling.canvas_shape), generator=make_generator(int(seed), "cpu"))
        latents = latents.to(device)
        fresh_noise = make_generator(seed_for(int(seed), _STOCHASTIC_STREAM), device)
        denoiser = _TiledDenoiser(
            net=net,
            tiling=tiling,
            weights=weights,
            cond_tiles=_to_tiles(pad_to_canvas(cond[i].to(device, torch.float32), tiling), tiling),
            toy_tiles=None if time_of_year is None else time_of_year[i].to(device).expand(tiling.n_tiles),
            chunk=max_patches_per_batch,
        )
        if blend == "once":
            tiles = run_sampler(denoiser.tiles, _to_tiles(latents, tiling), generator=fresh_noise)
            field = _from_tiles(tiles.to(dtype), tiling, weights, crop=True)
        else:
            canvas = run_sampler(denoiser.full_domain, latents[None], generator=fresh_noise)[0]
            field = canvas[..., : tiling.height, : tiling.width]
        samples.append(field.to(torch.float32))
    return torch.stack(samples)


def _edge_pairs(origins: tuple[int, ...], patch: int, n: int) -> np.ndarray:
    """Indices j of the differences field[j+1] - field[j] that straddle an interior tile edge on one axis."""
    edges = {o for o in origins if 0 < o < n} | {o + patch for o in origins if o + patch < n}
    return np.array(sorted(e - 1 for e in edges), dtype=np.int64)


def seam_ratio(field: np.ndarray | torch.Tensor, tiling: Tiling) -> float:
    """Mean |difference| of neighbouring cells across interior tile edges / the mean over all other pairs.

    ``field`` [..., H, W] on the tiling's domain (leading dims are pooled). A pair straddles an edge when
    the two cells lie on either side of the first or last row (column) of some tile, inside the domain. A
    seamless stationary field gives ~1; seams give > 1. Raises ``ValueError`` for a single-tile tiling.
    """
    f = field.detach().cpu().numpy() if isinstance(field, torch.Tensor) else np.asarray(field)
    if f.ndim < 2 or tuple(f.shape[-2:]) != tiling.domain_shape:
        raise ValueError(
            f"field must be [..., H, W] with (H, W) = {tiling.domain_shape}, got {tuple(f.shape)}"
        )
    f = f.astype(np.float64)
    seam_rows = _edge_pairs(tiling.row_origins, tiling.patch[0], tiling.height)
    seam_cols = _edge_pairs(tiling.col_origins, tiling.patch[1], tiling.width)
    if seam_rows.size == 0 and seam_cols.size == 0:
        raise ValueError(
            f"a tiling of {tiling.n_tiles} tile(s) over {tiling.domain_shape} has no interior tile edges"
        )
    dy = np.abs(np.diff(f, axis=-2))  # [..., H-1, W]
    dx = np.abs(np.diff(f, axis=-1))  # [..., H, W-1]
    seam_y = np.zeros(dy.shape[-2], dtype=bool)
    seam_y[seam_rows] = True
    seam_x = np.zeros(dx.shape[-1], dtype=bool)
    seam_x[seam_cols] = True
    seam_sum = dy[..., seam_y, :].sum() + dx[..., seam_x].sum()
    seam_count = dy[..., seam_y, :].size + dx[..., seam_x].size
    inner_sum = dy[..., ~seam_y, :].sum() + dx[..., ~seam_x].sum()
    inner_count = dy[..., ~seam_y, :].size + dx[..., ~seam_x].size
    inner = inner_sum / inner_count
    if inner == 0:
        raise ValueError("the field is constant inside tiles: the seam ratio is undefined")
    return float(seam_sum / seam_count / inner)
