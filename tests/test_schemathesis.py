"""Schemathesis with every check against the live gateway: the server does what /openapi.json says.

All four phases (examples, coverage, fuzzing, stateful), a fixed seed, bounded
examples and time (tests/schemathesis.toml). It runs against a stack of its
own, with a short queue: valid submissions start real jobs, and a full queue
answers 429 (documented) rather than piling work onto the other tests' stack.

Every check runs but `use_after_free`: DELETE /api/v1/generations/{id}
cancels a job, and the job, its events and its result stay readable, as the
operation documents; a read after a successful DELETE is that behaviour, not
a use after free.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx

from tests.conftest import new_stack

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = Path(__file__).parent / "artifacts"
CONFIG = Path(__file__).parent / "schemathesis.toml"
SCHEMATHESIS = str(Path(sys.executable).parent / "schemathesis")


def test_schemathesis_finds_nothing_with_every_check(tmp_path):
    stack = new_stack(tmp_path, "schemathesis", GENERATION_QUEUE_LIMIT="4", GENERATION_GRACE_PERIOD_S="1")
    stack.start_all()
    try:
        result = subprocess.run(
            [
                SCHEMATHESIS, "--config-file", str(CONFIG), "--no-color",
                "run", f"{stack.gateway_url}/openapi.json",
                "--checks", "all",
                "--exclude-checks", "use_after_free",
                "--phases", "examples,coverage,fuzzing,stateful",
                "--report", "junit",
                "--report-dir", str(ARTIFACTS / "schemathesis"),
            ],
            capture_output=True,
            text=True,
            timeout=240,
            check=False,
            cwd=ROOT,
        )
        (ARTIFACTS / "schemathesis.log").write_text(result.stdout + result.stderr)
        assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
        for name in ("generation", "gateway", "telemetry"):
            assert stack.processes[name].poll() is None, f"{name} died under the fuzzing"
    finally:
        _cancel_what_is_left(stack.gateway_url)
        stack.stop_all()


def _cancel_what_is_left(url: str) -> None:
    """Jobs the fuzzing queued would otherwise run on while the stack stops."""
    with httpx.Client(base_url=url, timeout=10) as http:
        for status in ("queued", "running"):
            listing = http.get("/api/v1/generations", params={"status": status, "page_size": 100})
            for job in listing.json().get("generations", []) if listing.status_code == 200 else []:
                http.delete(f"/api/v1/generations/{job['id']}")
