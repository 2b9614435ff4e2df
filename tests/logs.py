"""Reading a service's structured log (one JSON object a line) in tests."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def entries(log_file: Path, msg: str | None = None) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    if not log_file.exists():
        return found
    for line in log_file.read_text(errors="replace").splitlines():
        if not line.startswith("{"):
            continue
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if msg is None or entry.get("msg") == msg:
            found.append(entry)
    return found
