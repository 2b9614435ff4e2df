"""`make loadtest`: a bounded load test of the gateway on loopback.

    .venv/bin/python -m bench.loadtest                       # a stack of its own, both phases
    .venv/bin/python -m bench.loadtest --url http://127.0.0.1:5000 --phases capacity

Two phases, each bounded in requests and seconds, and it stops by itself:

- capacity: `--users` closed-loop users, each submitting a picture, following
  its events to the end and downloading the result, again and again: the
  throughput and latency the service sustains;
- overload: open-loop arrivals at `--overload-factor` × the measured capacity,
  whatever the service answers; the bounded queue must push back with 429 and
  Retry-After, nothing may time out, and memory must stay bounded.

After each phase every accepted (202) job must reach a terminal state and a
succeeded one's result must download: anything else is reported as lost.
Reports: bench/loadtest-report.json and bench/LOADTEST.md.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import time
from collections import Counter
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from bench.common import (
    BENCH_DIR,
    SMALL,
    fmt_bytes,
    follow_events,
    machine,
    own_stack,
    percentile,
    photo_png,
    rss_bytes,
)
from services.stack import Stack

REQUEST_TIMEOUT_S = 60.0  # one HTTP exchange; hitting it counts as a timeout, the thing that must not happen
FOLLOW_TIMEOUT_S = 600.0  # one job's event stream, queue included


@dataclass
class Job:
    submitted_at: float
    http_status: int = 0
    code: str = ""
    job_id: str = ""
    retry_after: str | None = None
    terminal: str = ""
    downloaded: bool = False
    latency_s: float = 0.0
    error: str = ""


@dataclass
class Phase:
    name: str
    jobs: list[Job] = field(default_factory=list)
    started: float = 0.0
    wall_s: float = 0.0
    rss_samples: list[dict[str, int]] = field(default_factory=list)
    queue_samples: list[float] = field(default_factory=list)
    rate: float = 0.0  # overload: arrivals per second
    arrivals_s: float = 0.0  # overload: how long arrivals went on

    def report(self) -> dict[str, Any]:
        accepted = [j for j in self.jobs if j.http_status == 202]
        done = [j for j in accepted if j.terminal == "succeeded" and j.downloaded]
        lost = [j for j in accepted if j.terminal not in ("succeeded", "failed", "cancelled")]
        undownloaded = [j for j in accepted if j.terminal == "succeeded" and not j.downloaded]
        rejected = [j for j in self.jobs if j.http_status == 429]
        latencies = [j.latency_s for j in done]
        codes = Counter(j.code or str(j.http_status) for j in self.jobs if j.http_status != 202)
        codes.update(f"job {j.terminal}" for j in accepted if j.terminal in ("failed", "cancelled"))
        codes.update(j.error for j in accepted if j.error)
        peak = {n: max(s.get(n, 0) for s in self.rss_samples) for n in (self.rss_samples[0] if self.rss_samples else {})}
        return {
            "phase": self.name,
            "rate": self.rate,
            "arrivals_s": self.arrivals_s,
            "requests": len(self.jobs),
            "accepted": len(accepted),
            "succeeded_and_downloaded": len(done),
            "rejected_429": len(rejected),
            "rejected_with_retry_after": sum(1 for j in rejected if j.retry_after),
            "retry_after_values": dict(Counter(j.retry_after for j in rejected if j.retry_after)),
            "timeouts": sum(1 for j in self.jobs if j.code == "timeout" or "timeout" in j.error),
            "lost": len(lost),
            "lost_ids": [j.job_id for j in lost][:20],
            "succeeded_not_downloadable": len(undownloaded),
            "wall_s": self.wall_s,
            "throughput_jobs_per_s": len(done) / self.wall_s if self.wall_s else 0.0,
            "latency_s": {
                "p50": percentile(latencies, 50),
                "p95": percentile(latencies, 95),
                "p99": percentile(latencies, 99),
                "max": max(latencies) if latencies else float("nan"),
            },
            "errors_by_code": dict(codes),
            "rss_start_bytes": self.rss_samples[0] if self.rss_samples else {},
            "rss_peak_bytes": peak,
            "rss_end_bytes": self.rss_samples[-1] if self.rss_samples else {},
            "queue_length_max": max((q for q in self.queue_samples if not math.isnan(q)), default=None),
        }


class Load:
    def __init__(self, client: httpx.AsyncClient, image: bytes, params: dict[str, Any], stack: Stack | None) -> None:
        self.client = client
        self.image = image
        self.params = {k: str(v) for k, v in params.items()}
        self.stack = stack

    async def submit(self, job: Job) -> None:
        try:
            response = await self.client.post(
                "/api/v1/generations",
                files={"image": ("photo.png", self.image, "image/png")},
                data=self.params,
                timeout=REQUEST_TIMEOUT_S,
            )
        except httpx.TimeoutException:
            job.code = "timeout"
            return
        except httpx.HTTPError as exc:
            job.code = type(exc).__name__
            return
        job.http_status = response.status_code
        if response.status_code == 202:
            job.job_id = response.json()["id"]
            return
        job.retry_after = response.headers.get("retry-after")
        try:
            job.code = f"{response.status_code} {response.json()['error']['code']}"
        except (ValueError, KeyError, TypeError):
            job.code = str(response.status_code)

    async def follow(self, job: Job) -> None:
        """Follow an accepted job to its end and download a success's result."""
        try:
            job.terminal, error = await follow_events(self.client, job.job_id, FOLLOW_TIMEOUT_S)
            if error:
                job.error = error
            if job.terminal not in ("succeeded", "failed", "cancelled"):
                # The stream broke: ask for the status before calling the job lost.
                record = await self.client.get(f"/api/v1/generations/{job.job_id}", timeout=REQUEST_TIMEOUT_S)
                if record.status_code == 200 and record.json().get("status") in ("succeeded", "failed", "cancelled"):
                    job.terminal = record.json()["status"]
            if job.terminal == "succeeded":
                result = await self.client.get(f"/api/v1/generations/{job.job_id}/result", timeout=REQUEST_TIMEOUT_S)
                job.downloaded = result.status_code == 200 and len(result.content) > 0
                if not job.downloaded:
                    job.error = f"download HTTP {result.status_code}"
        except httpx.TimeoutException:
            job.error = "timeout"
        except httpx.HTTPError as exc:
            job.error = type(exc).__name__
        job.latency_s = time.perf_counter() - job.submitted_at

    async def one(self, phase: Phase) -> Job:
        job = Job(submitted_at=time.perf_counter())
        phase.jobs.append(job)
        await self.submit(job)
        if job.job_id:
            await self.follow(job)
        return job

    async def sample(self, phase: Phase, stop: asyncio.Event, metrics_url: str | None) -> None:
        """Memory of the services and the queue length, twice a second, until stopped."""
        while not stop.is_set():
            if self.stack is not None:
                phase.rss_samples.append(rss_bytes(self.stack))
            if metrics_url:
                phase.queue_samples.append(await _queue_length(self.client, metrics_url))
            try:
                await asyncio.wait_for(stop.wait(), 0.5)
            except TimeoutError:
                pass


async def _queue_length(client: httpx.AsyncClient, url: str) -> float:
    try:
        text = (await client.get(url, timeout=5)).text
    except httpx.HTTPError:
        return float("nan")
    for line in text.splitlines():
        if line.startswith("orfeas_queue_length "):
            return float(line.split()[1])
    return float("nan")


async def capacity(load: Load, users: int, requests: int, duration_s: float, metrics_url: str | None) -> Phase:
    phase = Phase("capacity")
    stop = asyncio.Event()
    sampler = asyncio.create_task(load.sample(phase, stop, metrics_url))
    phase.started = time.perf_counter()
    deadline = phase.started + duration_s
    issued = 0

    async def user() -> None:
        nonlocal issued
        while issued < requests and time.perf_counter() < deadline:
            issued += 1
            await load.one(phase)

    await asyncio.gather(*(user() for _ in range(users)))
    phase.wall_s = time.perf_counter() - phase.started
    stop.set()
    await sampler
    return phase


async def overload(load: Load, rate: float, requests: int, duration_s: float, metrics_url: str | None) -> Phase:
    """Open loop: arrivals keep their schedule whatever the service answers."""
    phase = Phase("overload")
    stop = asyncio.Event()
    sampler = asyncio.create_task(load.sample(phase, stop, metrics_url))
    phase.rate = rate
    phase.started = time.perf_counter()
    tasks: list[asyncio.Task[Job]] = []
    for i in range(requests):
        at = phase.started + i / rate
        if at - phase.started > duration_s:
            break
        await asyncio.sleep(max(0.0, at - time.perf_counter()))
        tasks.append(asyncio.create_task(load.one(phase)))
    phase.arrivals_s = time.perf_counter() - phase.started
    await asyncio.gather(*tasks)  # the drain: every accepted job to its end
    phase.wall_s = time.perf_counter() - phase.started
    stop.set()
    await sampler
    return phase


# ------------------------------------------------------------------ reporting
def markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [
        "# ORFEAS load test",
        "",
        f"Command: `{report['command']}`  ",
        f"Machine: {m['nproc']} CPUs ({m['cpu']}), {m['ram_gib']} GiB RAM, torch {m['torch']}; date {m['date']}  ",
        f"Target: {report['target']}; parameters {report['params']}; picture {report['picture']}",
        "",
        "| phase | requests | accepted (202) | 429 (with Retry-After) | ok + downloaded | lost | timeouts | jobs/s | p50 | p95 | p99 |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p in report["phases"]:
        lat = p["latency_s"]
        lines.append(
            f"| {p['phase']} | {p['requests']} | {p['accepted']} | {p['rejected_429']} ({p['rejected_with_retry_after']}) | "
            f"{p['succeeded_and_downloaded']} | {p['lost']} | {p['timeouts']} | {p['throughput_jobs_per_s']:.2f} | "
            f"{lat['p50']:.3f} s | {lat['p95']:.3f} s | {lat['p99']:.3f} s |"
        )
    lines.append("")
    for p in report["phases"]:
        lines.append(f"## {p['phase']}")
        lines.append("")
        if p["phase"] == "overload":
            lines.append(
                f"Arrivals at {p['rate']:.1f} jobs/s ({report['overload_factor']}× the measured capacity) for "
                f"{p['arrivals_s']:.0f} s, then the accepted jobs drained; {p['wall_s']:.0f} s in all."
            )
        else:
            lines.append(f"{report['users']} users, closed loop; {p['wall_s']:.0f} s.")
        lines.append("")
        lines.append(f"- errors by code: {p['errors_by_code'] or 'none'}")
        lines.append(f"- Retry-After values on 429: {p['retry_after_values'] or 'none'}")
        lines.append(f"- lost (accepted, never terminal): {p['lost']}; succeeded but not downloadable: {p['succeeded_not_downloadable']}")
        if p["queue_length_max"] is not None:
            lines.append(f"- queue length, max sampled (orfeas_queue_length): {p['queue_length_max']:.0f}")
        if p["rss_peak_bytes"]:
            lines.append(
                "- RSS start / peak / end: "
                + "; ".join(
                    f"{n} {fmt_bytes(p['rss_start_bytes'].get(n, 0))} / {fmt_bytes(v)} / {fmt_bytes(p['rss_end_bytes'].get(n, 0))}"
                    for n, v in p["rss_peak_bytes"].items()
                )
            )
        lines.append("")
    lines.append("## Verdict")
    lines.append("")
    lines += [f"- {v}" for v in report["verdict"]]
    return "\n".join(lines) + "\n"


def verdict(phases: list[dict[str, Any]]) -> tuple[list[str], bool]:
    lines, ok = [], True
    for p in phases:
        if p["lost"] or p["succeeded_not_downloadable"]:
            ok = False
            lines.append(f"{p['phase']}: {p['lost']} accepted jobs lost, {p['succeeded_not_downloadable']} results not downloadable")
        else:
            lines.append(f"{p['phase']}: nothing lost ({p['accepted']} accepted, all terminal, every success downloaded)")
        if p["timeouts"]:
            ok = False
            lines.append(f"{p['phase']}: {p['timeouts']} timeouts")
        if p["rejected_429"] and p["rejected_with_retry_after"] != p["rejected_429"]:
            ok = False
            lines.append(f"{p['phase']}: {p['rejected_429'] - p['rejected_with_retry_after']} 429s without Retry-After")
    over = next((p for p in phases if p["phase"] == "overload"), None)
    if over is not None:
        if over["rejected_429"]:
            lines.append(f"overload: backpressure held: {over['rejected_429']} × 429 with Retry-After, no timeouts")
        else:
            lines.append("overload: no 429 was needed: the arrivals never filled the queue")
        start, peak = over["rss_start_bytes"], over["rss_peak_bytes"]
        if peak:
            lines.append(
                "overload: memory bounded: peak RSS "
                + ", ".join(f"{n} {fmt_bytes(v)} (start {fmt_bytes(start.get(n, 0))})" for n, v in peak.items())
            )
    return lines, ok


# ----------------------------------------------------------------------- main
async def run(args: argparse.Namespace) -> dict[str, Any]:
    params = SMALL if args.params == "small" else {}
    image = photo_png("astronaut", args.picture_side)
    with ExitStack() as stack_scope:
        stack: Stack | None = None
        url = args.url
        metrics_url = args.metrics_url
        if not url:
            stack = stack_scope.enter_context(own_stack("loadtest"))
            url = stack.gateway_url
            metrics_url = f"http://127.0.0.1:{stack.generation_metrics_port}/metrics"
        if not url.startswith(("http://127.0.0.1", "http://localhost", "http://[::1]")):
            raise SystemExit("the load test only targets loopback")
        limits = httpx.Limits(max_connections=args.max_connections, max_keepalive_connections=args.max_connections)
        async with httpx.AsyncClient(base_url=url, limits=limits) as client:
            load = Load(client, image, params, stack)
            await load.one(Phase("warm-up"))
            phases: list[Phase] = []
            if "capacity" in args.phases:
                phases.append(await capacity(load, args.users, args.requests, args.duration, metrics_url))
            if "overload" in args.phases:
                measured = phases[0].report()["throughput_jobs_per_s"] if phases else 0.0
                rate = args.overload_rate or max(2.0, args.overload_factor * measured)
                phases.append(
                    await overload(load, rate, args.overload_requests, args.overload_duration, metrics_url)
                )
    reports = [p.report() for p in phases]
    lines, ok = verdict(reports)
    return {
        "command": "python -m bench.loadtest " + " ".join(sys.argv[1:]),
        "machine": machine(),
        "target": "own stack on free loopback ports" if not args.url else args.url,
        "params": params or "defaults",
        "picture": f"astronaut {args.picture_side}px PNG",
        "users": args.users,
        "overload_factor": args.overload_factor,
        "phases": reports,
        "verdict": lines,
        "ok": ok,
    }


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench.loadtest", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="", help="a running gateway on loopback; default: start a stack of its own")
    p.add_argument("--metrics-url", default="", help="the generation service's /metrics, to sample the queue length")
    p.add_argument("--phases", default="capacity,overload")
    p.add_argument("--users", type=int, default=8)
    p.add_argument("--requests", type=int, default=200, help="capacity phase: at most this many jobs")
    p.add_argument("--duration", type=float, default=60.0, help="capacity phase: at most this many seconds")
    p.add_argument("--overload-factor", type=float, default=4.0, help="overload arrivals × measured capacity")
    p.add_argument("--overload-rate", type=float, default=0.0, help="overload arrivals per second (overrides the factor)")
    p.add_argument("--overload-requests", type=int, default=600)
    p.add_argument("--overload-duration", type=float, default=30.0, help="seconds of arrivals; the drain follows")
    p.add_argument("--params", choices=("small", "default"), default="small")
    p.add_argument("--picture-side", type=int, default=256)
    p.add_argument("--max-connections", type=int, default=512)
    p.add_argument("--json", type=Path, default=BENCH_DIR / "loadtest-report.json")
    p.add_argument("--markdown", type=Path, default=BENCH_DIR / "LOADTEST.md")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    report = asyncio.run(run(args))
    args.json.write_text(json.dumps(report, indent=2, default=str) + "\n")
    args.markdown.write_text(markdown(report))
    print(markdown(report))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
