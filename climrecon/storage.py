"""Where data lives: the data home, store URLs (local or any fsspec URL) and their storage options.

Secrets rule: storage options from a config file are non-secret; secret ones (keys, tokens) come only
from the environment (``CLIMRECON_STORAGE_OPTIONS`` as JSON, or the usual AWS_* variables that s3fs reads)
and are merged in at use time by :func:`resolve_storage_options`. Anything logged or recorded goes
through :func:`redact` first.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import fsspec

__all__ = [
    "SECRET_OPTION_KEYS",
    "default_data_home",
    "resolve_storage_options",
    "redact",
    "join_url",
    "public_url",
    "filesystem",
    "is_remote",
]

SECRET_OPTION_KEYS = frozenset(
    {
        "key",
        "secret",
        "token",
        "password",
        "session_token",
        "aws_access_key_id",
        "aws_secret_access_key",
        "aws_session_token",
        "access_key",
        "secret_key",
        "client_secret",
        "sas_token",
        "account_key",
        "credentials",
    }
)
REDACTED = "***"


def default_data_home() -> Path:
    """``$CLIMRECON_DATA_HOME`` or ``~/.cache/climrecon``: packaged raw data and the built sample catalog."""
    return Path(os.environ.get("CLIMRECON_DATA_HOME", Path.home() / ".cache" / "climrecon"))


def resolve_storage_options(options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Config options merged with the secret-bearing ``CLIMRECON_STORAGE_OPTIONS`` environment JSON."""
    merged = dict(options or {})
    env = os.environ.get("CLIMRECON_STORAGE_OPTIONS")
    if env:
        try:
            extra = json.loads(env)
        except json.JSONDecodeError as exc:
            raise ValueError(f"CLIMRECON_STORAGE_OPTIONS is not valid JSON: {exc.msg}") from None
        if not isinstance(extra, dict):
            raise ValueError("CLIMRECON_STORAGE_OPTIONS must be a JSON object")
        merged.update(extra)
    return merged


def redact(obj: Any) -> Any:
    """A copy of ``obj`` (nested dicts/lists) with every secret-looking key's value replaced by ``***``."""
    if isinstance(obj, dict):
        return {k: (REDACTED if str(k).lower() in SECRET_OPTION_KEYS else redact(v)) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(redact(v) for v in obj)
    return obj


def is_remote(url: str) -> bool:
    return "://" in url and not url.startswith("file://")


def public_url(url: str) -> str:
    """``url`` without any ``user:password@`` part (URLs are recorded in attributes and logs)."""
    parts = urlsplit(str(url))
    if parts.username or parts.password:
        return urlunsplit(
            parts._replace(netloc=(parts.hostname or "") + (f":{parts.port}" if parts.port else ""))
        )
    return str(url)


def join_url(root: str, *parts: str) -> str:
    """Join path parts onto a local path or URL with '/' (no normalisation of the scheme)."""
    out = str(root).rstrip("/")
    for p in parts:
        out = f"{out}/{str(p).strip('/')}"
    return out


def filesystem(
    url: str, storage_options: dict[str, Any] | None = None
) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem and in-filesystem path for ``url``."""
    fs, path = fsspec.core.url_to_fs(str(url), **(storage_options or {}))
    return fs, path
