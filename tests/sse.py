"""A small Server-Sent Events reader for the tests."""
from __future__ import annotations

import json
from typing import Any

import httpx


def read_events(client: httpx.Client, path: str, headers: dict[str, str] | None = None) -> list[tuple[str, dict[str, Any]]]:
    """Every event of a stream, until the server closes it after the terminal one."""
    events: list[tuple[str, dict[str, Any]]] = []
    with client.stream("GET", path, headers=headers, timeout=120) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        name, data = "message", []
        for line in response.iter_lines():
            if line.startswith("event:"):
                name = line[6:].strip()
            elif line.startswith("data:"):
                data.append(line[5:].strip())
            elif line == "" and data:
                events.append((name, json.loads("\n".join(data))))
                name, data = "message", []
    return events
