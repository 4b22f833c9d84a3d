"""A compact conditional UNet for denoising gridded fields (the raw network F_theta of EDM).

Input: the (preconditioned) noisy target ``x`` [B, out_channels, H, W] concatenated along channels with the
conditioning tensor ``cond`` [B, cond_channels, H, W] that the caller assembles (interpolated coarse fields,
elevation, land fraction, sin/cos of lat/lon, ...). Two embeddings drive every residual block through a
GroupNorm scale/shift: the noise level (positional or Fourier features of EDM's ``c_noise``) and the
cyclic time of year (sin/cos of ``2 pi k f`` for ``k = 1..time_harmonics``, ``f`` = fraction of the year,
so 31 December and 1 January are neighbours).

Layout (ADM-like): ``len(channel_mults)`` levels; level ``l`` works at resolution ``H / 2^l`` with
``base_channels * channel_mults[l]`` channels and ``num_blocks`` residual blocks on the way down and
``num_blocks + 1`` on the way up (each fed one skip connection); self-attention after the residual blocks
of the levels in ``attention_levels`` and in the middle. H and W must be divisible by ``2^(levels-1)``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["UNetConfig", "UNet", "time_of_year_features", "count_parameters"]


@dataclass(frozen=True)
class UNetConfig:
    """Architecture of :class:`UNet` (everything needed to rebuild it from a checkpoint)."""

    out_channels: int = 1  # target variables; the noisy input has as many channels
    cond_channels: int = 0  # conditioning channels concatenated with the noisy input (0: unconditional)
    base_channels: int = 64
    channel_mults: tuple[int, ...] = (1, 2, 2, 2)
    num_blocks: int = 2  # residual blocks per level (down path)
    attention_levels: tuple[int, ...] = (3,)  # level indices (0 = full resolution) with self-attention
    mid_attention: bool = True
    attention_head_channels: int = 32
    dropout: float = 0.0
    noise_embedding: Literal["positional", "fourier"] = "positional"
    time_harmonics: int = 2  # harmonics of the annual cycle; 0 disables the time-of-year input
    emb_mult: int = 4  # embedding width = emb_mult * base_channels

    def __post_init__(self) -> None:
        object.__setattr__(self, "channel_mults", tuple(int(m) for m in self.channel_mults))
        object.__setattr__(self, "attention_levels", tuple(int(a) for a in self.attention_levels))
        checks = [
            (self.out_channels >= 1, f"out_channels must be >= 1, got {self.out_channels}"),
            (self.cond_channels >= 0, f"cond_channels must be >= 0, got {self.cond_channels}"),
            (self.base_channels >= 1, f"base_channels must be >= 1, got {self.base_channels}"),
            (
                len(self.channel_mults) >= 1 and all(m >= 1 for m in self.channel_mults),
                f"channel_mults must be a non-empty list of positive ints, got {list(self.channel_mults)}",
            ),
            (self.num_blocks >= 1, f"num_blocks must be >= 1, got {self.num_blocks}"),
            (
                all(0 <= a < len(self.channel_mults) for a in self.attention_levels),
                f"attention_levels {list(self.attention_levels)} must index levels "
                f"0..{len(self.channel_mults) - 1}",
            ),
            (self.attention_head_channels >= 1, "attention_head_channels must be >= 1"),
            (0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout}"),
            (
                self.noise_embedding in ("positional", "fourier"),
                f"noise_embedding must be 'positional' or 'fourier', got {self.noise_embedding!r}",
            ),
            (self.time_harmonics >= 0, f"time_harmonics must be >= 0, got {self.time_harmonics}"),
            (self.emb_mult >= 1, f"emb_mult must be >= 1, got {self.emb_mult}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(f"invalid UNetConfig: {msg}")

    @property
    def levels(self) -> int:
        return len(self.channel_mults)

    @property
    def size_multiple(self) -> int:
        """H and W must be multiples of this."""
        return 2 ** (self.levels - 1)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> UNetConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown UNetConfig field(s) {unknown}; expected a subset of {sorted(known)}")
        return cls(**dict(d))


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def time_of_year_features(fraction: torch.Tensor, harmonics: int) -> torch.Tensor:
    """[B] fraction of the year in [0, 1) -> [B, 2*harmonics]: sin/cos(2 pi k f), k = 1..harmonics."""
    k = torch.arange(1, harmonics + 1, device=fraction.device, dtype=torch.float32)
    angle = 2 * math.pi * fraction.to(torch.float32)[:, None] * k[None, :]
    return torch.cat([angle.sin(), angle.cos()], dim=1)


def _groups(channels: int) -> int:
    return math.gcd(32, channels)


def _zero(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class PositionalEmbedding(nn.Module):
    """Transformer-style sinusoidal features of a scalar (as in EDM's ADM/DDPM++ networks)."""

    def __init__(self, channels: int, max_positions: int = 10000):
        super().__init__()
        half = channels // 2
        freqs = (1.0 / max_positions) ** (torch.arange(half, dtype=torch.float32) / max(half - 1, 1))
        self.register_buffer("freqs", freqs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = x.to(torch.float32)[:, None] * self.freqs[None, :]
        return torch.cat([a.cos(), a.sin()], dim=1)


class FourierEmbedding(nn.Module):
    """Random Fourier features of a scalar (NCSN++); the frequencies are a buffer, saved with the weights."""

    def __init__(self, channels: int, scale: float = 16.0):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.register_buffer("freqs", torch.randn(channels // 2, generator=gen) * scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = 2 * math.pi * x.to(torch.float32)[:, None] * self.freqs[None, :]
        return torch.cat([a.cos(), a.sin()], dim=1)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv, embedding as GroupNorm scale/shift, SiLU-dropout-conv, residual."""

    def __init__(self, in_ch: int, out_ch: int, emb_ch: int, dropout: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(in_ch), in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb = nn.Linear(emb_ch, 2 * out_ch)
        self.norm2 = nn.GroupNorm(_groups(out_ch), out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = _zero(nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb(emb)[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.dropout(F.silu(h)))
        return (h + self.skip(x)) / math.sqrt(2)


class SelfAttention(nn.Module):
    """Multi-head self-attention over all H*W positions, residual."""

    def __init__(self, channels: int, head_channels: int):
        super().__init__()
        self.heads = max(1, channels // head_channels)
        if channels % self.heads:
            raise ValueError(f"attention over {channels} channels cannot be split into {self.heads} heads")
        self.norm = nn.GroupNorm(_groups(channels), channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = _zero(nn.Conv2d(channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, h * w).unbind(1)
        out = F.scaled_dot_product_attention(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2))
        out = out.transpose(-1, -2).reshape(b, c, h, w)
        return (x + self.proj(out)) / math.sqrt(2)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Stage(nn.Module):
    """A residual block optionally followed by self-attention."""

    def __init__(self, in_ch: int, out_ch: int, emb_ch: int, cfg: UNetConfig, attention: bool):
        super().__init__()
        self.res = ResBlock(in_ch, out_ch, emb_ch, cfg.dropout)
        self.attn = SelfAttention(out_ch, cfg.attention_head_channels) if attention else None

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        x = self.res(x, emb)
        return self.attn(x) if self.attn is not None else x


class UNet(nn.Module):
    """F_theta(x, c_noise, cond, time_of_year) -> [B, out_channels, H, W]."""

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = cfg = config
        emb_ch = cfg.emb_mult * cfg.base_channels
        self.map_noise = (
            PositionalEmbedding(cfg.base_channels)
            if cfg.noise_embedding == "positional"
            else FourierEmbedding(cfg.base_channels)
        )
        emb_in = 2 * (cfg.base_channels // 2) + 2 * cfg.time_harmonics
        self.map_emb = nn.Sequential(
            nn.Linear(emb_in, emb_ch), nn.SiLU(), nn.Linear(emb_ch, emb_ch), nn.SiLU()
        )

        widths = [cfg.base_channels * m for m in cfg.channel_mults]
        self.input = nn.Conv2d(cfg.out_channels + cfg.cond_channels, widths[0], 3, padding=1)
        self.down = nn.ModuleList()
        skip_widths = [widths[0]]
        ch = widths[0]
        for level, width in enumerate(widths):
            blocks = nn.ModuleList()
            for _ in range(cfg.num_blocks):
                blocks.append(_Stage(ch, width, emb_ch, cfg, level in cfg.attention_levels))
                ch = width
                skip_widths.append(ch)
            down = Downsample(ch) if level < cfg.levels - 1 else None
            if down is not None:
                skip_widths.append(ch)
            self.down.append(nn.ModuleDict({"blocks": blocks, **({"down": down} if down else {})}))

        self.mid = nn.ModuleList(
            [_Stage(ch, ch, emb_ch, cfg, cfg.mid_attention), _Stage(ch, ch, emb_ch, cfg, False)]
        )

        self.up = nn.ModuleList()
        for level in reversed(range(cfg.levels)):
            width = widths[level]
            blocks = nn.ModuleList()
            for _ in range(cfg.num_blocks + 1):
                blocks.append(
                    _Stage(ch + skip_widths.pop(), width, emb_ch, cfg, level in cfg.attention_levels)
                )
                ch = width
            up = Upsample(ch) if level > 0 else None
            self.up.append(nn.ModuleDict({"blocks": blocks, **({"up": up} if up else {})}))
        self.out_norm = nn.GroupNorm(_groups(ch), ch)
        self.out_conv = _zero(nn.Conv2d(ch, cfg.out_channels, 3, padding=1))

    def _check_inputs(
        self, x: torch.Tensor, cond: torch.Tensor | None, time_of_year: torch.Tensor | None
    ) -> None:
        cfg = self.config
        if x.ndim != 4 or x.shape[1] != cfg.out_channels:
            raise ValueError(
                f"UNet expects the noisy input as [B, {cfg.out_channels}, H, W], got shape {tuple(x.shape)}"
            )
        h, w = x.shape[-2:]
        m = cfg.size_multiple
        if h % m or w % m:
            raise ValueError(
                f"UNet with {cfg.levels} levels needs H and W divisible by 2^{cfg.levels - 1} = {m}, "
                f"got H={h}, W={w}; pad or crop the patch "
                f"(e.g. to {math.ceil(h / m) * m}x{math.ceil(w / m) * m})"
            )
        if cfg.cond_channels:
            if cond is None:
                raise ValueError(f"UNet was built with cond_channels={cfg.cond_channels} but cond is None")
            if (
                cond.shape[0] != x.shape[0]
                or cond.shape[1] != cfg.cond_channels
                or cond.shape[-2:] != x.shape[-2:]
            ):
                raise ValueError(
                    f"cond must be [B={x.shape[0]}, {cfg.cond_channels}, {h}, {w}], got {tuple(cond.shape)}"
                )
        elif cond is not None and cond.shape[1] != 0:
            raise ValueError(f"UNet was built with cond_channels=0 but cond has shape {tuple(cond.shape)}")
        if cfg.time_harmonics:
            if time_of_year is None:
                raise ValueError(
                    f"UNet was built with time_harmonics={cfg.time_harmonics} but time_of_year is None; "
                    "pass the fraction of the year in [0, 1) per sample"
                )
            if time_of_year.reshape(-1).shape[0] != x.shape[0]:
                raise ValueError(
                    f"time_of_year must have one value per sample ({x.shape[0]}), "
                    f"got {tuple(time_of_year.shape)}"
                )

    def forward(
        self,
        x: torch.Tensor,
        c_noise: torch.Tensor,
        cond: torch.Tensor | None = None,
        time_of_year: torch.Tensor | None = None,
    ) -> torch.Tensor:
        cfg = self.config
        self._check_inputs(x, cond, time_of_year)
        b = x.shape[0]
        feats = [
            self.map_noise(c_noise.reshape(-1).expand(b) if c_noise.numel() == 1 else c_noise.reshape(b))
        ]
        if cfg.time_harmonics:
            feats.append(time_of_year_features(time_of_year.reshape(b), cfg.time_harmonics))
        emb = self.map_emb(torch.cat(feats, dim=1).to(x.dtype))

        h = torch.cat([x, cond], dim=1) if cfg.cond_channels else x
        h = self.input(h)
        skips = [h]
        for level in self.down:
            for block in level["blocks"]:
                h = block(h, emb)
                skips.append(h)
            if "down" in level:
                h = level["down"](h)
                skips.append(h)
        for block in self.mid:
            h = block(h, emb)
        for level in self.up:
            for block in level["blocks"]:
                h = block(torch.cat([h, skips.pop()], dim=1), emb)
            if "up" in level:
                h = level["up"](h)
        return self.out_conv(F.silu(self.out_norm(h)))
