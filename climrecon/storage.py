"""Where data lives: the data home, store URLs (local or any fsspec URL) and their storage options.

Secrets rule: storage options from a config file are non-secret; secret ones (keys, tokens) come only
from the environment (``CLIMRECON_STORAGE_OPTIONS`` as JSON, or the usual AWS_* variables that s3fs reads)
and are merged in at use time by :func:`resolve_storage_options`, in the process that opens the store:
options sent to Dask workers go through :func:`for_workers` (the environment's keys removed) and the worker
merges its own environment back. Anything logged or recorded goes through :func:`redact` first.
"""

from __future__ import annotations

import copy
import json
import os
import posixpath
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import fsspec

__all__ = [
    "SECRET_OPTION_KEYS",
    "StoragePathError",
    "safe_name",
    "store_url",
    "options_for",
    "url_options",
    "explain_storage_error",
    "default_data_home",
    "resolve_storage_options",
    "environment_storage_options",
    "for_workers",
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


def environment_storage_options() -> dict[str, Any]:
    """The secret-bearing ``CLIMRECON_STORAGE_OPTIONS`` JSON object of this process's environment ({} unset)."""
    env = os.environ.get("CLIMRECON_STORAGE_OPTIONS")
    if not env:
        return {}
    try:
        extra = json.loads(env)
    except json.JSONDecodeError as exc:
        raise ValueError(f"CLIMRECON_STORAGE_OPTIONS is not valid JSON: {exc.msg}") from None
    if not isinstance(extra, dict):
        raise ValueError("CLIMRECON_STORAGE_OPTIONS must be a JSON object")
    return extra


def resolve_storage_options(options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Config options merged with the secret-bearing ``CLIMRECON_STORAGE_OPTIONS`` environment JSON (its
    top-level keys win). Idempotent: resolving resolved options again changes nothing."""
    return {**(options or {}), **environment_storage_options()}


def for_workers(options: dict[str, Any] | None) -> dict[str, Any] | None:
    """``options`` as they may travel to Dask workers in task arguments: without the keys this process took
    from ``CLIMRECON_STORAGE_OPTIONS``, so its secrets stay in the environment. Every function that runs on
    a worker resolves them again there (:func:`resolve_storage_options`) from the worker's own environment
    (a local cluster's workers inherit this process's; on other hosts set it there, as AWS_* credentials)."""
    if not options:
        return options
    env = environment_storage_options()
    return {k: v for k, v in options.items() if k not in env}


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
    """Join path parts onto a local path or URL with '/', ``.`` and ``..`` segments resolved (the scheme and
    bucket are kept as they are)."""
    out = str(root).rstrip("/")
    for p in parts:
        out = f"{out}/{str(p).strip('/')}"
    scheme, sep, rest = out.partition("://")
    if not sep:
        scheme, rest = "", out
    absolute = rest.startswith("/")
    path = posixpath.normpath(rest) if rest else rest
    if absolute and not path.startswith("/"):
        path = "/" + path
    return f"{scheme}{sep}{path}" if sep else path


class StoragePathError(ValueError):
    """A store URL built from data would leave the storage root; the message names the URL and the root."""


_UNSAFE = re.compile(r"[^A-Za-z0-9_+\-]+")


def safe_name(text: object) -> str:
    """One part of a store name built from data (catalog columns, store attributes): every run of characters
    other than letters, digits, ``_``, ``+`` and ``-`` (dots and slashes included) becomes ``_``, so a part can
    never be a path, a parent directory or a hidden file; empty parts become ``na``."""
    return _UNSAFE.sub("_", str(text)).strip("_") or "na"


def store_url(root: str, stage: str, data_parts: Sequence[object], tail: str) -> str:
    """``<root>/<stage>/<part>.<part>....<tail>``: each of ``data_parts`` (names that come from data: catalog
    columns, store names and attributes) made safe by :func:`safe_name`; ``tail`` (e.g. ``"<key>.zarr"``) is
    the stage's own. Raises :class:`StoragePathError` if the result does not lie under ``root``."""
    if "/" in tail or ".." in tail:
        raise StoragePathError(f"store name tail {tail!r} must be a plain file name")
    url = join_url(root, stage, ".".join([*(safe_name(p) for p in data_parts), tail]))
    base = join_url(root).rstrip("/")
    if not url.startswith(base + "/"):
        raise StoragePathError(f"store URL {public_url(url)} would leave the storage root {public_url(base)}")
    return url


def _location(url: str) -> tuple[str, str]:
    """(protocol, bucket/host) of a URL; ("file", "") for local paths."""
    parts = urlsplit(str(url))
    if not is_remote(str(url)):
        return "file", ""
    return parts.scheme, parts.netloc.rsplit("@", 1)[-1]


S3_CLIENT_DEFAULTS = {
    "connect_timeout": 10,
    "read_timeout": 60,
    "retries": {"max_attempts": 4, "mode": "standard"},
}
"""botocore settings for s3:// unless ``config_kwargs`` are given: an unreachable or silent endpoint fails
after a bounded time (botocore's own defaults wait 60 s per connection attempt)."""


def url_options(url: str, options: dict[str, Any] | None) -> dict[str, Any] | None:
    """The storage options to open ``url`` with: None for a local path (the run's remote options belong to
    its object store, never to a local sample store or catalog), else ``options`` (for s3:// with
    :data:`S3_CLIENT_DEFAULTS` as ``config_kwargs`` unless set)."""
    if not is_remote(str(url)):
        return None
    out = dict(options or {})
    if str(url).startswith(("s3://", "s3a://")) and "config_kwargs" not in out:
        out["config_kwargs"] = copy.deepcopy(S3_CLIENT_DEFAULTS)  # botocore rewrites the dict it is given
    return out or None


def options_for(url: str, root: str, options: dict[str, Any] | None) -> dict[str, Any] | None:
    """The storage options for opening ``url``: the run's options (``storage.options`` + the environment's)
    belong to the filesystem of the storage ``root`` (its protocol and bucket); any other location (a local
    sample store, a public bucket) opens with none. A remote URL of the same protocol elsewhere keeps the
    options but the bucket-specific ones are the user's to set in the URL's own catalog."""
    if not options:
        return None
    here, there = _location(url), _location(root)
    if here[0] == "file":
        return None
    return dict(options) if here[0] == there[0] else None


CREDENTIAL_HINT = (
    "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) in the environment, or "
    'CLIMRECON_STORAGE_OPTIONS=\'{"key": ..., "secret": ...}\'; for a public bucket set storage.options.anon=true'
)


def explain_storage_error(exc: BaseException, url: str) -> str | None:
    """A clear message for storage failures whose own text names neither the URL nor the fix (missing
    credentials, an unreachable endpoint); None for any other error."""
    text = f"{type(exc).__name__}: {exc}"
    where = public_url(str(url))
    if (
        "NoCredentialsError" in text
        or "Unable to locate credentials" in text
        or "PartialCredentialsError" in text
    ):
        return f"no credentials to reach {where}: {CREDENTIAL_HINT}"
    if "InvalidAccessKeyId" in text or "SignatureDoesNotMatch" in text:
        return (
            f"the credentials were refused by {where} ({type(exc).__name__}); check them: {CREDENTIAL_HINT}"
        )
    if "EndpointConnectionError" in text or "Could not connect to the endpoint" in text:
        return f"cannot reach the object store of {where} ({exc}); check storage.options.endpoint_url and the network"
    return None


def filesystem(
    url: str, storage_options: dict[str, Any] | None = None
) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem and in-filesystem path for ``url``."""
    fs, path = fsspec.core.url_to_fs(str(url), **(url_options(url, storage_options) or {}))
    return fs, path
