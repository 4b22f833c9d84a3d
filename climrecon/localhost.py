"""Services on a local address: free ports, waiting for a listener, and a real S3 API (``moto_server``).

One home for what the CLI's local Prefect server, the tests and the benchmarks each need when they start a
server of their own:

- :func:`free_port`: a TCP port nothing listens on right now;
- :func:`wait_listening`: block until a freshly started server accepts connections, or fail naming it;
- :func:`serve_moto`, :class:`LocalS3` and :func:`moto_server_argv`: an S3 endpoint served by ``moto_server``
  (the ``test`` extra), with throw-away credentials that belong in the environment (:attr:`LocalS3.credentials`), never in
  a config or a Prefect parameter (:attr:`LocalS3.storage_options` holds only the endpoint).
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

__all__ = ["LocalS3", "free_port", "moto_server_argv", "serve_moto", "wait_listening"]


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that nothing listens on right now."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_listening(
    host: str,
    port: int,
    *,
    process: subprocess.Popen | None = None,
    name: str = "server",
    timeout: float = 30.0,
    log: Callable[[], str] | None = None,
) -> None:
    """Return once ``host:port`` accepts a TCP connection.

    Raises ``RuntimeError`` naming ``name`` (and quoting ``log()`` when given) if ``process`` exits first or
    nothing listens within ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection((host, port), timeout=0.3).close()
            return
        except OSError:
            if process is not None and process.poll() is not None:
                tail = f":\n{log()}" if log else ""
                raise RuntimeError(f"{name} exited with code {process.returncode}{tail}") from None
            time.sleep(0.1)
    tail = f":\n{log()}" if log else ""
    raise RuntimeError(f"{name} did not listen on {host}:{port} within {timeout:.0f} s{tail}")


def moto_server_argv(host: str, port: int) -> list[str]:
    """The command that serves an S3 API on ``host:port`` (``moto_server`` beside this interpreter)."""
    exe = shutil.which("moto_server") or str(Path(sys.executable).with_name("moto_server"))
    return [exe, "-H", host, "-p", str(port)]


@contextmanager
def serve_moto(host: str = "127.0.0.1", timeout: float = 20.0) -> Iterator[LocalS3]:
    """A ``moto_server`` on a free port of ``host`` for the ``with`` block: yields its :class:`LocalS3`
    (fresh throw-away credentials, no bucket yet); the server is stopped on exit (killed after 10 s), and a
    server that does not listen within ``timeout`` seconds raises ``RuntimeError``."""
    port = free_port(host)
    proc = subprocess.Popen(
        moto_server_argv(host, port), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        wait_listening(host, port, process=proc, name="moto_server", timeout=timeout)
        yield LocalS3(endpoint_url=f"http://{host}:{port}")
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@dataclass(frozen=True)
class LocalS3:
    """An S3 endpoint with throw-away credentials and a bucket name (empty: none chosen yet)."""

    endpoint_url: str
    key: str = field(default_factory=lambda: f"key-{uuid.uuid4().hex[:8]}")
    secret: str = field(default_factory=lambda: f"secret-{uuid.uuid4().hex}")
    bucket: str = ""

    @property
    def credentials(self) -> dict[str, str]:
        """The ``AWS_*`` variables a client or worker needs (environment only)."""
        return {
            "AWS_ACCESS_KEY_ID": self.key,
            "AWS_SECRET_ACCESS_KEY": self.secret,
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    @property
    def storage_options(self) -> dict[str, Any]:
        """Non-secret fsspec options (what a config may hold): the credentials come from the environment."""
        return {"endpoint_url": self.endpoint_url}

    def url(self, *parts: str) -> str:
        """``s3://<bucket>/<parts...>``."""
        return "s3://" + "/".join([self.bucket, *parts])

    def filesystem(self):
        """An ``s3fs.S3FileSystem`` with these credentials (tests and benchmarks only)."""
        import s3fs

        return s3fs.S3FileSystem(endpoint_url=self.endpoint_url, key=self.key, secret=self.secret)

    def with_new_bucket(self, prefix: str = "b") -> LocalS3:
        """The same endpoint and credentials with a fresh, empty bucket ``<prefix>-<random>``, created."""
        other = replace(self, bucket=f"{prefix}-{uuid.uuid4().hex[:12]}")
        other.filesystem().mkdir(other.bucket)
        return other
