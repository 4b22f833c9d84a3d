"""A plain-torch training loop for one named network of a method: AdamW with warmup, EMA weights, gradient
clipping, bf16 autocast on CUDA (fp32 on CPU), atomic periodic checkpoints and exact resume.

The loss is passed in (``loss(net, target, cond, time_of_year, generator=...) -> per-element loss``, e.g.
:class:`~climrecon.models.edm.EDMLoss`); the network is trained under a ``role`` of the checkpoint
(``denoiser``, ``regression``, ...), and networks trained before it (``frozen``: role -> EMA state) are
written into every checkpoint beside it, so a two-stage method keeps one file.

The data pipeline supplies :class:`Batch` objects (tensors already normalised, see
:mod:`climrecon.models.normalization`). Pass ``batches`` as a *factory* ``first_step -> iterator`` so that a
resumed run draws the same batches as an uninterrupted one (e.g. seed the crop sampler with
``seed_for(seed, step)``); a plain iterator is accepted too, and is then simply continued.

Exact resume: the checkpoint holds the raw and EMA weights, the optimizer moments, the step, the loss
history and every RNG state the loop uses (the loss noise generator, the global CPU generator used by
dropout, and the CUDA one). Interrupting a run after any checkpoint and calling :func:`train` again with the
same arguments gives bit-identical weights on the same machine.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal

import torch
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from climrecon.models.checkpoint import (
    EMA_PREFIX,
    TRAIN_PREFIX,
    CheckpointError,
    CheckpointMetadata,
    NetworkSpec,
    read_checkpoint,
    save_checkpoint,
)
from climrecon.models.samplers import make_generator, seed_for

__all__ = ["Batch", "Loss", "TrainConfig", "TrainResult", "train", "reduce_loss", "resolve_device"]


@dataclass
class Batch:
    """One normalised training batch.

    target [B, C, H, W]; cond [B, Ccond, H, W] (None if unconditional); time_of_year [B], fraction in [0, 1);
    weight [B, 1, H, W] (None: every cell counts): 1 on valid cells, 0 on masked ones (ocean, missing data),
    so the loss is the mean over valid cells only; masked target cells must still be finite (e.g. 0).
    """

    target: torch.Tensor
    cond: torch.Tensor | None = None
    time_of_year: torch.Tensor | None = None
    weight: torch.Tensor | None = None

    def to(self, device: torch.device | str) -> Batch:
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return Batch(move(self.target), move(self.cond), move(self.time_of_year), move(self.weight))

    def nonfinite(self) -> list[str]:
        """Names of the batch tensors holding NaN or inf."""
        parts = {"target": self.target, "cond": self.cond, "time_of_year": self.time_of_year}
        return [k for k, t in parts.items() if t is not None and not bool(torch.isfinite(t).all())]


def reduce_loss(per_element: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """The mean of a per-element loss [B, C, H, W], over valid cells only when ``weight`` [B, 1, H, W] is given
    (cells of weight 0 do not count; an all-masked batch gives 0)."""
    if weight is None:
        return per_element.mean()
    w = weight.to(per_element.dtype).expand_as(per_element)
    return (per_element * w).sum() / w.sum().clamp(min=1.0)


@dataclass(frozen=True)
class TrainConfig:
    max_steps: int = 10_000
    lr: float = 2e-4
    warmup_steps: int = 500  # linear ramp from lr/warmup_steps to lr
    lr_schedule: Literal["constant", "cosine"] = "constant"  # after warmup
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float | None = 1.0  # max global gradient norm; None disables clipping
    ema_halflife_steps: float = 500.0  # EMA weight of a step halves after this many steps
    ema_rampup_ratio: float | None = 0.05  # early on, half-life <= ratio * step (as in EDM)
    checkpoint_every: int = 1000
    log_every: int = 50
    seed: int = 0
    mixed_precision: bool = True  # bf16 autocast, CUDA only
    device: str = "auto"  # "auto" (cuda if available), "cpu", "cuda", "cuda:1", ...

    def __post_init__(self) -> None:
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))
        checks = [
            (self.max_steps >= 1, f"max_steps must be >= 1, got {self.max_steps}"),
            (self.lr > 0, f"lr must be > 0, got {self.lr}"),
            (self.warmup_steps >= 0, f"warmup_steps must be >= 0, got {self.warmup_steps}"),
            (
                self.lr_schedule in ("constant", "cosine"),
                f"lr_schedule must be 'constant' or 'cosine', got {self.lr_schedule!r}",
            ),
            (
                self.grad_clip is None or self.grad_clip > 0,
                f"grad_clip must be > 0 or None, got {self.grad_clip}",
            ),
            (self.ema_halflife_steps > 0, f"ema_halflife_steps must be > 0, got {self.ema_halflife_steps}"),
            (self.checkpoint_every >= 1, f"checkpoint_every must be >= 1, got {self.checkpoint_every}"),
            (self.log_every >= 1, f"log_every must be >= 1, got {self.log_every}"),
            (self.seed >= 0, f"seed must be >= 0, got {self.seed}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(f"invalid TrainConfig: {msg}")

    def lr_at(self, step: int) -> float:
        """Learning rate for the update that follows ``step`` completed steps."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        if self.lr_schedule == "cosine":
            span = max(self.max_steps - self.warmup_steps, 1)
            return self.lr * 0.5 * (1 + math.cos(math.pi * min(step - self.warmup_steps, span) / span))
        return self.lr

    def ema_beta(self, step: int) -> float:
        """EMA decay after ``step`` (>= 1) completed steps."""
        halflife = self.ema_halflife_steps
        if self.ema_rampup_ratio is not None:
            halflife = min(halflife, step * self.ema_rampup_ratio)
        return 0.5 ** (1 / max(halflife, 1e-8))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown TrainConfig field(s) {unknown}; expected a subset of {sorted(known)}")
        return cls(**dict(d))


@dataclass
class TrainResult:
    step: int  # completed optimisation steps
    losses: list[float] = field(
        repr=False
    )  # mean training loss of every step 1..step (resumed runs included)
    checkpoint_path: Path
    content_sha256: str
    resumed_from: int  # step the run started from (0: fresh)
    seconds: float  # wall time of this call


Loss = Callable[..., torch.Tensor]
"""``loss(net, target, cond, time_of_year, *, generator) -> [B, C, H, W]`` per-element loss (averaged here)."""


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"TrainConfig.device={name!r} but CUDA is not available; use 'auto' or 'cpu'")
    return device


# -- optimizer / RNG state <-> flat tensors ---------------------------------------------------------
def _optimizer_state(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for idx, state in sd["state"].items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{idx}.{key}"] = value
            else:
                scalars[f"{idx}.{key}"] = value
    groups = [{k: list(v) if isinstance(v, tuple) else v for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def _load_optimizer_state(
    opt: torch.optim.Optimizer, tensors: Mapping[str, torch.Tensor], info: Mapping[str, Any]
) -> None:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if name.startswith("optim."):
            _, idx, key = name.split(".", 2)
            state.setdefault(int(idx), {})[key] = value
    for name, value in info["scalars"].items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    groups = [{k: tuple(v) if k == "betas" else v for k, v in g.items()} for g in info["param_groups"]]
    opt.load_state_dict({"state": state, "param_groups": groups})


def _rng_state(noise: torch.Generator, device: torch.device) -> dict[str, torch.Tensor]:
    out = {"rng.cpu": torch.get_rng_state(), "rng.noise": noise.get_state()}
    if device.type == "cuda":
        out["rng.cuda"] = torch.cuda.get_rng_state(device)
    return out


def _set_rng_state(tensors: Mapping[str, torch.Tensor], noise: torch.Generator, device: torch.device) -> None:
    torch.set_rng_state(tensors["rng.cpu"].cpu())
    noise.set_state(tensors["rng.noise"].cpu())
    if device.type == "cuda" and "rng.cuda" in tensors:
        torch.cuda.set_rng_state(tensors["rng.cuda"].cpu(), device)


@torch.no_grad()
def _update_ema(ema: list[torch.Tensor], live: list[torch.Tensor], beta: float) -> None:
    """ema <- beta * ema + (1 - beta) * live for the parameters (the UNet's buffers are constants)."""
    for t_ema, t in zip(ema, live, strict=True):
        if t_ema.is_floating_point():
            t_ema.lerp_(t.detach(), 1 - beta)
        else:
            t_ema.copy_(t)


def _batch_iterator(
    batches: Iterable[Batch] | Callable[[int], Iterable[Batch]], start: int
) -> Iterator[Batch]:
    return iter(batches(start)) if callable(batches) and not hasattr(batches, "__next__") else iter(batches)


def train(
    model: torch.nn.Module,
    batches: Iterable[Batch] | Callable[[int], Iterable[Batch]],
    cfg: TrainConfig,
    *,
    loss: Loss,
    checkpoint_path: str | Path,
    metadata: CheckpointMetadata | None = None,
    role: str = "denoiser",
    frozen: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
    arrays: Mapping[str, torch.Tensor] | None = None,
    resume: bool = True,
    progress: bool = True,
    on_log: Callable[[dict[str, float]], None] | None = None,
) -> TrainResult:
    """Train ``model`` (the network of ``role``) with ``loss`` for ``cfg.max_steps`` steps in total,
        checkpointing to ``checkpoint_path``.

        ``metadata`` describes the method for its checkpoint (networks by role, variables, normalisation, grid,
        data); ``metadata.networks[role]`` must describe ``model`` and its other roles must be exactly those of
        ``frozen`` (their EMA states, trained before and written unchanged); ``arrays`` are written into every
    checkpoint beside the weights (:func:`~climrecon.models.checkpoint.save_checkpoint`). ``train`` and ``step`` are filled in
        here. Default: ``CheckpointMetadata(method="edm", networks={role: ...})``. With ``resume`` and an
        existing checkpoint of the same role, training continues from it (a finished run returns at once);
        ``resume=False`` starts over and overwrites it. ``on_log`` receives ``{"step", "loss", "lr",
        "grad_norm", "steps_per_s"}`` every ``cfg.log_every`` steps, after any checkpoint due at that step.
        The model is moved to the training device in place.
    """
    t0 = time.perf_counter()
    checkpoint_path = Path(checkpoint_path)
    device = resolve_device(cfg.device)
    frozen = {r: dict(state) for r, state in (frozen or {}).items()}
    metadata = metadata or CheckpointMetadata(method="edm", networks={role: NetworkSpec.of(model)})
    if metadata.networks.get(role) != NetworkSpec.of(model):
        raise ValueError(
            f"metadata.networks[{role!r}] does not describe the model being trained: "
            f"{metadata.networks.get(role)} vs {NetworkSpec.of(model)}"
        )
    if set(metadata.networks) != {role, *frozen}:
        raise ValueError(
            f"metadata names networks {sorted(metadata.networks)}; training {role!r} with frozen {sorted(frozen)}"
        )
    metadata = replace(metadata, train=cfg.to_dict())

    model.to(device).train()
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.AdamW(
        model.parameters(), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay, foreach=True
    )
    loss_fn = loss
    noise = make_generator(seed_for(cfg.seed, 1), device)
    use_amp = cfg.mixed_precision and device.type == "cuda"

    start, losses = 0, []
    if resume and checkpoint_path.exists():
        contents = read_checkpoint(checkpoint_path, map_location="cpu")
        info = contents.header.get("training")
        if info is None:
            raise CheckpointError(
                f"checkpoint {checkpoint_path} holds no training state (inference-only); cannot resume "
                "from it. Pass resume=False to start over, or another checkpoint_path"
            )
        if info.get("role", "denoiser") != role:
            raise CheckpointError(
                f"checkpoint {checkpoint_path} is training the network {info.get('role')!r}, not {role!r}; "
                "refusing to resume. Use resume=False or another checkpoint_path"
            )
        if contents.metadata.networks.get(role) != NetworkSpec.of(model):
            raise CheckpointError(
                f"checkpoint {checkpoint_path} was written for another model ({contents.metadata.networks.get(role)}); "
                "refusing to resume. Use resume=False or another checkpoint_path"
            )
        train_tensors = contents.with_prefix(TRAIN_PREFIX)
        model.load_state_dict({k[6:]: v for k, v in train_tensors.items() if k.startswith("model.")})
        ema.load_state_dict(contents.with_prefix(f"{EMA_PREFIX}{role}."))
        _load_optimizer_state(opt, train_tensors, info["optimizer"])
        _set_rng_state(train_tensors, noise, device)
        losses = train_tensors["losses"].tolist()
        start = int(info["step"])
    else:
        torch.manual_seed(seed_for(cfg.seed, 0))  # dropout and anything else on the global generator

    digest = ""

    def checkpoint(step: int) -> str:
        opt_tensors, opt_info = _optimizer_state(opt)
        training_state = {
            **{f"model.{k}": v for k, v in model.state_dict().items()},
            **opt_tensors,
            **_rng_state(noise, device),
            "losses": torch.tensor(losses, dtype=torch.float64),
        }
        return save_checkpoint(
            checkpoint_path,
            {**frozen, role: ema.state_dict()},
            replace(metadata, step=step),
            training_state=training_state,
            training_info={"step": step, "role": role, "optimizer": opt_info},
            arrays=arrays,
        )

    resumed_from = start
    if start >= cfg.max_steps:
        digest = read_checkpoint(checkpoint_path).header["content_sha256"]
        return TrainResult(start, losses, checkpoint_path, digest, resumed_from, time.perf_counter() - t0)

    it = _batch_iterator(batches, start)
    params = [p for p in model.parameters() if p.requires_grad]
    ema_params, live_params = list(ema.parameters()), list(model.parameters())
    window: list[float] = []
    t_log = time.perf_counter()
    columns = (
        TextColumn("[bold]training"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, disable=not progress) as bar:
        task = bar.add_task("train", total=cfg.max_steps, completed=start, loss="-")
        for step in range(start, cfg.max_steps):
            try:
                batch = next(it).to(device)
            except StopIteration:
                raise ValueError(
                    f"the batch iterator ran out after {step - start} batch(es), at step {step} of "
                    f"{cfg.max_steps}; "
                    "make it infinite (cycle over random crops) or lower TrainConfig.max_steps"
                ) from None
            lr = cfg.lr_at(step)
            for group in opt.param_groups:
                group["lr"] = lr
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_amp):
                per_element = loss_fn(model, batch.target, batch.cond, batch.time_of_year, generator=noise)
                loss = reduce_loss(per_element, batch.weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            max_norm = cfg.grad_clip if cfg.grad_clip is not None else math.inf
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
            loss_value = float(loss.detach())
            if not math.isfinite(loss_value):  # before opt.step(): the weights stay as they were
                bad = batch.nonfinite()  # inspected only here: no per-step scan (and device sync)
                if bad:
                    raise FloatingPointError(
                        f"the training batch of step {step + 1} has NaN/inf in {bad}: the data has missing or "
                        "masked cells (e.g. ocean) that reached the network; describe them with a mask (the "
                        "fine data's `mask`) so they are filled and left out of the loss"
                    )
                raise FloatingPointError(
                    f"non-finite training loss ({loss_value}) at step {step + 1}; check the batch "
                    "normalisation "
                    f"or lower TrainConfig.lr (now {cfg.lr})"
                )
            opt.step()
            done = step + 1
            _update_ema(ema_params, live_params, cfg.ema_beta(done))
            losses.append(loss_value)
            window.append(loss_value)
            bar.update(task, completed=done, loss=f"{loss_value:.4f}")
            if done % cfg.checkpoint_every == 0 or done == cfg.max_steps:
                digest = checkpoint(done)
            if done % cfg.log_every == 0 or done == cfg.max_steps:
                now = time.perf_counter()
                record = {
                    "step": float(done),
                    "loss": sum(window) / len(window),
                    "lr": lr,
                    "grad_norm": grad_norm,
                    "steps_per_s": len(window) / max(now - t_log, 1e-9),
                }
                window, t_log = [], now
                if on_log is not None:
                    on_log(record)
    return TrainResult(cfg.max_steps, losses, checkpoint_path, digest, resumed_from, time.perf_counter() - t0)
