"""Self-describing, hash-verified model checkpoints that never unpickle arbitrary objects.

File format (one file, written by ``torch.save``, read by ``torch.load(weights_only=True)``): a flat dict
whose values are tensors, except ``"metadata"``, a JSON string::

    {"metadata": '{"format": "climrecon-checkpoint", "format_version": 1, "content_sha256": ..., ...}',
     "ema.<param>": Tensor, ...                       # EMA weights: what inference uses
     "train.model.<param>": Tensor, "train.optim.<i>.<key>": Tensor, "train.rng.<name>": Tensor, ...}

``train.*`` entries (the raw weights, optimizer moments, RNG states, loss history) exist only in training
checkpoints, so a run can resume exactly; ``strip_training_state`` writes the inference-only file.

``content_sha256`` is the SHA-256 of the canonical metadata JSON (without the hash itself) and of every
tensor's name, dtype, shape and bytes in sorted order; :func:`load_checkpoint` verifies it.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from climrecon.models.edm import EDMConfig, EDMPrecond
from climrecon.models.normalization import NormalizationStats
from climrecon.models.unet import UNet, UNetConfig

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "CheckpointError",
    "GridSpec",
    "CheckpointMetadata",
    "CheckpointContents",
    "EMA_PREFIX",
    "TRAIN_PREFIX",
    "save_checkpoint",
    "read_checkpoint",
    "load_checkpoint",
    "strip_training_state",
]

FORMAT = "climrecon-checkpoint"
FORMAT_VERSION = 1
EMA_PREFIX = "ema."
TRAIN_PREFIX = "train."


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable, tampered with, or does not match what the caller needs."""


@dataclass(frozen=True)
class GridSpec:
    """The grid a model was trained on: fine resolution (deg), coarse/fine factor, patch size, region."""

    fine_resolution: float | None = None
    coarsening_factor: int | None = None
    patch_size: int | None = None
    region: dict[str, float] | None = None  # lat_min, lat_max, lon_min, lon_max

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> GridSpec:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown GridSpec field(s) {unknown}; expected a subset of {sorted(known)}")
        return cls(**dict(d))


@dataclass(frozen=True)
class CheckpointMetadata:
    """Everything needed to rebuild, verify and correctly feed a trained model."""

    method: str  # e.g. "dpdm", "corrdiff-residual", "zssd-prior"
    unet: UNetConfig
    edm: EDMConfig = EDMConfig()
    variables: tuple[str, ...] = ()  # target variables, one per output channel, in order
    cond_channels: tuple[str, ...] = ()  # names of the conditioning channels, in order
    normalization: NormalizationStats | None = None
    grid: GridSpec = GridSpec()
    train: dict[str, Any] = field(default_factory=dict)  # training configuration
    data: dict[str, Any] = field(default_factory=dict)  # description of the training data (labelled!)
    step: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "variables", tuple(self.variables))
        object.__setattr__(self, "cond_channels", tuple(self.cond_channels))
        if self.variables and len(self.variables) != self.unet.out_channels:
            raise ValueError(
                f"metadata lists {len(self.variables)} variables {list(self.variables)} but the UNet has "
                f"out_channels={self.unet.out_channels}"
            )
        if self.cond_channels and len(self.cond_channels) != self.unet.cond_channels:
            raise ValueError(
                f"metadata names {len(self.cond_channels)} conditioning channels but the UNet has "
                f"cond_channels={self.unet.cond_channels}"
            )
        if (
            self.normalization is not None
            and self.variables
            and self.normalization.variables != self.variables
        ):
            raise ValueError(
                f"normalisation covers {list(self.normalization.variables)} but the model predicts "
                f"{list(self.variables)}"
            )

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "unet": self.unet.to_dict(),
            "edm": self.edm.to_dict(),
            "variables": list(self.variables),
            "cond_channels": list(self.cond_channels),
            "normalization": self.normalization.to_dict() if self.normalization else None,
            "grid": self.grid.to_dict(),
            "train": self.train,
            "data": self.data,
            "step": self.step,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> CheckpointMetadata:
        return cls(
            method=d["method"],
            unet=UNetConfig.from_dict(d["unet"]),
            edm=EDMConfig.from_dict(d.get("edm", {})),
            variables=tuple(d.get("variables", ())),
            cond_channels=tuple(d.get("cond_channels", ())),
            normalization=NormalizationStats.from_dict(d["normalization"])
            if d.get("normalization")
            else None,
            grid=GridSpec.from_dict(d.get("grid", {})),
            train=dict(d.get("train", {})),
            data=dict(d.get("data", {})),
            step=int(d.get("step", 0)),
        )


def _canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False)


def _content_hash(header: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    h.update(_canonical_json({k: v for k, v in header.items() if k != "content_sha256"}).encode())
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(f"\0{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def save_checkpoint(
    path: str | os.PathLike,
    ema_state: Mapping[str, torch.Tensor],
    metadata: CheckpointMetadata,
    *,
    training_state: Mapping[str, torch.Tensor] | None = None,
    training_info: Mapping[str, Any] | None = None,
) -> str:
    """Write a checkpoint atomically (temp file + ``os.replace``); returns its content hash.

    ``ema_state`` is the state dict of the :class:`EDMPrecond` used for inference. ``training_state``
    (tensors) and ``training_info`` (JSON-able) are only needed to resume training.
    """
    path = Path(path)
    tensors: dict[str, torch.Tensor] = {EMA_PREFIX + k: v.detach().to("cpu") for k, v in ema_state.items()}
    for k, v in (training_state or {}).items():
        if not isinstance(v, torch.Tensor):
            raise TypeError(f"training_state[{k!r}] is a {type(v).__name__}; only tensors may be stored")
        tensors[TRAIN_PREFIX + k] = v.detach().to("cpu")
    header: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "metadata": metadata.to_dict(),
        "training": dict(training_info) if training_info is not None else None,
    }
    header["content_sha256"] = _content_hash(header, tensors)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        torch.save({"metadata": _canonical_json(header), **tensors}, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return header["content_sha256"]


@dataclass(frozen=True)
class CheckpointContents:
    """A verified checkpoint: its metadata, the raw JSON header and every stored tensor by name."""

    metadata: CheckpointMetadata
    header: dict[str, Any]
    tensors: dict[str, torch.Tensor]

    def with_prefix(self, prefix: str) -> dict[str, torch.Tensor]:
        return {k[len(prefix) :]: v for k, v in self.tensors.items() if k.startswith(prefix)}


def read_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> CheckpointContents:
    """Read and verify a checkpoint; raises :class:`CheckpointError` for every way it can be unusable."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        blob = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        if not zipfile.is_zipfile(path):
            raise CheckpointError(
                f"checkpoint {path} is corrupt or not a torch file (not a readable zip archive); "
                "re-copy or re-train it"
            ) from None
        detail = next(
            (ln.split(" was not")[0].strip() for ln in str(exc).splitlines() if "Unsupported global" in ln),
            "",
        )
        raise CheckpointError(
            f"{path} is not a climrecon checkpoint: it holds objects other than tensors and strings "
            f"(refusing to unpickle arbitrary objects){': ' + detail if detail else ''}"
        ) from None
    except Exception as exc:  # noqa: BLE001 - torch raises many types for damaged archives
        first = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
        raise CheckpointError(
            f"checkpoint {path} is corrupt or truncated (torch.load failed: {type(exc).__name__}: {first}); "
            "re-copy or re-train it"
        ) from None
    raw = blob.get("metadata") if isinstance(blob, dict) else None
    try:
        header = json.loads(raw) if isinstance(raw, str) else None
    except json.JSONDecodeError:
        header = None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a climrecon checkpoint (no '{FORMAT}' metadata record)")
    if header.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {path} has format version {header.get('format_version')}, this code reads "
            f"version {FORMAT_VERSION}"
        )
    tensors = {k: v for k, v in blob.items() if k != "metadata"}
    bad = [k for k, v in tensors.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{path} is not a climrecon checkpoint: entries {bad[:5]} are not tensors")
    digest = _content_hash(header, tensors)
    if digest != header.get("content_sha256"):
        raise CheckpointError(
            f"checkpoint {path} failed its integrity check: content hash {digest[:16]}... does not match the "
            f"recorded {str(header.get('content_sha256'))[:16]}... (the file was modified or damaged)"
        )
    try:
        metadata = CheckpointMetadata.from_dict(header["metadata"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {path} has invalid metadata: {exc}") from None
    return CheckpointContents(metadata, header, tensors)


def _lookup(d: Mapping[str, Any], dotted: str, path: Path) -> Any:
    node: Any = d
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            raise CheckpointError(
                f"cannot check {dotted!r} against checkpoint {path}: no such metadata field "
                f"(top-level fields: {sorted(d)})"
            )
        node = node[part]
    return node


def _check_expectations(metadata: CheckpointMetadata, expect: Mapping[str, Any], path: Path) -> None:
    actual_all = metadata.to_dict()
    for key, wanted in expect.items():
        actual = _lookup(actual_all, key, path)
        wanted_json = json.loads(json.dumps(wanted, default=lambda o: o.to_dict()))
        if actual != wanted_json:
            verb = "were" if isinstance(wanted_json, list) else "was"
            raise CheckpointError(
                f"checkpoint {path} was trained for {key.replace('.', ' ')} {actual!r} but {wanted_json!r} "
                f"{verb} requested"
            )


def load_checkpoint(
    path: str | os.PathLike,
    expect: Mapping[str, Any] | None = None,
    map_location: str | torch.device = "cpu",
) -> tuple[EDMPrecond, CheckpointMetadata]:
    """The model (EMA weights, eval mode, on ``map_location``) and its metadata.

    ``expect`` maps metadata fields (dotted for nested ones: ``"grid.patch_size"``) to required values,
    e.g. ``{"variables": ["tas", "pr"], "method": "dpdm"}``; any difference raises :class:`CheckpointError`.
    """
    path = Path(path)
    contents = read_checkpoint(path, map_location=map_location)
    metadata = contents.metadata
    if expect:
        _check_expectations(metadata, expect, path)
    model = EDMPrecond(UNet(metadata.unet), metadata.edm)
    state = contents.with_prefix(EMA_PREFIX)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(
            f"checkpoint {path}: weights do not fit the recorded UNetConfig: {str(exc).splitlines()[0]}"
        ) from None
    return model.to(map_location).eval().requires_grad_(False), metadata


def strip_training_state(src: str | os.PathLike, dst: str | os.PathLike) -> str:
    """Write ``dst``, the inference-only copy of ``src`` (EMA weights + metadata); returns its hash."""
    contents = read_checkpoint(src)
    return save_checkpoint(dst, contents.with_prefix(EMA_PREFIX), contents.metadata)
