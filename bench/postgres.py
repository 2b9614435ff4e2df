"""Several instances on PostgreSQL against one on SQLite (issue 12).

    .venv/bin/python -m bench.postgres           # this suite alone; its section of bench/RESULTS.md
    .venv/bin/python -m bench.run --suites postgres

A private PostgreSQL (services/postgres_local.py, Debian's server) in a temporary folder, then:

1. **Per-job overhead of the store.** A job's whole life as the store sees it, in process, through the
   real job managers: submit, claim, the stage events a default inflate job commits (18 events in 15
   transactions), success; the pipeline's compute left out. SQLite (JobManager) against PostgreSQL
   (ClusterJobManager, its notices, heartbeat and housekeeping running). Target: at most 5 ms more per job.
2. **Event latency, commit to SSE client.** Jobs through a two-instance stack's gateway, each followed over
   SSE; an event's latency is when the client read it minus the `time` stamped on it in the transaction
   that commits it. Target: p50 at most 20 ms.
3. **Submit rate and claim latency, 10,000 jobs queued against an empty queue.** In process on the
   PostgreSQL store: submissions one after another, then claims of a batch of 8. Target: within 1.5x.
4. **Throughput, 1 and 2 instances.** The same burst through the gateway of a one-instance stack on SQLite,
   one on PostgreSQL and a two-instance one on PostgreSQL. On a two-core machine the two instances share
   the cores: this is the cost of running two, not a speed-up.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psycopg

from bench.common import BENCH_DIR, LOG_DIR, fmt_s, machine, machine_line, median, percentile, photo_png, write_section
from services.stack import ROOT, Stack, free_port

SECTION_TITLE = "## Several instances on PostgreSQL (issue 12)"
OVERHEAD_TARGET_S = 0.005
EVENT_P50_TARGET_S = 0.020
QUEUED_RATIO_TARGET = 1.5
# A default job's commits after its submission: the claim (image_preprocessing started), then these.
JOB_STAGE_EVENTS = (
    ("image_preprocessing", "completed"),
    ("shape_generation", "started"),
    *[("shape_generation", "progress")] * 5,
    ("shape_generation", "completed"),
    ("texture_synthesis", "started"),
    ("texture_synthesis", "completed"),
    ("mesh_export", "started"),
    ("mesh_export", "completed"),
)
RESULT = {"vertices": 1, "faces": 1, "watertight": True, "volume": 1.0, "extents": [1, 1, 1],
          "sizes": {"glb": 1}, "sha256": {"glb": "0" * 64}, "source_sha256": "0" * 64}


# ------------------------------------------------------------------ a private PostgreSQL
@dataclass
class Server:
    url: str
    proc: subprocess.Popen[bytes]
    folder: Path

    def database(self) -> str:
        name = f"b_{uuid.uuid4().hex[:10]}"
        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return self.url.rsplit("/", 1)[0] + f"/{name}"


@contextmanager
def private_postgres() -> Iterator[Server]:
    from services.postgres_local import LocalPostgres

    folder = Path(tempfile.mkdtemp(prefix="orfeas-bench-pg-", dir="/tmp"))
    folder.chmod(0o755)
    local = LocalPostgres(folder / "cluster", free_port())
    local.prepare()
    env = {"ORFEAS_POSTGRES_FOLDER": str(local.folder), "ORFEAS_POSTGRES_PORT": str(local.port)}
    log = open(folder / "postgres.log", "ab")  # noqa: SIM115 - the child keeps it
    proc = subprocess.Popen([sys.executable, "-m", "services.postgres_local"], cwd=ROOT,
                            env={**__import__("os").environ, **env}, stdout=log, stderr=log)
    log.close()
    try:
        for _ in range(300):
            try:
                with psycopg.connect(local.url, connect_timeout=1):
                    break
            except psycopg.OperationalError:
                time.sleep(0.1)
        yield Server(local.url, proc, folder)
    finally:
        proc.send_signal(2)
        proc.wait(30)
        shutil.rmtree(folder, ignore_errors=True)


# ------------------------------------------------------------------ 1 and 3: in process
async def _managers(kind: str, url: str, folder: Path, queue_limit: int) -> tuple[Any, Any]:
    from services.generation.artifacts import ArtifactStore
    from services.generation.cluster_jobs import ClusterJobManager, batch_key_text
    from services.generation.job_store import JobStore
    from services.generation.jobs import JobManager
    from services.generation.pg_store import PgJobStore

    artifacts = ArtifactStore(folder / "artifacts")
    if kind == "sqlite":
        store = JobStore(folder / "generation.db")
        await store.open()
        return store, JobManager(store, artifacts, queue_limit, 2)
    pg = PgJobStore(url, origin="bench:1", batch_key_of=batch_key_text)
    await pg.open()
    return pg, ClusterJobManager(pg, artifacts, queue_limit, 2, instance="bench:1", lease_s=30.0)


async def _job_life(manager: Any, params: Any, image: bytes, loaded: Any) -> None:
    record = await manager.submit(params, image, "sha", loaded, 0.01)
    (job,) = await manager.take_batch(params, 1, uuid.uuid4().hex, "bench:1/cpu", "cpu")
    assert job.id == record.id
    for stage, state in JOB_STAGE_EVENTS:
        await manager.emit_stage(job, stage, state, 1.0 if state == "completed" else 0.5, 0.01)
    assert await manager.finish(job, "succeeded", result=RESULT)


async def _store_overhead(url: str, jobs: int, unflushed_url: str) -> dict[str, Any]:
    from services.generation.pipeline.image_loading import load_image
    from services.generation.pipeline.params import GenerationParams

    image = photo_png(side=64)
    loaded = load_image(image)
    params = GenerationParams()
    out: dict[str, Any] = {}
    # Twice each, alternating: drift hits all alike. "unflushed": the same PostgreSQL code on a database
    # whose commits do not wait for their WAL to reach the disk (synchronous_commit=off), to show what
    # the flush of every commit costs; not the default, and not the target's figure.
    for kind in ("sqlite", "postgres", "unflushed", "sqlite", "postgres", "unflushed"):
        with tempfile.TemporaryDirectory(prefix="orfeas-bench-store-") as tmp:
            store, manager = await _managers(
                "sqlite" if kind == "sqlite" else "postgres", unflushed_url if kind == "unflushed" else url,
                Path(tmp), jobs + 10,
            )
            manager.start()
            for _ in range(5):  # warm-up: connections, caches
                await _job_life(manager, params, image, loaded)
            times = []
            for _ in range(jobs):
                started = time.perf_counter()
                await _job_life(manager, params, image, loaded)
                times.append(time.perf_counter() - started)
            await manager.close()
            await store.close()
        out.setdefault(kind, []).extend(times)
    sqlite, pg = median(out["sqlite"]), median(out["postgres"])
    return {
        "jobs": jobs,
        "transactions_per_job": 2 + len(JOB_STAGE_EVENTS) + 1,
        "sqlite_per_job_s": sqlite,
        "postgres_per_job_s": pg,
        "sqlite_p95_s": percentile(out["sqlite"], 95),
        "postgres_p95_s": percentile(out["postgres"], 95),
        "overhead_s": pg - sqlite,
        "unflushed_per_job_s": median(out["unflushed"]),
        "unflushed_overhead_s": median(out["unflushed"]) - sqlite,
        "target_s": OVERHEAD_TARGET_S,
    }


async def _queue_scaling(url: str, samples: int, backlog: int) -> dict[str, Any]:
    """Submit and claim latency with an empty queue and with `backlog` jobs waiting."""
    from services.generation import jobs as jobs_module
    from services.generation.pipeline.image_loading import load_image
    from services.generation.pipeline.params import GenerationParams

    image = photo_png(side=64)
    loaded = load_image(image)
    params = GenerationParams()
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="orfeas-bench-queue-") as tmp:
        store, manager = await _managers("postgres", url, Path(tmp), backlog + samples + 100)
        manager.start()
        for label in ("empty", "queued"):
            if label == "queued":
                # The backlog goes in as the service would put it (one admission each), in bulk for speed.
                records = []
                for _ in range(backlog):
                    record = jobs_module._new_record(params, "backlog", 0.01, "", None, False)
                    records.append(record)
                await _bulk_queue(store, records)
            submits, claims = [], []
            for _ in range(samples):
                started = time.perf_counter()
                await manager.submit(params, image, "sha", loaded, 0.01)
                submits.append(time.perf_counter() - started)
            for _ in range(samples // 8):
                started = time.perf_counter()
                batch = await manager.take_batch(params, 8, uuid.uuid4().hex, "bench:1/cpu", "cpu")
                claims.append(time.perf_counter() - started)
                # Up to 8: SKIP LOCKED passes over queued rows another transaction holds at that moment (the
                # instance's own queue-position update, which follows a claim), as a claim in service does.
                assert batch, "a claim found no queued job"
                for job in batch:  # out of the way, so the next claim takes queued ones
                    await manager.finish(job, "succeeded", result=RESULT)
            results[label] = {
                "queued_before": 0 if label == "empty" else backlog,
                "submit_p50_s": median(submits),
                "submits_per_s": 1 / median(submits),
                "claim_p50_s": median(claims),
                "claim_p95_s": percentile(claims, 95),
            }
        await manager.close()
        await store.close()
    results["submit_ratio"] = results["queued"]["submit_p50_s"] / results["empty"]["submit_p50_s"]
    results["claim_ratio"] = results["queued"]["claim_p50_s"] / results["empty"]["claim_p50_s"]
    results["target_ratio"] = QUEUED_RATIO_TARGET
    return results


async def _bulk_queue(store: Any, records: list[Any]) -> None:
    from services.generation.cluster_jobs import batch_key_text
    from services.generation.pg_store import COLUMNS, _values

    async def run(conn: Any) -> None:
        async with conn.cursor() as cursor:
            await cursor.executemany(
                f"INSERT INTO jobs ({', '.join(COLUMNS)}, batch_key, last_seq) VALUES"
                f" ({', '.join(f'%({c})s' for c in COLUMNS)}, %(batch_key)s, 0)",
                [{**_values(r), "batch_key": batch_key_text(r.params)} for r in records],
            )
        await conn.execute("ANALYZE jobs")

    await store._run(run)


# ------------------------------------------------------------------ 2 and 4: stacks
@contextmanager
def stack(name: str, instances: int, database_url: str) -> Iterator[Stack]:
    log_dir = LOG_DIR / name
    shutil.rmtree(log_dir, ignore_errors=True)
    with tempfile.TemporaryDirectory(prefix=f"orfeas-bench-{name}-") as tmp:
        first = free_port()
        while True:  # instances on consecutive ports
            try:
                import socket

                with socket.socket() as s:
                    s.bind(("127.0.0.1", first + 1))
                break
            except OSError:
                first = free_port()
        s = Stack(
            gateway_port=free_port(), generation_port=first, telemetry_port=free_port(),
            generation_metrics_port=0, telemetry_metrics_port=0, data_dir=Path(tmp) / "data",
            extra_env={"GENERATION_EXPORT_PROCESSES": "1"}, log_dir=log_dir,
            generation_instances=instances, database_url=database_url,
        )
        s.start_all()
        try:
            yield s
        finally:
            s.stop_all()


async def _follow(client: httpx.AsyncClient, image: bytes, params: dict[str, Any]) -> tuple[list[float], bool]:
    """Submit, read the SSE stream; each event's latency from its commit (its `time`) to now."""
    response = await client.post("/api/v1/generations", files={"image": ("p.png", image, "image/png")},
                                 data={k: str(v) for k, v in params.items()}, timeout=60)
    if response.status_code != 202:
        return [], False
    latencies: list[float] = []
    name = ""
    async with client.stream("GET", f"/api/v1/generations/{response.json()['id']}/events", timeout=300) as r:
        async for line in r.aiter_lines():
            now = time.time()
            if line.startswith("event:"):
                name = line[6:].strip()
            elif line.startswith("data:"):
                stamped = json.loads(line[5:]).get("time")
                if stamped:
                    latencies.append(now - _epoch(stamped))
            if name in ("succeeded", "failed", "cancelled") and line == "":
                return latencies, name == "succeeded"
    return latencies, False


def _epoch(stamp: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(stamp).timestamp()


async def _burst(url: str, jobs: int, params: dict[str, Any], live_only: bool) -> dict[str, Any]:
    image = photo_png()
    async with httpx.AsyncClient(base_url=url, limits=httpx.Limits(max_connections=4 * jobs)) as client:
        started = time.perf_counter()
        runs = await asyncio.gather(*(_follow(client, image, params) for _ in range(jobs)))
        wall = time.perf_counter() - started
    ok = sum(1 for _, succeeded in runs if succeeded)
    # The first events (replayed from the past when the stream opens) are not live: leave them out.
    latencies = [x for lat, _ in runs for x in (lat[3:] if live_only else lat)]
    return {"jobs": jobs, "succeeded": ok, "wall_s": wall, "throughput_jobs_per_s": ok / wall, "latencies": latencies}


def _stacks(server: Server, jobs: int, repeats: int, params: dict[str, Any]) -> dict[str, Any]:
    modes = {"1 instance, SQLite": (1, ""), "1 instance, PostgreSQL": (1, "pg"), "2 instances, PostgreSQL": (2, "pg")}
    out: dict[str, Any] = {}
    for name, (instances, db) in modes.items():
        with stack(f"postgres-{instances}-{db or 'sqlite'}", instances, server.database() if db else "") as s:
            asyncio.run(_burst(s.gateway_url, 4, params, True))  # warm-up
            bursts = [asyncio.run(_burst(s.gateway_url, jobs, params, True)) for _ in range(repeats)]
        latencies = [x for b in bursts for x in b["latencies"]]
        out[name] = {
            "instances": instances,
            "store": "PostgreSQL" if db else "SQLite",
            "succeeded": sum(b["succeeded"] for b in bursts),
            "jobs": jobs * repeats,
            "throughput_jobs_per_s": median([b["throughput_jobs_per_s"] for b in bursts]),
            "wall_s": median([b["wall_s"] for b in bursts]),
            "event_latency_p50_s": percentile(latencies, 50),
            "event_latency_p95_s": percentile(latencies, 95),
            "events": len(latencies),
        }
    return out


def run(jobs: int = 16, repeats: int = 3, store_jobs: int = 200, backlog: int = 10_000, samples: int = 200,
        params: dict[str, Any] | None = None) -> dict[str, Any]:
    params = params or {"resolution": 128, "steps": 30, "face_count": 4000, "texture_size": 256}
    with private_postgres() as server:
        unflushed = server.database()
        with psycopg.connect(unflushed, autocommit=True) as conn:
            conn.execute(f"ALTER DATABASE {unflushed.rsplit('/', 1)[1]} SET synchronous_commit = off")
        overhead = asyncio.run(_store_overhead(server.database(), store_jobs, unflushed))
        queue = asyncio.run(_queue_scaling(server.database(), samples, backlog))
        stacks = _stacks(server, jobs, repeats, params)
    two = stacks["2 instances, PostgreSQL"]
    return {
        "params": params,
        "burst_jobs": jobs,
        "repeats": repeats,
        "overhead": overhead,
        "queue": queue,
        "stacks": stacks,
        "event_latency_p50_s": two["event_latency_p50_s"],
        "event_latency_p95_s": two["event_latency_p95_s"],
        "scaling": two["throughput_jobs_per_s"] / stacks["1 instance, PostgreSQL"]["throughput_jobs_per_s"],
    }


def _met(ok: bool) -> str:
    return "yes" if ok else "**no**"


def summary_rows(pg: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    o, q, s = pg["overhead"], pg["queue"], pg["stacks"]
    rows = [
        ("store overhead per job, PostgreSQL − SQLite", fmt_s(o["overhead_s"]), f"≤ {fmt_s(o['target_s'])}",
         _met(o["overhead_s"] <= o["target_s"])),
        ("event latency commit → SSE client, p50 (2 instances)", fmt_s(pg["event_latency_p50_s"]),
         f"≤ {fmt_s(EVENT_P50_TARGET_S)}", _met(pg["event_latency_p50_s"] <= EVENT_P50_TARGET_S)),
        ("event latency commit → SSE client, p95 (2 instances)", fmt_s(pg["event_latency_p95_s"]), "", ""),
        (f"submit, {q['queued']['queued_before']:,} queued / empty", f"{q['submit_ratio']:.2f}×",
         f"≤ {QUEUED_RATIO_TARGET}×", _met(q["submit_ratio"] <= QUEUED_RATIO_TARGET)),
        (f"claim of 8, {q['queued']['queued_before']:,} queued / empty", f"{q['claim_ratio']:.2f}×",
         f"≤ {QUEUED_RATIO_TARGET}×", _met(q["claim_ratio"] <= QUEUED_RATIO_TARGET)),
    ]
    for name, m in s.items():
        rows.append((f"throughput, {name}", f"{m['throughput_jobs_per_s']:.2f} jobs/s", "", ""))
    return rows


def markdown(pg: dict[str, Any], command: str | None = None, line: str | None = None) -> list[str]:
    from bench.report import table

    o, q, s = pg["overhead"], pg["queue"], pg["stacks"]
    lines = [SECTION_TITLE, ""]
    if command:
        lines += [f"Command: `{command}`", ""]
    if line:
        lines += [f"Machine: {line}", ""]
    lines += [
        "### Per-job overhead of the store",
        "",
        (f"A job's life as the store sees it, through the real job managers, {o['jobs']} jobs per side, two runs "
         f"per side alternating, medians: submit, claim, the stage events of a default inflate job, success "
         f"({o['transactions_per_job']} transactions, 18 events); no compute."),
        "",
        table([
            ("SQLite (JobManager)", fmt_s(o["sqlite_per_job_s"]), fmt_s(o["sqlite_p95_s"])),
            ("PostgreSQL (ClusterJobManager)", fmt_s(o["postgres_per_job_s"]), fmt_s(o["postgres_p95_s"])),
            ("PostgreSQL, every commit unflushed (database-wide synchronous_commit=off, for reference)",
             fmt_s(o["unflushed_per_job_s"]), ""),
        ], ("store", "per job, p50", "p95")),
        "",
        (f"Overhead: **{fmt_s(o['overhead_s'])} per job** (target ≤ {fmt_s(o['target_s'])}). Every change of "
         "a job's state (admission, claim, cancel, its end) waits for its WAL to reach the disk, so a job "
         "accepted is never lost, even to a power cut; a running job's progress rows (its stage events, 12 "
         "of the 15 commits) do not wait (synchronous_commit=off for that transaction alone, see pg_store.py), "
         "and the next state change's flush carries them. SQLite in WAL mode with synchronous=NORMAL flushes "
         f"at checkpoints only. With no commit flushed the overhead would be {fmt_s(o['unflushed_overhead_s'])}. "
         "The rest is the round trips (a running job's stage event is one statement; submission and claim are "
         "short transactions) and the notice each commit sends to every instance."),
        "",
        f"### A queue of {q['queued']['queued_before']:,}",
        "",
        table([
            (label, f"{v['queued_before']:,}", fmt_s(v["submit_p50_s"]), f"{v['submits_per_s']:.0f}",
             fmt_s(v["claim_p50_s"]), fmt_s(v["claim_p95_s"]))
            for label, v in ((k, q[k]) for k in ("empty", "queued"))
        ], ("queue", "jobs waiting", "submit p50", "submits/s", "claim of 8, p50", "p95")),
        "",
        (f"Ratios with the backlog: submit **{q['submit_ratio']:.2f}×**, claim **{q['claim_ratio']:.2f}×** "
         f"(target ≤ {QUEUED_RATIO_TARGET}×)."),
        "",
        "### Through the gateway: event latency and throughput",
        "",
        (f"{pg['burst_jobs']} jobs submitted at once and each followed over SSE, {pg['repeats']} bursts per "
         f"stack, medians (params {pg['params']}). Event latency: the client's clock when it read an event minus "
         "the `time` stamped on the event in the transaction that committed it (same machine, same clock); the "
         "first three events of each stream (replayed when it opens) are left out."),
        "",
        table([
            (name, f"{m['succeeded']}/{m['jobs']}", f"{m['throughput_jobs_per_s']:.2f}", f"{m['wall_s']:.2f} s",
             fmt_s(m["event_latency_p50_s"]), fmt_s(m["event_latency_p95_s"]), str(m["events"]))
            for name, m in s.items()
        ], ("stack", "ok", "jobs/s", "wall", "event p50", "event p95", "events")),
        "",
        (f"Two instances / one on PostgreSQL: **{pg['scaling']:.2f}×**; one instance on PostgreSQL / on SQLite: "
         f"**{s['1 instance, PostgreSQL']['throughput_jobs_per_s'] / s['1 instance, SQLite']['throughput_jobs_per_s']:.2f}×**. "
         "On this two-core machine both instances, their stage threads and PostgreSQL itself share the same two "
         "cores, so the first ratio is not the scaling of two machines (a second instance only fills the gaps "
         "the first leaves while it waits), and the second is the store's whole cost where the database competes "
         "with the jobs for the CPU. With a GPU (or a machine) per instance, each brings its own device."),
        "",
    ]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--store-jobs", type=int, default=200)
    parser.add_argument("--backlog", type=int, default=10_000)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    line = machine_line()
    result = run(args.jobs, args.repeats, args.store_jobs, args.backlog)
    section = "\n".join(markdown(result, ".venv/bin/python -m bench.postgres", line))
    print(section)
    for row in summary_rows(result):
        print(" | ".join(row))
    if not args.no_write:
        write_section(BENCH_DIR / "RESULTS.md", SECTION_TITLE, section)
        (BENCH_DIR / "out").mkdir(exist_ok=True)
        (BENCH_DIR / "out" / "results-postgres.json").write_text(
            json.dumps({"machine": machine(), "postgres": result}, indent=2, default=str) + "\n"
        )


if __name__ == "__main__":
    main()
