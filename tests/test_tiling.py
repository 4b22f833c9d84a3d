"""Tiling a domain into overlapping patches and blending them back (climrecon.models.tiling)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from climrecon.models.tiling import (
    TilingError,
    blend_patches,
    blend_weights,
    extract_patches,
    make_tiling,
    pad_to_canvas,
)

# (height, width, patch, overlap): square, non-square, larger and smaller than the patch, irregular last tile,
# overlap 0, overlap > patch / 2 (cells in three tiles), non-square patches, a 1 x 1 domain.
CASES = [
    (40, 40, 16, 4),
    (20, 28, 16, 4),
    (33, 17, (8, 6), (3, 2)),
    (64, 24, 16, 0),
    (30, 30, 8, 6),
    (5, 7, 8, 2),
    (5, 40, 8, 3),
    (40, 3, (8, 4), (4, 1)),
    (16, 16, 16, 8),
    (1, 1, 4, 1),
]
IDS = [f"{h}x{w}-p{p}-o{o}" for h, w, p, o in CASES]


def _pair(v):
    return (v, v) if isinstance(v, int) else v


@pytest.mark.parametrize("height,width,patch,overlap", CASES, ids=IDS)
def test_tiles_cover_every_cell_and_stay_on_the_canvas(height, width, patch, overlap):
    t = make_tiling(height, width, patch, overlap)
    (ph, pw), (oh, ow) = _pair(patch), _pair(overlap)
    assert t.canvas_shape == (max(height, ph), max(width, pw))
    assert t.n_tiles == len(t.row_origins) * len(t.col_origins) == t.origins.shape[0]
    for origins, p, o, n in ((t.row_origins, ph, oh, height), (t.col_origins, pw, ow, width)):
        assert origins[0] == 0
        assert origins[-1] + p == max(n, p)  # the last tile ends exactly at the border
        steps = np.diff(origins)
        assert np.all(steps > 0) and np.all(steps <= p - o)  # no gap, at least the nominal overlap
    coverage = np.zeros(t.canvas_shape, dtype=int)
    for k in range(t.n_tiles):
        rows, cols = t.tile_slices(k)
        assert rows.stop <= t.canvas_shape[0] and cols.stop <= t.canvas_shape[1]
        coverage[rows, cols] += 1
    assert coverage.min() >= 1
    np.testing.assert_array_equal(t.origins[:, 0], np.repeat(t.row_origins, len(t.col_origins)))


@pytest.mark.parametrize("height,width,patch,overlap", CASES, ids=IDS)
def test_extract_then_blend_is_exact(height, width, patch, overlap):
    t = make_tiling(height, width, patch, overlap)
    ph, pw = _pair(patch)
    rng = np.random.default_rng(0)
    field = rng.normal(size=(2, 3, height, width))
    patches = extract_patches(field, t)
    assert patches.shape == (2, 3, t.n_tiles, ph, pw)
    random_positive = rng.uniform(0.1, 1.0, size=(t.n_tiles, ph, pw))
    for weights in (blend_weights(t, "hann"), blend_weights(t, "uniform"), random_positive):
        np.testing.assert_allclose(blend_patches(patches, t, weights), field, rtol=0, atol=1e-12)
    # torch float32 in, torch float32 out, same result
    field_t = torch.from_numpy(field).to(torch.float32)
    back = blend_patches(extract_patches(field_t, t), t, blend_weights(t))
    assert isinstance(back, torch.Tensor) and back.dtype == torch.float32 and back.shape == field_t.shape
    torch.testing.assert_close(back, field_t, rtol=0, atol=1e-6)


@pytest.mark.parametrize("height,width,patch,overlap", CASES, ids=IDS)
def test_weights_are_a_positive_partition_of_unity(height, width, patch, overlap):
    t = make_tiling(height, width, patch, overlap)
    for taper in ("hann", "uniform"):
        w = blend_weights(t, taper)
        assert w.shape == (t.n_tiles, *_pair(patch))
        assert w.min() > 0 and w.max() <= 1 + 1e-12
        # blending with unit weights averages over the covering tiles: times the coverage = summed weights
        coverage = np.zeros(t.canvas_shape)
        for k in range(t.n_tiles):
            coverage[t.tile_slices(k)] += 1
        summed = blend_patches(w, t, np.ones_like(w), crop=False) * coverage
        np.testing.assert_allclose(summed, 1.0, atol=1e-12)


def test_hann_taper_is_one_inside_and_at_domain_borders_and_smooth_across_overlaps():
    t = make_tiling(40, 40, 16, 8)  # regular: origins 0, 8, 16, 24; every overlap is 8 cells
    assert t.row_origins == (0, 8, 16, 24)
    w = blend_weights(t, "hann").reshape(4, 4, 16, 16)
    ramp = np.sin(0.5 * np.pi * (np.arange(8) + 0.5) / 8) ** 2
    corner, inner = w[0, 0], w[1, 1]
    # the corner tile: no taper against the domain edges (rows/cols 0..7), cos^2 towards its neighbours
    np.testing.assert_allclose(corner[:8, :8], 1.0)
    np.testing.assert_allclose(corner[0, 8:], ramp[::-1])
    # an interior tile: separable sin^2 rise then cos^2 fall on both axes (the two ramps meet mid-tile)
    np.testing.assert_allclose(inner, np.outer(np.r_[ramp, ramp[::-1]], np.r_[ramp, ramp[::-1]]))
    # smooth: no step larger than the Hann ramp's maximum slope pi / (2 L)
    for tile in (corner, inner):
        for axis in (0, 1):
            assert np.abs(np.diff(tile, axis=axis)).max() <= np.pi / 16 + 1e-12
    # neighbouring tapers sum to one across the shared overlap
    np.testing.assert_allclose(w[0, 0, 0, 8:] + w[0, 1, 0, :8], 1.0)
    # a tile spanning a whole axis (domain no longer than the patch) has no taper on that axis
    thin = blend_weights(make_tiling(8, 40, 16, 4))
    np.testing.assert_allclose(thin[0, :, :12], 1.0)


def test_irregular_last_tile_overlaps_more_and_still_blends_to_one():
    t = make_tiling(20, 28, 16, 4)  # stride 12 -> rows (0, 4): the last tile shifted back, overlap 12
    assert t.row_origins == (0, 4) and t.col_origins == (0, 12)
    w = blend_weights(t)
    first_row = w.reshape(2, 2, 16, 16)[:, 0, :, 0]  # column 0 of the two tiles of the first tile column
    np.testing.assert_allclose(first_row[0, :4], 1.0)  # rows 0..3 only in the first tile
    assert np.all(np.diff(first_row[0, 4:]) < 0) and np.all(np.diff(first_row[1, :12]) > 0)


def test_smaller_than_patch_domain_is_reflection_padded_and_cropped_back():
    field = np.arange(35, dtype=np.float64).reshape(5, 7)
    t = make_tiling(5, 7, 8, 2)
    assert t.n_tiles == 1 and t.canvas_shape == (8, 8)
    patch = extract_patches(field, t)[0]
    np.testing.assert_array_equal(patch, np.pad(field, ((0, 3), (0, 1)), mode="reflect"))
    np.testing.assert_array_equal(pad_to_canvas(torch.from_numpy(field), t).numpy(), patch)
    assert blend_patches(extract_patches(field, t), t).shape == (5, 7)
    # pads longer than the axis fold again (numpy "reflect" semantics)
    tiny = np.array([[1.0, 2.0]])
    np.testing.assert_array_equal(
        extract_patches(tiny, make_tiling(1, 2, 5))[0], np.pad(tiny, ((0, 4), (0, 3)), mode="reflect")
    )
    # a field already on the padded canvas is accepted as is
    np.testing.assert_array_equal(extract_patches(patch, t)[0], patch)


def test_bad_tilings_and_mismatched_fields_are_rejected_with_clear_messages():
    with pytest.raises(TilingError, match="overlap must satisfy"):
        make_tiling(32, 32, 8, 8)
    with pytest.raises(TilingError, match="patch must be an int or a pair"):
        make_tiling(32, 32, (8, 8, 8), 2)
    with pytest.raises(TilingError, match="at least 1 x 1"):
        make_tiling(0, 32, 8, 2)
    with pytest.raises(TilingError, match="taper must be"):
        blend_weights(make_tiling(32, 32, 8, 2), "gaussian")
    t = make_tiling(32, 24, 8, 2)
    with pytest.raises(TilingError, match=r"domain shape \(32, 24\)"):
        extract_patches(np.zeros((24, 32)), t)
    with pytest.raises(TilingError, match="patches must end in"):
        blend_patches(np.zeros((t.n_tiles + 1, 8, 8)), t)
    with pytest.raises(TilingError, match="sum to <= 0"):
        blend_patches(np.zeros((t.n_tiles, 8, 8)), t, np.zeros((t.n_tiles, 8, 8)))
