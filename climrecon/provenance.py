"""Provenance facts every stage records: code version, time, and a CF ``history`` line.

Secrets never get here: callers pass configs through :func:`climrecon.storage.redact` (done by
:func:`stage_attrs` for the config it records).
"""

from __future__ import annotations

import json
import subprocess
from datetime import UTC, datetime
from functools import cache
from pathlib import Path
from typing import Any

import climrecon
from climrecon.storage import redact

__all__ = ["code_version", "utc_now", "history_line", "stage_attrs"]


@cache
def code_version() -> str:
    """``climrecon <version>`` plus the git commit (and ``-dirty``) when running from a checkout."""
    root = Path(__file__).resolve().parent.parent
    commit = ""
    try:
        commit = subprocess.run(
            ["git", "-C", str(root), "describe", "--always", "--dirty", "--abbrev=12"],
            capture_output=True, text=True, timeout=5, check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return f"climrecon {climrecon.__version__}" + (f" (git {commit})" if commit else "")


def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def history_line(stage: str, detail: str) -> str:
    """One CF ``history`` entry: ``<UTC time> climrecon <version> <stage>: <detail>``."""
    return f"{utc_now()} {code_version()} {stage}: {detail}"


def stage_attrs(stage: str, config: Any, key: str, previous_history: str = "", **extra: Any) -> dict[str, str]:
    """Attributes a stage writes on its output store (JSON-encoded where structured, secrets redacted)."""
    cfg = config.model_dump(mode="json") if hasattr(config, "model_dump") else config
    history = "\n".join(h for h in (previous_history, history_line(stage, f"key {key}")) if h)
    attrs = {
        f"climrecon_{stage}_config": json.dumps(redact(cfg), sort_keys=True, default=str),
        "climrecon_code_version": code_version(),
        "history": history,
    }
    attrs.update({f"climrecon_{k}": v if isinstance(v, str) else json.dumps(redact(v), default=str) for k, v in extra.items()})
    return attrs
