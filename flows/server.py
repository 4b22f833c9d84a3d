"""A local Prefect server (API + UI) on 127.0.0.1 with SQLite in a given home directory.

Prefect runs without a server too (a temporary one per process, see ../shared/STACK.md), but workers,
deployments, schedules and the UI need a real one. :func:`start_server` starts
``prefect server start`` as a child process whose whole state (SQLite database, profiles, logs) lives in
``home``, waits until ``GET /api/health`` answers, and returns a :class:`LocalPrefectServer` that knows
its API and UI URLs, the environment clients and workers need, and how to stop it::

    with start_server("~/.cache/climrecon/prefect") as server:
        print(server.ui_url)                       # open in a browser
        subprocess.run(["prefect", "worker", "start", "--pool", "climrecon-process"],
                       env=server.client_environment())

Telemetry is off (``PREFECT_SERVER_ANALYTICS_ENABLED=false``): machines here are offline.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from climrecon.localhost import free_port
from climrecon.storage import default_data_home

__all__ = [
    "LocalPrefectServer",
    "prefect_api",
    "PrefectServerError",
    "client_environment",
    "free_port",
    "start_server",
    "template_database",
    "wait_until_healthy",
]

DEFAULT_HOST = "127.0.0.1"
_REPLACED_VARIABLES = frozenset(
    {
        "PREFECT_API_URL",
        "PREFECT_API_KEY",
        "PREFECT_HOME",
        "PREFECT_PROFILE",
        "PREFECT_PROFILES_PATH",
        "PREFECT_API_DATABASE_CONNECTION_URL",
        "PREFECT_SERVER_DATABASE_CONNECTION_URL",
        "PREFECT_UI_API_URL",
    }
)


class PrefectServerError(RuntimeError):
    """The local Prefect server did not start or stopped answering; the message quotes its log."""


def client_environment(api_url: str, home: str | Path | None = None) -> dict[str, str]:
    """Environment variables that point Prefect clients, CLIs and workers at the server at ``api_url``.

    ``home`` (optional) becomes ``PREFECT_HOME`` so that profiles and local result storage stay there
    instead of in ``~/.prefect``. Returns only the Prefect variables; merge them into ``os.environ``.
    """
    env = {
        "PREFECT_API_URL": api_url,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_CLI_PROMPT": "false",
    }
    if home is not None:
        env["PREFECT_HOME"] = str(Path(home).expanduser().resolve())
    return env


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def wait_until_healthy(
    api_url: str,
    timeout: float = 90.0,
    process: subprocess.Popen | None = None,
    log_path: Path | None = None,
) -> float:
    """Poll ``{api_url}/health`` until it answers ``true``; return the seconds waited.

    Raises :class:`PrefectServerError` (quoting the end of ``log_path``) if ``process`` exits first or
    ``timeout`` seconds pass.
    """
    start = time.monotonic()
    while True:
        if process is not None and process.poll() is not None:
            raise PrefectServerError(
                f"prefect server exited with code {process.returncode} before it was healthy; "
                f"log {log_path}:\n{_tail(log_path) if log_path else ''}"
            )
        try:
            with urllib.request.urlopen(f"{api_url}/health", timeout=2) as response:
                if response.status == 200 and response.read().strip() == b"true":
                    return time.monotonic() - start
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            pass
        if time.monotonic() - start > timeout:
            raise PrefectServerError(
                f"prefect server at {api_url} was not healthy within {timeout:.0f} s; "
                f"log {log_path}:\n{_tail(log_path) if log_path else ''}"
            )
        time.sleep(0.25)


@dataclass
class LocalPrefectServer:
    """A running ``prefect server start`` child process (stop it with :meth:`stop` or a ``with`` block)."""

    home: Path
    host: str
    port: int
    process: subprocess.Popen = field(repr=False)
    log_path: Path
    startup_seconds: float = 0.0
    from_template: bool = False  # the database started as a copy of the template (:func:`start_server`)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def api_url(self) -> str:
        """The REST API (set it as ``PREFECT_API_URL``)."""
        return f"{self.url}/api"

    @property
    def ui_url(self) -> str:
        """The UI, served by the same process at ``GET /``."""
        return self.url

    def flow_run_url(self, flow_run_id: object) -> str:
        """The UI page of one flow run."""
        return f"{self.ui_url}/runs/flow-run/{flow_run_id}"

    def client_environment(self) -> dict[str, str]:
        """Prefect variables for clients, CLIs and workers of this server (see :func:`client_environment`)."""
        return client_environment(self.api_url, self.home)

    def is_running(self) -> bool:
        return self.process.poll() is None

    def stop(self, timeout: float = 20.0) -> None:
        """Stop the server (SIGTERM to its process group, SIGKILL after ``timeout`` s); idempotent."""
        if self.process.poll() is not None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)

    def __enter__(self) -> LocalPrefectServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _die_with_parent() -> None:
    """``preexec_fn`` of the server process: Linux sends it SIGTERM when the process that started it dies,
    however it dies (SIGKILL included), so no server outlives its ``climrecon`` command and keeps its port.
    (The signal follows the *thread* that started the child: start servers from the main thread.)"""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux/glibc: the with-block and signal handlers still stop it
        pass


@contextmanager
def prefect_api(services: bool = False) -> Iterator[str | None]:
    """The Prefect API for one ``climrecon`` command: the running server of ``PREFECT_API_URL`` when it is
    set (reused, untouched), else a private server for the duration of the block (``PREFECT_API_URL`` set
    meanwhile), which dies with this process even when it is killed. Its home is
    ``$TMPDIR/climrecon-prefect/<pid>``, removed at the end, and swept by the next command when a killed
    one left it. Yields the API URL of a private server, None when an existing one is used."""
    if os.environ.get("PREFECT_API_URL"):
        yield None
        return
    base = Path(tempfile.gettempdir()) / "climrecon-prefect"
    _sweep_dead_homes(base)  # what killed commands left behind (a SIGKILLed process cannot clean up)
    home = base / str(os.getpid())
    home.mkdir(parents=True, exist_ok=True)
    saved = {k: os.environ.get(k) for k in ("PREFECT_API_URL", "PREFECT_SERVER_ANALYTICS_ENABLED")}
    try:
        with start_server(home, services=services, template=template_database()) as server:
            os.environ.update(PREFECT_API_URL=server.api_url, PREFECT_SERVER_ANALYTICS_ENABLED="false")
            yield server.api_url
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        shutil.rmtree(home, ignore_errors=True)


def _sweep_dead_homes(base: Path) -> None:
    """Remove the private server homes (named by their command's pid) of commands that are gone."""
    if not base.is_dir():
        return
    for home in base.iterdir():
        try:
            os.kill(int(home.name), 0)
        except ProcessLookupError:
            shutil.rmtree(home, ignore_errors=True)
        except (ValueError, PermissionError):
            continue


def _prefect_executable() -> list[str]:
    exe = Path(sys.executable).with_name("prefect")
    if exe.is_file():
        return [str(exe)]
    found = shutil.which("prefect")
    return [found] if found else [sys.executable, "-m", "prefect"]


def start_server(
    home: str | Path,
    *,
    host: str = DEFAULT_HOST,
    port: int | None = None,
    timeout: float = 90.0,
    services: bool = True,
    template: Path | None = None,
) -> LocalPrefectServer:
    """Start a Prefect server with its SQLite database under ``home`` and wait until it is healthy.

    - ``home``: created if missing; holds ``prefect.db``, the profiles and ``server.log``.
    - ``port``: default a free port. ``host``: 127.0.0.1 by default (reachable from this machine only;
      use 0.0.0.0 deliberately to serve a cluster, behind your own access control).
    - ``services=False`` runs only the API and UI (no scheduler, no late-run marking).
    - ``template``: a migrated, empty database (:func:`template_database`). A home without a database starts
      from a copy of it (a fresh SQLite database spends ~12 s on Prefect's migrations); when there is none
      yet, it is written from this server's database once healthy, before anything else uses it. A template
      the server cannot start from is removed and the server started afresh.

    Returns the running :class:`LocalPrefectServer`; raises :class:`PrefectServerError` with the end of
    the server log if it exits or is not healthy within ``timeout`` seconds (the process is stopped).
    """
    home = Path(home).expanduser().resolve()
    home.mkdir(parents=True, exist_ok=True)
    database = home / "prefect.db"
    copied_from = (
        template
        if template is not None and not database.exists() and _copy_template(template, database)
        else None
    )
    try:
        server = _start(home, host, port, timeout, services)
    except PrefectServerError:
        if copied_from is None:
            raise
        copied_from.unlink(missing_ok=True)  # a stale or damaged template: start afresh, write a new one
        for leftover in home.glob("prefect.db*"):
            leftover.unlink()
        copied_from = None
        server = _start(home, host, port, timeout, services)
    server.from_template = copied_from is not None
    if template is not None and not template.exists():
        _write_template(database, template)
    return server


def _start(home: Path, host: str, port: int | None, timeout: float, services: bool) -> LocalPrefectServer:
    port = port or free_port(host)
    api_url = f"http://{host}:{port}/api"
    # the caller's other Prefect settings pass through; these would point elsewhere and are replaced
    env = {k: v for k, v in os.environ.items() if k not in _REPLACED_VARIABLES}
    env.update(client_environment(api_url, home))
    env.update(
        PREFECT_SERVER_API_HOST=host,
        PREFECT_SERVER_API_PORT=str(port),
        PREFECT_SERVER_DATABASE_CONNECTION_URL=f"sqlite+aiosqlite:///{home / 'prefect.db'}",
        PREFECT_SERVER_UI_ENABLED="true",
        PREFECT_SERVER_UI_API_URL=api_url,
    )
    command = [*_prefect_executable(), "server", "start", "--host", host, "--port", str(port)]
    if not services:
        command.append("--no-services")
    log_path = home / "server.log"
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            command,
            env=env,
            cwd=home,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # Ctrl-C in the terminal stops the command, which stops the server
            preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
        )
    server = LocalPrefectServer(home=home, host=host, port=port, process=process, log_path=log_path)
    try:
        server.startup_seconds = wait_until_healthy(api_url, timeout, process, log_path)
    except BaseException:
        server.stop()
        raise
    return server


def template_database() -> Path:
    """Where private servers keep their migrated, empty database: one per Prefect version, under
    ``$CLIMRECON_DATA_HOME/prefect`` (``~/.cache/climrecon/prefect`` by default)."""
    from importlib.metadata import version

    return default_data_home() / "prefect" / f"template-{version('prefect')}.db"


def _copy_template(template: Path, database: Path) -> bool:
    """Copy ``template`` to ``database``; False (nothing copied) when there is no readable template."""
    try:
        shutil.copyfile(template, database)
        return True
    except OSError:
        database.unlink(missing_ok=True)
        return False


def _write_template(database: Path, template: Path) -> None:
    """A consistent single-file copy of a running server's fresh ``database`` (SQLite ``VACUUM INTO``),
    moved into place atomically; a template that cannot be written is simply not kept."""
    import sqlite3

    partial = template.with_name(f".{template.name}.{os.getpid()}.partial")
    try:
        template.parent.mkdir(parents=True, exist_ok=True)
        partial.unlink(missing_ok=True)
        with contextlib.closing(sqlite3.connect(database)) as db:
            db.execute("VACUUM INTO ?", (str(partial),))
        os.replace(partial, template)
    except (OSError, sqlite3.Error):
        partial.unlink(missing_ok=True)
