"""The one tiled sampler: a patch network turned into a full-domain denoiser, and the sampler loop around it.

A patch-trained network sees ``ph x pw`` patches; a domain of any size is covered by the overlapping tiles
of :mod:`climrecon.models.tiling`. :class:`TiledDenoiser` is a denoiser wrapper (like physicsnemo's
multi-diffusion and guidance wrappers): ``D(x; sigma)`` of B whole fields, computed by cutting ``x`` and the
conditioning into tiles, running the network on every tile in calls of a FIXED shape, and blending the
denoised tiles back with the tiling's weights. Methods wrap it further (guidance, residual + mean); the
samplers of :mod:`climrecon.models.samplers` never know that tiles exist.

:func:`sample_tiled` samples B items (e.g. months x members) at once:

- ``blend="every_step"`` (multi-diffusion; CorrDiff's patch inference, the default): the sampler integrates
  the full-domain latent and sees the blended D at every step, so overlapping tiles agree throughout.
- ``blend="once"`` (DPDM-style): every tile is an independent chain; final tiles are blended at the end.

Determinism (what the downscale stage relies on):
- item ``i`` starts from unit-normal noise on the full canvas drawn from a CPU generator seeded with
  ``seeds[i]``, then moved to the device: independent of device, batch, tiling chunking and companions;
- stochastic solvers (Heun with ``S_churn > 0``, DDIM with ``eta > 0``) draw item ``i``'s fresh noise from
  its own CPU generator seeded ``seed_for(seeds[i], 1)``;
- the network always sees calls of exactly ``max_patches_per_batch`` patches (the last padded with zeros),
  so a patch's result never depends on which other patches share its call: sampling items together or one
  by one gives the same bytes (on CPU; on CUDA up to the determinism of its kernels).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Literal

import numpy as np
import torch

from climrecon.models.samplers import ddim_sampler, dpmpp_2m_sampler, edm_sampler, make_generator, seed_for
from climrecon.models.tiling import Tiling, blend_patches, blend_weights, extract_patches
from climrecon.models.windows import WindowDenoiser, window_centres

__all__ = ["PatchNet", "TiledDenoiser", "denoise_zero", "sample_tiled", "SOLVERS", "BLENDS"]

PatchNet = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None], torch.Tensor]
"""``net(x [n, C_out, ph, pw], sigma [n], cond [n, C_cond, ph, pw] | None, time_of_year [n] | None) -> D(x)``"""

SOLVERS = ("heun", "ddim", "dpmpp2m")
BLENDS = ("every_step", "once")
_STOCHASTIC_STREAM = 1  # seed_for(seed, 1): an item's fresh sampler noise, independent of its initial noise


class TiledDenoiser:
    """``D(x; sigma)`` of B full fields from a patch network (module docstring).

    ``cond`` [B, C_cond, H, W] (domain or canvas) and ``time_of_year`` [B] are cut/repeated per tile once;
    ``chunk`` patches per network call, always (zero-padded). :meth:`tiles` denoises a tile stack
    [B * n_tiles, C, ph, pw] (item-major), :meth:`__call__` a canvas [B, C, *canvas] into the blended canvas.
    """

    def __init__(
        self,
        net: PatchNet,
        tiling: Tiling,
        cond: torch.Tensor | None,
        time_of_year: torch.Tensor | None,
        *,
        chunk: int = 32,
        taper: Literal["hann", "uniform"] = "hann",
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float64,
    ):
        if chunk < 1:
            raise ValueError(f"max_patches_per_batch must be >= 1, got {chunk}")
        self.net, self.tiling, self.chunk = net, tiling, int(chunk)
        self.device = torch.device(device)
        self.weights = torch.as_tensor(blend_weights(tiling, taper), dtype=dtype, device=self.device)
        n = tiling.n_tiles
        self.cond_tiles = None if cond is None else self.to_tiles(cond.to(self.device, torch.float32))
        self.toy_tiles = (
            None if time_of_year is None else time_of_year.to(self.device, torch.float32).repeat_interleave(n)
        )

    def to_tiles(self, field: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] (domain or canvas) -> [B * n_tiles, C, ph, pw], item-major."""
        ph, pw = self.tiling.patch
        tiles = extract_patches(field, self.tiling)  # [B, C, n, ph, pw]
        return tiles.transpose(1, 2).reshape(field.shape[0] * self.tiling.n_tiles, field.shape[1], ph, pw)

    def from_tiles(self, tiles: torch.Tensor, crop: bool) -> torch.Tensor:
        """Inverse of :meth:`to_tiles`, blended: [B * n_tiles, C, ph, pw] -> [B, C, H, W] (canvas if not crop)."""
        n, (ph, pw) = self.tiling.n_tiles, self.tiling.patch
        stack = tiles.reshape(tiles.shape[0] // n, n, tiles.shape[1], ph, pw).transpose(1, 2)
        return blend_patches(stack, self.tiling, self.weights, crop=crop)

    def tiles(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """D on a tile stack, in network calls of exactly ``chunk`` patches (one sigma for the whole stack)."""
        out = []
        sig = sigma.reshape(-1)[:1].expand(self.chunk)
        for start in range(0, x.shape[0], self.chunk):
            n = min(self.chunk, x.shape[0] - start)
            s = slice(start, start + n)
            xs = x[s]
            cs = None if self.cond_tiles is None else self.cond_tiles[s]
            ts = None if self.toy_tiles is None else self.toy_tiles[s]
            if n < self.chunk:
                pad = self.chunk - n
                xs = torch.cat([xs, xs.new_zeros((pad, *xs.shape[1:]))])
                cs = None if cs is None else torch.cat([cs, cs.new_zeros((pad, *cs.shape[1:]))])
                ts = None if ts is None else torch.cat([ts, ts.new_zeros(pad)])
            out.append(self.net(xs, sig, cs, ts)[:n].to(x.dtype))
        return torch.cat(out)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """x [B, C, *canvas] -> the blended D of all tiles on the canvas (what "every_step" integrates)."""
        return self.from_tiles(self.tiles(self.to_tiles(x), sigma), crop=False)


@torch.no_grad()
def denoise_zero(
    net: PatchNet,
    cond: np.ndarray,
    time_of_year: np.ndarray,
    tiling: Tiling,
    *,
    n_out: int,
    sigma: float,
    chunk: int = 32,
    months_per_call: int = 16,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """``D(0; sigma)`` [T, n_out, H, W] float64 on the CPU, of conditioning ``cond`` [T, C, H, W] (network space):
    the network on every tile of a zero field in calls of exactly ``chunk`` patches, blended over the domain
    (CorrDiff's regression: :data:`~climrecon.models.edm.REGRESSION_SIGMA`). Deterministic: no noise is drawn,
    and the calls' shape is fixed."""
    sig = torch.tensor([sigma], dtype=torch.float32, device=device)
    out = torch.empty((cond.shape[0], n_out, tiling.height, tiling.width), dtype=torch.float64)
    for start in range(0, cond.shape[0], months_per_call):
        s = slice(start, min(start + months_per_call, cond.shape[0]))
        c = torch.from_numpy(np.ascontiguousarray(cond[s]))
        den = TiledDenoiser(net, tiling, c, torch.from_numpy(time_of_year[s]), chunk=chunk, device=device)
        zeros = torch.zeros((c.shape[0], n_out, *tiling.canvas_shape), dtype=torch.float64, device=device)
        out[s] = den(zeros, sig)[..., : tiling.height, : tiling.width].cpu()
    return out


def _check(
    cond: torch.Tensor | None,
    toy: torch.Tensor | None,
    tiling: Tiling,
    seeds: Sequence[int],
    solver: str,
    blend: str,
    net: object,
) -> None:
    if isinstance(net, torch.nn.Module) and net.training:
        raise ValueError(
            "net is in training mode (dropout would make sampling non-deterministic): call net.eval()"
        )
    if cond is not None and (
        cond.ndim != 4 or tuple(cond.shape[-2:]) not in (tiling.domain_shape, tiling.canvas_shape)
    ):
        raise ValueError(
            f"cond must be [B, C, H, W] with (H, W) = {tiling.domain_shape} of the tiling, got "
            f"{tuple(cond.shape)}"
        )
    b = len(seeds)
    if cond is not None and cond.shape[0] != b:
        raise ValueError(f"need one seed per item: {cond.shape[0]} items, {b} seeds")
    if any(not isinstance(s, (int, np.integer)) or isinstance(s, bool) or s < 0 for s in seeds):
        raise ValueError(f"seeds must be non-negative ints (one per item), got {list(seeds)!r}")
    if toy is not None and tuple(toy.shape) != (b,):
        raise ValueError(f"time_of_year must be [B] = [{b}], got {tuple(toy.shape)}")
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
    if blend not in BLENDS:
        raise ValueError(f"blend must be one of {BLENDS}, got {blend!r}")


@torch.no_grad()
def sample_tiled(
    net: PatchNet,
    cond: torch.Tensor | None,
    time_of_year: torch.Tensor | None,
    tiling: Tiling,
    *,
    seeds: Sequence[int],
    out_channels: int,
    num_steps: int = 18,
    solver: Literal["heun", "ddim", "dpmpp2m"] = "heun",
    blend: Literal["every_step", "once"] = "every_step",
    taper: Literal["hann", "uniform"] = "hann",
    max_patches_per_batch: int = 32,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    rho: float = 7.0,
    S_churn: float = 0.0,
    S_min: float = 0.0,
    S_max: float = math.inf,
    S_noise: float = 1.0,
    eta: float = 0.0,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float64,
    wrap: Callable[[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]], Callable] | None = None,
    window: int = 1,
    sequence_length: int | None = None,
    sigmas: Sequence[float] | None = None,
    zero_start: bool = False,
) -> torch.Tensor:
    """[B, out_channels, H, W] float32 samples of ``len(seeds)`` items (module docstring for the contract).

    ``net`` is the preconditioned patch denoiser; ``cond`` [B, C_cond, H, W] its conditioning in network space
    (or None); ``solver`` "heun" is EDM's Algorithm 2 (``S_*`` churn; Algorithm 1 without churn), "ddim" uses
    ``eta``, "dpmpp2m" is DPM-Solver++(2M) (one call per step); ``sigmas`` (optional) replaces the Eq. 5
    noise levels (e.g. a distilled checkpoint's own). ``wrap`` (optional) wraps the full-domain denoiser (blend "every_step" only), e.g. for guidance.
    ``zero_start``: every item starts from a zero latent instead of its seed's noise (with a deterministic
    solver, the sampler's image of the noise distribution's centre: the same for every seed).
    ``window`` > 1: ``net`` is a prior over windows of that many steps (``window * out_channels`` channels)
    and the items are ``B / sequence_length`` whole sequences of ``sequence_length`` consecutive steps
    (step-major within each), denoised by :class:`~climrecon.models.windows.WindowDenoiser`; each window sees
    the conditioning and time of year of its centre step.
    """
    _check(cond, time_of_year, tiling, seeds, solver, blend, net)
    device = torch.device(device)
    if window > 1:
        n = sequence_length or 0
        if n < window or len(seeds) % n:
            raise ValueError(
                f"window sampling needs whole sequences of sequence_length >= window ({window}) steps; got "
                f"{len(seeds)} items, sequence_length {sequence_length}"
            )
        if blend != "every_step":
            raise ValueError("a window prior needs blend='every_step': windows share the sequence state")
        # each window is conditioned like its centre step
        centres = torch.as_tensor(
            (np.arange(len(seeds) // n)[:, None] * n + window_centres(n, window)[None]).ravel()
        )
        cond = None if cond is None else cond[centres]
        time_of_year = None if time_of_year is None else time_of_year[centres]
    denoiser = TiledDenoiser(
        net, tiling, cond, time_of_year, chunk=max_patches_per_batch, taper=taper, device=device, dtype=dtype
    )
    if window > 1:
        denoiser = WindowDenoiser(denoiser, n, window)
    latents = (
        torch.zeros((len(seeds), out_channels, *tiling.canvas_shape))
        if zero_start
        else torch.stack(
            [
                torch.randn((out_channels, *tiling.canvas_shape), generator=make_generator(int(s), "cpu"))
                for s in seeds
            ]
        )
    ).to(device)
    schedule = {
        "num_steps": num_steps,
        "sigma_min": sigma_min,
        "sigma_max": sigma_max,
        "rho": rho,
        "dtype": dtype,
        "sigmas": sigmas,
    }
    if solver == "heun":
        run = functools.partial(
            edm_sampler, **schedule, S_churn=S_churn, S_min=S_min, S_max=S_max, S_noise=S_noise
        )
    elif solver == "ddim":
        run = functools.partial(ddim_sampler, **schedule, eta=eta)
    else:
        run = functools.partial(dpmpp_2m_sampler, **schedule)
    stochastic = (solver == "heun" and S_churn > 0) or (solver == "ddim" and eta > 0)
    fresh = (
        [make_generator(seed_for(int(s), _STOCHASTIC_STREAM), "cpu") for s in seeds] if stochastic else None
    )
    if blend == "every_step":
        field = run(wrap(denoiser) if wrap else denoiser, latents, generator=fresh)
        field = field[..., : tiling.height, : tiling.width]
    else:
        if wrap is not None:
            raise ValueError(
                "a denoiser wrapper (guidance) needs blend='every_step': it acts on whole fields"
            )
        tiles = run(denoiser.tiles, denoiser.to_tiles(latents), generator=fresh)
        field = denoiser.from_tiles(tiles.to(dtype), crop=True)
    return field.to(torch.float32)
