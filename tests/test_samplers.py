"""EDM/DDIM samplers on a Gaussian toy whose exact denoiser is known, and reproducibility by seed."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from climrecon.models.edm import EDMPrecond
from climrecon.models.samplers import ddim_sampler, edm_sampler, karras_sigmas, make_generator, seed_for
from climrecon.models.unet import UNet, UNetConfig

MU, S = 0.3, 0.5  # data ~ N(MU, S^2)
SIGMA_MAX = 80.0
N = 40_000


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny tensors: one thread is faster than two on a shared machine, and keeps timings stable.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def gaussian_denoiser(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Exact D(x; sigma) = E[y | y + sigma n = x] for y ~ N(MU, S^2)."""
    sig = sigma.reshape(-1, *([1] * (x.ndim - 1)))
    return (x * S**2 + MU * sig**2) / (S**2 + sig**2)


def exact_flow(latents: torch.Tensor) -> torch.Tensor:
    """Exact probability-flow ODE map from sigma_max to 0: x - MU scales with sqrt(S^2 + sigma^2)."""
    x_max = SIGMA_MAX * latents.double()
    return MU + (x_max - MU) * S / math.sqrt(S**2 + SIGMA_MAX**2)


def latents(n: int = N, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 1, generator=make_generator(seed))


def assert_moments(x: torch.Tensor, var_tol: float) -> None:
    n = x.shape[0]
    # Starting from N(0, sigma_max^2) instead of N(MU, S^2 + sigma_max^2) shifts the mean by MU*S/sigma_max.
    mean_tol = 4 * S / math.sqrt(n) + MU * S / SIGMA_MAX
    assert abs(float(x.mean()) - MU) < mean_tol, (float(x.mean()), MU, mean_tol)
    assert abs(float(x.var()) / S**2 - 1) < var_tol, (float(x.var()), S**2, var_tol)


def test_karras_schedule_matches_eq5():
    t = karras_sigmas(18, 0.002, 80.0, 7.0)
    assert t.shape == (19,)
    assert float(t[0]) == pytest.approx(80.0) and float(t[17]) == pytest.approx(0.002) and float(t[18]) == 0.0
    assert bool((t[:-1] > t[1:]).all())
    i = 5
    expected = (80 ** (1 / 7) + i / 17 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    assert float(t[i]) == pytest.approx(expected, rel=1e-12)


def test_heun_is_second_order_and_ddim_first_order_on_exact_flow():
    z = latents(2000)
    exact = exact_flow(z)
    heun = [
        float((edm_sampler(gaussian_denoiser, z, num_steps=n).double() - exact).abs().max()) for n in (36, 72)
    ]
    ddim = [
        float((ddim_sampler(gaussian_denoiser, z, num_steps=n).double() - exact).abs().max())
        for n in (36, 72)
    ]
    assert 3.0 < heun[0] / heun[1] < 5.5, heun  # error / 4 when steps double
    assert 1.7 < ddim[0] / ddim[1] < 2.3, ddim  # error / 2 when steps double
    assert heun[1] < 0.01 and heun[1] < ddim[1] / 5


def test_deterministic_heun_reproduces_target_moments():
    x = edm_sampler(gaussian_denoiser, latents(), num_steps=128)
    assert x.dtype == torch.float32 and x.shape == (N, 1)
    assert_moments(x, var_tol=0.03)


def test_stochastic_heun_reproduces_target_moments():
    x = edm_sampler(gaussian_denoiser, latents(), num_steps=256, S_churn=40, generator=make_generator(2))
    assert_moments(x, var_tol=0.03)
    # churn only within [S_min, S_max]: a window below every step equals the deterministic sampler
    z = latents(500)
    det = edm_sampler(gaussian_denoiser, z, num_steps=18)
    windowed = edm_sampler(
        gaussian_denoiser, z, num_steps=18, S_churn=40, S_min=100, S_max=200, generator=make_generator(2)
    )
    assert torch.equal(det, windowed)


def test_ddim_reproduces_target_moments_deterministic_and_ancestral():
    assert_moments(ddim_sampler(gaussian_denoiser, latents(), num_steps=512), var_tol=0.03)
    assert_moments(
        ddim_sampler(gaussian_denoiser, latents(), num_steps=1024, eta=1.0, generator=make_generator(3)),
        var_tol=0.03,
    )


def test_stochastic_samplers_require_an_explicit_generator():
    with pytest.raises(ValueError, match="torch.Generator"):
        edm_sampler(gaussian_denoiser, latents(10), S_churn=10)
    with pytest.raises(ValueError, match="torch.Generator"):
        ddim_sampler(gaussian_denoiser, latents(10), eta=0.5)


def test_seed_for_is_stable_distinct_and_63_bit():
    a = seed_for(20261121, 3, 7)
    assert a == seed_for(20261121, 3, 7)
    assert 0 <= a < 2**63
    seeds = {seed_for(20261121, t, m) for t in range(50) for m in range(10)}
    assert len(seeds) == 500
    assert seed_for(1, 2, 3) != seed_for(1, 3, 2) != seed_for(1, 2)
    assert seed_for(np.int64(5), 1) == seed_for(5, 1)
    with pytest.raises(ValueError, match="non-negative"):
        seed_for(1, -2)


def _tiny_model() -> EDMPrecond:
    torch.manual_seed(0)
    cfg = UNetConfig(
        out_channels=2,
        cond_channels=3,
        base_channels=8,
        channel_mults=(1, 2),
        num_blocks=1,
        attention_levels=(1,),
    )
    model = EDMPrecond(UNet(cfg)).eval()
    with torch.no_grad():  # the output convolutions start at zero; give them weights so F matters
        for p in model.parameters():
            if not p.any():
                p.normal_(0, 0.05)
    return model


def test_same_seed_gives_identical_bytes_with_a_unet():
    model = _tiny_model()
    cond = torch.randn(2, 3, 8, 8, generator=make_generator(0))
    toy = torch.tensor([0.1, 0.6])

    def sample(seed: int) -> bytes:
        z = torch.randn(2, 2, 8, 8, generator=make_generator(seed_for(seed, 0)))
        denoise = lambda x, sigma: model(x, sigma, cond, toy)  # noqa: E731
        out = edm_sampler(denoise, z, num_steps=6, S_churn=5, generator=make_generator(seed_for(seed, 1)))
        assert out.shape == (2, 2, 8, 8) and torch.isfinite(out).all()
        return out.numpy().tobytes()

    assert sample(11) == sample(11)
    assert sample(11) != sample(12)


def test_dpmpp_2m_is_second_order_with_one_call_per_step():
    from climrecon.models.samplers import dpmpp_2m_sampler

    z = latents(2000)
    exact = exact_flow(z)
    calls = []

    def counted(x, sigma):
        calls.append(1)
        return gaussian_denoiser(x, sigma)

    errs = []
    for n in (24, 48):
        calls.clear()
        errs.append(float((dpmpp_2m_sampler(counted, z, num_steps=n).double() - exact).abs().max()))
        assert len(calls) == n  # one network evaluation per step
    assert errs[0] / errs[1] > 3.0, errs  # error / 4 when steps double (second order)
    ddim = float((ddim_sampler(gaussian_denoiser, z, num_steps=48).double() - exact).abs().max())
    assert errs[1] < ddim / 5, (errs, ddim)
    assert_moments(dpmpp_2m_sampler(gaussian_denoiser, latents(), num_steps=64), var_tol=0.03)


def test_explicit_noise_levels_replace_eq5_and_are_checked():
    from climrecon.models.samplers import noise_levels

    z = latents(200)
    t = karras_sigmas(6)
    assert torch.equal(
        edm_sampler(gaussian_denoiser, z, num_steps=6), edm_sampler(gaussian_denoiser, z, sigmas=t.tolist())
    )
    levels = noise_levels(3, 0.002, 80.0, 7.0, [40.0, 2.0, 0.1, 0.0], device="cpu", dtype=torch.float64)
    assert levels.tolist() == [40.0, 2.0, 0.1, 0.0]
    for bad in ([40.0, 2.0, 2.0, 0.0], [40.0, 0.0, 0.0], [5.0]):
        with pytest.raises(ValueError, match="noise levels"):
            noise_levels(3, 0.002, 80.0, 7.0, bad, device="cpu", dtype=torch.float64)
