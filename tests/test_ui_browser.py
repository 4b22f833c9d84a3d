"""The Prefect UI, served by the local server, shows the deployment run as Completed in headless Chromium.

Shares the server and the flow run of tests/test_deployment_e2e.py (``deployed_run`` in
tests/deploy_fixtures.py). Skipped when /usr/bin/chromium is absent; .ci/run installs it. The screenshot
is kept in tests/artifacts/ui_flow_run.png.
"""

from __future__ import annotations

import html
import re
import subprocess
from pathlib import Path

import pytest

pytest.register_assert_rewrite("deploy_fixtures")
from deploy_fixtures import ARTIFACTS  # noqa: E402

pytest_plugins = ["deploy_fixtures"]

CHROMIUM = Path("/usr/bin/chromium")

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(
        not CHROMIUM.exists(),
        reason="needs headless Chromium at /usr/bin/chromium "
        "(apt-get install -y --no-install-recommends chromium; .ci/run installs it)",
    ),
]


def visible_text(dom: str) -> str:
    """The text a reader sees in a dumped DOM (scripts, styles and tags removed, whitespace collapsed)."""
    text = re.sub(r"<(script|style)\b.*?</\1>", " ", dom, flags=re.S | re.I)
    text = re.sub(r"<[^>]+>", " ", text)
    return re.sub(r"\s+", " ", html.unescape(text)).strip()


def render(url: str, screenshot: Path, profile: Path, budget_ms: int = 20000) -> str:
    """Load ``url`` in a fresh headless Chromium profile; save a screenshot and return the rendered DOM."""
    command = [
        str(CHROMIUM),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        f"--user-data-dir={profile}",
        "--window-size=1400,900",
        f"--virtual-time-budget={budget_ms}",
        f"--screenshot={screenshot}",
        "--dump-dom",
        url,
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"chromium exited {done.returncode}: {done.stderr[-2000:]}"
    return done.stdout


def test_ui_shows_the_deployment_run_completed(deployed_run, tmp_path):
    run = deployed_run
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    screenshot = ARTIFACTS / "ui_flow_run.png"
    screenshot.unlink(missing_ok=True)
    text = visible_text(render(run.server.flow_run_url(run.flow_run.id), screenshot, tmp_path / "profile"))
    (ARTIFACTS / "ui_flow_run.txt").write_text(text)
    # the run's own page: breadcrumb "Runs <name>", (its tags), its state badge, then flow, deployment, pool
    header = re.search(rf"Runs {re.escape(run.flow_run.name)} (?P<tags>.{{0,120}}?)\bCompleted\b", text)
    assert header, text[:1500]
    flow_name, deployment = run.deployment_name.split("/")
    assert f"Flow {flow_name} Deployment {deployment} Work Pool {run.flow_run.work_pool_name}" in text, text[
        :1500
    ]
    # the header counts the run's own task runs ("2 Task runs"); the API also lists the placeholder task
    # runs a parent keeps for its subflows, so the API count is an upper bound
    shown = re.search(r"\b(\d+) Task runs?\b", text)
    assert shown and 1 <= int(shown.group(1)) <= len(run.task_runs), text[:1500]
    assert screenshot.is_file() and screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert screenshot.stat().st_size > 10_000  # a rendered page, not a blank image
