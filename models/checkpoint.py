"""Self-describing, hash-verified model checkpoints with NAMED networks that never unpickle arbitrary objects.

File format 2 (one file, written by ``torch.save``, read by ``torch.load(weights_only=True)``): a flat dict
whose values are tensors, except ``"metadata"``, a JSON string::

    {"metadata": '{"format": "climrecon-checkpoint", "format_version": 2, "content_sha256": ..., "metadata": {
                    "method": ..., "method_config": {...}, "networks": {"denoiser": {"kind": "edm-unet",
                    "unet": {...}, "edm": {...}}, ...}, "variables": [...], ...}, "training": {...} | null}',
     "ema.<role>.<param>": Tensor, ...                 # EMA weights of each named network: what inference uses
     "data.<name>": Tensor, ...                        # arrays the method needs at inference (e.g. a climatology)
     "train.model.<param>": Tensor, "train.optim.<i>.<key>": Tensor, "train.rng.<name>": Tensor, ...}

A method keeps each of its networks under a role (``denoiser``; CorrDiff adds ``regression``), and its typed
configuration under ``method_config``. ``train.*`` entries (raw weights, optimizer moments, RNG states, loss
history of the network being trained, ``training.role``) exist only in training checkpoints, so a run can
resume exactly; :func:`strip_training_state` writes the inference-only file.

``content_sha256`` is the SHA-256 of the canonical header JSON (without the hash itself) and of every
tensor's name, dtype, shape and bytes in sorted order; :func:`read_checkpoint` verifies it.

Format 1 (one network, ``ema.<param>``; the first shipped checkpoint) is still read: it is verified with its
own hash, then presented as format 2 with its network under the role ``denoiser``.
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
    "NetworkSpec",
    "CheckpointMetadata",
    "CheckpointContents",
    "EMA_PREFIX",
    "DATA_PREFIX",
    "TRAIN_PREFIX",
    "save_checkpoint",
    "read_checkpoint",
    "load_networks",
    "strip_training_state",
]

FORMAT = "climrecon-checkpoint"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
EMA_PREFIX = "ema."
DATA_PREFIX = "data."
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
class NetworkSpec:
    """How to rebuild one named network: ``kind`` (a key of :data:`NETWORK_KINDS`) and its configs."""

    unet: UNetConfig
    edm: EDMConfig = EDMConfig()
    kind: str = "edm-unet"

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "unet": self.unet.to_dict(), "edm": self.edm.to_dict()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> NetworkSpec:
        return cls(
            UNetConfig.from_dict(d["unet"]),
            EDMConfig.from_dict(d.get("edm", {})),
            str(d.get("kind", "edm-unet")),
        )

    @classmethod
    def of(cls, model: torch.nn.Module) -> NetworkSpec:
        """The spec of a built network (an :class:`EDMPrecond` around a :class:`UNet`)."""
        return cls(model.net.config, model.config)

    def build(self) -> torch.nn.Module:
        try:
            return NETWORK_KINDS[self.kind](self)
        except KeyError:
            raise CheckpointError(
                f"unknown network kind {self.kind!r}; this code builds {sorted(NETWORK_KINDS)}"
            ) from None


NETWORK_KINDS = {"edm-unet": lambda spec: EDMPrecond(UNet(spec.unet), spec.edm)}
"""Network kind -> builder. ``edm-unet``: EDM preconditioning (Karras et al. Eq. 7) around the project's UNet."""


@dataclass(frozen=True)
class CheckpointMetadata:
    """Everything needed to rebuild, verify and correctly feed a trained method's networks."""

    method: str  # the method's label, e.g. "dpdm-residual", "corrdiff", "zssd-prior"
    networks: Mapping[str, NetworkSpec]  # role -> spec, e.g. {"denoiser": ...}
    variables: tuple[str, ...] = ()  # target variables, one per output channel, in order
    cond_channels: tuple[str, ...] = ()  # names of the conditioning channels, in order
    normalization: NormalizationStats | None = None
    grid: GridSpec = GridSpec()
    method_config: dict[str, Any] = field(default_factory=dict)  # the method's typed config (JSON)
    train: dict[str, Any] = field(default_factory=dict)  # training configuration
    data: dict[str, Any] = field(default_factory=dict)  # description of the training data (labelled!)
    step: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "variables", tuple(self.variables))
        object.__setattr__(self, "cond_channels", tuple(self.cond_channels))
        object.__setattr__(self, "networks", dict(self.networks))
        if not self.networks:
            raise ValueError("a checkpoint needs at least one named network")
        for role, spec in self.networks.items():
            if not isinstance(spec, NetworkSpec):
                raise TypeError(f"networks[{role!r}] must be a NetworkSpec, got {type(spec).__name__}")
        if (
            self.normalization is not None
            and self.variables
            and self.normalization.variables != self.variables
        ):
            raise ValueError(
                f"normalisation covers {list(self.normalization.variables)} but the model predicts "
                f"{list(self.variables)}"
            )

    @property
    def roles(self) -> tuple[str, ...]:
        return tuple(self.networks)

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "method_config": self.method_config,
            "networks": {role: spec.to_dict() for role, spec in self.networks.items()},
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
            networks={role: NetworkSpec.from_dict(n) for role, n in d["networks"].items()},
            variables=tuple(d.get("variables", ())),
            cond_channels=tuple(d.get("cond_channels", ())),
            normalization=NormalizationStats.from_dict(d["normalization"])
            if d.get("normalization")
            else None,
            grid=GridSpec.from_dict(d.get("grid", {})),
            method_config=dict(d.get("method_config") or {}),
            train=dict(d.get("train", {})),
            data=dict(d.get("data", {})),
            step=int(d.get("step", 0)),
        )


def _upgrade_v1(
    header: dict[str, Any], tensors: dict[str, torch.Tensor]
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """A verified format-1 header and tensors as format 2: its one network becomes the ``denoiser`` role."""
    meta = dict(header["metadata"])
    meta["networks"] = {
        "denoiser": {"kind": "edm-unet", "unet": meta.pop("unet"), "edm": meta.pop("edm", {})}
    }
    training = header.get("training")
    if training is not None:
        training = {**training, "role": "denoiser"}
    upgraded = {
        **header,
        "format_version": FORMAT_VERSION,
        "metadata": meta,
        "training": training,
        "upgraded_from_format": 1,
    }
    renamed = {
        (EMA_PREFIX + "denoiser." + k[len(EMA_PREFIX) :] if k.startswith(EMA_PREFIX) else k): v
        for k, v in tensors.items()
    }
    return upgraded, renamed


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
    ema_states: Mapping[str, Mapping[str, torch.Tensor]],
    metadata: CheckpointMetadata,
    *,
    training_state: Mapping[str, torch.Tensor] | None = None,
    training_info: Mapping[str, Any] | None = None,
    arrays: Mapping[str, torch.Tensor] | None = None,
) -> str:
    """Write a checkpoint atomically (temp file + ``os.replace``); returns its content hash.

    ``ema_states`` maps each role of ``metadata.networks`` to the state dict used for inference (every role,
    no other). ``arrays`` are tensors the method needs at inference besides its weights (e.g. a
    training-period climatology), kept by :func:`strip_training_state`. ``training_state`` (tensors) and ``training_info`` (JSON-able, with the ``role`` in
    training) are only needed to resume training.
    """
    path = Path(path)
    if set(ema_states) != set(metadata.networks):
        raise CheckpointError(
            f"weights given for roles {sorted(ema_states)} but the metadata describes {sorted(metadata.networks)}"
        )
    tensors: dict[str, torch.Tensor] = {
        f"{EMA_PREFIX}{role}.{k}": v.detach().to("cpu")
        for role, state in ema_states.items()
        for k, v in state.items()
    }
    for k, v in (arrays or {}).items():
        if not isinstance(v, torch.Tensor):
            raise TypeError(f"arrays[{k!r}] is a {type(v).__name__}; only tensors may be stored")
        tensors[DATA_PREFIX + k] = v.detach().to("cpu").contiguous()
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

    def arrays(self) -> dict[str, torch.Tensor]:
        """The method's inference arrays (``data.<name>`` entries), by name."""
        return self.with_prefix(DATA_PREFIX)

    def ema_states(self) -> dict[str, dict[str, torch.Tensor]]:
        """role -> the EMA state dict of that network."""
        return {role: self.with_prefix(f"{EMA_PREFIX}{role}.") for role in self.metadata.networks}


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
        first = (str(exc).strip().splitlines() or [""])[0].strip()
        detail = f": {first}" if first and len(first) <= 240 else ""  # torch's own words, whole or not at all
        raise CheckpointError(
            f"checkpoint {path} ({path.stat().st_size} bytes) is corrupt or truncated and cannot be read "
            f"(torch.load raised {type(exc).__name__}{detail}). Re-copy or re-train it."
        ) from None
    raw = blob.get("metadata") if isinstance(blob, dict) else None
    try:
        header = json.loads(raw) if isinstance(raw, str) else None
    except json.JSONDecodeError:
        header = None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a climrecon checkpoint (no '{FORMAT}' metadata record)")
    if header.get("format_version") not in READABLE_VERSIONS:
        raise CheckpointError(
            f"checkpoint {path} has format version {header.get('format_version')}, this code reads "
            f"versions {list(READABLE_VERSIONS)}"
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
    if header["format_version"] == 1:
        header, tensors = _upgrade_v1(header, tensors)
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


def load_networks(
    path: str | os.PathLike,
    expect: Mapping[str, Any] | None = None,
    map_location: str | torch.device = "cpu",
    roles: tuple[str, ...] | None = None,
) -> tuple[dict[str, torch.nn.Module], CheckpointMetadata]:
    """The named networks (EMA weights, eval mode, on ``map_location``) and the metadata.

    ``roles`` (default: every network of the checkpoint) must all be present, else :class:`CheckpointError`
    names the missing role. ``expect`` maps metadata fields (dotted for nested ones: ``"grid.patch_size"``)
    to required values, e.g. ``{"variables": ["tas", "pr"]}``; any difference raises :class:`CheckpointError`.
    """
    path = Path(path)
    contents = read_checkpoint(path, map_location=map_location)
    metadata = contents.metadata
    if expect:
        _check_expectations(metadata, expect, path)
    wanted = tuple(roles) if roles is not None else metadata.roles
    missing = [r for r in wanted if r not in metadata.networks]
    if missing:
        raise CheckpointError(
            f"checkpoint {path} ({metadata.method}) lacks the network role(s) {missing} this method needs; "
            f"it holds {list(metadata.roles)}"
        )
    out = {}
    for role in wanted:
        net = metadata.networks[role].build()
        state = contents.with_prefix(f"{EMA_PREFIX}{role}.")
        if not state:
            raise CheckpointError(f"checkpoint {path} has no weights for its network role {role!r}")
        try:
            net.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise CheckpointError(
                f"checkpoint {path}: weights of role {role!r} do not fit its recorded config: "
                f"{str(exc).splitlines()[0]}"
            ) from None
        out[role] = net.to(map_location).eval().requires_grad_(False)
    return out, metadata


def strip_training_state(src: str | os.PathLike, dst: str | os.PathLike) -> str:
    """Write ``dst``, the inference-only copy of ``src`` (EMA weights + metadata) in format 2; its hash."""
    contents = read_checkpoint(src)
    return save_checkpoint(dst, contents.ema_states(), contents.metadata, arrays=contents.arrays())
