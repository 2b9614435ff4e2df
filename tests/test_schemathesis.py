"""Fuzz the gateway's OpenAPI schema: no input may make it answer 5xx.

Bounded in examples and time. The POST endpoint accepts the generated
bodies too, so a few real (tiny) jobs may run; the worker keeps up.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ARTIFACTS = Path(__file__).parent / "artifacts"


def test_no_input_makes_the_gateway_answer_5xx(stack):
    schemathesis = str(Path(sys.executable).parent / "schemathesis")
    result = subprocess.run(
        [
            schemathesis, "run", f"{stack.gateway_url}/openapi.json",
            "--checks", "not_a_server_error",
            "--max-examples", "25",
            "--max-time", "30",
            "--phases", "examples,coverage,fuzzing",
            "--workers", "1",
            "--seed", "20261129",
            "--request-timeout", "30",
            "--generation-database", "none",
            "--suppress-health-check", "all",
            # Streams that follow a live job stay open until it ends; fuzzing them only waits.
            "--exclude-path-regex", "/(events|ws)$",
            "--report", "junit",
            "--report-dir", str(ARTIFACTS / "schemathesis"),
            "--no-color",
        ],
        capture_output=True,
        text=True,
        timeout=240,
    )
    (ARTIFACTS / "schemathesis.log").write_text(result.stdout + result.stderr)
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-2000:]
