"""The compact conditional UNet: shapes, input checks, config round trip, cyclic time-of-year embedding."""

from __future__ import annotations

import json

import pytest
import torch

from climrecon.models.unet import SelfAttention, UNet, UNetConfig, count_parameters, time_of_year_features


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny(**kw) -> UNetConfig:
    base = dict(
        out_channels=2,
        cond_channels=3,
        base_channels=8,
        channel_mults=(1, 2, 2),
        num_blocks=1,
        attention_levels=(2,),
    )
    return UNetConfig(**{**base, **kw})


def randomized(net: UNet) -> UNet:
    """Give the zero-initialised output layers random weights so every input influences the output."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in net.parameters():
            if not p.any():
                p.normal_(0, 0.05)
    return net.eval()


def inputs(b=2, h=16, w=24, cfg: UNetConfig | None = None, seed=0):
    cfg = cfg or tiny()
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(b, cfg.out_channels, h, w, generator=g),
        torch.randn(b, generator=g),
        torch.randn(b, cfg.cond_channels, h, w, generator=g),
        torch.rand(b, generator=g),
    )


def test_output_shape_for_several_sizes_and_zero_init():
    net = UNet(tiny())
    for h, w in [(16, 24), (8, 8), (32, 4)]:
        x, c_noise, cond, toy = inputs(h=h, w=w)
        out = net(x, c_noise, cond, toy)
        assert out.shape == (2, 2, h, w)
        assert not out.any()  # zero-initialised output layer: F = 0 until trained


def test_non_divisible_size_gives_clear_error():
    net = UNet(tiny())
    x, c_noise, cond, toy = inputs(h=18, w=24)
    with pytest.raises(ValueError, match=r"divisible by 2\^2 = 4, got H=18, W=24"):
        net(x, c_noise, cond, toy)


def test_bad_conditioning_inputs_are_rejected():
    net = UNet(tiny())
    x, c_noise, cond, toy = inputs()
    with pytest.raises(ValueError, match="cond_channels=3 but cond is None"):
        net(x, c_noise, None, toy)
    with pytest.raises(ValueError, match=r"cond must be \[B=2, 3, 16, 24\]"):
        net(x, c_noise, cond[:, :2], toy)
    with pytest.raises(ValueError, match="time_of_year is None"):
        net(x, c_noise, cond, None)
    with pytest.raises(ValueError, match=r"\[B, 2, H, W\]"):
        net(x[:, :1], c_noise, cond, toy)


def test_unconditional_without_time_of_year():
    cfg = tiny(cond_channels=0, time_harmonics=0, noise_embedding="fourier")
    net = randomized(UNet(cfg))
    x, c_noise, _, _ = inputs(cfg=cfg)
    assert net(x, c_noise).shape == x.shape


def test_output_depends_on_every_input():
    net = randomized(UNet(tiny()))
    x, c_noise, cond, toy = inputs()
    ref = net(x, c_noise, cond, toy)
    for i, changed in enumerate(
        [
            (x + 0.5, c_noise, cond, toy),
            (x, c_noise + 1, cond, toy),
            (x, c_noise, cond + 0.5, toy),
            (x, c_noise, cond, toy + 0.3),
        ]
    ):
        assert (net(*changed) - ref).abs().max() > 1e-4, f"input {i} has no effect"


def test_time_of_year_embedding_is_cyclic():
    months = (torch.arange(12) + 0.5) / 12  # mid-month fractions
    e = time_of_year_features(months, harmonics=2)
    dist = lambda a, b: float((e[a] - e[b]).norm())  # noqa: E731
    assert dist(11, 0) == pytest.approx(dist(0, 1), abs=1e-6)  # December is January's neighbour
    assert dist(11, 0) < 0.6 * dist(0, 6)  # ... and far from July
    e01 = time_of_year_features(torch.tensor([0.0, 1.0, 0.9999]), 2)
    assert torch.allclose(e01[0], e01[1], atol=1e-5) and torch.allclose(e01[0], e01[2], atol=2e-3)
    # end to end: the network cannot tell 31 Dec from 1 Jan, but can tell January from July
    net = randomized(UNet(tiny()))
    x, c_noise, cond, _ = inputs(b=1)
    out = {f: net(x, c_noise, cond, torch.tensor([f])) for f in (0.0, 0.9999, 0.5)}
    assert (out[0.0] - out[0.9999]).abs().max() < 0.05 * (out[0.0] - out[0.5]).abs().max()


def test_config_round_trip_and_validation():
    cfg = tiny(dropout=0.1)
    again = UNetConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg
    with pytest.raises(ValueError, match=r"unknown UNetConfig field\(s\) \['width'\]"):
        UNetConfig.from_dict({**cfg.to_dict(), "width": 3})
    with pytest.raises(ValueError, match="attention_levels"):
        tiny(attention_levels=(3,))
    with pytest.raises(ValueError, match="channel_mults"):
        tiny(channel_mults=())


def test_attention_where_configured_and_parameter_count():
    net = UNet(tiny(attention_levels=(0, 2)))
    n_attn = sum(isinstance(m, SelfAttention) for m in net.modules())
    # level 0: 1 down + 2 up blocks; level 2: 1 down + 2 up; mid: 1
    assert n_attn == 7
    assert count_parameters(net) > count_parameters(UNet(tiny(attention_levels=())))
