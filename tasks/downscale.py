"""Downscale stage: a regridded GCM store -> an N-member high-resolution ensemble, by patch diffusion.

Input: the regrid stage's *fine* store (the coarse field bilinearly put on the fine grid: the model's
``<var>_coarse`` conditioning), its *static* store on the same grid (``orog``, ``orog_std``, ``sftlf``)
and, for checking only, its *coarse* store. Output: one :class:`~climrecon.stores.StageStore` at
``<root>/downscale/<source>.<experiment>.<member_id>.<method>.<key>.zarr`` holding the checkpoint's
variables as float32 ``(member, time, lat, lon)``, chunks ``member=1, time=time_chunk``, lat/lon whole;
coords ``member`` (0..N-1), ``time`` (cftime month starts in the source's calendar) + ``time_bnds``,
``lat``, ``lon``; attributes ``climrecon_key``, ``history``, ``climrecon_downscale_config`` (JSON) and,
once complete, ``climrecon_provenance`` (JSON, :func:`climrecon.provenance.stage_record`).

Work is cut into :class:`WorkUnit` s of ``months_per_unit`` steps x ``members_per_unit`` members, each one
chunk-aligned region with its own done marker. :func:`sample_unit` (pinned to GPU workers when there are
any) reads the unit's conditioning and samples every (time, member) item of the unit together:
:func:`sample_items` runs all their patches through the network in calls of exactly
``max_patches_per_batch`` patches (the last call padded), so a patch's result never depends on which other
patches share its call. :func:`write_unit` (any worker) writes the region, then its marker.

Determinism: item (t, m) starts from the unit-normal noise of ``seed_for(seed, month_index(t), m)`` with
``month_index = year * 12 + month - 1`` (absolute, so a store covering 1990-2000 and one covering
1995-2000 agree on 1995-2000), drawn on the CPU; the Heun sampler is deterministic (no churn). The bytes
written do not depend on unit sizes, the number of workers or which worker ran a unit (bitwise on CPU;
on CUDA up to the determinism of the GPU kernels).

Model inputs and outputs are exactly training's (:mod:`climrecon.tasks.training_data`): the conditioning
is normalised by :func:`~climrecon.tasks.conditioning.normalize_conditioning` with the full-field statistics the checkpoint recorded
(``metadata.data["conditioning_normalization"]``, else its target statistics), and the network output is
denormalised with the target statistics and, for a residual model (``metadata.data["target"] ==
"residual"``), added to the coarse field on the fine grid (:func:`physical_fields`).
"""

from __future__ import annotations

import functools
import json
import math
import os
import time as _time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import dask.array as da
import numpy as np
import torch
import xarray as xr

from climrecon.config import DownscaleConfig
from climrecon.provenance import hardware, stage_attrs, stage_record, utc_now
from climrecon.storage import join_url, public_url
from climrecon.stores import StageStore, content_key
from climrecon.models.checkpoint import CheckpointMetadata, load_checkpoint, read_checkpoint
from climrecon.models.normalization import NormalizationStats
from climrecon.models.samplers import edm_sampler, make_generator, seed_for
from climrecon.tasks.conditioning import (
    ConditioningError,
    ConditioningSpec,
    conditioning_stack,
    normalize_conditioning,
    time_of_year,
)
from climrecon.tasks.tiling import (
    Tiling,
    TilingError,
    blend_patches,
    blend_weights,
    extract_patches,
    make_tiling,
)
from climrecon.tasks.training_data import TARGET_KINDS

__all__ = [
    "DOWNSCALE_VERSION",
    "DownscaleError",
    "DownscalePlan",
    "UnitReport",
    "WorkUnit",
    "default_checkpoint",
    "finalize_downscale",
    "item_seeds",
    "month_index",
    "checkpoint_spec",
    "network_conditioning",
    "physical_fields",
    "plan_downscale",
    "prepare_downscale",
    "run_downscale",
    "run_units",
    "sample_items",
    "sample_unit",
    "write_unit",
]

DOWNSCALE_VERSION = 1  # bump when what the stage computes changes, so old stores are not reused
REPO_ROOT = Path(__file__).resolve().parent.parent
_TIME_CODER = xr.coders.CFDatetimeCoder(use_cftime=True)


class DownscaleError(ValueError):
    """Inputs, checkpoint or config cannot be downscaled together; the message names the one at fault."""


# -- units and seeds ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class WorkUnit:
    """A block of time steps x members: one chunk-aligned region of the member store."""

    time: slice
    member: slice
    period: str  # "1990-01..1990-12"

    @property
    def label(self) -> str:
        """``"1990-01..1990-12 m0-7"``: the readable name of the unit (task names, messages)."""
        return f"{self.period} m{self.member.start}-{self.member.stop - 1}"

    @property
    def region(self) -> dict[str, slice]:
        return {"member": self.member, "time": self.time}

    @property
    def size(self) -> int:
        """Items (months x members) in the unit."""
        return (self.time.stop - self.time.start) * (self.member.stop - self.member.start)


def month_index(times: Sequence[Any]) -> list[int]:
    """Absolute month of each cftime label: ``year * 12 + month - 1`` (the time part of every seed)."""
    out = [int(t.year) * 12 + int(t.month) - 1 for t in times]
    if any(i < 0 for i in out):
        raise DownscaleError(f"time labels before year 0 cannot be seeded (first: {times[0]})")
    return out


def item_seeds(base_seed: int, months: Sequence[int], members: Sequence[int]) -> list[int]:
    """Seeds of the items of a unit in its order (member-major, then time): ``seed_for(base, month, m)``."""
    return [seed_for(base_seed, int(t), int(m)) for m in members for t in months]


# -- conditioning -----------------------------------------------------------------------------------------
def checkpoint_spec(metadata: CheckpointMetadata, path: str) -> ConditioningSpec:
    """The ConditioningSpec whose channel names are the checkpoint's ``cond_channels``."""
    factor = int(metadata.grid.coarsening_factor or 1)
    try:
        spec = ConditioningSpec.from_channel_names(metadata.variables, factor, metadata.cond_channels)
    except ConditioningError as exc:
        raise DownscaleError(
            f"checkpoint {path} expects conditioning channels {list(metadata.cond_channels)}, which this downscale "
            f"stage cannot build: {exc}"
        ) from None
    return spec


def network_conditioning(stack: np.ndarray, channels: Sequence[str], metadata: CheckpointMetadata) -> np.ndarray:
    """[T, C, H, W] conditioning in physical units -> network space, exactly as in training."""
    if metadata.normalization is None:
        raise DownscaleError("checkpoint has no normalization statistics; it cannot be used for sampling")
    recorded = metadata.data.get("conditioning_normalization")
    stats = NormalizationStats.from_dict(recorded) if recorded else metadata.normalization
    return normalize_conditioning(stack, channels, stats).astype(np.float32)


def physical_fields(z: torch.Tensor, cond: np.ndarray, channels: Sequence[str], metadata: CheckpointMetadata) -> np.ndarray:
    """Network output [N, V, H, W] -> physical fields [N, V, H, W], given the items' physical conditioning
    [N, C, H, W]: denormalised with the target statistics, plus ``<v>_coarse`` for a residual model."""
    x = metadata.normalization.denormalize(z.cpu(), channel_dim=1).numpy().astype(np.float32)
    kind = metadata.data.get("target", "full")
    if kind not in TARGET_KINDS:
        raise DownscaleError(f"checkpoint records target kind {kind!r}; this code knows {TARGET_KINDS}")
    if kind == "residual":
        coarse = np.stack([cond[:, list(channels).index(f"{v}_coarse")] for v in metadata.variables], axis=1)
        x = x + coarse
    return x


# -- sampling ------------------------------------------------------------------------------------------------
def _net_on_patches(net: Callable, chunk: int) -> Callable:
    """D over a stack of patches in calls of exactly ``chunk`` patches (the last padded with zeros).

    A fixed call shape makes a patch's result independent of how many items a unit holds: backends may
    pick other kernels (other float rounding) for other batch sizes, never for other companions.
    """

    def run(x: torch.Tensor, sigma: torch.Tensor, cond: torch.Tensor, toy: torch.Tensor | None) -> torch.Tensor:
        out = []
        for start in range(0, x.shape[0], chunk):
            n = min(chunk, x.shape[0] - start)
            s = slice(start, start + n)
            xs, cs = x[s], cond[s]
            ts = None if toy is None else toy[s]
            if n < chunk:
                pad = chunk - n
                xs = torch.cat([xs, xs.new_zeros((pad, *xs.shape[1:]))])
                cs = torch.cat([cs, cs.new_zeros((pad, *cs.shape[1:]))])
                ts = None if ts is None else torch.cat([ts, ts.new_zeros(pad)])
            sig = sigma.reshape(-1)[:1].expand(chunk)
            out.append(net(xs, sig, cs, ts)[:n].to(x.dtype))
        return torch.cat(out)

    return run


@torch.no_grad()
def sample_items(
    net: Callable,
    cond: torch.Tensor,
    toy: torch.Tensor | None,
    tiling: Tiling,
    *,
    seeds: Sequence[int],
    out_channels: int,
    num_steps: int = 18,
    blend: Literal["every_step", "once"] = "every_step",
    max_patches_per_batch: int = 32,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """[B, out_channels, H, W] float32 samples of all ``B`` items at once (deterministic Heun, EDM Alg. 1).

    The same chains as :func:`climrecon.tasks.patch_sampling.sample_domain` (item ``i`` starts from the
    canvas noise of ``seeds[i]`` drawn on the CPU; ``blend`` "every_step" blends the denoised tiles into
    one full-domain D at every step, "once" blends independent tile chains at the end), but the patches
    of every item share the network calls (:func:`_net_on_patches`) to fill the device.
    """
    b, n = cond.shape[0], tiling.n_tiles
    if len(seeds) != b:
        raise ValueError(f"need one seed per item: {b} items, {len(seeds)} seeds")
    if blend not in ("every_step", "once"):
        raise ValueError(f"blend must be 'every_step' or 'once', got {blend!r}")
    device = torch.device(device)
    ph, pw = tiling.patch
    weights = torch.as_tensor(blend_weights(tiling), dtype=dtype, device=device)
    latents = torch.stack(
        [torch.randn((out_channels, *tiling.canvas_shape), generator=make_generator(int(s), "cpu")) for s in seeds]
    ).to(device)

    def to_tiles(field: torch.Tensor) -> torch.Tensor:  # [B, C, H, W] -> [B * n, C, ph, pw], item-major
        tiles = extract_patches(field, tiling)  # [B, C, n, ph, pw]
        return tiles.transpose(1, 2).reshape(b * n, field.shape[1], ph, pw)

    def from_tiles(tiles: torch.Tensor, crop: bool) -> torch.Tensor:  # inverse of to_tiles, blended
        stack = tiles.reshape(b, n, tiles.shape[1], ph, pw).transpose(1, 2)
        return blend_patches(stack, tiling, weights, crop=crop)

    cond_tiles = to_tiles(cond.to(device, torch.float32))
    toy_tiles = None if toy is None else toy.to(device, torch.float32).repeat_interleave(n)
    net_tiles = _net_on_patches(net, max_patches_per_batch)
    schedule = {"num_steps": num_steps, "dtype": dtype}
    if blend == "every_step":
        def denoise(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
            return from_tiles(net_tiles(to_tiles(x), sigma, cond_tiles, toy_tiles), crop=False)

        field = edm_sampler(denoise, latents, **schedule)[..., : tiling.height, : tiling.width]
    else:
        tiles = edm_sampler(lambda x, s: net_tiles(x, s, cond_tiles, toy_tiles), to_tiles(latents), **schedule)
        field = from_tiles(tiles.to(dtype), crop=True)
    return field.to(torch.float32)


# -- the plan ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class UnitReport:
    """What one unit did: where it sampled, on which device, for how long."""

    label: str
    items: int
    worker: str | None
    device: str
    sample_seconds: float
    written: bool = False
    hardware: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class DownscalePlan:
    """Everything a worker needs for one member store (picklable, no secrets)."""

    name: str  # "<source>.<experiment>.<member_id>.<method>"
    config: DownscaleConfig
    checkpoint: str
    checkpoint_sha256: str
    method: str
    variables: tuple[str, ...]
    channels: tuple[str, ...]
    spec: ConditioningSpec
    tiling: Tiling
    fine_url: str
    fine_key: str
    static_url: str
    static_key: str
    coarse_url: str | None
    coarse_key: str | None
    time_labels: tuple[str, ...]
    months: tuple[int, ...]  # month_index of every time step
    out_url: str
    out_key: str
    identity: dict[str, str]
    upstream: dict[str, Any]
    checkpoint_info: dict[str, Any]
    started: str

    @property
    def n_time(self) -> int:
        return len(self.time_labels)

    def units(self) -> list[WorkUnit]:
        """Every work unit, time-major: blocks of months_per_unit steps (the last may be shorter) x members."""
        cfg = self.config
        out = []
        for t0 in range(0, self.n_time, cfg.months_per_unit):
            t = slice(t0, min(t0 + cfg.months_per_unit, self.n_time))
            period = f"{self.time_labels[t.start]}..{self.time_labels[t.stop - 1]}"
            for m0 in range(0, cfg.members, cfg.members_per_unit):
                out.append(WorkUnit(t, slice(m0, min(m0 + cfg.members_per_unit, cfg.members)), period))
        return out


def default_checkpoint(configured: str | None) -> str:
    """The configured checkpoint (relative paths: to the working directory, else the repo root), or the one
    ``*.pt`` file shipped in ``<repo>/checkpoints/``."""
    if configured:
        path = Path(configured)
        if not path.is_absolute() and not path.exists() and (REPO_ROOT / path).exists():
            path = REPO_ROOT / path
        return str(path)
    found = sorted((REPO_ROOT / "checkpoints").glob("*.pt"))
    if len(found) != 1:
        raise DownscaleError(
            f"downscale.checkpoint is not set and {REPO_ROOT / 'checkpoints'} holds {len(found)} *.pt file(s) "
            f"{[p.name for p in found]}; set downscale.checkpoint to the model to sample with"
        )
    return str(found[0])


def _open(url: str, storage_options: dict[str, Any] | None, what: str) -> xr.Dataset:
    try:
        ds = xr.open_zarr(url, storage_options=storage_options or None, decode_times=_TIME_CODER, chunks=None)
    except (FileNotFoundError, KeyError, ValueError, OSError) as exc:
        raise DownscaleError(f"cannot open the {what} {url}: {type(exc).__name__}: {exc}") from None
    status = ds.attrs.get("climrecon_status", "complete")
    if status != "complete":
        raise DownscaleError(f"the {what} {url} is {status!r}, not complete: finish the regrid stage first")
    return ds


def _step(values: Any, what: str) -> float:
    v = np.asarray(values, dtype=float)
    if v.size < 2:
        raise DownscaleError(f"{what} has fewer than 2 cells; cannot tell its resolution")
    steps = np.diff(v)
    if not np.allclose(steps, steps[0], rtol=1e-6, atol=1e-9) or steps[0] <= 0:
        raise DownscaleError(f"{what} is not a regular ascending grid")
    return float(steps[0])


def _coarse_resolution(fine: xr.Dataset, coarse: xr.Dataset | None, fine_url: str, coarse_url: str | None) -> float:
    if coarse is not None:
        return _step(coarse["lat"], f"coarse store {coarse_url}: lat")
    raw = fine.attrs.get("climrecon_regrid_config")
    try:
        return float(json.loads(raw)["coarse_resolution"])
    except (TypeError, ValueError, KeyError):
        raise DownscaleError(
            f"cannot tell the coarse resolution behind the fine store {fine_url} (no climrecon_regrid_config "
            "attribute): pass the regrid stage's coarse store (downscale.coarse)"
        ) from None


def _identity(fine: xr.Dataset, fine_url: str, fine_key: str, method: str) -> dict[str, str]:
    wanted = ("source_id", "experiment_id", "member_id")
    ident = {f: str(fine.attrs[f]) for f in wanted if fine.attrs.get(f)}
    if len(ident) < 3:
        parts = fine_url.rstrip("/").rsplit("/", 1)[-1].split(".")
        if len(parts) < 4:
            raise DownscaleError(
                f"cannot tell source/experiment/member of {fine_url}: it has no source_id/experiment_id/member_id "
                "attributes and its name is not <source>.<experiment>.<member_id>...zarr"
            )
        ident = {**dict(zip(wanted, parts[:3], strict=True)), **ident}
    return {**ident, "method": method}


def plan_downscale(
    cfg: DownscaleConfig,
    root: str,
    fine_url: str,
    static_url: str,
    coarse_url: str | None = None,
    checkpoint: str | None = None,
    storage_options: dict[str, Any] | None = None,
) -> DownscalePlan:
    """Check the inputs against the checkpoint and name the member store; writes nothing.

    Raises :class:`DownscaleError` when the coarse resolution behind the fine store differs from the
    checkpoint's ``fine_resolution x coarsening_factor`` (naming the ``regrid.coarse_resolution`` to use),
    the fine grid's spacing differs from the checkpoint's, a variable the model predicts is missing, the
    static store is on another grid or lacks a static channel, or the tiling cannot be built.
    """
    path = default_checkpoint(checkpoint or cfg.checkpoint)
    contents = read_checkpoint(path)  # verified: raises CheckpointError naming the file
    meta = contents.metadata
    sha = str(contents.header["content_sha256"])
    fine = _open(fine_url, storage_options, "regridded fine store")
    static = _open(static_url, storage_options, "static store")
    coarse = _open(coarse_url, storage_options, "regridded coarse store") if coarse_url else None

    missing = [v for v in meta.variables if v not in fine.data_vars]
    if missing:
        raise DownscaleError(
            f"checkpoint {path} downscales {list(meta.variables)} but the regridded store {fine_url} lacks "
            f"{missing} (it has {sorted(map(str, fine.data_vars))}); ingest and regrid those variables"
        )
    g = meta.grid
    dlat, dlon = _step(fine["lat"], f"fine store {fine_url}: lat"), _step(fine["lon"], f"fine store {fine_url}: lon")
    if g.fine_resolution and not (math.isclose(dlat, g.fine_resolution) and math.isclose(dlon, g.fine_resolution)):
        raise DownscaleError(
            f"the regridded fine store {fine_url} is on a {dlat:g} x {dlon:g} deg grid but checkpoint {path} was "
            f"trained at {g.fine_resolution:g} deg: re-run regrid with regrid.resolution={g.fine_resolution:g}"
        )
    if g.fine_resolution and g.coarsening_factor:
        wanted = g.fine_resolution * g.coarsening_factor
        have = _coarse_resolution(fine, coarse, fine_url, coarse_url)
        if not math.isclose(have, wanted, rel_tol=1e-6):
            raise DownscaleError(
                f"the regridded store {fine_url} was made from a {have:g}-deg coarse grid but checkpoint {path} was "
                f"trained to downscale {g.fine_resolution:g} deg x {g.coarsening_factor} = {wanted:g} deg: re-run "
                f"regrid with regrid.coarse_resolution={wanted:g} (or use a checkpoint trained for {have:g} deg)"
            )
    for c in ("lat", "lon"):
        if static.sizes.get(c) != fine.sizes[c] or not np.allclose(static[c].values, fine[c].values, atol=1e-6):
            raise DownscaleError(
                f"the static store {static_url} is not on the grid of the fine store {fine_url} ({c}: "
                f"{static.sizes.get(c)} vs {fine.sizes[c]} cells); use the static store the same regrid run wrote"
            )
    spec = checkpoint_spec(meta, path)
    lacking = [s for s in spec.static_names() if s not in static.data_vars]
    if lacking:
        raise DownscaleError(
            f"static store {static_url} lacks {lacking} that checkpoint {path} is conditioned on; re-run the "
            "regrid stage of this version (it writes the <name>_coarse views too)"
        )
    if not g.patch_size:
        raise DownscaleError(f"checkpoint {path} records no grid.patch_size; cannot tile the domain for it")
    patch = int(g.patch_size)
    overlap = cfg.overlap if cfg.overlap is not None else patch // 4
    try:
        tiling = make_tiling(fine.sizes["lat"], fine.sizes["lon"], patch, overlap)
    except TilingError as exc:
        raise DownscaleError(f"downscale.overlap / checkpoint patch size {patch}: {exc}") from None

    fine_key = str(fine.attrs.get("climrecon_key") or content_key("foreign-fine", fine_url, dict(fine.sizes)))
    static_key = str(static.attrs.get("climrecon_key") or content_key("foreign-static", static_url, dict(static.sizes)))
    coarse_key = None if coarse is None else str(coarse.attrs.get("climrecon_key", ""))
    times = fine["time"].values
    identity = _identity(fine, fine_url, fine_key, meta.method)
    key = content_key(
        "downscale", DOWNSCALE_VERSION, fine_key, static_key, sha, cfg.members, cfg.seed, cfg.num_steps,
        cfg.blend, patch, overlap, cfg.time_chunk, cfg.zarr_format,
    )
    name = ".".join(identity[f] for f in ("source_id", "experiment_id", "member_id", "method"))
    upstream_record = fine.attrs.get("climrecon_provenance")
    try:
        upstream = json.loads(upstream_record) if upstream_record else None
    except ValueError:
        upstream = None
    upstream = upstream or {"stage": "regrid", "store": public_url(fine_url), "content_key": fine_key,
                            "history": str(fine.attrs.get("history", ""))}
    return DownscalePlan(
        name=name,
        config=cfg,
        checkpoint=path,
        checkpoint_sha256=sha,
        method=meta.method,
        variables=tuple(meta.variables),
        channels=tuple(meta.cond_channels),
        spec=spec,
        tiling=tiling,
        fine_url=fine_url,
        fine_key=fine_key,
        static_url=static_url,
        static_key=static_key,
        coarse_url=coarse_url,
        coarse_key=coarse_key,
        time_labels=tuple(f"{t.year:04d}-{t.month:02d}" for t in times),
        months=tuple(month_index(times)),
        out_url=join_url(root, "downscale", f"{name}.{key}.zarr"),
        out_key=key,
        identity=identity,
        upstream=upstream,
        checkpoint_info={"path": path, "sha256": sha, "method": meta.method, "step": meta.step,
                         "train": meta.train, "data": meta.data, "grid": meta.grid.to_dict()},
        started=utc_now(),
    )


# -- the store ------------------------------------------------------------------------------------------------
def _store(plan: DownscalePlan, storage_options: dict[str, Any] | None) -> StageStore:
    return StageStore(plan.out_url, plan.out_key, dict(storage_options or {}))


def _template(plan: DownscalePlan, fine: xr.Dataset) -> tuple[xr.Dataset, dict[str, Any]]:
    cfg = plan.config
    n_m, n_t, n_y, n_x = cfg.members, plan.n_time, fine.sizes["lat"], fine.sizes["lon"]
    time_var = fine["time"].variable.to_base_variable()
    coords = {"member": ("member", np.arange(n_m, dtype=np.int64), {"long_name": "ensemble member",
                                                                    "standard_name": "realization"}),
              "time": time_var, "lat": fine["lat"].variable, "lon": fine["lon"].variable}
    ds = xr.Dataset(coords=coords)
    enc_time = {k: fine["time"].encoding[k] for k in ("units", "calendar") if k in fine["time"].encoding}
    encoding: dict[str, Any] = {"time": {**enc_time, "dtype": "float64", "chunks": (cfg.time_chunk,)}}
    if "time_bnds" in fine:
        ds["time_bnds"] = fine["time_bnds"].variable.to_base_variable().load()
        encoding["time_bnds"] = {**enc_time, "dtype": "float64", "chunks": (cfg.time_chunk, ds.sizes["bnds"])}
        ds["time"].attrs["bounds"] = "time_bnds"
    for b in ("lat_bnds", "lon_bnds"):
        if b in fine.variables:
            ds = ds.assign_coords({b: fine[b].variable.load()})
    for v in plan.variables:
        empty = da.empty((n_m, n_t, n_y, n_x), chunks=(1, cfg.time_chunk, n_y, n_x), dtype=np.float32)
        attrs = {k: fine[v].attrs[k] for k in ("units", "standard_name", "long_name") if k in fine[v].attrs}
        ds[v] = xr.DataArray(empty, dims=("member", "time", "lat", "lon"), attrs=attrs)
        encoding[v] = {"dtype": "float32", "chunks": (1, cfg.time_chunk, n_y, n_x)}
    ds.attrs = {
        **plan.identity,
        "title": f"ClimRecon downscaled ensemble of {plan.name} ({n_m} members)",
        "Conventions": "CF-1.8",
        **stage_attrs("downscale", cfg, plan.out_key, str(fine.attrs.get("history", "")),
                      checkpoint=plan.checkpoint, checkpoint_sha256=plan.checkpoint_sha256),
    }
    return ds, encoding


def prepare_downscale(plan: DownscalePlan, storage_options: dict[str, Any] | None = None) -> list[WorkUnit]:
    """Write the member store's template (once); the units without a done marker."""
    store = _store(plan, storage_options)
    if store.is_complete():
        return []
    template, encoding = _template(plan, _open(plan.fine_url, storage_options, "regridded fine store"))
    store.initialize(template, encoding=encoding, zarr_format=plan.config.zarr_format)  # no-op if there
    units = plan.units()
    pending = {str(r) for r in store.pending([u.region for u in units])}
    return [u for u in units if str(u.region) in pending]


# -- units ----------------------------------------------------------------------------------------------------
def _device(requested: str) -> torch.device:
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise DownscaleError("downscale.device is 'cuda' but this worker has no CUDA device")
        return torch.device("cuda")
    return torch.device("cpu")


@functools.lru_cache(maxsize=2)
def _model(path: str, sha: str, device: str) -> tuple[Any, CheckpointMetadata]:
    """The checkpoint's model on ``device``, loaded once per worker process (keyed by its content hash)."""
    model, meta = load_checkpoint(path, map_location=device)
    return model, meta


def _worker_address() -> str | None:
    try:
        from distributed import get_worker

        return get_worker().address
    except (ImportError, ValueError):
        return None


def _conditioning(plan: DownscalePlan, unit: WorkUnit, storage_options: dict[str, Any] | None) -> tuple[np.ndarray, np.ndarray]:
    """The unit's conditioning [T, C, H, W] in physical units and its time of year [T]."""
    fine = _open(plan.fine_url, storage_options, "regridded fine store")[list(plan.variables)].isel(time=unit.time)
    static = _open(plan.static_url, storage_options, "static store")[plan.spec.static_names()]
    try:
        stack = conditioning_stack(fine.load(), static.load(), plan.spec)
    except ConditioningError as exc:
        raise DownscaleError(f"{plan.fine_url}: {exc}") from None
    values = stack.values
    bad = ~np.isfinite(values).all(axis=(1, 2, 3))
    if bad.any():
        raise DownscaleError(
            f"conditioning of {plan.name} has NaN/inf at {[plan.time_labels[unit.time.start + i] for i in np.flatnonzero(bad)]} "
            f"(channels {plan.channels}); check the regridded stores {plan.fine_url} and {plan.static_url}"
        )
    return values, time_of_year(fine["time"].values)


def sample_unit(
    plan: DownscalePlan, unit: WorkUnit, storage_options: dict[str, Any] | None = None
) -> tuple[dict[str, np.ndarray], UnitReport]:
    """Sample every (member, time) item of ``unit``: ``{variable: (member, time, lat, lon) float32}`` + report."""
    cfg = plan.config
    device = _device(cfg.device)
    t0 = _time.perf_counter()
    model, meta = _model(plan.checkpoint, plan.checkpoint_sha256, str(device))
    cond, toy = _conditioning(plan, unit, storage_options)
    cond_net = network_conditioning(cond, plan.channels, meta)
    members = range(unit.member.start, unit.member.stop)
    n_t = unit.time.stop - unit.time.start
    seeds = item_seeds(cfg.seed, plan.months[unit.time], members)
    cond_items = torch.from_numpy(np.tile(cond_net, (len(members), 1, 1, 1)))  # member-major, like the seeds
    toy_items = torch.from_numpy(np.tile(toy, len(members)))
    z = sample_items(
        model, cond_items, toy_items, plan.tiling, seeds=seeds, out_channels=len(plan.variables),
        num_steps=cfg.num_steps, blend=cfg.blend, max_patches_per_batch=cfg.max_patches_per_batch, device=device,
    )
    x = physical_fields(z, np.tile(cond, (len(members), 1, 1, 1)), plan.channels, meta)
    x = x.reshape(len(members), n_t, len(plan.variables), *x.shape[-2:])
    fields = {v: np.ascontiguousarray(x[:, :, i]) for i, v in enumerate(plan.variables)}
    report = UnitReport(unit.label, unit.size, _worker_address(), str(device), _time.perf_counter() - t0,
                        hardware=hardware())
    return fields, report


def write_unit(
    plan: DownscalePlan,
    unit: WorkUnit,
    sampled: tuple[dict[str, np.ndarray], UnitReport],
    storage_options: dict[str, Any] | None = None,
) -> UnitReport:
    """Write a sampled unit into its region of the member store, then its done marker."""
    fields, report = sampled
    block = xr.Dataset({v: (("member", "time", "lat", "lon"), a) for v, a in fields.items()})
    _store(plan, storage_options).write_block(block, unit.region)
    return UnitReport(**{**report.__dict__, "written": True})


def run_units(
    plan: DownscalePlan,
    units: Sequence[WorkUnit],
    storage_options: dict[str, Any] | None = None,
    client: Any = None,
    resources: Mapping[str, float] | None = None,
    on_done: Callable[[UnitReport], None] | None = None,
) -> list[UnitReport]:
    """Sample and write ``units``: in this process, or on ``client`` (sampling with ``resources``, e.g.
    ``{"GPU": 1}`` to pin it to GPU workers; writing anywhere). ``on_done`` is called as each unit finishes.
    Units already done are skipped; the first failure is raised (finished units keep their markers)."""
    pending = {str(r) for r in _store(plan, storage_options).pending([u.region for u in units])}
    todo = [u for u in units if str(u.region) in pending]
    reports: list[UnitReport] = []
    if client is None:
        for unit in todo:
            reports.append(write_unit(plan, unit, sample_unit(plan, unit, storage_options), storage_options))
            if on_done:
                on_done(reports[-1])
        return reports
    from distributed import as_completed

    futures = [submit_unit(client, plan, u, storage_options, resources) for u in todo]
    for fut in as_completed(futures):
        reports.append(fut.result())
        if on_done:
            on_done(reports[-1])
    return reports


def submit_unit(
    client: Any, plan: DownscalePlan, unit: WorkUnit, storage_options: dict[str, Any] | None = None,
    resources: Mapping[str, float] | None = None,
) -> Any:
    """Dask futures of one unit: sampling (with ``resources``) then writing (anywhere); the write's future."""
    tag = f"{plan.name}-{unit.label.replace(' ', '-')}-{plan.out_key}-{os.urandom(4).hex()}"
    sampled = client.submit(sample_unit, plan, unit, storage_options, resources=dict(resources) if resources else None,
                            pure=False, key=f"downscale-sample-{tag}")
    return client.submit(write_unit, plan, unit, sampled, storage_options, pure=False, key=f"downscale-write-{tag}")


def finalize_downscale(
    plan: DownscalePlan, storage_options: dict[str, Any] | None = None, reports: Sequence[UnitReport] = ()
) -> str:
    """Mark the member store complete (every unit written) with its provenance record; its URL."""
    store = _store(plan, storage_options)
    if store.is_complete():
        return plan.out_url
    workers = {}
    for r in reports:
        workers.setdefault(f"{r.worker or 'local'} {r.device}", {"worker": r.worker, "device": r.device,
                                                                   "hardware": r.hardware})
    inputs = [{"store": public_url(plan.fine_url), "content_key": plan.fine_key, "role": "conditioning"},
              {"store": public_url(plan.static_url), "content_key": plan.static_key, "role": "static"}]
    if plan.coarse_url:
        inputs.append({"store": public_url(plan.coarse_url), "content_key": plan.coarse_key, "role": "coarse"})
    record = stage_record(
        "downscale", store=public_url(plan.out_url), key=plan.out_key, config=plan.config, started=plan.started,
        inputs=inputs, upstream=plan.upstream, checkpoint=plan.checkpoint_info, base_seed=plan.config.seed,
        seeds="seed_for(base_seed, year * 12 + month - 1, member)", workers=list(workers.values()),
        units_this_run=len(reports), sample_seconds_this_run=round(sum(r.sample_seconds for r in reports), 3),
    )
    store.finalize([u.region for u in plan.units()], attrs={"climrecon_provenance": json.dumps(record, sort_keys=True)})
    return plan.out_url


def run_downscale(
    plan: DownscalePlan,
    storage_options: dict[str, Any] | None = None,
    client: Any = None,
    resources: Mapping[str, float] | None = None,
) -> tuple[str, list[UnitReport]]:
    """Write (or finish) the member store of ``plan``: template, pending units, finalize. URL + reports."""
    pending = prepare_downscale(plan, storage_options)
    reports = run_units(plan, pending, storage_options, client, resources)
    return finalize_downscale(plan, storage_options, reports), reports
