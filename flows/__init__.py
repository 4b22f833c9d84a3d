"""Prefect flows: thin wrappers that call the stage libraries in ``climrecon.tasks``.

Importing this package sets offline-friendly Prefect defaults (only where the user has not set them):
no analytics (this machine has no internet), and a generous start-up timeout for Prefect's temporary
local server, which a busy 2-core machine can need. Set ``PREFECT_API_URL`` to use a real server
(``climrecon server`` or ``prefect server start``), which is faster and shows runs in the UI.
"""

import os

for _name, _value in {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
}.items():
    os.environ.setdefault(_name, _value)
