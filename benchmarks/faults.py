"""The fault suite as a benchmark: which faults the pipeline survives, which bad inputs it refuses cleanly,
whether any secret leaks, and how fast an unreachable object store fails.

Runs the tests marked ``faults`` (tests/test_faults.py and the ingest bad-input table of
tests/test_ingest_errors.py) in a subprocess with a ledger (``$CLIMRECON_FAULTS_REPORT``): each case is
entered only when it passed every assertion (bytes identical or a clean failure, as the case expects;
for bad input: a message naming the culprit and every earlier store byte-identical). Writes
``benchmarks/results/faults.json``::

    python benchmarks/faults.py [--out benchmarks/results/faults.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from common import command_line, machine, versions, write_results  # noqa: E402
from test_faults import BAD_INPUT_KINDS, FAULT_KINDS, SECRET_KINDS  # noqa: E402
from test_ingest_errors import BAD_INPUTS  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "faults.json"))
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        ledger = Path(tmp) / "ledger.json"
        start = time.perf_counter()
        done = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-m", "faults", "-n", "0", "-p", "no:cacheprovider"],
            cwd=REPO,
            env={**__import__("os").environ, "CLIMRECON_FAULTS_REPORT": str(ledger)},
            capture_output=True,
            text=True,
        )
        wall = time.perf_counter() - start
        entries = json.loads(ledger.read_text()) if ledger.exists() else {}
    by = {
        c: {e["kind"]: e for e in entries.values() if e["category"] == c}
        for c in ("fault", "bad_input", "secret")
    }
    bad_kinds = [f"ingest {case}" for case in BAD_INPUTS] + list(BAD_INPUT_KINDS)
    secret = by["secret"].get(SECRET_KINDS[0], {})
    result = {
        "fault_kinds": list(FAULT_KINDS),
        "fault_kinds_survived": [k for k in FAULT_KINDS if k in by["fault"]],
        "bad_input_kinds": bad_kinds,
        "bad_input_kinds_clean": [k for k in bad_kinds if k in by["bad_input"]],
        "secret_kinds": list(SECRET_KINDS),
        "secret_kinds_clean": [k for k in SECRET_KINDS if k in by["secret"]],
        "canary_hits": secret.get("canary_hits", "not run (test failed)"),
        "canary_places_searched": secret.get("places_searched"),
        "s3_down_fail_s": by["fault"].get("S3 unreachable before a run", {}).get("fail_s"),
        "messages": {k: e.get("message") for c in by.values() for k, e in c.items() if e.get("message")},
        "pytest": {"returncode": done.returncode, "summary": done.stdout.strip().splitlines()[-1:]},
        "wall_s": round(wall, 1),
        "command": command_line(),
        "machine": machine(),
        "versions": versions("prefect", "distributed", "s3fs", "zarr", "moto"),
    }
    write_results(args.out, result)
    print(
        f"faults survived {len(result['fault_kinds_survived'])}/{len(FAULT_KINDS)}, bad input clean "
        f"{len(result['bad_input_kinds_clean'])}/{len(bad_kinds)}, canary hits {result['canary_hits']}, "
        f"S3 down fails in {result['s3_down_fail_s']} s; pytest: {result['pytest']['summary']}"
    )
    return result


if __name__ == "__main__":
    main()
