"""Device scaling: the same burst of jobs against one worker and against N workers.

    .venv/bin/python -m bench.devices            # this suite alone; its section of bench/RESULTS.md
    .venv/bin/python -m bench.run --suites devices

Two stacks stay up side by side, GENERATION_DEVICES set to one device and to
N; the bursts alternate between them (one, N, one, N, ...) so drift in the
machine's load hits both alike, and the medians are compared.

- On a CUDA machine with N ≥ 2 devices: `cuda:0` against `cuda:0,...,cuda:N-1`.
  The target is a throughput of at least 0.9 × N × the one-device figure.
- Without CUDA (or with one GPU): two workers on the same device, `cpu,cpu`
  (or `cuda:0,cuda:0`). They share the same cores, so this shows what a second
  worker costs and how fairly the two share a burst; it is not a speed-up
  and no target applies.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections import Counter
from contextlib import ExitStack
from typing import Any

import httpx
import torch

from bench.common import (
    BENCH_DIR,
    generate_via_gateway,
    log_records,
    machine,
    machine_line,
    median,
    own_stack,
    percentile,
    photo_png,
    write_section,
)

SCALING_TARGET = 0.9
SECTION_TITLE = "## Device scaling (GENERATION_DEVICES)"


def device_lists() -> tuple[str, str, bool]:
    """(one worker, N workers, whether the N are distinct devices) for this machine."""
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count >= 2:
        return "cuda:0", ",".join(f"cuda:{i}" for i in range(count)), True
    one = "cuda:0" if count == 1 else "cpu"
    return one, f"{one},{one}", False


async def _burst(stack: Any, image: bytes, jobs: int, params: dict[str, Any]) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=stack.gateway_url, limits=httpx.Limits(max_connections=4 * jobs)) as client:
        started = time.perf_counter()
        runs = await asyncio.gather(*(generate_via_gateway(client, image, params) for _ in range(jobs)))
        wall = time.perf_counter() - started
    ok = [r for r in runs if r.status == "succeeded" and r.result_bytes]
    ids = {r.job_id for r in ok}
    finished = [e for e in log_records(stack.log_dir / "generation.log", "job finished") if e.get("job_id") in ids]
    per_worker = Counter(str(e.get("worker_id", "?")).rsplit("/", 1)[-1] for e in finished)
    return {
        "jobs": jobs,
        "succeeded": len(ok),
        "wall_s": wall,
        "throughput_jobs_per_s": len(ok) / wall if wall else float("nan"),
        "p50_s": percentile([r.total_s for r in ok], 50),
        "p95_s": percentile([r.total_s for r in ok], 95),
        "jobs_per_worker": dict(sorted(per_worker.items())),
        "errors": sorted({f"{r.http_status} {r.status} {r.error}" for r in runs if r not in ok}),
    }


def _mode(name: str, devices: str, bursts: list[dict[str, Any]]) -> dict[str, Any]:
    workers = len(devices.split(","))
    shares = []
    for b in bursts:
        counts = [b["jobs_per_worker"].get(w, 0) for w in sorted(b["jobs_per_worker"])] or [0]
        counts += [0] * (workers - len(counts))
        # Fairness: the least-loaded worker's jobs over the most-loaded one's (1.0: an even split).
        shares.append(min(counts) / max(counts) if max(counts) else float("nan"))
    return {
        "mode": name,
        "devices": devices,
        "workers": workers,
        "bursts": bursts,
        "throughput_jobs_per_s": median([b["throughput_jobs_per_s"] for b in bursts]),
        "wall_s": median([b["wall_s"] for b in bursts]),
        "p50_s": median([b["p50_s"] for b in bursts]),
        "p95_s": median([b["p95_s"] for b in bursts]),
        "balance": median(shares),
        "succeeded": sum(b["succeeded"] for b in bursts),
        "jobs": sum(b["jobs"] for b in bursts),
    }


async def _measure(stacks: dict[str, Any], jobs: int, repeats: int, params: dict[str, Any]) -> dict[str, list]:
    image = photo_png()
    for stack in stacks.values():  # warm-up: weights, imports, the optimizer's first measurements
        async with httpx.AsyncClient(base_url=stack.gateway_url) as client:
            await asyncio.gather(*(generate_via_gateway(client, image, params) for _ in range(4)))
    bursts: dict[str, list] = {name: [] for name in stacks}
    for _ in range(repeats):
        for name, stack in stacks.items():
            bursts[name].append(await _burst(stack, image, jobs, params))
    return bursts


def run(jobs: int = 32, repeats: int = 3, params: dict[str, Any] | None = None) -> dict[str, Any]:
    params = params or {}
    one, many, distinct = device_lists()
    modes = {"1 worker": one, f"{len(many.split(','))} workers": many}
    with ExitStack() as stacks:
        running = {
            name: stacks.enter_context(own_stack(f"devices-{len(spec.split(','))}", GENERATION_DEVICES=spec))
            for name, spec in modes.items()
        }
        bursts = asyncio.run(_measure(running, jobs, repeats, params))
    results = [_mode(name, modes[name], bursts[name]) for name in modes]
    single, multi = results
    scaling = multi["throughput_jobs_per_s"] / single["throughput_jobs_per_s"]
    return {
        "params": params or "defaults",
        "jobs": jobs,
        "repeats": repeats,
        "distinct_devices": distinct,
        "modes": results,
        "scaling": scaling,
        # Per worker, against one worker alone: 1.0 is perfect scaling.
        "efficiency": scaling / multi["workers"],
        "target": SCALING_TARGET if distinct else None,
        "what_it_shows": (
            f"{multi['workers']} devices against one: the ≥ {SCALING_TARGET} × N target applies"
            if distinct
            else f"two workers sharing one device ({one}): the overhead of a second worker and the fairness "
            "of the split, not a speed-up (on the CPU they compete for the same cores and the one interpreter's "
            "lock, each with its own stage threads, so a second worker costs throughput there)"
        ),
    }


def summary_rows(dev: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    single, multi = dev["modes"]
    n = multi["workers"]
    rows = [
        (f"throughput, {dev['jobs']} jobs at once, {single['devices']}", f"{single['throughput_jobs_per_s']:.2f} jobs/s", "", ""),
        (f"throughput, {dev['jobs']} jobs at once, {multi['devices']}", f"{multi['throughput_jobs_per_s']:.2f} jobs/s", "", ""),
    ]
    if dev["target"] is not None:
        wanted = dev["target"] * n
        rows.append((f"device scaling, {n} devices / 1", f"{dev['scaling']:.2f}×", f"≥ {wanted:.1f}×",
                     "yes" if dev["scaling"] >= wanted else "**no**"))
    else:
        rows.append((f"{n} workers on one device / 1 worker (overhead, not a speed-up)", f"{dev['scaling']:.2f}×", "", ""))
    rows.append((f"balance between the {n} workers (least / most jobs per burst)", f"{multi['balance']:.2f}", "", ""))
    return rows


def markdown(dev: dict[str, Any], command: str | None = None, machine_line: str | None = None) -> list[str]:
    from bench.common import fmt_s
    from bench.report import table

    rows = []
    for m in dev["modes"]:
        split = " / ".join(
            ", ".join(f"{w}: {n}" for w, n in b["jobs_per_worker"].items()) for b in m["bursts"]
        )
        rows.append(
            (
                m["devices"],
                f"{m['succeeded']}/{m['jobs']}",
                f"{m['wall_s']:.2f} s",
                f"{m['throughput_jobs_per_s']:.2f}",
                fmt_s(m["p50_s"]),
                fmt_s(m["p95_s"]),
                f"{m['balance']:.2f}",
                split,
            )
        )
    errors = sorted({e for m in dev["modes"] for b in m["bursts"] for e in b["errors"]})
    lines = [SECTION_TITLE, ""]
    if command:
        lines += [f"Command: `{command}`", ""]
    if machine_line:
        lines += [f"Machine: {machine_line}", ""]
    return lines + [
        (f"{dev['jobs']} jobs submitted at once through the gateway, {dev['repeats']} bursts per side, the sides "
         f"alternating; medians over the bursts (params: {dev['params']})."),
        "",
        table(rows, ("GENERATION_DEVICES", "ok", "wall", "jobs/s", "p50", "p95", "balance", "jobs per worker, each burst")),
        "",
        (f"Throughput ratio {dev['modes'][1]['devices']} / {dev['modes'][0]['devices']}: **{dev['scaling']:.2f}×** "
         f"({dev['efficiency']:.2f} per worker). What it shows: {dev['what_it_shows']}. Balance is the least-loaded "
         "worker's jobs over the most-loaded one's, median over the bursts (1.00: an even split)."),
        "",
    ] + ([f"Errors: {errors}", ""] if errors else [])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    line = machine_line()
    result = run(args.jobs, args.repeats)
    command = ".venv/bin/python -m bench.devices" + (f" --jobs {args.jobs}" if args.jobs != 32 else "") + (
        f" --repeats {args.repeats}" if args.repeats != 3 else ""
    )
    section = "\n".join(markdown(result, command, line))
    print(section)
    for row in summary_rows(result):
        print(" | ".join(row))
    if not args.no_write:
        write_section(BENCH_DIR / "RESULTS.md", SECTION_TITLE, section)
        (BENCH_DIR / "out").mkdir(exist_ok=True)
        (BENCH_DIR / "out" / "results-devices.json").write_text(
            json.dumps({"machine": machine(), "devices": result}, indent=2, default=str) + "\n"
        )


if __name__ == "__main__":
    main()
