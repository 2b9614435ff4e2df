"""Debian's Prometheus, started with deploy/prometheus.yml rewritten to the
test stack's ports, scrapes all three services; the stage histogram reads
back through its HTTP query API, and every dashboard query parses.

`make install` installs the prometheus package (make/monitor.mk).
"""
from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from services.common.metrics import STAGES
from services.stack import Stack, free_port
from tests.images import photo_png

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = Path(__file__).parent / "artifacts"
FAST = {"resolution": "64", "face_count": "1000", "texture_size": "256"}
# Upper bounds on waiting, never expectations of speed.
START_TIMEOUT_S = 60.0
SCRAPE_TIMEOUT_S = 60.0


@dataclass
class Prometheus:
    url: str
    process: subprocess.Popen[bytes]

    def query(self, promql: str) -> dict[str, Any]:
        response = httpx.get(f"{self.url}/api/v1/query", params={"query": promql}, timeout=10)
        body = response.json()
        assert response.status_code == 200 and body["status"] == "success", (promql, body)
        return body["data"]

    def vector(self, promql: str, label: str) -> dict[str, float]:
        return {r["metric"].get(label, ""): float(r["value"][1]) for r in self.query(promql)["result"]}


def rewrite_config(template: str, stack: Stack, interval_s: int = 1) -> str:
    config = (
        template.replace("127.0.0.1:5000", f"127.0.0.1:{stack.gateway_port}")
        .replace("127.0.0.1:9101", f"127.0.0.1:{stack.generation_metrics_port}")
        .replace("127.0.0.1:9102", f"127.0.0.1:{stack.telemetry_metrics_port}")
    )
    lines = []
    for line in config.splitlines():
        key = line.strip().split(":", 1)[0]
        if key in ("scrape_interval", "evaluation_interval", "scrape_timeout"):
            line = f"{line.split(':', 1)[0]}: {interval_s}s"
        lines.append(line)
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def prometheus(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prometheus]:
    binary = shutil.which("prometheus") or "/usr/bin/prometheus"
    if not Path(binary).exists():
        pytest.fail("Debian's prometheus is not installed; `make install` installs it (make/monitor.mk)")
    workdir = tmp_path_factory.mktemp("prometheus")
    config = workdir / "prometheus.yml"
    config.write_text(rewrite_config((ROOT / "deploy/prometheus.yml").read_text(), stack))
    port = free_port()
    log_path = ARTIFACTS / "logs" / "prometheus.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--storage.tsdb.retention.time=1h",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    server = Prometheus(f"http://127.0.0.1:{port}", process)
    try:
        _wait_ready(server)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _wait_ready(server: Prometheus) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            pytest.fail(f"prometheus exited with code {server.process.returncode}; see tests/artifacts/logs/prometheus.log")
        try:
            if httpx.get(f"{server.url}/-/ready", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    pytest.fail(f"prometheus not ready after {START_TIMEOUT_S:.0f}s")


def _generate(http: httpx.Client, n: int) -> None:
    ids = []
    for seed in range(n):
        response = http.post(
            "/api/v1/generations",
            files={"image": ("astronaut.png", photo_png("astronaut", 128), "image/png")},
            data={**FAST, "seed": str(100 + seed)},
        )
        assert response.status_code == 202, response.text
        ids.append(response.json()["id"])
    for job_id in ids:
        with http.stream("GET", f"/api/v1/generations/{job_id}/events", timeout=120) as events:
            for _ in events.iter_lines():
                pass
        assert http.get(f"/api/v1/generations/{job_id}").json()["status"] == "succeeded"


def _poll(fn: Any, timeout_s: float) -> Any:
    """fn() until it returns something truthy, for at most timeout_s; the last result otherwise."""
    deadline = time.monotonic() + timeout_s
    result = fn()
    while not result and time.monotonic() < deadline:
        time.sleep(0.5)
        result = fn()
    return result


def test_prometheus_scrapes_every_service(prometheus: Prometheus) -> None:
    def all_up() -> dict[str, float] | None:
        up = prometheus.vector('up{job=~"orfeas-.*"}', "job")
        return up if len(up) == 3 and all(v == 1 for v in up.values()) else None

    up = _poll(all_up, SCRAPE_TIMEOUT_S)
    assert up == {"orfeas-gateway": 1.0, "orfeas-generation": 1.0, "orfeas-telemetry": 1.0}, (
        prometheus.query('up{job=~"orfeas-.*"}')
    )


def test_stage_histogram_reads_back_through_the_query_api(prometheus: Prometheus, http: httpx.Client) -> None:
    jobs = 3
    baseline = prometheus.vector("sum by (stage) (orfeas_stage_duration_seconds_count)", "stage")
    _generate(http, jobs)

    def counted() -> dict[str, float] | None:
        now = prometheus.vector("sum by (stage) (orfeas_stage_duration_seconds_count)", "stage")
        grown = all(now.get(s, 0) - baseline.get(s, 0) >= jobs for s in STAGES)
        return now if grown else None

    counts = _poll(counted, SCRAPE_TIMEOUT_S)
    assert counts, prometheus.query("orfeas_stage_duration_seconds_count")
    assert set(STAGES) <= set(counts)

    # The buckets come back too: a quantile over them is a finite duration per stage.
    p95 = prometheus.vector(
        "histogram_quantile(0.95, sum by (le, stage) (orfeas_stage_duration_seconds_bucket))", "stage"
    )
    for stage in STAGES:
        assert 0 <= p95[stage] < float("inf"), (stage, p95)
    sums = prometheus.vector("sum by (stage) (orfeas_stage_duration_seconds_sum)", "stage")
    assert all(sums[s] > 0 for s in STAGES), sums


def test_every_dashboard_query_parses(prometheus: Prometheus) -> None:
    dashboard = json.loads((ROOT / "deploy/grafana/orfeas-dashboard.json").read_text())
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            # Grafana fills $__rate_interval in; any range will do for parsing.
            prometheus.query(target["expr"].replace("$__rate_interval", "1m"))
