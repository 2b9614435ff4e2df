"""The batching speed-up, in one run: 32 jobs sent strictly one at a time
(the next only once the previous has finished) against the same 32 submitted
at once to a stack that batches dynamically. A third mode submits them at
once with GENERATION_MAX_BATCH_SIZE=1: the same stage overlap without
batched shape_generation, which shows how much of the gain is batching
itself. Throughput, p50/p95, the batch sizes the worker
chose, where the time went, and the generation service's peak memory
against its budget.
"""
from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import psutil
import torch

from bench.common import (
    STAGES,
    generate_via_gateway,
    job_record,
    log_records,
    median,
    metric_sum,
    own_stack,
    peak_rss_bytes,
    percentile,
    photo_png,
    process_tree,
    reset_peak_rss,
    rss_bytes,
    scrape,
)
from services.common.config import GenerationConfig

MODES: dict[str, dict[str, str]] = {
    "strictly one at a time": {},
    "overlapped, max_batch_size=1": {"GENERATION_MAX_BATCH_SIZE": "1"},
    "dynamic batching": {},
}


def memory_budget_bytes() -> int:
    """The batch memory budget: target utilisation × the device's memory, or on the
    CPU × the configured share of the memory available now."""
    cfg = GenerationConfig()
    if torch.cuda.is_available():
        return int(torch.cuda.get_device_properties(0).total_memory * cfg.target_utilization)
    return int(psutil.virtual_memory().available * cfg.cpu_memory_share * cfg.target_utilization)


async def _device_peak(client: httpx.AsyncClient, url: str, stop: asyncio.Event) -> float:
    """The highest device memory in use the service reported while the run went on (CUDA)."""
    peak = 0.0
    while not stop.is_set():
        try:
            text = (await client.get(url, timeout=5)).text
            for line in text.splitlines():
                if line.startswith(("orfeas_device_memory_used_bytes{device=\"cuda", "orfeas_batch_memory_peak_bytes{device=\"cuda")):
                    peak = max(peak, float(line.split()[-1]))
        except (httpx.HTTPError, ValueError):
            pass
        try:
            await asyncio.wait_for(stop.wait(), 0.25)
        except TimeoutError:
            pass
    return peak


async def _one_mode(mode: str, env: dict[str, str], jobs: int, params: dict[str, Any]) -> dict[str, Any]:
    image = photo_png()
    with own_stack("batching-" + mode.split(" ")[0], **env) as stack:
        metrics_url = f"http://127.0.0.1:{stack.generation_metrics_port}/metrics"
        async with httpx.AsyncClient(base_url=stack.gateway_url, limits=httpx.Limits(max_connections=4 * jobs)) as client:
            await generate_via_gateway(client, image, params)  # warm-up
            pid = stack.processes["generation"].pid
            rss_before = rss_bytes(stack)["generation"]  # workers included
            tree = [p.pid for p in process_tree(pid)]
            hwm_reset = all(reset_peak_rss(p) for p in tree)
            cpu_before = _cpu_seconds(stack)
            before = _scrape_or_empty(metrics_url)
            stop = asyncio.Event()
            cuda_peak = asyncio.create_task(_device_peak(client, metrics_url, stop)) if torch.cuda.is_available() else None
            started = time.perf_counter()
            if mode == "strictly one at a time":
                runs = [await generate_via_gateway(client, image, params) for _ in range(jobs)]
            else:
                runs = await asyncio.gather(*(generate_via_gateway(client, image, params) for _ in range(jobs)))
            wall = time.perf_counter() - started
            cpu_used = _cpu_seconds(stack) - cpu_before
            stop.set()
            after = _scrape_or_empty(metrics_url)
            # The sum of each process's high-water mark: an upper bound on their peak together.
            peak = int(await cuda_peak) if cuda_peak is not None else sum(peak_rss_bytes(p) for p in tree)
            records = await asyncio.gather(*(job_record(client, r.job_id) for r in runs if r.job_id))
    ids = {r.job_id for r in runs}
    logged = [e for e in log_records(stack.log_dir / "generation.log", "job finished") if e.get("job_id") in ids]
    chosen = sorted((int(e["batch_size"]) for e in logged if e.get("batch_size")), reverse=True)
    ok = [r for r in runs if r.status == "succeeded" and r.result_bytes]
    latencies = [r.total_s for r in ok]
    stage_medians = {
        s: median([float((rec.get("stage_timings") or {}).get(s, 0.0)) for rec in records]) for s in STAGES
    }
    batches = metric_sum(after, "orfeas_batch_size_count") - metric_sum(before, "orfeas_batch_size_count")
    batched_jobs = metric_sum(after, "orfeas_batch_size_sum") - metric_sum(before, "orfeas_batch_size_sum")
    return {
        "mode": mode,
        "jobs": jobs,
        "succeeded": len(ok),
        "wall_s": wall,
        "throughput_jobs_per_s": len(ok) / wall if wall else float("nan"),
        "p50_s": percentile(latencies, 50),
        "p95_s": percentile(latencies, 95),
        "stage_medians_s": stage_medians,
        # CPU-seconds the three services spent per job: on n cores no schedule
        # can beat n / this many jobs a second, batched or not.
        "cpu_s_per_job": cpu_used / max(1, len(ok)),
        "throughput_ceiling_jobs_per_s": (psutil.cpu_count() or 1) * max(1, len(ok)) / cpu_used if cpu_used else float("nan"),
        # Per job, the size of the batch its shape_generation ran in (the worker's log).
        "job_batch_sizes": chosen,
        "batches_from_metrics": batches,
        "mean_batch_size_from_metrics": batched_jobs / batches if batches else float("nan"),
        "rss_before_bytes": rss_before,
        "peak_rss_bytes": peak,
        # What the batches themselves added over the idle service.
        "peak_above_start_bytes": max(0, peak - rss_before) if cuda_peak is None else peak,
        "peak_measured_from": (
            "device memory in use, sampled every 0.25 s" if cuda_peak is not None
            else "sum of the generation processes' RSS high-water marks (VmHWM) " + ("since reset" if hwm_reset else "since start")
        ),
        "budget_bytes": memory_budget_bytes(),
        "errors": sorted({f"{r.http_status} {r.status} {r.error}" for r in runs if r not in ok}),
    }


def _cpu_seconds(stack: Any) -> float:
    """CPU time of every service process and its workers so far."""
    total = 0.0
    for proc in stack.processes.values():
        for p in process_tree(proc.pid):
            try:
                times = p.cpu_times()
                total += times.user + times.system
            except psutil.Error:
                pass
    return total


def _scrape_or_empty(url: str) -> dict[Any, float]:
    try:
        return scrape(url)
    except httpx.HTTPError:
        return {}


def batch_histogram(sizes: list[int]) -> dict[int, int]:
    """{batch size: number of batches}, from the per-job sizes (a batch of n has n jobs)."""
    counts: dict[int, int] = {}
    for size in sizes:
        counts[size] = counts.get(size, 0) + 1
    return {size: n // size for size, n in sorted(counts.items())}


def run(jobs: int = 32, params: dict[str, Any] | None = None, serial: bool = True) -> dict[str, Any]:
    params = params or {}
    modes = {m: e for m, e in MODES.items() if serial or m != "strictly one at a time"}
    results = [asyncio.run(_one_mode(mode, env, jobs, params)) for mode, env in modes.items()]
    by_mode = {r["mode"]: r for r in results}
    single = by_mode["overlapped, max_batch_size=1"]
    dynamic = by_mode["dynamic batching"]
    baseline = by_mode.get("strictly one at a time") or single
    for r in results:
        r["batches"] = batch_histogram(r["job_batch_sizes"])
    serial_stages = (by_mode.get("strictly one at a time") or single)["stage_medians_s"]
    total = sum(serial_stages.values())
    shape = serial_stages.get("shape_generation", 0.0)
    return {
        "params": params or "defaults",
        "modes": results,
        # Amdahl: batching speeds up shape_generation only; were it free, the
        # rest of each job's work would still be there.
        "shape_generation_share": shape / total if total else float("nan"),
        "amdahl_bound": total / (total - shape) if total > shape else float("inf"),
        # The headline: dynamic batching against strictly one at a time.
        "speedup_throughput": dynamic["throughput_jobs_per_s"] / baseline["throughput_jobs_per_s"],
        "p50_ratio": dynamic["p50_s"] / baseline["p50_s"],
        "p95_ratio": dynamic["p95_s"] / baseline["p95_s"],
        # The ablation: the same overlap, with and without batched shape_generation.
        "speedup_vs_unbatched": dynamic["throughput_jobs_per_s"] / single["throughput_jobs_per_s"],
    }
