"""End-to-end latency through the gateway against the in-process pipeline,
default settings, the 512-pixel astronaut; runs interleaved so that drift of
the machine touches both sides alike.
"""
from __future__ import annotations

import asyncio
import datetime as dt
from typing import Any

import httpx

from bench.common import STAGES, generate_via_gateway, job_record, median, own_stack, photo_png, summary
from bench.inprocess import device_of, run_once
from services.generation.pipeline.params import GenerationParams


async def _measure(runs: int, device_name: str) -> dict[str, Any]:
    device = device_of(device_name)
    image = photo_png()
    params = GenerationParams()
    inproc: list[float] = []
    e2e: list[float] = []
    service: list[float] = []
    inproc_stages: dict[str, list[float]] = {s: [] for s in STAGES}
    service_stages: dict[str, list[float]] = {s: [] for s in STAGES}
    failures: list[str] = []
    phases: dict[str, list[float]] = {k: [] for k in PHASES}
    # The first of each is a warm-up: imports, allocator pools, the gRPC channel.
    run_once(image, params, device)
    with own_stack("latency") as stack:
        async with httpx.AsyncClient(base_url=stack.gateway_url) as client:
            await generate_via_gateway(client, image, {})
            for _ in range(runs):
                seconds, timings, _mesh = run_once(image, params, device)
                inproc.append(seconds)
                for stage in STAGES:
                    inproc_stages[stage].append(float(timings.get(stage, 0.0)))
                run = await generate_via_gateway(client, image, {})
                if run.status != "succeeded" or not run.result_bytes:
                    failures.append(f"{run.http_status} {run.status} {run.error}")
                    continue
                e2e.append(run.total_s)
                record = await job_record(client, run.job_id)
                _phases(phases, run.submit_s, run.terminal_s, run.total_s, record)
                timings = record.get("stage_timings") or {}
                service.append(sum(float(v) for v in timings.values()))
                for stage in STAGES:
                    service_stages[stage].append(float(timings.get(stage, 0.0)))
    pairs = [e - i for e, i in zip(e2e, inproc)]
    return {
        "runs": runs,
        "device": str(device),
        "params": params.to_dict(),
        "inprocess": summary(inproc),
        "e2e": summary(e2e),
        "service_stage_sum": summary(service),
        "overhead_s": median(e2e) - median(inproc),
        "overhead_ratio": median(e2e) / median(inproc) if inproc and e2e else float("nan"),
        "overhead_paired_median_s": median(pairs),
        # What the stage timers inside the service do not see: upload, queue,
        # gRPC, SSE, the download.
        "serving_outside_stages_s": median(e2e) - median(service),
        "inprocess_stages": {s: median(v) for s, v in inproc_stages.items()},
        "service_stages": {s: median(v) for s, v in service_stages.items()},
        "phases": {k: median(v) for k, v in phases.items()},
        "failures": failures,
    }


# Where one end-to-end run's time goes, as the client and the job's own timestamps see it.
PHASES: dict[str, str] = {
    "submit": "POST until 202 (upload, gateway, gRPC, admission decoding the picture)",
    "queued": "created until a worker took it (job timestamps)",
    "running": "taken until finished (job timestamps)",
    "follow": "202 until the terminal SSE event (client)",
    "download": "terminal event until the GLB is downloaded (client)",
}


def _phases(out: dict[str, list[float]], submit_s: float, terminal_s: float, total_s: float, record: dict[str, Any]) -> None:
    out["submit"].append(submit_s)
    out["follow"].append(terminal_s - submit_s)
    out["download"].append(total_s - terminal_s)
    created, started, finished = (_epoch(record.get(k)) for k in ("created_at", "started_at", "finished_at"))
    if created is not None and started is not None:
        out["queued"].append(started - created)
    if started is not None and finished is not None:
        out["running"].append(finished - started)


def _epoch(value: Any) -> float | None:
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str) and value:
        try:
            return dt.datetime.fromisoformat(value).timestamp()
        except ValueError:
            return None
    return None


def run(runs: int = 10, device: str = "auto") -> dict[str, Any]:
    return asyncio.run(_measure(runs, device))
