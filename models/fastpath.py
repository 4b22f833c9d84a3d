"""How a patch network runs during sampling: eager, channels-last memory layout, or ``torch.compile``.

The sampler calls the network in fixed-shape chunks (:class:`~climrecon.models.tiled.TiledDenoiser`), which
is what a compiled graph wants: one compilation per process and chunk shape, reused for every step, month
and member. ``benchmarks/sampling_cost.py`` measures the three in the shipped sampling path.

- ``eager``: the module as trained (NCHW).
- ``channels_last``: the module's weights in NHWC layout (oneDNN's preferred convolution layout on CPU).
- ``compile``: ``torch.compile`` (inductor) of the eager module, compiled at the first call. Compilation
  can fail where a toolchain is missing (no C++ compiler on a CPU host, no Triton on a GPU host): the first
  failure logs one warning naming the cause and the network runs eagerly from then on (bitwise the eager
  result), so a run never stops for it.

:func:`auto_patch_batch` sizes the chunk (patches per call, across months, members and tiles) from the
device's free memory. Every mode is deterministic for a given mode, device and chunk shape; different modes give results that
agree to float32 rounding, not bitwise (a run's provenance records the mode).
"""

from __future__ import annotations

import logging
from typing import Any, Literal

import torch

__all__ = ["NetworkMode", "prepare_network", "CompiledNetwork", "auto_patch_batch"]

NetworkMode = Literal["eager", "channels_last", "compile"]
_log = logging.getLogger(__name__)


class CompiledNetwork(torch.nn.Module):
    """``torch.compile(net)`` with a clean eager fallback; other attributes come from ``net`` itself."""

    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net = net
        self._compiled: Any = torch.compile(net, dynamic=False)
        self.fallback_reason: str | None = None
        self.train(net.training)  # a new module starts in training mode; follow the wrapped network

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self._compiled is not None:
            try:
                return self._compiled(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001 - any compiler failure: run eagerly, say so once
                self.fallback_reason = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
                self._compiled = None
                _log.warning(
                    "torch.compile of the patch network failed (%s); running it eagerly", self.fallback_reason
                )
        return self.net(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("net"), name)


def prepare_network(net: torch.nn.Module, mode: NetworkMode = "eager") -> torch.nn.Module:
    """``net`` (in eval mode) ready to sample in ``mode`` (module docstring); "eager" returns it unchanged."""
    net.eval()
    if mode == "eager":
        return net
    if mode == "channels_last":
        return net.to(memory_format=torch.channels_last)
    if mode == "compile":
        return CompiledNetwork(net)
    raise ValueError(f"network mode must be one of eager, channels_last, compile; got {mode!r}")


def _activation_bytes_per_patch(net: torch.nn.Module, example: tuple[torch.Tensor | None, ...]) -> int:
    """Bytes of every module output in one no-grad forward of a one-patch batch: an upper bound of what one
    patch adds to a call's peak memory (nothing is freed early in this count)."""
    total = 0

    def hook(_module: torch.nn.Module, _inputs: Any, output: Any) -> None:
        nonlocal total
        if isinstance(output, torch.Tensor):
            total += output.numel() * output.element_size()

    handles = [m.register_forward_hook(hook) for m in net.modules()]
    try:
        with torch.no_grad():
            net(*example)
    finally:
        for h in handles:
            h.remove()
    return max(total, 1)


def auto_patch_batch(
    net: torch.nn.Module,
    example: tuple[torch.Tensor | None, ...],
    device: torch.device,
    *,
    fraction: float = 0.25,
    cpu_cap: int = 64,
    cuda_cap: int = 4096,
) -> int:
    """Patches per network call sized from ``device``'s free memory: ``fraction`` of it over one patch's
    footprint, capped (``cpu_cap``: larger CPU calls run no faster, ``benchmarks/sampling_cost.py`` measures
    the best batch per device; ``cuda_cap``). ``example``: a one-patch call ``(x, sigma, cond, time_of_year)``
    on ``device``. CUDA measures the footprint (peak allocated memory of a probe call of 8 patches), the CPU
    counts it (module outputs of a one-patch call) against the available RAM."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        probe = tuple(None if t is None else t.expand(8, *t.shape[1:]).contiguous() for t in example)
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        with torch.no_grad():
            net(*probe)
        torch.cuda.synchronize(device)
        per_patch = max((torch.cuda.max_memory_allocated(device) - base) / 8, 1.0)
        return int(max(1, min(cuda_cap, fraction * free // per_patch)))
    import psutil

    per_patch = _activation_bytes_per_patch(net, example)
    return int(max(1, min(cpu_cap, fraction * psutil.virtual_memory().available // per_patch)))
