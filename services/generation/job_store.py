"""Durable job records and their events, in SQLite (WAL) under DATA_DIR.

The store is the source of truth: memory, watchers and metrics change only
after a transaction here has committed, and the in-memory queue is rebuilt
from it when the service starts, so a job accepted here is never lost.

SQLite never runs on the event loop. Writes go through one dedicated thread
and one connection, so they are serialised in the order they were asked for;
reads use a second connection on a second thread, so status calls are not
stuck behind a write that waits for another process's lock (WAL lets readers
and a writer overlap). A write that finds the database locked by another
process retries for up to `lock_wait_s`, and every transaction rolls back
when anything in it fails, so a failure never leaves a transaction open.
"""
from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

# The records and transitions live in store.py (shared with the PostgreSQL store); imported from here too.
from services.generation.store import (  # noqa: F401 - re-exported
    ACTIVE_STATUSES,
    TERMINAL_STATUSES,
    Applied,
    Change,
    Event,
    JobRecord,
    StoreUnavailable,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

# Each entry moves the schema from version i to i + 1 (PRAGMA user_version).
MIGRATIONS: tuple[str, ...] = (
    """
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
    """,
    # The life-cycle's flags: a committed cancel, the claim that runs the job, and a version per change.
    """
    ALTER TABLE jobs ADD COLUMN cancel_requested INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE jobs ADD COLUMN claim_token TEXT;
    ALTER TABLE jobs ADD COLUMN version INTEGER NOT NULL DEFAULT 0;
    """,
    # Which worker runs (or ran) the job, and on which device: set by the claim, cleared by a requeue.
    """
    ALTER TABLE jobs ADD COLUMN worker_id TEXT;
    ALTER TABLE jobs ADD COLUMN device TEXT;
    """,
)

JOB_COLUMNS = (
    "id", "request_id", "payload_sha256", "status", "params", "stage", "progress", "stage_timings", "result",
    "error_code", "error_message", "attempts", "deadline", "cancel_on_disconnect", "created_at", "started_at",
    "finished_at", "cancel_requested", "claim_token", "version", "worker_id", "device",
)  # fmt: skip


class JobStore:
    """The SQLite implementation of services/generation/store.py's JobStore."""

    def __init__(self, path: Path, lock_wait_s: float = 30.0, busy_timeout_ms: int = 250) -> None:
        self.path = path
        self.lock_wait_s = lock_wait_s
        self.busy_timeout_ms = busy_timeout_ms
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="store-write")
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="store-read")
        self._write_db: sqlite3.Connection | None = None
        self._read_db: sqlite3.Connection | None = None

    # --- opening and closing ---------------------------------------------------
    async def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._write_db = await self._on(self._writer, self._connect)
        await self._write(self._migrate)
        self._read_db = await self._on(self._reader, self._connect)

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, isolation_level=None)
        db.row_factory = sqlite3.Row
        db.execute(f"PRAGMA busy_timeout={int(self.busy_timeout_ms)}")
        db.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL mode survives a process crash (kill -9); only a power
        # loss can take back the last transactions.
        db.execute("PRAGMA synchronous=NORMAL")
        return db

    @staticmethod
    def _migrate(db: sqlite3.Connection) -> None:
        version = db.execute("PRAGMA user_version").fetchone()[0]
        for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
            for statement in filter(str.strip, script.split(";")):
                db.execute(statement)
            db.execute(f"PRAGMA user_version={number}")

    async def close(self) -> None:
        for executor, attr in ((self._writer, "_write_db"), (self._reader, "_read_db")):
            db = getattr(self, attr)
            if db is not None:
                await self._on(executor, db.close)
                setattr(self, attr, None)
            executor.shutdown(wait=True)

    # --- the two threads ---------------------------------------------------------
    @staticmethod
    async def _on(executor: ThreadPoolExecutor, fn: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(executor, fn)

    async def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        def run() -> T:
            assert self._read_db is not None, "store is not open"
            return _retrying(lambda: fn(self._read_db), self.lock_wait_s, transaction=False, db=self._read_db)

        return await self._on(self._reader, run)

    async def _write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """fn inside one IMMEDIATE transaction on the writer thread: all of it commits, or none of it."""

        def run() -> T:
            assert self._write_db is not None, "store is not open"
            return _retrying(lambda: fn(self._write_db), self.lock_wait_s, transaction=True, db=self._write_db)

        return await self._on(self._writer, run)

    # --- writes --------------------------------------------------------------------
    async def insert(self, record: JobRecord, events: Sequence[Event]) -> tuple[JobRecord, bool]:
        """Insert a new job with its first events. With a request_id already used, returns that job
        instead and False; the caller compares payloads."""

        def run(db: sqlite3.Connection) -> tuple[JobRecord, bool]:
            if record.request_id is not None:
                row = db.execute("SELECT * FROM jobs WHERE request_id=?", (record.request_id,)).fetchone()
                if row is not None:
                    return _record(row), False
            db.execute(
                f"INSERT INTO jobs ({', '.join(JOB_COLUMNS)}) VALUES ({', '.join('?' * len(JOB_COLUMNS))})",
                _row_values(record),
            )
            for event in events:
                _insert_event(db, record.id, event)
            return record, True

        return await self._write(run)

    async def apply(self, changes: Sequence[Change]) -> list[Applied | None]:
        """Apply every change in one transaction; None where a job's expectation did not hold."""

        def run(db: sqlite3.Connection) -> list[Applied | None]:
            out: list[Applied | None] = []
            for change in changes:
                row = db.execute("SELECT * FROM jobs WHERE id=?", (change.job_id,)).fetchone()
                before = _record(row) if row is not None else None
                if before is None or not change.expect(before):
                    out.append(None)
                    continue
                after = change.change(before)
                if after is None:
                    out.append(None)
                    continue
                db.execute(
                    f"UPDATE jobs SET {', '.join(f'{c}=?' for c in JOB_COLUMNS[1:])} WHERE id=?",
                    (*_row_values(after)[1:], after.id),
                )
                event = change.event(after) if change.event is not None else None
                if event is not None:
                    _insert_event(db, after.id, event)
                out.append(Applied(before, after, event))
            return out

        return await self._write(run)

    async def record_artifact(self, job_id: str, fmt: str, sha256: str, size: int) -> bool:
        """A succeeded job's result gains a format written after it ended (on its first download).

        Not a transition of the life-cycle: the state and the events stay as they are."""

        def run(db: sqlite3.Connection) -> bool:
            row = db.execute("SELECT status, result FROM jobs WHERE id=?", (job_id,)).fetchone()
            if row is None or row["status"] != "succeeded" or not row["result"]:
                return False
            result = json.loads(row["result"])
            result["sha256"][fmt] = sha256
            result["sizes"][fmt] = size
            db.execute("UPDATE jobs SET result=?, version=version+1 WHERE id=?", (json.dumps(result), job_id))
            return True

        return await self._write(run)

    async def expire(self, job_id: str, reason: str, at: float) -> bool:
        """Delete a finished job's record and events, leaving a tombstone that says why."""

        def run(db: sqlite3.Connection) -> bool:
            row = db.execute("SELECT status FROM jobs WHERE id=?", (job_id,)).fetchone()
            if row is None or row["status"] not in TERMINAL_STATUSES:
                return False
            db.execute("DELETE FROM events WHERE job_id=?", (job_id,))
            db.execute("DELETE FROM jobs WHERE id=?", (job_id,))
            db.execute(
                "INSERT OR REPLACE INTO expired (id, reason, expired_at) VALUES (?,?,?)", (job_id, reason, at)
            )
            return True

        return await self._write(run)

    # --- reads ----------------------------------------------------------------------
    async def get(self, job_id: str) -> JobRecord | None:
        row = await self._read(lambda db: db.execute("SELECT * FROM jobs WHERE id=?", (job_id,)).fetchone())
        return _record(row) if row else None

    async def get_by_request_id(self, request_id: str) -> JobRecord | None:
        row = await self._read(
            lambda db: db.execute("SELECT * FROM jobs WHERE request_id=?", (request_id,)).fetchone()
        )
        return _record(row) if row else None

    async def list_page(self, limit: int, before: tuple[float, str] | None, status: str | None) -> list[JobRecord]:
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
        sql = f"SELECT * FROM jobs {where} ORDER BY created_at DESC, id DESC LIMIT ?"
        rows = await self._read(lambda db: db.execute(sql, (*args, limit)).fetchall())
        return [_record(r) for r in rows]

    async def active(self) -> list[JobRecord]:
        """Jobs a restart must pick up, oldest first (the queue order)."""
        rows = await self._read(
            lambda db: db.execute(
                "SELECT * FROM jobs WHERE status IN ('queued','running') ORDER BY created_at, id"
            ).fetchall()
        )
        return [_record(r) for r in rows]

    async def finished_before(self, older_than: float) -> list[str]:
        rows = await self._read(
            lambda db: db.execute(
                "SELECT id FROM jobs WHERE status IN ('succeeded','failed','cancelled') AND finished_at < ?",
                (older_than,),
            ).fetchall()
        )
        return [r["id"] for r in rows]

    async def finished_oldest_first(self) -> list[tuple[str, float]]:
        rows = await self._read(
            lambda db: db.execute(
                "SELECT id, finished_at FROM jobs WHERE status IN ('succeeded','failed','cancelled')"
                " ORDER BY finished_at, id"
            ).fetchall()
        )
        return [(r["id"], r["finished_at"]) for r in rows]

    async def known_ids(self, ids: Sequence[str]) -> set[str]:
        """Which of these ids still have a record."""
        wanted = list(ids)
        if not wanted:
            return set()

        def run(db: sqlite3.Connection) -> set[str]:
            found: set[str] = set()
            for start in range(0, len(wanted), 500):
                part = wanted[start : start + 500]
                sql = f"SELECT id FROM jobs WHERE id IN ({', '.join('?' * len(part))})"
                found.update(r["id"] for r in db.execute(sql, part))
            return found

        return await self._read(run)

    async def tombstone(self, job_id: str) -> tuple[str, float] | None:
        row = await self._read(
            lambda db: db.execute("SELECT reason, expired_at FROM expired WHERE id=?", (job_id,)).fetchone()
        )
        return (row["reason"], row["expired_at"]) if row else None

    async def events(self, job_id: str, after: int = 0) -> list[bytes]:
        rows = await self._read(
            lambda db: db.execute(
                "SELECT data FROM events WHERE job_id=? AND seq>? ORDER BY seq", (job_id, after)
            ).fetchall()
        )
        return [bytes(r["data"]) for r in rows]

    async def counts(self) -> dict[str, int]:
        rows = await self._read(lambda db: db.execute("SELECT status, COUNT(*) AS n FROM jobs GROUP BY status").fetchall())
        return {r["status"]: r["n"] for r in rows}


def _retrying(fn: Callable[[], T], wait_s: float, *, transaction: bool, db: sqlite3.Connection) -> T:
    """Run fn (in a transaction when asked), retrying while another process holds the lock."""
    give_up = time.monotonic() + wait_s
    pause = 0.01
    while True:
        try:
            if not transaction:
                return fn()
            db.execute("BEGIN IMMEDIATE")
            try:
                result = fn()
                db.execute("COMMIT")
                return result
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
        except sqlite3.OperationalError as exc:
            text = str(exc).lower()
            if "full" in text:
                raise StoreUnavailable("the disk holding the job database is full", disk_full=True) from exc
            if "locked" not in text and "busy" not in text:
                raise
            if time.monotonic() >= give_up:
                raise StoreUnavailable(
                    f"the job database has been locked by another process for over {wait_s:g} s; retry shortly"
                ) from exc
            log.warning("job database locked by another process; retrying", extra={"error": str(exc)})
            time.sleep(pause)
            pause = min(pause * 2, 0.5)


def _insert_event(db: sqlite3.Connection, job_id: str, event: Event) -> None:
    row = db.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM events WHERE job_id=?", (job_id,)).fetchone()
    event.sequence = row[0]
    db.execute("INSERT INTO events (job_id, seq, data) VALUES (?,?,?)", (job_id, event.sequence, event.SerializeToString()))


def _row_values(job: JobRecord) -> tuple[Any, ...]:
    return (
        job.id,
        job.request_id,
        job.payload_sha256,
        job.status,
        json.dumps(job.params),
        job.stage,
        job.progress,
        json.dumps(job.stage_timings),
        json.dumps(job.result) if job.result is not None else None,
        job.error_code,
        job.error_message,
        job.attempts,
        job.deadline,
        int(job.cancel_on_disconnect),
        job.created_at,
        job.started_at,
        job.finished_at,
        int(job.cancel_requested),
        job.claim_token,
        job.version,
        job.worker_id,
        job.device,
    )


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
        cancel_requested=bool(row["cancel_requested"]),
        claim_token=row["claim_token"],
        version=row["version"],
        worker_id=row["worker_id"],
        device=row["device"],
    )


def now() -> float:
    return time.time()
