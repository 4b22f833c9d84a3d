"""Architecture and style rules kept by tools, not by memory: import-linter contracts (pyproject
``[tool.importlinter]``) and ruff (lint + format check), run on the source tree as part of the test suite."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _installed_layout(root: Path) -> Path:
    """The ``climrecon`` package as it is installed (``package-dir``: flows/, tasks/, models/... under one
    namespace), copied under ``root``: import-linter's graph builder walks one package directory."""
    package_dir = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name, folder in sorted(package_dir.items(), key=lambda kv: kv[0].count(".")):
        shutil.copytree(
            REPO / folder, root / "src" / Path(*name.split(".")), ignore=ignore, dirs_exist_ok=True
        )
    shutil.copy(REPO / "pyproject.toml", root / "pyproject.toml")
    return root


def _run(args: list[str], cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_import_contracts_hold(tmp_path):
    """models/ torch only; tasks/ know no method module; methods/ import no stage, flow or CLI; only flows
    use Prefect (pyproject ``[tool.importlinter]``)."""
    root = _installed_layout(tmp_path)
    env = {"PYTHONPATH": str(root / "src"), "PATH": str(BIN), "HOME": str(tmp_path)}
    done = _run([str(BIN / "lint-imports"), "--no-cache"], root, env)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "0 broken" in done.stdout


def test_ruff_lint_and_format_are_clean():
    lint = _run([str(BIN / "ruff"), "check", "--no-cache", "."], REPO)
    assert lint.returncode == 0, lint.stdout[-4000:]
    fmt = _run([str(BIN / "ruff"), "format", "--check", "--no-cache", "."], REPO)
    assert fmt.returncode == 0, "run `ruff format .`:\n" + fmt.stdout[-4000:]
