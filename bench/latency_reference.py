"""End to end through the gateway: this code against an earlier commit, in one run.

    .venv/bin/python -m bench.latency_reference --reference 8c7be45 --runs 15 [--write]

bench.latency compares the gateway with the pipeline in process; this compares two whole stacks, the
working tree's and the commit's (exported with `git archive`, its own pb/ built from its own protos, the
same virtual environment), each started with `python -m services.stack` on free loopback ports. Jobs
alternate between the two stacks, one at a time (the user path of bench.common.generate_via_gateway:
POST, SSE to the terminal event, GLB download), so whatever else the machine does touches both alike.
It prints each phase's median per side and the ratio, and with --write keeps the table in RESULTS.md.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import httpx

from bench.common import (
    BENCH_DIR,
    ROOT,
    comparison_section,
    exported_commit,
    free_port,
    generate_via_gateway,
    photo_png,
    write_section,
)

SECTION_TITLE = "## End to end: this code against an earlier commit"
PHASES = ("e2e", "submit", "follow", "download")
PORT_VARIABLES = (
    "GATEWAY_PORT", "GENERATION_PORT", "TELEMETRY_PORT", "GENERATION_METRICS_PORT", "TELEMETRY_METRICS_PORT"
)  # fmt: skip
READY_WAIT_S = 300.0


@contextmanager
def stack(tree: Path) -> Iterator[str]:
    """The tree's whole stack on free loopback ports and a throw-away data dir; yields the gateway's URL."""
    with tempfile.TemporaryDirectory(prefix="latency-reference-data-") as data:
        ports = {name: str(free_port()) for name in PORT_VARIABLES}
        with open(Path(data) / "stack.log", "wb") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "services.stack"], cwd=tree, env={**os.environ, **ports, "DATA_DIR": data},
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )
        try:
            yield f"http://127.0.0.1:{ports['GATEWAY_PORT']}"
        finally:
            os.killpg(process.pid, signal.SIGINT)
            process.wait(60)


async def _ready(client: httpx.AsyncClient) -> None:
    for _ in range(int(READY_WAIT_S / 0.5)):
        try:
            if (await client.get("/readyz")).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        await asyncio.sleep(0.5)
    raise RuntimeError(f"{client.base_url} was not ready within {READY_WAIT_S:g} s")


async def compare(urls: dict[str, str], runs: int, warmup: int = 3) -> dict[str, dict[str, list[float]]]:
    """{"reference" | "working": {phase: [seconds, one per job]}}, the two stacks alternating job by job."""
    image = photo_png()
    results: dict[str, dict[str, list[float]]] = {name: {phase: [] for phase in PHASES} for name in urls}
    clients = {name: httpx.AsyncClient(base_url=url, timeout=300.0) for name, url in urls.items()}
    try:
        for client in clients.values():
            await _ready(client)
        for index in range(warmup + runs):
            order = list(clients) if index % 2 == 0 else list(reversed(clients))
            for name in order:
                run = await generate_via_gateway(clients[name], image, {})
                if run.status != "succeeded" or not run.result_bytes:
                    raise RuntimeError(f"{name}: {run.http_status} {run.status} {run.error}")
                if index >= warmup:
                    phases = results[name]
                    phases["e2e"].append(run.total_s)
                    phases["submit"].append(run.submit_s)
                    phases["follow"].append(run.terminal_s - run.submit_s)
                    phases["download"].append(run.total_s - run.terminal_s)
    finally:
        for client in clients.values():
            await client.aclose()
    return results


def _medians(results: dict[str, dict[str, list[float]]]) -> list[tuple[str, float, float]]:
    return [(phase, statistics.median(results["reference"][phase]) * 1000,
             statistics.median(results["working"][phase]) * 1000) for phase in PHASES]


def _section(results: dict[str, dict[str, list[float]]], reference: str, runs: int) -> str:
    lines = comparison_section(
        SECTION_TITLE, f".venv/bin/python -m bench.latency_reference --reference {reference} --runs {runs} --write",
        reference,
        ("Default settings, the 512-px astronaut through the gateway (POST, SSE to the terminal event, GLB "
         f"download), {runs} jobs a stack after 3 warm-ups, the two stacks (commit {{commit}} and the working tree) "
         "alternating job by job; medians. submit: POST until 202; follow: 202 until the terminal event; "
         "download: the GLB after it."),
        "phase", _medians(results),
    )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference", default="HEAD", help="the commit to compare the working tree with")
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--write", action="store_true", help="also write the comparison into bench/RESULTS.md")
    args = parser.parse_args()
    with ExitStack() as stacks:
        reference_tree = stacks.enter_context(exported_commit(args.reference))
        urls = {"reference": stacks.enter_context(stack(reference_tree)), "working": stacks.enter_context(stack(ROOT))}
        results = asyncio.run(compare(urls, args.runs))
    print(f"{'phase':<10}{'reference ms':>14}{'working ms':>12}{'ratio':>8}")
    for phase, before, after in _medians(results):
        print(f"{phase:<10}{before:>14.1f}{after:>12.1f}{after / before:>8.2f}")
    if args.write:
        write_section(BENCH_DIR / "RESULTS.md", SECTION_TITLE, _section(results, args.reference, args.runs))


if __name__ == "__main__":
    main()
