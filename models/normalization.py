"""Per-variable normalisation: a fixed transform, then standardisation by training-period statistics.

Each target variable ``v`` is mapped to network space as ``z = (T_v(x) - mean_v) / std_v`` where ``T_v`` is

- ``identity`` for tas, uas, vas, psl (close enough to Gaussian at monthly scale), and
- ``log1p`` for pr: ``T(x) = log1p(x / scale)`` with ``scale = PR_SCALE = 1 mm/day`` expressed in CF units
  (1 kg m-2 day-1 = 1/86400 kg m-2 s-1). Dividing by 1 mm/day keeps dry months near 0 and compresses
  the long wet tail; negative precipitation (regridding noise) is clipped to 0 first.

``mean_v``/``std_v`` are statistics of ``T_v(x)`` over the training years, computed by the caller (e.g. with
Dask over a Zarr store, using :func:`forward_transform`) or with :meth:`NormalizationStats.fit` for data in
memory. The inverse is exact for every ``x >= 0`` (pr) or any real ``x`` (identity); the pr inverse clips
below 0 so samples never carry negative precipitation.

Arrays are torch tensors or numpy arrays with the variable axis at ``channel_dim`` (default ``-3``:
``[..., C, H, W]``). The stats serialise to JSON (they travel inside checkpoints).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
import torch

__all__ = [
    "PR_SCALE",
    "DEFAULT_TRANSFORMS",
    "Transform",
    "NormalizationStats",
    "forward_transform",
    "inverse_transform",
]

PR_SCALE = 1.0 / 86400.0
"""1 mm/day of precipitation in kg m-2 s-1 (1 mm of water over 1 m2 weighs 1 kg)."""

Transform = Literal["identity", "log1p"]

DEFAULT_TRANSFORMS: dict[str, Transform] = {
    "tas": "identity",
    "uas": "identity",
    "vas": "identity",
    "psl": "identity",
    "pr": "log1p",
}

Array = torch.Tensor | np.ndarray


def _default_scale(transform: Transform) -> float:
    return PR_SCALE if transform == "log1p" else 1.0


def forward_transform(x: Array, transform: Transform, scale: float = 1.0) -> Array:
    """``T(x)``: identity, or ``log1p(max(x, 0) / scale)``."""
    if transform == "identity":
        return x
    if transform == "log1p":
        if isinstance(x, torch.Tensor):
            return torch.log1p(x.clamp(min=0) / scale)
        return np.log1p(np.maximum(x, 0) / scale)
    raise ValueError(f"unknown transform {transform!r}; expected one of 'identity', 'log1p'")


# log1p values beyond this (x > 1e13 x scale) are no precipitation, only an untrained or diverged network:
# clipping them keeps the output finite in float32 (expm1 overflows above ~88) and changes no real value
LOG1P_MAX = 30.0


def inverse_transform(y: Array, transform: Transform, scale: float = 1.0) -> Array:
    """``T^-1(y)``: identity, or ``scale * expm1(min(y, LOG1P_MAX))`` clipped at 0."""
    if transform == "identity":
        return y
    if transform == "log1p":
        if isinstance(y, torch.Tensor):
            return (torch.expm1(y.clamp(max=LOG1P_MAX)) * scale).clamp(min=0)
        return np.maximum(np.expm1(np.minimum(y, LOG1P_MAX)) * scale, 0)
    raise ValueError(f"unknown transform {transform!r}; expected one of 'identity', 'log1p'")


@dataclass(frozen=True)
class NormalizationStats:
    """Transform and standardisation constants for an ordered list of variables (one per channel)."""

    variables: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    transforms: tuple[Transform, ...] = field(default=())
    scales: tuple[float, ...] = field(default=())

    def __post_init__(self) -> None:
        n = len(self.variables)
        transforms = self.transforms or tuple(DEFAULT_TRANSFORMS.get(v, "identity") for v in self.variables)
        scales = self.scales or tuple(_default_scale(t) for t in transforms)
        object.__setattr__(self, "variables", tuple(self.variables))
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))
        object.__setattr__(self, "transforms", tuple(transforms))
        object.__setattr__(self, "scales", tuple(float(s) for s in scales))
        for name in ("mean", "std", "transforms", "scales"):
            if len(getattr(self, name)) != n:
                raise ValueError(
                    f"NormalizationStats.{name} has {len(getattr(self, name))} entries but there are "
                    f"{n} variables {list(self.variables)}"
                )
        for v, t, m, s, sc in zip(
            self.variables, self.transforms, self.mean, self.std, self.scales, strict=True
        ):
            if t not in ("identity", "log1p"):
                raise ValueError(f"variable {v!r}: unknown transform {t!r}; expected 'identity' or 'log1p'")
            if not (math.isfinite(m) and math.isfinite(s) and s > 0):
                raise ValueError(f"variable {v!r}: mean={m} and std={s} must be finite with std > 0")
            if not sc > 0:
                raise ValueError(f"variable {v!r}: transform scale must be > 0, got {sc}")

    # -- fitting ----------------------------------------------------------------------------------
    @classmethod
    def fit(
        cls, samples: Mapping[str, Array], transforms: Mapping[str, Transform] | None = None
    ) -> NormalizationStats:
        """Statistics of ``T_v(samples[v])`` over all their elements (NaNs ignored), in mapping order."""
        names, means, stds, ts, scales = [], [], [], [], []
        for v, x in samples.items():
            t = (transforms or {}).get(v, DEFAULT_TRANSFORMS.get(v, "identity"))
            sc = _default_scale(t)
            arr = np.asarray(x.detach().cpu() if isinstance(x, torch.Tensor) else x, dtype=np.float64)
            y = forward_transform(arr, t, sc)
            if not np.isfinite(y).any():
                raise ValueError(f"variable {v!r}: no finite values to compute normalisation statistics from")
            names.append(v)
            means.append(float(np.nanmean(y)))
            stds.append(float(np.nanstd(y)))
            ts.append(t)
            scales.append(sc)
        return cls(tuple(names), tuple(means), tuple(stds), tuple(ts), tuple(scales))

    # -- transforms -------------------------------------------------------------------------------
    def _check_channels(self, x: Array, channel_dim: int) -> None:
        if x.shape[channel_dim] != len(self.variables):
            raise ValueError(
                f"array has {x.shape[channel_dim]} channels on axis {channel_dim} but the normalisation "
                f"covers {len(self.variables)} variables {list(self.variables)}"
            )

    def _apply(self, x: Array, channel_dim: int, per_channel) -> Array:
        self._check_channels(x, channel_dim)
        parts = []
        for i in range(len(self.variables)):
            xi = x.select(channel_dim, i) if isinstance(x, torch.Tensor) else np.take(x, i, axis=channel_dim)
            parts.append(per_channel(i, xi))
        if isinstance(x, torch.Tensor):
            return torch.stack(parts, dim=channel_dim)
        return np.stack(parts, axis=channel_dim)

    def normalize(self, x: Array, channel_dim: int = -3) -> Array:
        """Physical units -> network space: ``(T_v(x) - mean_v) / std_v`` per channel."""

        def one(i: int, xi: Array) -> Array:
            return (forward_transform(xi, self.transforms[i], self.scales[i]) - self.mean[i]) / self.std[i]

        return self._apply(x, channel_dim, one)

    def denormalize(self, z: Array, channel_dim: int = -3) -> Array:
        """Network space -> physical units; the exact inverse of :meth:`normalize` (pr >= 0)."""

        def one(i: int, zi: Array) -> Array:
            return inverse_transform(zi * self.std[i] + self.mean[i], self.transforms[i], self.scales[i])

        return self._apply(z, channel_dim, one)

    def subset(self, variables: Sequence[str]) -> NormalizationStats:
        """The stats of ``variables`` only, in that order."""
        missing = [v for v in variables if v not in self.variables]
        if missing:
            raise KeyError(f"no normalisation statistics for {missing}; available: {list(self.variables)}")
        idx = [self.variables.index(v) for v in variables]
        return NormalizationStats(
            tuple(variables),
            tuple(self.mean[i] for i in idx),
            tuple(self.std[i] for i in idx),
            tuple(self.transforms[i] for i in idx),
            tuple(self.scales[i] for i in idx),
        )

    # -- serialisation ----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> NormalizationStats:
        known = {"variables", "mean", "std", "transforms", "scales"}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown NormalizationStats field(s) {unknown}; expected {sorted(known)}")
        missing = sorted({"variables", "mean", "std"} - set(d))
        if missing:
            raise ValueError(f"NormalizationStats is missing field(s) {missing}")
        return cls(**{k: tuple(v) for k, v in d.items()})

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_json(cls, text: str) -> NormalizationStats:
        return cls.from_dict(json.loads(text))
