"""Helpers every benchmark shares: machine and version facts, peak memory, isolated runs, result files.

- :func:`machine` / :func:`versions`: what the figures were measured on and with;
- :func:`peak_rss_mib`: this process's peak resident set size;
- :func:`run_isolated`: run a command in a fresh child process and return its JSON result, wall time and
  the child's own peak RSS (from ``wait4``), so one case's memory never leaks into another's figure;
- :func:`command_line` and :func:`write_results`: the exact command and a stable JSON file;
- :func:`add_evaluation_arguments` / :func:`run_side_by_side`: a side-by-side evaluation of methods through
  the evaluation stage's own code (:func:`climrecon.tasks.evaluate.run_evaluation`).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "machine",
    "versions",
    "peak_rss_mib",
    "run_isolated",
    "checkpoint_id",
    "command_line",
    "write_results",
    "IsolatedRun",
    "add_evaluation_arguments",
    "evaluation_overrides",
    "side_by_side_config",
    "score_table",
    "run_side_by_side",
    "SideBySide",
]


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _ram_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def machine() -> dict[str, Any]:
    """CPU model, logical cores (all, and usable by this process), RAM, OS, and the load when measured."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {
        "cpu_model": _cpu_model(),
        "logical_cores": os.cpu_count(),
        "usable_cores": usable,
        "ram_gib": _ram_gib(),
        "platform": platform.platform(),
        "load_average_1_5_15min": [round(x, 2) for x in load] if load else None,
    }


def versions(*packages: str) -> dict[str, str]:
    """Python, the given distributions' versions, and the climrecon code version (git commit)."""
    out = {"python": platform.python_version()}
    for name in packages:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    from climrecon.provenance import code_version

    out["climrecon"] = code_version()
    return out


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far, MiB (Linux reports ru_maxrss in KiB)."""
    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


class IsolatedRun(dict):
    """The child's JSON result plus ``wall_s`` (whole child) and ``peak_rss_mib`` (the child alone)."""


def run_isolated(argv: list[str], timeout_s: float = 600.0, env: dict[str, str] | None = None) -> IsolatedRun:
    """Run ``argv`` in a fresh process; it must write its JSON result to the path in ``$BENCH_RESULT``.

    Peak RSS comes from ``os.wait4`` on that child, i.e. the kernel's figure for the child process only.
    A non-zero exit raises RuntimeError with the child's output tail.
    """
    with tempfile.TemporaryDirectory() as tmp:
        result_path, log_path = Path(tmp) / "result.json", Path(tmp) / "log.txt"
        child_env = {**os.environ, **(env or {}), "BENCH_RESULT": str(result_path)}
        start = time.perf_counter()
        with log_path.open("wb") as log:
            proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=child_env)
            deadline = start + timeout_s
            while True:
                pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
                if pid:
                    break
                if time.perf_counter() > deadline:
                    proc.kill()
                    os.wait4(proc.pid, 0)
                    raise RuntimeError(f"{shlex.join(argv)} ran past {timeout_s:.0f} s")
                time.sleep(0.05)
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            tail = log_path.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"{shlex.join(argv)} exited with {proc.returncode}:\n{tail}")
        result = IsolatedRun(json.loads(result_path.read_text()))
    scale = 1 if sys.platform == "darwin" else 1024
    result["wall_s"] = round(wall, 3)
    result["peak_rss_mib"] = round(usage.ru_maxrss * scale / 2**20, 1)
    return result


def checkpoint_id(path: str | None) -> dict[str, str] | None:
    """File name and content hash of a checkpoint (the header's ``content_sha256``): which weights a point
    sampled, so points of a retrained checkpoint are never mistaken for the earlier one's."""
    if path is None:
        return None
    from climrecon.models.checkpoint import read_checkpoint

    return {"file": Path(path).name, "sha256": str(read_checkpoint(path).header["content_sha256"])}


def command_line() -> str:
    """The command that started this process, as it would be typed (interpreter + script + arguments)."""
    script = sys.argv[0]
    try:
        script = os.path.relpath(script)
    except ValueError:
        pass
    return shlex.join(["python", script, *sys.argv[1:]])


def write_results(path: str | Path, results: dict[str, Any]) -> Path:
    """Write ``results`` as indented, key-sorted JSON (parent folders created); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2, sort_keys=True, default=str) + "\n")
    return path


def add_evaluation_arguments(
    parser: argparse.ArgumentParser, *, month_stride: int, members: int, threads: int = 1, steps: int = 12
) -> None:
    """The arguments of a side-by-side evaluation benchmark (what :func:`evaluation_overrides` takes), plus
    ``--set KEY=VALUE`` overrides."""
    months = 120 // month_stride
    parser.add_argument(
        "--month-stride",
        type=int,
        default=month_stride,
        help=f"{month_stride}: {months} months over 2011-2020",
    )
    parser.add_argument("--members", type=int, default=members)
    parser.add_argument(
        "--steps",
        type=int,
        default=steps,
        help="sampler steps of every diffusion method (with its default solver)",
    )
    parser.add_argument("--threads", type=int, default=threads)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")


def evaluation_overrides(
    methods: list[Any],
    variables: list[str],
    *,
    members: int,
    month_stride: int,
    threads: int,
    steps: int,
    factors: Sequence[int] = (8,),
) -> list[str]:
    """The config overrides of a side-by-side evaluation benchmark (CPU sampler; x8 unless ``factors``)."""
    return [
        f"evaluate.factors={json.dumps(list(factors))}",
        f"evaluate.variables={json.dumps(variables)}",
        f"evaluate.methods={json.dumps(methods)}",
        f"evaluate.ensemble_sizes=[{members}]",
        f"evaluate.month_stride={month_stride}",
        f"evaluate.threads={threads}",
        f"sampler.num_steps={steps}",
        "sampler.device=cpu",
    ]


@dataclass
class SideBySide:
    """What :func:`run_side_by_side` returns: the config, the evaluation result, its wall time and
    ``scores[method label][variable][score name]``."""

    cfg: Any
    result: Any
    wall_s: float
    scores: dict[str, dict[str, dict[str, float]]]


def side_by_side_config(args: argparse.Namespace, methods: list[Any], variables: list[str]) -> Any:
    """The evaluation config of ``methods`` on ``variables`` with the arguments of
    :func:`add_evaluation_arguments` (its ``--set`` overrides last)."""
    from climrecon.config import load_config

    overrides = evaluation_overrides(
        methods,
        variables,
        members=args.members,
        month_stride=args.month_stride,
        threads=args.threads,
        steps=args.steps,
    ) + list(args.overrides)
    return load_config(None, overrides)


def score_table(
    records: Sequence[dict[str, Any]], scores: Sequence[str]
) -> dict[str, dict[str, dict[str, float]]]:
    """``{method: {variable: {score: value}}}`` of the evaluation's records, keeping ``scores``."""
    table: dict[str, dict[str, dict[str, float]]] = {}
    for r in records:
        table.setdefault(r["method"], {})[r["variable"]] = {k: r[k] for k in scores}
    return table


def run_side_by_side(
    args: argparse.Namespace, methods: list[Any], variables: list[str], scores: Sequence[str]
) -> SideBySide:
    """Evaluate ``methods`` side by side on ``variables`` (:func:`side_by_side_config`: the same held-out
    months, members, seeds and sampler for every method) and keep the ``scores`` of each method and variable."""
    from climrecon.tasks.evaluate import run_evaluation

    cfg = side_by_side_config(args, methods, variables)
    start = time.perf_counter()
    result = run_evaluation(cfg, log=lambda msg: print(msg, flush=True))
    wall = time.perf_counter() - start
    return SideBySide(cfg, result, wall, score_table(result.records, scores))
