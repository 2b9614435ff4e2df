"""Looking at a job from every side: the API, the store's row and its events, and a competing writer."""
from __future__ import annotations

import sqlite3
import subprocess
import sys
import time
from contextlib import contextmanager
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from pb.orfeas.generation.v1 import generation_pb2 as pb

TERMINAL = (pb.JOB_STATUS_SUCCEEDED, pb.JOB_STATUS_FAILED, pb.JOB_STATUS_CANCELLED)
STATUS_NAMES = {"queued": pb.JOB_STATUS_QUEUED, "running": pb.JOB_STATUS_RUNNING, "succeeded": pb.JOB_STATUS_SUCCEEDED,
                "failed": pb.JOB_STATUS_FAILED, "cancelled": pb.JOB_STATUS_CANCELLED}


def database(data_dir: Path) -> Path:
    return data_dir / "generation.db"


@dataclass
class StoredJob:
    status: str
    attempts: int
    cancel_requested: bool
    started_at: float | None
    events: list[pb.GenerationEvent]


def stored_job(data_dir: Path, job_id: str) -> StoredJob | None:
    """The job as the store holds it, read with a connection of our own (WAL lets us read beside the service)."""
    db = sqlite3.connect(f"file:{database(data_dir)}?mode=ro", uri=True, timeout=10)
    db.row_factory = sqlite3.Row
    try:
        row = db.execute("SELECT * FROM jobs WHERE id=?", (job_id,)).fetchone()
        if row is None:
            return None
        events = []
        for (data,) in db.execute("SELECT data FROM events WHERE job_id=? ORDER BY seq", (job_id,)):
            event = pb.GenerationEvent()
            event.ParseFromString(data)
            events.append(event)
        flagged = bool(row["cancel_requested"]) if "cancel_requested" in row.keys() else False
        return StoredJob(row["status"], row["attempts"], flagged, row["started_at"], events)
    finally:
        db.close()


@contextmanager
def write_lock_held(data_dir: Path, seconds: float) -> Iterator[subprocess.Popen[str]]:
    """Another process (as a backup script or a sqlite3 shell would) holds the database's write lock."""
    script = (
        "import sqlite3, sys, time\n"
        "db = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
        "db.execute('BEGIN IMMEDIATE')\n"
        "print('locked', flush=True)\n"
        "time.sleep(float(sys.argv[2]))\n"
        "db.execute('ROLLBACK')\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script, str(database(data_dir)), str(seconds)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
    try:
        yield proc
    finally:
        proc.wait(timeout=seconds + 30)


def check_ended_consistently(stub, data_dir: Path, job_id: str) -> pb.Generation:
    """Exactly one terminal event, the last; the API, the row and that event agree. Returns the API's view."""
    api = stub.GetGeneration(pb.GetGenerationRequest(id=job_id), timeout=10)
    stored = stored_job(data_dir, job_id)
    assert stored is not None, f"{job_id}: no record"
    terminals = [e for e in stored.events if e.kind == pb.EVENT_KIND_TERMINAL]
    assert len(terminals) == 1, f"{job_id}: {len(terminals)} terminal events"
    assert stored.events[-1].kind == pb.EVENT_KIND_TERMINAL, f"{job_id}: events after the terminal one"
    assert [e.sequence for e in stored.events] == list(range(1, len(stored.events) + 1))
    assert api.status == STATUS_NAMES[stored.status] == terminals[0].outcome.status, (
        f"{job_id}: api {pb.JobStatus.Name(api.status)}, row {stored.status}, "
        f"event {pb.JobStatus.Name(terminals[0].outcome.status)}"
    )
    watched = list(stub.WatchGeneration(pb.WatchGenerationRequest(id=job_id), timeout=30))
    assert [e.SerializeToString() for e in watched] == [e.SerializeToString() for e in stored.events]
    return api


def wait_until(predicate, timeout_s: float = 60.0, interval_s: float = 0.05, what: str = "condition"):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")
