"""The services' memory after many jobs against after a few: a leak shows
as resident memory that keeps growing with the job count. Small settings
keep a thousand jobs to minutes; a time bound stops it regardless.
"""
from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx

from bench.common import SMALL, generate_via_gateway, own_stack, photo_png, rss_bytes

CHECKPOINTS: tuple[int, ...] = (10, 100, 300, 1000)


async def _drive(jobs: int, concurrency: int, timeout_s: float) -> dict[str, Any]:
    image = photo_png("astronaut", 256)
    checkpoints = sorted({c for c in CHECKPOINTS if c < jobs} | {jobs})
    rss: dict[int, dict[str, int]] = {}
    outcomes: dict[str, int] = {}
    done = 0
    stop_at = time.monotonic() + timeout_s
    with own_stack("leak") as stack:
        async with httpx.AsyncClient(base_url=stack.gateway_url) as client:
            lock = asyncio.Lock()
            next_checkpoint = iter(checkpoints)
            target = next(next_checkpoint)
            issued = 0

            async def user() -> None:
                nonlocal issued, done, target
                while time.monotonic() < stop_at:
                    async with lock:
                        if issued >= target:
                            return
                        issued += 1
                        seed = issued
                    run = await generate_via_gateway(client, image, {**SMALL, "seed": seed})
                    key = run.status if run.status == "succeeded" and run.result_bytes else f"{run.http_status} {run.status} {run.error}"
                    outcomes[key] = outcomes.get(key, 0) + 1
                    done += 1

            started = time.monotonic()
            while True:
                await asyncio.gather(*(user() for _ in range(concurrency)))
                # Between checkpoints nothing is in flight: the RSS is the services' at rest.
                await asyncio.sleep(1.0)
                rss[done] = rss_bytes(stack)
                if time.monotonic() >= stop_at:
                    break
                try:
                    target = next(next_checkpoint)
                except StopIteration:
                    break
            elapsed = time.monotonic() - started
    counts = sorted(rss)
    first, last = counts[0], counts[-1]
    growth = {name: rss[last][name] - rss[first].get(name, 0) for name in rss[last]}
    return {
        "jobs_requested": jobs,
        "jobs_done": done,
        "concurrency": concurrency,
        "params": SMALL,
        "elapsed_s": elapsed,
        "stopped_by_time_bound": done < jobs,
        "rss_by_jobs": {str(k): v for k, v in sorted(rss.items())},
        "growth_bytes": growth,
        "growth_per_1000_jobs_bytes": {
            n: g * 1000 / max(1, last - first) for n, g in growth.items()
        },
        "outcomes": outcomes,
    }


def run(jobs: int = 1000, concurrency: int = 4, timeout_s: float = 900.0) -> dict[str, Any]:
    return asyncio.run(_drive(jobs, concurrency, timeout_s))
