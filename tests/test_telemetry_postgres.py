"""Telemetry's history in PostgreSQL (TELEMETRY_DATABASE_URL): the service moves to another machine (another
DATA_DIR, a new process) and keeps what it learned, every instance's profiles and decisions, per worker
and in total. The same history as on SQLite, read back through the same gRPC answers."""
from __future__ import annotations

from pathlib import Path

import psycopg

from pb.orfeas.telemetry.v1 import telemetry_pb2 as tpb
from tests.postgres_fixtures import PostgresServer
from tests.telemetry_fixtures import MIB, TelemetryProcess, five_stages, profile

# Two generation instances, one worker each.
WORKERS = ("host-a:50051/cpu", "host-b:50051/cuda:0")


def _report(proc: TelemetryProcess) -> None:
    channel, stub = proc.stub()
    with channel:
        stub.ReportProfile(
            tpb.ReportProfileRequest(profiles=[
                profile("a1", "keep", five_stages(1, 1, 4, 2, 2), worker_id=WORKERS[0],
                        peaks={"shape_generation": 900 * MIB}),
                profile("a2", "keep", five_stages(1, 2, 6, 2, 1), worker_id=WORKERS[0]),
                profile("b1", "keep", five_stages(1, 1, 2, 1, 1), worker_id=WORKERS[1], device="cuda:0"),
            ]),
            timeout=10,
        )
        for worker in WORKERS:
            decision = stub.RecommendBatchSize(
                tpb.RecommendBatchSizeRequest(backend="keep", resolution=256, steps=50, queue_length=8,
                                              worker_id=worker, memory=tpb.MemorySnapshot(free_bytes=8192 * MIB)),
                timeout=10,
            )
            stub.RecordBatchOutcome(
                tpb.RecordBatchOutcomeRequest(decision_id=decision.decision_id, backend="keep", resolution=256,
                                              steps=50, batch_size=decision.size, out_of_memory=True,
                                              available_bytes=8192 * MIB),
                timeout=10,
            )


def _snapshot(proc: TelemetryProcess) -> list[object]:
    channel, stub = proc.stub()
    with channel:
        summaries = [
            stub.GetPerformanceSummary(tpb.GetPerformanceSummaryRequest(backend="keep", worker_id=w), timeout=10)
            for w in ("", *WORKERS)
        ]
        return [*summaries, stub.GetOptimizerState(tpb.GetOptimizerStateRequest(), timeout=10)]


def test_telemetry_on_postgres_moves_machines_and_keeps_every_instances_history(
    postgres: PostgresServer, tmp_path: Path
) -> None:
    url = postgres.database()
    first = TelemetryProcess(tmp_path / "machine-1", env={"TELEMETRY_DATABASE_URL": url}).start()
    try:
        _report(first)
        before = _snapshot(first)
    finally:
        first.kill()
    total, per_a, per_b, optimizer = before
    assert total.total_pipelines == 3 and [w.worker_id for w in total.workers] == sorted(WORKERS)
    assert (per_a.total_pipelines, per_b.total_pipelines) == (2, 1)
    assert len(optimizer.decisions) == 2 and optimizer.costs[0].oom_floor_bytes > 0

    # Another machine: nothing of the first one's DATA_DIR, only the database.
    second = TelemetryProcess(tmp_path / "machine-2", env={"TELEMETRY_DATABASE_URL": url}).start()
    try:
        after = _snapshot(second)
    finally:
        second.kill()
    assert after == before
    assert not list((tmp_path / "machine-2").glob("*.sqlite3"))
    with psycopg.connect(url) as conn:
        assert conn.execute("SELECT count(*) FROM profiles").fetchone() == (3,)
        assert conn.execute("SELECT count(DISTINCT worker_id) FROM decisions").fetchone() == (2,)
