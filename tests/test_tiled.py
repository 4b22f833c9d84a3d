"""The one tiled sampler (climrecon.models.tiled): determinism, blending, seams, denoiser wrapping."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from climrecon.models.edm import EDMPrecond
from climrecon.models.samplers import edm_sampler, make_generator
from climrecon.models.tiled import TiledDenoiser, sample_tiled
from climrecon.models.tiling import make_tiling, seam_ratio
from climrecon.models.unet import UNet, UNetConfig


def sample_domain(net, cond, toy, tiling, *, seeds, out_channels=1, **kw):
    """sample_tiled for the one-channel models of this module."""
    return sample_tiled(net, cond, toy, tiling, seeds=seeds, out_channels=out_channels, **kw)


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny convolutions run fastest (and steadiest on a shared machine) on one thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_net() -> EDMPrecond:
    """An EDM-preconditioned 2-level UNet with random (seeded) weights, zero-initialised layers included."""
    torch.manual_seed(0)
    config = UNetConfig(
        out_channels=1,
        cond_channels=2,
        base_channels=8,
        channel_mults=(1, 2),
        num_blocks=1,
        attention_levels=(),
        mid_attention=False,
        time_harmonics=1,
    )
    net = EDMPrecond(UNet(config))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=gen))
    return net.eval()


@pytest.fixture(scope="module")
def inputs():
    gen = torch.Generator().manual_seed(2)
    return torch.randn(3, 2, 12, 20, generator=gen), torch.tensor([0.1, 0.5, 0.9])


class GaussianPatchDenoiser:
    """The exact denoiser of a patch under a stationary Gaussian prior: squared-exponential covariance with
    length scale ``length`` cells and unit variance, D(x; sigma) = S (S + sigma^2 I)^-1 x. Fields drawn from
    the prior are smooth, with no preferred location, so a seamless sampler gives a seam ratio of ~1."""

    def __init__(self, ph: int, pw: int, length: float):
        yy, xx = np.meshgrid(np.arange(ph), np.arange(pw), indexing="ij")
        pts = np.stack([yy.ravel(), xx.ravel()], axis=1)
        d2 = ((pts[:, None, :] - pts[None, :, :]) ** 2).sum(-1)
        lam, vec = np.linalg.eigh(np.exp(-d2 / (2 * length**2)) + 1e-6 * np.eye(len(pts)))
        self.lam, self.vec = torch.from_numpy(lam), torch.from_numpy(vec)

    def __call__(self, x, sigma, cond, time_of_year):
        n, c = x.shape[:2]
        coef = x.reshape(n, c, -1).to(torch.float64) @ self.vec
        shrink = self.lam / (self.lam + sigma.to(torch.float64).reshape(n, 1, 1) ** 2)
        return ((coef * shrink) @ self.vec.T).reshape(x.shape)


def pointwise_denoiser(x, sigma, cond=None, time_of_year=None):
    """Exact denoiser of an i.i.d. N(0, 1) prior: D = x / (1 + sigma^2), the same on a patch or a domain."""
    return x / (1 + sigma.reshape(-1, *[1] * (x.ndim - 1)) ** 2)


@pytest.mark.parametrize("blend", ["once", "every_step"])
def test_item_results_do_not_depend_on_the_batch(tiny_net, inputs, blend):
    cond, toy = inputs
    tiling = make_tiling(12, 20, 8, 4)
    kw = {"num_steps": 4, "blend": blend}
    batch = sample_domain(tiny_net, cond, toy, tiling, seeds=[11, 22, 33], **kw)
    assert batch.shape == (3, 1, 12, 20) and batch.dtype == torch.float32 and torch.isfinite(batch).all()
    for i, seed in enumerate([11, 22, 33]):
        alone = sample_domain(tiny_net, cond[i : i + 1], toy[i : i + 1], tiling, seeds=[seed], **kw)
        assert torch.equal(alone[0], batch[i])  # identical bytes
    # another companion in the batch, in another position: item 22 unchanged
    mixed = sample_domain(tiny_net, cond[[1, 0]], toy[[1, 0]], tiling, seeds=[22, 99], **kw)
    assert torch.equal(mixed[0], batch[1])
    assert not torch.equal(batch[0], batch[1])  # distinct seeds, distinct samples


def test_churn_noise_is_per_item_too(tiny_net, inputs):
    cond, toy = inputs
    tiling = make_tiling(12, 20, 8, 4)
    kw = {"num_steps": 4, "blend": "every_step", "S_churn": 2.0}
    batch = sample_domain(tiny_net, cond[:2], toy[:2], tiling, seeds=[5, 6], **kw)
    alone = sample_domain(tiny_net, cond[1:2], toy[1:2], tiling, seeds=[6], **kw)
    assert torch.equal(alone[0], batch[1])
    no_churn = sample_domain(
        tiny_net, cond[1:2], toy[1:2], tiling, seeds=[6], num_steps=4, blend="every_step"
    )
    assert not torch.equal(alone, no_churn)


@pytest.mark.parametrize("blend", ["once", "every_step"])
def test_patch_chunking_changes_only_float_rounding(tiny_net, inputs, blend):
    """Network calls of 1 tile vs all 8 tiles at once: equal to float32 rounding, NOT bitwise on CPU (oneDNN
    convolutions round differently with the batch size; observed max difference ~1e-4 on values of ~5, the
    chain starting at sigma_max = 80)."""
    cond, toy = inputs
    tiling = make_tiling(12, 20, 8, 4)
    one = sample_domain(
        tiny_net, cond[:1], toy[:1], tiling, seeds=[7], num_steps=4, blend=blend, max_patches_per_batch=1
    )
    all_ = sample_domain(
        tiny_net, cond[:1], toy[:1], tiling, seeds=[7], num_steps=4, blend=blend, max_patches_per_batch=64
    )
    torch.testing.assert_close(one, all_, rtol=1e-4, atol=1e-3)


def test_single_tile_equals_plain_sampling_with_the_documented_noise(tiny_net, inputs):
    cond, toy = inputs
    tiling = make_tiling(8, 16, (8, 16), 0)
    got = sample_domain(
        tiny_net, cond[:1, :, :8, :16], toy[:1], tiling, seeds=[3], num_steps=5, max_patches_per_batch=1
    )
    latents = torch.randn((1, 1, 8, 16), generator=make_generator(3, "cpu"))
    want = edm_sampler(lambda x, s: tiny_net(x, s, cond[:1, :, :8, :16], toy[:1]), latents, num_steps=5)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("blend", ["once", "every_step"])
@pytest.mark.parametrize(
    "shape,patch,overlap", [((12, 20), 8, 4), ((20, 12), (8, 4), (2, 1)), ((5, 7), 8, 2), ((5, 20), 8, 3)]
)
def test_tiled_sampling_of_a_pointwise_prior_equals_whole_domain_sampling(blend, shape, patch, overlap):
    """A local denoiser gives the same answer on tiles as on the domain: both blends must reproduce the
    whole-domain chain exactly (same initial noise), whatever the domain/patch shapes."""
    h, w = shape
    tiling = make_tiling(h, w, patch, overlap)
    got = sample_domain(
        pointwise_denoiser,
        torch.zeros(2, 0, h, w),
        None,
        tiling,
        seeds=[4, 8],
        num_steps=6,
        blend=blend,
        out_channels=1,
        max_patches_per_batch=3,
    )
    assert got.shape == (2, 1, h, w)
    for i, seed in enumerate([4, 8]):
        latents = torch.randn((1, 1, *tiling.canvas_shape), generator=make_generator(seed, "cpu"))
        want = edm_sampler(pointwise_denoiser, latents, num_steps=6)[..., :h, :w]
        torch.testing.assert_close(got[i : i + 1], want, rtol=0, atol=1e-5)


def test_every_step_blending_is_seamless_and_unblended_tiles_are_not():
    h, w, patch, length = 32, 48, 12, 2.5
    net = GaussianPatchDenoiser(patch, patch, length)
    cond, seeds = torch.zeros(4, 0, h, w), [0, 1, 2, 3]
    blended_tiling = make_tiling(h, w, patch, patch // 2)
    blended = sample_domain(
        net, cond, None, blended_tiling, seeds=seeds, num_steps=12, blend="every_step", out_channels=1
    )
    assert 0.9 < seam_ratio(blended, blended_tiling) < 1.1  # measured 0.98
    assert 0.8 < blended.std() < 1.2  # the prior's unit variance, no washing out by averaging
    unblended_tiling = make_tiling(h, w, patch, 0)
    unblended = sample_domain(
        net,
        cond,
        None,
        unblended_tiling,
        seeds=seeds,
        num_steps=12,
        blend="once",
        taper="uniform",
        out_channels=1,
    )
    assert seam_ratio(unblended, unblended_tiling) > 2.0  # measured 2.9


def test_seam_ratio_is_one_for_stationary_fields_and_grows_with_injected_seams():
    tiling = make_tiling(96, 128, 16, 4)
    rng = np.random.default_rng(0)
    white = rng.normal(size=(4, 96, 128))
    assert 0.97 < seam_ratio(white, tiling) < 1.03
    # a smooth stationary field: periodic Gaussian filter of white noise (exactly translation invariant)
    ky, kx = np.meshgrid(np.fft.fftfreq(96), np.fft.fftfreq(128), indexing="ij")
    smooth = np.fft.ifft2(np.fft.fft2(white) * np.exp(-2 * (np.pi * 3) ** 2 * (ky**2 + kx**2))).real
    assert 0.9 < seam_ratio(smooth, tiling) < 1.1
    assert seam_ratio(torch.from_numpy(smooth), tiling) == pytest.approx(seam_ratio(smooth, tiling))
    # one random offset per tile of a no-overlap tiling: jumps exactly at the tile edges
    blocks = make_tiling(96, 128, 16, 0)
    offsets = np.kron(rng.normal(size=(6, 8)), np.ones((16, 16)))
    assert seam_ratio(smooth + 0.5 * smooth.std() * offsets, blocks) > 1.5
    with pytest.raises(ValueError, match="no interior tile edges"):
        seam_ratio(smooth, make_tiling(96, 128, 128, 0))


def test_bad_arguments_are_rejected_with_clear_messages(tiny_net, inputs):
    cond, toy = inputs
    tiling = make_tiling(12, 20, 8, 4)
    with pytest.raises(ValueError, match="need one seed per item: 3 items, 2 seeds"):
        sample_domain(tiny_net, cond, toy, tiling, seeds=[1, 2])
    with pytest.raises(ValueError, match="non-negative ints"):
        sample_domain(tiny_net, cond, toy, tiling, seeds=[1, 2, -3])
    with pytest.raises(ValueError, match=r"\(H, W\) = \(12, 20\)"):
        sample_domain(tiny_net, cond[..., :10], toy, tiling, seeds=[1, 2, 3])
    with pytest.raises(ValueError, match="blend must be"):
        sample_domain(tiny_net, cond, toy, tiling, seeds=[1, 2, 3], blend="sometimes")
    with pytest.raises(ValueError, match="needs blend='every_step'"):
        sample_domain(tiny_net, cond, toy, tiling, seeds=[1, 2, 3], blend="once", wrap=lambda d: d)
    tiny_net.train()
    try:
        with pytest.raises(ValueError, match="net.eval()"):
            sample_domain(tiny_net, cond, toy, tiling, seeds=[1, 2, 3])
    finally:
        tiny_net.eval()


def test_a_wrapper_sees_the_blended_full_domain_denoiser(tiny_net, inputs):
    """``wrap`` receives the full-domain denoiser (guidance wraps it this way): it is called on whole canvases
    of every item, an identity wrapper changes no byte, and what it returns is what the sampler integrates."""
    cond, toy = inputs
    tiling = make_tiling(12, 20, 8, 4)
    seen = []

    def identity(denoise):
        def wrapped(x, sigma):
            seen.append(tuple(x.shape))
            return denoise(x, sigma)

        return wrapped

    plain = sample_domain(tiny_net, cond, toy, tiling, seeds=[1, 2, 3], num_steps=3)
    assert torch.equal(
        sample_domain(tiny_net, cond, toy, tiling, seeds=[1, 2, 3], num_steps=3, wrap=identity), plain
    )
    assert set(seen) == {(3, 1, 12, 20)}
    zero = sample_domain(
        tiny_net,
        cond,
        toy,
        tiling,
        seeds=[1, 2, 3],
        num_steps=3,
        wrap=lambda d: lambda x, s: torch.zeros_like(x),
    )
    torch.testing.assert_close(zero, torch.zeros_like(zero), rtol=0, atol=1e-5)  # D = 0: the ODE ends at 0
    assert isinstance(TiledDenoiser(tiny_net, tiling, cond, toy), TiledDenoiser)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_sampling_keeps_the_determinism_contract(tiny_net, inputs):
    """On CUDA: per-item results independent of the batch, and the same chain as on CPU (the initial noise
    is drawn on the CPU) up to float32/TF32 rounding."""
    cond, toy = inputs
    tiling = make_tiling(12, 20, 8, 4)
    net = tiny_net.to("cuda")
    try:
        batch = sample_domain(net, cond, toy, tiling, seeds=[11, 22, 33], num_steps=4)
        alone = sample_domain(net, cond[1:2], toy[1:2], tiling, seeds=[22], num_steps=4)
        assert batch.device.type == "cuda" and torch.equal(alone[0], batch[1])
        cpu = sample_domain(tiny_net.to("cpu"), cond, toy, tiling, seeds=[11, 22, 33], num_steps=4)
        # cuDNN may use TF32 convolutions (10-bit mantissa): compare in relative norm
        assert float((batch.cpu() - cpu).norm() / cpu.norm()) < 1e-2
    finally:
        tiny_net.to("cpu")
