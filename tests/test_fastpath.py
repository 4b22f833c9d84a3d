"""How the patch network runs while sampling (models/fastpath.py): layouts, compilation with an eager
fallback, and chunks sized from the device's memory."""

from __future__ import annotations

import pytest
import torch

from climrecon.config import ConfigError, load_config
from climrecon.models.edm import EDMPrecond
from climrecon.models.fastpath import CompiledNetwork, auto_patch_batch, prepare_network
from climrecon.models.tiled import sample_tiled
from climrecon.models.tiling import make_tiling
from climrecon.models.unet import UNet, UNetConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def tiny(seed: int = 0) -> EDMPrecond:
    torch.manual_seed(seed)
    cfg = UNetConfig(
        out_channels=2, cond_channels=3, base_channels=8, channel_mults=(1, 2), attention_levels=(1,)
    )
    return EDMPrecond(UNet(cfg)).eval()


def call(n: int = 4) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(1)
    return (
        torch.randn(n, 2, 16, 16, generator=g),
        torch.full((n,), 0.7),
        torch.randn(n, 3, 16, 16, generator=g),
        torch.rand(n, generator=g),
    )


def test_channels_last_agrees_with_eager_and_is_deterministic():
    eager = tiny()
    nhwc = prepare_network(tiny(), "channels_last")
    assert prepare_network(eager, "eager") is eager
    assert next(p for p in nhwc.parameters() if p.ndim == 4).is_contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        a, b, c = eager(*call()), nhwc(*call()), nhwc(*call())
    assert torch.equal(b, c)
    assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)
    # through the tiled sampler, as the product runs it
    tiling = make_tiling(24, 24, 16, 4)
    kw = dict(seeds=[3, 4], out_channels=2, num_steps=3, max_patches_per_batch=4)
    cond, toy = torch.randn(2, 3, 24, 24), torch.rand(2)
    with torch.no_grad():
        x = sample_tiled(eager, cond, toy, tiling, **kw)
        y = sample_tiled(nhwc, cond, toy, tiling, **kw)
    assert torch.allclose(x, y, atol=1e-4)
    with pytest.raises(ValueError, match="network mode"):
        prepare_network(tiny(), "fast")  # type: ignore[arg-type]


def test_a_network_that_cannot_compile_runs_eagerly_with_one_warning(monkeypatch, caplog):
    import torch._inductor.config as inductor

    # a host without a working C++ toolchain: inductor's CPU code generation fails at the first call
    monkeypatch.setattr(inductor.cpp, "cxx", ("/nonexistent/bin/c++",))
    monkeypatch.setenv("TORCHINDUCTOR_FORCE_DISABLE_CACHES", "1")
    torch._dynamo.reset()
    net = prepare_network(tiny(), "compile")
    assert isinstance(net, CompiledNetwork) and net.sigma_data == 1.0  # attributes come from the network
    assert not net.training  # the tiled sampler refuses networks in training mode
    with torch.no_grad(), caplog.at_level("WARNING"):
        out = net(*call())
        again = net(*call())
    assert net.fallback_reason and "compile" in caplog.text
    assert sum("torch.compile" in r.getMessage() for r in caplog.records) == 1
    with torch.no_grad():
        assert torch.equal(out, tiny()(*call())) and torch.equal(again, out)
    torch._dynamo.reset()


def test_auto_patch_batch_fills_a_fraction_of_free_memory(monkeypatch):
    import psutil

    net = tiny()
    one = tuple(t[:1] for t in call(1))
    assert auto_patch_batch(net, one, torch.device("cpu")) == 64  # plenty of RAM: the CPU cap

    class Small:
        available = 4 * 2**20  # 4 MiB free

    monkeypatch.setattr(psutil, "virtual_memory", lambda: Small)
    small = auto_patch_batch(net, one, torch.device("cpu"))
    assert 1 <= small < 64


def test_sampler_config_accepts_auto_and_network_modes():
    cfg = load_config(None, ["sampler.max_patches_per_batch=auto", "sampler.network=channels_last"])
    assert cfg.sampler.max_patches_per_batch == "auto" and "network channels_last" in cfg.sampler.describe()
    with pytest.raises(ConfigError, match="max_patches_per_batch"):
        load_config(None, ["sampler.max_patches_per_batch=0"])
    with pytest.raises(ConfigError, match="network"):
        load_config(None, ["sampler.network=tensorrt"])
