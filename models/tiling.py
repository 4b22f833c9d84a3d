"""Tiling a 2-D domain into overlapping patches, and blending patches back into one field.

A patch-trained diffusion model sees ``ph x pw`` patches; inference covers a whole ``H x W`` domain with
tiles that overlap by ``oh``/``ow`` cells and blends them with smooth weights (Hann taper in the overlap
zones). Everything here is pure index arithmetic and works on numpy arrays and torch tensors alike
(the result has the input's type, dtype and device).

Contract:
- Tiles are the cartesian product of row origins and column origins, in row-major order (tile
  ``k = i * n_cols + j``). Along an axis of length ``n >= p`` the origins are ``0, s, 2s, ...`` with stride
  ``s = p - o``; the last tile is shifted back to end exactly at the border (``n - p``), so no border cell is
  lost and the last overlap may be larger than ``o``.
- A domain axis shorter than the patch (``n < p``) gets one tile on a *canvas* padded by reflection (mode
  "reflect", edge not repeated, folded again when the pad exceeds the axis) at the END of the axis, up to the
  patch size; :func:`blend_patches` crops the canvas back to the domain. ``Tiling.canvas_shape`` is
  ``(max(H, ph), max(W, pw))``; without padding canvas and domain coincide.
- :func:`blend_weights` gives a partition of unity: per tile, a separable taper that is 1 in the interior
  and against the domain (canvas) borders and rises as ``sin^2`` across every overlap with a neighbouring
  tile; the tapers are then divided by their sum over tiles, so the summed weights are exactly 1 on every
  canvas cell and every weight is > 0. Where no cell lies in more than two tiles of an axis (``o <= p / 2``
  and a regular last tile) the raw Hann tapers already sum to 1 and the division changes nothing.
- ``blend_patches(extract_patches(f, t), t, w) == f`` to float rounding for any field, tiling and weights
  with positive sum (the blend is normalised by the summed weights).
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

__all__ = [
    "Tiling",
    "TilingError",
    "make_tiling",
    "blend_weights",
    "pad_to_canvas",
    "extract_patches",
    "blend_patches",
    "seam_ratio",
]

Array = Any  # numpy.ndarray or torch.Tensor


class TilingError(ValueError):
    """A tiling cannot be built, or a field/patch stack does not match the tiling."""


@dataclass(frozen=True)
class Tiling:
    """Overlapping tiles covering an ``height x width`` domain (see the module docstring for the rules)."""

    height: int
    width: int
    patch: tuple[int, int]  # (ph, pw)
    overlap: tuple[int, int]  # (oh, ow), the nominal overlap between neighbouring tiles
    row_origins: tuple[int, ...]  # first row of each tile row, on the canvas
    col_origins: tuple[int, ...]  # first column of each tile column, on the canvas

    @property
    def domain_shape(self) -> tuple[int, int]:
        return (self.height, self.width)

    @property
    def canvas_shape(self) -> tuple[int, int]:
        """The domain padded (by reflection, at the end) to at least the patch size on each axis."""
        return (max(self.height, self.patch[0]), max(self.width, self.patch[1]))

    @property
    def grid_shape(self) -> tuple[int, int]:
        """(tile rows, tile columns)."""
        return (len(self.row_origins), len(self.col_origins))

    @property
    def n_tiles(self) -> int:
        return len(self.row_origins) * len(self.col_origins)

    @property
    def origins(self) -> np.ndarray:
        """[n_tiles, 2] int64 (row, column) of each tile's first cell, row-major."""
        rows, cols = np.meshgrid(self.row_origins, self.col_origins, indexing="ij")
        return np.stack([rows.ravel(), cols.ravel()], axis=1).astype(np.int64)

    def tile_slices(self, k: int) -> tuple[slice, slice]:
        """(row slice, column slice) of tile ``k`` on the canvas."""
        if not 0 <= k < self.n_tiles:
            raise IndexError(f"tile index {k} out of range for a tiling of {self.n_tiles} tiles")
        y0 = self.row_origins[k // len(self.col_origins)]
        x0 = self.col_origins[k % len(self.col_origins)]
        return slice(y0, y0 + self.patch[0]), slice(x0, x0 + self.patch[1])


def _pair(value: int | tuple[int, int] | list[int], name: str) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, (int, np.integer)) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in pair):
        raise TilingError(f"{name} must be an int or a pair of ints (rows, columns), got {value!r}")
    return int(pair[0]), int(pair[1])


def _axis_origins(n: int, p: int, o: int) -> tuple[int, ...]:
    """Origins along one axis: stride p - o, the last one shifted back to end at the border."""
    if n <= p:
        return (0,)
    stride = p - o
    count = math.ceil((n - p) / stride) + 1
    return tuple(min(k * stride, n - p) for k in range(count))


def make_tiling(
    height: int, width: int, patch: int | tuple[int, int], overlap: int | tuple[int, int] = 0
) -> Tiling:
    """Tiles of ``patch`` cells overlapping by ``overlap`` cells covering a ``height x width`` domain.

    Any domain works: square or not, larger or smaller than the patch (an axis shorter than the patch is
    padded by reflection to the patch size and cropped back by :func:`blend_patches`).
    """
    ph, pw = _pair(patch, "patch")
    oh, ow = _pair(overlap, "overlap")
    if not (
        isinstance(height, (int, np.integer))
        and isinstance(width, (int, np.integer))
        and height >= 1
        and width >= 1
    ):
        raise TilingError(f"domain must be at least 1 x 1 cells, got height={height!r}, width={width!r}")
    if ph < 1 or pw < 1:
        raise TilingError(f"patch must be >= 1 cell on each axis, got {(ph, pw)}")
    if not (0 <= oh < ph and 0 <= ow < pw):
        raise TilingError(
            "overlap must satisfy 0 <= overlap < patch on each axis, "
            f"got overlap={(oh, ow)} for patch={(ph, pw)}"
        )
    return Tiling(
        height=int(height),
        width=int(width),
        patch=(ph, pw),
        overlap=(oh, ow),
        row_origins=_axis_origins(int(height), ph, oh),
        col_origins=_axis_origins(int(width), pw, ow),
    )


# --- weights -------------------------------------------------------------------------------------------


def _axis_tapers(origins: tuple[int, ...], p: int, taper: str) -> np.ndarray:
    """[n_axis_tiles, p] raw 1-D tapers: 1 inside, sin^2 ramps across the actual overlap with each neighbour.

    Across an overlap of L cells shared by tiles k and k+1, tile k+1 rises as sin^2(pi/2 (i + 1/2) / L) and
    tile k falls as cos^2 of the same argument: the pair sums to 1 and both stay > 0.
    """
    w = np.ones((len(origins), p), dtype=np.float64)
    if taper == "uniform":
        return w
    for k in range(len(origins) - 1):
        overlap = origins[k] + p - origins[k + 1]  # cells shared by tiles k and k+1
        if overlap <= 0:
            continue
        ramp = np.sin(0.5 * np.pi * (np.arange(overlap) + 0.5) / overlap) ** 2
        w[k + 1, :overlap] *= ramp  # rises at the left edge of tile k+1
        w[k, p - overlap :] *= ramp[::-1]  # falls at the right edge of tile k (= cos^2)
    return w


def _accumulate(canvas: Array, tiling: Tiling, stack: Array) -> Array:
    """canvas[..., tile k] += stack[..., k, :, :] for every tile (in place; returns canvas)."""
    for k in range(tiling.n_tiles):
        rows, cols = tiling.tile_slices(k)
        canvas[..., rows, cols] += stack[..., k, :, :]
    return canvas


def blend_weights(tiling: Tiling, taper: Literal["hann", "uniform"] = "hann") -> np.ndarray:
    """[n_tiles, ph, pw] float64 blending weights, a partition of unity over the canvas (module docstring).

    ``"hann"``: separable sin^2/cos^2 tapers across each overlap, 1 in the interior and at the domain borders.
    ``"uniform"``: every cell of every tile weighs the same (overlaps are plain averages).
    """
    if taper not in ("hann", "uniform"):
        raise TilingError(f"taper must be 'hann' or 'uniform', got {taper!r}")
    ph, pw = tiling.patch
    wy = _axis_tapers(tiling.row_origins, ph, taper)
    wx = _axis_tapers(tiling.col_origins, pw, taper)
    raw = (wy[:, None, :, None] * wx[None, :, None, :]).reshape(tiling.n_tiles, ph, pw)
    total = _accumulate(np.zeros(tiling.canvas_shape), tiling, raw)
    return raw / extract_patches(total, tiling)


# --- numpy / torch helpers -----------------------------------------------------------------------------


def _is_torch(x: Any) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def _reflect_indices(n: int, size: int) -> np.ndarray:
    """Indices 0..size-1 folded into 0..n-1 by reflection without repeating the edge (numpy "reflect")."""
    i = np.arange(size)
    if n == 1:
        return np.zeros(size, dtype=np.int64)
    period = 2 * (n - 1)
    m = i % period
    return np.where(m < n, m, period - m).astype(np.int64)


def _take(x: Array, index: np.ndarray, axis: int) -> Array:
    if _is_torch(x):
        import torch

        return x.index_select(axis, torch.as_tensor(index, device=x.device))
    return np.take(x, index, axis=axis)


def _check_field(field: Array, tiling: Tiling, what: str) -> None:
    shape = tuple(field.shape[-2:])
    if field.ndim < 2 or shape not in (tiling.domain_shape, tiling.canvas_shape):
        raise TilingError(
            f"{what} must end in the domain shape {tiling.domain_shape} (or the padded canvas "
            f"{tiling.canvas_shape}) of the tiling, got shape {tuple(field.shape)}"
        )


def pad_to_canvas(field: Array, tiling: Tiling) -> Array:
    """[..., H, W] -> [..., *canvas_shape]: reflection padding at the end of each axis shorter than the patch.

    A field already on the canvas is returned as is.
    """
    _check_field(field, tiling, "field")
    (ch, cw), (h, w) = tiling.canvas_shape, tuple(field.shape[-2:])
    if h < ch:
        field = _take(field, _reflect_indices(h, ch), axis=field.ndim - 2)
    if w < cw:
        field = _take(field, _reflect_indices(w, cw), axis=field.ndim - 1)
    return field


def extract_patches(field: Array, tiling: Tiling) -> Array:
    """[..., H, W] (domain, or already padded canvas) -> [..., n_tiles, ph, pw] (copies, row-major tiles)."""
    canvas = pad_to_canvas(field, tiling)
    tiles = [canvas[(..., *tiling.tile_slices(k))] for k in range(tiling.n_tiles)]
    if _is_torch(canvas):
        import torch

        return torch.stack(tiles, dim=-3)
    return np.stack(tiles, axis=-3)


def blend_patches(
    patches: Array, tiling: Tiling, weights: Array | None = None, *, crop: bool = True
) -> Array:
    """[..., n_tiles, ph, pw] -> [..., H, W]: sum_k w_k patch_k / sum_k w_k on the canvas, then cropped.

    ``weights`` [n_tiles, ph, pw] (numpy or torch; default ``blend_weights(tiling, "hann")``) must have a
    positive sum on every canvas cell. ``crop=False`` returns the whole canvas (as a sampler working on the
    padded canvas needs). The result has the dtype (floating) and device of ``patches``.
    """
    n, (ph, pw) = tiling.n_tiles, tiling.patch
    if patches.ndim < 3 or tuple(patches.shape[-3:]) != (n, ph, pw):
        raise TilingError(
            f"patches must end in (n_tiles, ph, pw) = {(n, ph, pw)}, got shape {tuple(patches.shape)}"
        )
    if weights is None:
        weights = blend_weights(tiling)
    if tuple(weights.shape) != (n, ph, pw):
        raise TilingError(
            f"weights must have shape (n_tiles, ph, pw) = {(n, ph, pw)}, got {tuple(weights.shape)}"
        )
    lead = tuple(patches.shape[:-3])
    if _is_torch(patches):
        import torch

        if not patches.is_floating_point():
            patches = patches.to(torch.float64)
        weights = torch.as_tensor(weights, dtype=patches.dtype, device=patches.device)
        canvas = torch.zeros(lead + tiling.canvas_shape, dtype=patches.dtype, device=patches.device)
        total = torch.zeros(tiling.canvas_shape, dtype=patches.dtype, device=patches.device)
    else:
        if not np.issubdtype(patches.dtype, np.floating):
            patches = patches.astype(np.float64)
        weights = np.asarray(weights, dtype=patches.dtype)
        canvas = np.zeros(lead + tiling.canvas_shape, dtype=patches.dtype)
        total = np.zeros(tiling.canvas_shape, dtype=patches.dtype)
    _accumulate(canvas, tiling, patches * weights)
    _accumulate(total, tiling, weights)
    if not bool((total > 0).all()):
        raise TilingError(
            "blend weights sum to <= 0 on some canvas cells; use blend_weights(tiling) or positive weights"
        )
    field = canvas / total
    return field[..., : tiling.height, : tiling.width] if crop else field


# --- seams ---------------------------------------------------------------------------------------------
def _edge_pairs(origins: tuple[int, ...], patch: int, n: int) -> np.ndarray:
    """Indices j of the differences field[j+1] - field[j] that straddle an interior tile edge on one axis."""
    edges = {o for o in origins if 0 < o < n} | {o + patch for o in origins if o + patch < n}
    return np.array(sorted(e - 1 for e in edges), dtype=np.int64)


def seam_ratio(field: Array, tiling: Tiling) -> float:
    """Mean |difference| of neighbouring cells across interior tile edges / the mean over all other pairs.

    ``field`` [..., H, W] on the tiling's domain (leading dims are pooled). A pair straddles an edge when
    the two cells lie on either side of the first or last row (column) of some tile, inside the domain. A
    seamless stationary field gives ~1; seams give > 1. Raises ``ValueError`` for a single-tile tiling.
    """
    f = field.detach().cpu().numpy() if _is_torch(field) else np.asarray(field)
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
