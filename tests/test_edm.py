"""EDM preconditioning (Eq. 7, Table 1) and loss (Eq. 2, 8)."""

from __future__ import annotations

import math

import pytest
import torch

from climrecon.models.edm import EDMConfig, EDMLoss, EDMPrecond
from climrecon.models.unet import UNet, UNetConfig


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_precond(sigma_data=0.7) -> EDMPrecond:
    torch.manual_seed(0)
    cfg = UNetConfig(
        out_channels=2,
        cond_channels=1,
        base_channels=8,
        channel_mults=(1, 2),
        num_blocks=1,
        attention_levels=(),
    )
    return EDMPrecond(UNet(cfg), EDMConfig(sigma_data=sigma_data))


def test_preconditioning_identities_and_limits():
    pre = tiny_precond(sigma_data=0.7)
    sd = 0.7
    sigma = torch.logspace(-4, 4, 50, dtype=torch.float64)
    c_skip, c_out, c_in, c_noise = pre.coefficients(sigma)
    torch.testing.assert_close(c_in**2 * (sigma**2 + sd**2), torch.ones_like(sigma))  # unit-variance input
    # unit-variance training target:
    # Var[(y - c_skip (y + n)) / c_out] = ((1 - c_skip)^2 sd^2 + c_skip^2 sigma^2) / c_out^2 = 1
    torch.testing.assert_close(
        ((1 - c_skip) ** 2 * sd**2 + c_skip**2 * sigma**2) / c_out**2, torch.ones_like(sigma)
    )
    torch.testing.assert_close(c_noise, sigma.log() / 4)
    loss = EDMLoss(pre.config)
    torch.testing.assert_close(loss.weight(sigma) * c_out**2, torch.ones_like(sigma))  # lambda = 1 / c_out^2
    # limits: sigma -> 0 keeps the input; sigma -> inf trusts the network, scaled to sigma_data
    assert float(c_skip[0]) == pytest.approx(1, abs=1e-7) and float(c_out[0]) == pytest.approx(0, abs=1e-3)
    assert float(c_skip[-1]) == pytest.approx(0, abs=1e-7) and float(c_out[-1]) == pytest.approx(sd, rel=1e-7)


def test_forward_applies_eq7_with_c_in_and_c_noise_given_to_the_network():
    pre = tiny_precond()
    seen = {}
    pre.net.register_forward_hook(lambda mod, args, out: seen.update(x=args[0], c_noise=args[1], F=out))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 2, 8, 8, generator=g) * 5
    cond, toy = torch.randn(3, 1, 8, 8, generator=g), torch.rand(3, generator=g)
    sigma = torch.tensor([0.01, 1.0, 30.0])
    with torch.no_grad():
        for p in pre.parameters():  # non-zero output layer, so F != 0
            if not p.any():
                p.normal_(0, 0.05)
        d = pre(x, sigma, cond, toy)
    c_skip, c_out, c_in, c_noise = (c.reshape(-1, 1, 1, 1) for c in pre.coefficients(sigma))
    torch.testing.assert_close(seen["x"], c_in * x)
    torch.testing.assert_close(seen["c_noise"], sigma.log() / 4)
    assert seen["F"].abs().max() > 1e-3
    torch.testing.assert_close(d, c_skip * x + c_out * seen["F"])
    # a scalar sigma broadcasts over the batch; a wrong count is an error
    assert pre(x, 2.0, cond, toy).shape == x.shape
    with pytest.raises(ValueError, match="one value per sample"):
        pre(x, torch.tensor([1.0, 2.0]), cond, toy)


def test_loss_samples_lognormal_sigma_and_is_one_at_init_on_unit_scale_data():
    cfg = EDMConfig(sigma_data=0.7)
    loss = EDMLoss(cfg)
    g = torch.Generator().manual_seed(2)
    sig = loss.sample_sigma(20_000, device=torch.device("cpu"), generator=g).flatten().log()
    assert float(sig.mean()) == pytest.approx(-1.2, abs=0.04) and float(sig.std()) == pytest.approx(
        1.2, abs=0.04
    )
    # At init F = 0 (zero output layer), so E[loss] = lambda (c_skip - 1)^2 sd^2 + lambda c_skip^2 sigma^2 = 1
    pre = tiny_precond(sigma_data=0.7)
    y = torch.randn(256, 2, 8, 8, generator=g) * 0.7
    cond, toy = torch.randn(256, 1, 8, 8, generator=g), torch.rand(256, generator=g)
    with torch.no_grad():
        value = loss(pre, y, cond, toy, generator=g)
    assert value.shape == y.shape
    assert float(value.mean()) == pytest.approx(1.0, abs=0.05)


def test_loss_is_reproducible_with_a_generator_and_config_round_trips():
    pre = tiny_precond()
    y = torch.randn(2, 2, 8, 8)
    cond, toy = torch.randn(2, 1, 8, 8), torch.rand(2)
    a = EDMLoss(pre.config)(pre, y, cond, toy, generator=torch.Generator().manual_seed(5))
    b = EDMLoss(pre.config)(pre, y, cond, toy, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    cfg = EDMConfig(sigma_data=0.5, P_mean=-1.0, P_std=1.4)
    assert EDMConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="sigma_data"):
        EDMConfig(sigma_data=0)
    assert math.isclose(EDMConfig().P_mean, -1.2) and math.isclose(EDMConfig().P_std, 1.2)
