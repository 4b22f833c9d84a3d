"""Sampler throughput of the shipped patch model, and the FLOP/s its UNet reaches vs a dense matmul.

Measured in one process, same thread count, best of ``--repeat`` timings (the machine is shared):

- ``matmul_gflops``: a float32 ``n x n @ n x n`` matmul (``2 n^3`` FLOPs), the dense-compute ceiling torch
  reaches here, re-measured between the forward cases and taken at its best (so load from other processes
  lowers the ceiling no more than the forward figures);
- per variant (eager; eager + channels_last; ``torch.compile`` when it works offline) and per patch batch
  size: one no-grad forward of :class:`EDMPrecond`, FLOPs counted with
  ``torch.utils.flop_counter.FlopCounterMode`` (convolutions, matmuls, attention), giving achieved GFLOP/s,
  ``patches_per_s`` (network evaluations of one patch per second) and the fraction of the matmul figure;
- ``sampler``: one full-domain :func:`~climrecon.models.tiled.sample_tiled` call (the shipped tiled sampler;
  every-step blending, Heun) on the 80 x 80 domain:
  seconds per sampler step and fine-grid cells per second per step.

Usage: ``python benchmarks/sampler_speed.py [--checkpoint ...] [--threads 1] [--batches 9 32 64]``
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from climrecon.models.checkpoint import load_networks
from climrecon.models.tiled import sample_tiled
from climrecon.models.tiling import make_tiling


def load_checkpoint(path: str):
    """The checkpoint's denoiser network and metadata."""
    nets, meta = load_networks(path, roles=("denoiser",))
    return nets["denoiser"], meta


sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import command_line, machine, peak_rss_mib, versions, write_results  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def best_seconds(fn: Callable[[], Any], repeat: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def matmul_gflops(n: int, repeat: int) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    return 2 * n**3 / best_seconds(lambda: a @ b, repeat) / 1e9


def forward_flops(model: torch.nn.Module, inputs: tuple) -> int:
    with FlopCounterMode(display=False) as counter:
        model(*inputs)
    return int(counter.get_total_flops())


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkpoint", default=str(REPO / "checkpoints" / "dpdm-westus-x8.pt"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batches", type=int, nargs="+", default=[9, 32, 64])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--matmul-n", type=int, default=2048)
    parser.add_argument("--sampler-steps", type=int, default=4)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "sampler_speed.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    model, meta = load_checkpoint(args.checkpoint)
    p = int(meta.grid.patch_size)
    unet = meta.networks["denoiser"].unet
    c_out, c_cond = unet.out_channels, unet.cond_channels
    ceiling = matmul_gflops(args.matmul_n, args.repeat)

    variants: dict[str, torch.nn.Module] = {"eager": model}
    variants["channels_last"] = load_checkpoint(args.checkpoint)[0].to(memory_format=torch.channels_last)
    notes: dict[str, str] = {}
    if not args.no_compile:
        try:
            compiled = torch.compile(load_checkpoint(args.checkpoint)[0])
            with torch.no_grad():
                compiled(
                    torch.randn(2, c_out, p, p), torch.ones(2), torch.randn(2, c_cond, p, p), torch.rand(2)
                )
            variants["compiled"] = compiled
        except Exception as exc:  # noqa: BLE001 - report why compile is unavailable, keep measuring
            notes["compiled"] = (
                f"torch.compile failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
            )

    rows = []
    for name, net in variants.items():
        for n in args.batches:
            fmt = torch.channels_last if name == "channels_last" else torch.contiguous_format
            inputs = (
                torch.randn(n, c_out, p, p).to(memory_format=fmt),
                torch.full((n,), 0.5),
                torch.randn(n, c_cond, p, p).to(memory_format=fmt),
                torch.rand(n),
            )
            with torch.no_grad():
                flops = forward_flops(model, inputs)  # same graph for every variant: count on eager
                try:
                    sec = best_seconds(lambda net=net, inputs=inputs: net(*inputs), args.repeat)
                except Exception as exc:  # noqa: BLE001 - e.g. an inductor recompile failing offline
                    notes[f"{name}/{n}"] = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
                    continue
            ceiling = max(ceiling, matmul_gflops(args.matmul_n, args.repeat))  # re-measured between cases
            gflops = flops / sec / 1e9
            rows.append(
                {
                    "variant": name,
                    "patches_per_call": n,
                    "forward_gflop": flops / 1e9,
                    "seconds_per_call": sec,
                    "patches_per_s": n / sec,
                    "achieved_gflops": gflops,
                }
            )
            print(f"{name:14s} batch {n:3d}: {n / sec:8.1f} patches/s, {gflops:6.2f} GFLOP/s")
    for row in rows:  # against the best matmul figure of the whole run (the conservative ceiling)
        row["fraction_of_matmul"] = row["achieved_gflops"] / ceiling
    best = max(rows, key=lambda r: r["achieved_gflops"])

    # One full-domain sample (every-step blending) on the 80 x 80 domain with the fastest variant's batch.
    tiling = make_tiling(80, 80, p, 8)
    cond = torch.randn(1, c_cond, 80, 80)
    net = variants[best["variant"]]
    steps = args.sampler_steps
    sec = best_seconds(
        lambda: sample_tiled(
            net,
            cond,
            torch.tensor([0.5]),
            tiling,
            seeds=[0],
            out_channels=c_out,
            num_steps=steps,
            max_patches_per_batch=64,
        ),
        max(1, args.repeat // 2),
        warmup=1,
    )
    evals = 2 * steps - 1  # Heun: two network calls per step, one on the last
    sampler = {
        "domain": [80, 80],
        "tiles": tiling.n_tiles,
        "overlap": 8,
        "num_steps": steps,
        "network_calls": evals,
        "seconds_per_sample": sec,
        "seconds_per_step": sec / steps,
        "fine_cells_per_s_per_step": 80 * 80 * steps / sec,
        "patches_per_s": tiling.n_tiles * evals / sec,
        "variant": best["variant"],
    }
    result = {
        "flops_fraction_of_matmul": best["fraction_of_matmul"],
        "patches_per_s": best["patches_per_s"],
        "best": best,
        "matmul_gflops": ceiling,
        "matmul_n": args.matmul_n,
        "forward": rows,
        "sampler": sampler,
        "notes": notes,
        "model": {
            "parameters": sum(t.numel() for t in model.parameters()),
            "patch_size": p,
            "unet": unet.to_dict(),
            "step": meta.step,
        },
        "torch_threads": args.threads,
        "peak_rss_mib": peak_rss_mib(),
        "machine": machine(),
        "versions": versions("torch", "numpy"),
        "command": command_line(),
    }
    print(
        f"best {best['variant']} x{best['patches_per_call']}: {best['fraction_of_matmul']:.1%} of matmul; "
        f"sampler {sampler['fine_cells_per_s_per_step']:.0f} cells/s/step"
    )
    if args.out:
        write_results(args.out, result)
    return result


if __name__ == "__main__":
    main()
