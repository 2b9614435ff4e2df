"""Durable job records and their events, in SQLite (WAL) under DATA_DIR.

The store is the source of truth: the in-memory queue and event hubs are
rebuilt from it when the service starts, so a job accepted here is never
lost to a crash. It is used from the event loop's thread only; each write is
one short transaction.
"""
from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    request_id TEXT UNIQUE,
    payload_sha256 TEXT NOT NULL,
    status TEXT NOT NULL,
    params TEXT NOT NULL,
    stage TEXT NOT NULL DEFAULT '',
    progress REAL NOT NULL DEFAULT 0,
    stage_timings TEXT NOT NULL DEFAULT '{}',
    result TEXT,
    error_code TEXT,
    error_message TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    deadline REAL,
    cancel_on_disconnect INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL
);
CREATE INDEX IF NOT EXISTS jobs_created ON jobs (created_at DESC, id DESC);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs (status);
CREATE TABLE IF NOT EXISTS expired (
    id TEXT PRIMARY KEY,
    reason TEXT NOT NULL,
    expired_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS events (
    job_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    data BLOB NOT NULL,
    PRIMARY KEY (job_id, seq)
);
"""

ACTIVE_STATUSES = ("queued", "running")
TERMINAL_STATUSES = ("succeeded", "failed", "cancelled")


@dataclass
class JobRecord:
    id: str
    status: str  # queued, running, succeeded, failed, cancelled
    params: dict[str, Any]
    payload_sha256: str
    created_at: float
    request_id: str | None = None
    stage: str = ""
    progress: float = 0.0
    stage_timings: dict[str, float] = field(default_factory=dict)
    result: dict[str, Any] | None = None
    error_code: str | None = None
    error_message: str | None = None
    attempts: int = 0
    deadline: float | None = None
    cancel_on_disconnect: bool = False
    started_at: float | None = None
    finished_at: float | None = None

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL_STATUSES


class JobStore:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL mode survives a process crash (kill -9); only a power
        # loss can take back the last transactions.
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(SCHEMA)

    def close(self) -> None:
        self._db.close()

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """Group writes into one commit: a job's state and the event that reports it land together."""
        self._db.execute("BEGIN")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    # jobs -----------------------------------------------------------------
    def insert(self, job: JobRecord) -> None:
        self._db.execute(
            "INSERT INTO jobs (id, request_id, payload_sha256, status, params, attempts, deadline,"
            " cancel_on_disconnect, created_at) VALUES (?,?,?,?,?,?,?,?,?)",
            (
                job.id,
                job.request_id,
                job.payload_sha256,
                job.status,
                json.dumps(job.params),
                job.attempts,
                job.deadline,
                int(job.cancel_on_disconnect),
                job.created_at,
            ),
        )

    def update(self, job: JobRecord) -> None:
        self._db.execute(
            "UPDATE jobs SET status=?, stage=?, progress=?, stage_timings=?, result=?, error_code=?,"
            " error_message=?, attempts=?, started_at=?, finished_at=? WHERE id=?",
            (
                job.status,
                job.stage,
                job.progress,
                json.dumps(job.stage_timings),
                json.dumps(job.result) if job.result is not None else None,
                job.error_code,
                job.error_message,
                job.attempts,
                job.started_at,
                job.finished_at,
                job.id,
            ),
        )

    def get(self, job_id: str) -> JobRecord | None:
        row = self._db.execute("SELECT * FROM jobs WHERE id=?", (job_id,)).fetchone()
        return _record(row) if row else None

    def get_by_request_id(self, request_id: str) -> JobRecord | None:
        row = self._db.execute("SELECT * FROM jobs WHERE request_id=?", (request_id,)).fetchone()
        return _record(row) if row else None

    def list_page(
        self, limit: int, before: tuple[float, str] | None, status: str | None
    ) -> list[JobRecord]:
        """Newest first; `before` is the (created_at, id) of the last job of the previous page."""
        clauses: list[str] = []
        args: list[Any] = []
        if before is not None:
            clauses.append("(created_at < ? OR (created_at = ? AND id < ?))")
            args += [before[0], before[0], before[1]]
        if status is not None:
            clauses.append("status = ?")
            args.append(status)
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        rows = self._db.execute(
            f"SELECT * FROM jobs {where} ORDER BY created_at DESC, id DESC LIMIT ?", (*args, limit)
        ).fetchall()
        return [_record(r) for r in rows]

    def active(self) -> list[JobRecord]:
        """Jobs a restart must pick up, oldest first (the queue order)."""
        rows = self._db.execute(
            "SELECT * FROM jobs WHERE status IN ('queued','running') ORDER BY created_at, id"
        ).fetchall()
        return [_record(r) for r in rows]

    def expired(self, older_than: float) -> list[str]:
        rows = self._db.execute(
            "SELECT id FROM jobs WHERE status IN ('succeeded','failed','cancelled') AND finished_at < ?",
            (older_than,),
        ).fetchall()
        return [r["id"] for r in rows]

    def finished_oldest_first(self) -> list[tuple[str, float]]:
        rows = self._db.execute(
            "SELECT id, finished_at FROM jobs WHERE status IN ('succeeded','failed','cancelled')"
            " ORDER BY finished_at, id"
        ).fetchall()
        return [(r["id"], r["finished_at"]) for r in rows]

    def expire(self, job_id: str, reason: str, at: float) -> None:
        """Delete a job's record and events, leaving a tombstone that says why."""
        self._db.execute("BEGIN")
        self._db.execute("DELETE FROM events WHERE job_id=?", (job_id,))
        self._db.execute("DELETE FROM jobs WHERE id=?", (job_id,))
        self._db.execute("INSERT OR REPLACE INTO expired (id, reason, expired_at) VALUES (?,?,?)", (job_id, reason, at))
        self._db.execute("COMMIT")

    def tombstone(self, job_id: str) -> tuple[str, float] | None:
        row = self._db.execute("SELECT reason, expired_at FROM expired WHERE id=?", (job_id,)).fetchone()
        return (row["reason"], row["expired_at"]) if row else None

    # events ---------------------------------------------------------------
    def append_event(self, job_id: str, seq: int, data: bytes) -> None:
        self._db.execute("INSERT OR REPLACE INTO events (job_id, seq, data) VALUES (?,?,?)", (job_id, seq, data))

    def events(self, job_id: str) -> list[bytes]:
        rows = self._db.execute("SELECT data FROM events WHERE job_id=? ORDER BY seq", (job_id,)).fetchall()
        return [bytes(r["data"]) for r in rows]

    def counts(self) -> dict[str, int]:
        rows = self._db.execute("SELECT status, COUNT(*) AS n FROM jobs GROUP BY status").fetchall()
        return {r["status"]: r["n"] for r in rows}


def _record(row: sqlite3.Row) -> JobRecord:
    return JobRecord(
        id=row["id"],
        request_id=row["request_id"],
        payload_sha256=row["payload_sha256"],
        status=row["status"],
        params=json.loads(row["params"]),
        stage=row["stage"],
        progress=row["progress"],
        stage_timings=json.loads(row["stage_timings"]),
        result=json.loads(row["result"]) if row["result"] else None,
        error_code=row["error_code"],
        error_message=row["error_message"],
        attempts=row["attempts"],
        deadline=row["deadline"],
        cancel_on_disconnect=bool(row["cancel_on_disconnect"]),
        created_at=row["created_at"],
        started_at=row["started_at"],
        finished_at=row["finished_at"],
    )


def now() -> float:
    return time.time()
