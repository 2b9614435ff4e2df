"""Jobs and their events in PostgreSQL, shared by every generation instance (GENERATION_DATABASE_URL).

The same contract as the SQLite store (store.py's JobStore): a change commits
with the event that reports it, or nothing does. Beside it, what only a
cluster needs, used by cluster_jobs.py:

- **The queue is the table.** A claim is one transaction that takes up to the
  batch size of compatible queued jobs with `SELECT ... FOR UPDATE SKIP
  LOCKED` (two instances claiming at once take different jobs, neither waits)
  and gives each a lease (`leased_until`, in database time, so instances'
  clocks do not matter), renewed by its instance's heartbeat. Jobs whose lease
  ran out are put back by any live instance (`reclaim`).
- **Admission is exact cluster-wide.** The lock on the queue counter's one row
  (migration 0002, kept by a trigger) serialises the short admission
  transaction, so the queue limit holds across instances and the unique
  request_id answers a repeated request with its first job.
- **Every committed change is announced** by a trigger (NOTIFY orfeas_jobs,
  and orfeas_queue when a job becomes queued); `listen` delivers those to the
  instance, so any instance follows any job.

Every database error reaches callers as StoreUnavailable ("storage: the job
database ... is unreachable"), UNAVAILABLE over gRPC and 503 at the gateway.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import psycopg
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from services.common.postgres import advisory_key, describe, migrate, reason
from services.generation.store import TERMINAL_STATUSES, Applied, Change, Event, JobRecord, StoreUnavailable

log = logging.getLogger(__name__)

T = TypeVar("T")

MIGRATIONS = Path(__file__).parent / "migrations" / "postgres"
JOB_CHANNEL = "orfeas_jobs"
QUEUE_CHANNEL = "orfeas_queue"
POSITIONS_LOCK = advisory_key("orfeas.generation.queue_positions")
SWEEP_LOCK = advisory_key("orfeas.generation.retention")

COLUMNS = (
    "id", "request_id", "payload_sha256", "status", "params", "stage", "progress", "stage_timings", "result",
    "error_code", "error_message", "attempts", "deadline", "cancel_on_disconnect", "created_at", "started_at",
    "finished_at", "cancel_requested", "claim_token", "version", "worker_id", "device",
)  # fmt: skip
_UPDATE_SET = ", ".join(f"{c} = %({c})s" for c in COLUMNS[1:])
# A claim that changes (or appears) starts a fresh lease; the same claim keeps its lease; no claim, no lease.
_LEASE = (
    "leased_until = CASE WHEN %(claim_token)s::text IS NULL THEN NULL"
    " WHEN %(claim_token)s::text IS DISTINCT FROM claim_token THEN now() + make_interval(secs => %(lease_s)s)"
    " ELSE leased_until END"
)
_WRITE = (
    f"WITH changed AS (UPDATE jobs SET {_UPDATE_SET}, {_LEASE}, last_seq = %(last_seq)s,"
    " reported_position = COALESCE(%(reported_position)s, reported_position) WHERE id = %(id)s)"
    " INSERT INTO events (job_id, seq, data) SELECT %(id)s, %(seq)s, %(data)s WHERE %(data)s::bytea IS NOT NULL"
)
# The same write in one statement (its own transaction), applied only if the row is still at the version
# the change was computed from: the fast path of `apply` (see PgJobStore._apply_known).
_CHANGED_IF_UNCHANGED = (
    f"changed AS (UPDATE jobs SET {_UPDATE_SET}, {_LEASE}, last_seq = %(last_seq)s"
    " WHERE id = %(id)s AND version = %(expected_version)s RETURNING id),"
    " event AS (INSERT INTO events (job_id, seq, data) SELECT id, %(seq)s, %(data)s FROM changed"
    " WHERE %(data)s::bytea IS NOT NULL)"
)
_WRITE_IF_UNCHANGED = f"WITH {_CHANGED_IF_UNCHANGED} SELECT count(*) AS n FROM changed"
# A running job's progress (a stage started, moved or ended; nothing else of the job changed) commits
# without waiting for its WAL to reach the disk: synchronous_commit=off for this one transaction, the
# per-transaction use PostgreSQL documents for data whose loss in a database crash is harmless. Only
# the last fraction of a second of such rows can be lost, and only whole, in commit order (the database
# stays consistent); every state change (admission, claim, cancel, the end) still waits for its flush,
# and its flush carries every progress row committed before it. A job whose progress was lost is still
# running under its lease and says so again at its next step.
_PROGRESS_IF_UNCHANGED = (
    "WITH unflushed AS (SELECT set_config('synchronous_commit', 'off', true) AS mode),"
    f" {_CHANGED_IF_UNCHANGED}"
    " SELECT count(*) AS n, (SELECT mode FROM unflushed) AS mode FROM changed"
)
# Jobs whose last committed state this instance remembers (it wrote or read them last).
KNOWN_JOBS = 4096


@dataclass
class Notice:
    """One committed change announced by the database."""

    job_id: str
    version: int
    last_seq: int
    origin: str


@dataclass
class _Row:
    record: JobRecord
    last_seq: int


class PgJobStore:
    """store.py's JobStore on PostgreSQL, plus the queue, the leases and the notifications of a cluster."""

    def __init__(
        self,
        url: str,
        *,
        origin: str,
        batch_key_of: Callable[[dict[str, Any]], str],
        lease_s: float = 30.0,
        pool_size: int = 10,
        timeout_s: float = 5.0,
    ) -> None:
        self.url = url
        self.where = describe(url)
        # Which instance made a change (host:port): it knows already; the others learn from the notice.
        self.origin = origin
        self.batch_key_of = batch_key_of
        self.lease_s = lease_s
        self.timeout_s = timeout_s
        self._pool = AsyncConnectionPool(
            url,
            min_size=min(2, pool_size),
            max_size=pool_size,
            timeout=timeout_s,
            open=False,
            configure=self._configure,
            kwargs={"autocommit": True, "row_factory": dict_row, "connect_timeout": max(1, round(timeout_s))},
            name="generation-store",
        )
        # False while the notification connection is down: the database is taken to be unreachable, and
        # calls fail at once instead of each waiting timeout_s for a connection.
        self.reachable = True
        self._last_error = ""
        self._known: OrderedDict[str, _Row] = OrderedDict()
        # One connection of its own for the one-statement writes (apply's fast path), taken in turn: they
        # are short, and most writes, so they skip the pool's hand-over.
        self._writer: psycopg.AsyncConnection[Any] | None = None
        self._writer_turn = asyncio.Lock()

    # --- opening and closing ---------------------------------------------------
    async def open(self, wait_s: float = 60.0) -> None:
        """Connect (waiting up to wait_s for the database to come up) and bring the schema up to date."""
        await self._pool.open(wait=True, timeout=wait_s)
        async with self._pool.connection() as conn:
            applied = await migrate(conn, MIGRATIONS, "generation")
        if applied:
            log.info("job database migrated", extra={"database": self.where, "applied": applied})

    async def _configure(self, conn: psycopg.AsyncConnection[Any]) -> None:
        await conn.execute("SELECT set_config('orfeas.origin', %s, false)", [self.origin])
        await conn.execute("SELECT set_config('application_name', %s, false)", [f"orfeas-generation {self.origin}"])

    async def close(self) -> None:
        if self._writer is not None:
            await self._writer.close()
        await self._pool.close()

    # --- running statements -----------------------------------------------------
    def _unreachable(self, detail: str) -> StoreUnavailable:
        return StoreUnavailable(
            f"the job database (PostgreSQL at {self.where}) is unreachable: {detail}; retry shortly"
        )

    async def _run(
        self, fn: Callable[[psycopg.AsyncConnection[Any]], Awaitable[T]], transaction: bool = True, own: bool = False
    ) -> T:
        """fn on a pooled connection (`own`: on the writer's), in one transaction when asked; database trouble
        as StoreUnavailable.

        A deadlock or serialisation failure (which PostgreSQL resolves by rolling one side back) is
        retried; nothing else is, since a commit whose answer was lost may have happened."""
        if not self.reachable:
            raise self._unreachable(self._last_error or "the connection was lost")
        for attempt in range(3):
            try:
                if own:
                    return await self._on_writer(fn)
                async with self._pool.connection() as conn:
                    if not transaction:
                        return await fn(conn)
                    async with conn.transaction():
                        return await fn(conn)
            except psycopg.errors.DiskFull as exc:
                raise StoreUnavailable(
                    f"the disk holding the job database (PostgreSQL at {self.where}) is full", disk_full=True
                ) from exc
            except psycopg.errors.TransactionRollback:
                if attempt == 2:
                    raise
                await asyncio.sleep(0.01 * (attempt + 1))
            except PoolTimeout as exc:
                raise self._unreachable(
                    self._last_error or f"no connection within {self.timeout_s:g} s"
                ) from exc
            except psycopg.OperationalError as exc:
                raise self._unreachable(reason(exc)) from exc
        raise AssertionError("unreachable")

    async def _on_writer(self, fn: Callable[[psycopg.AsyncConnection[Any]], Awaitable[T]]) -> T:
        async with self._writer_turn:
            if self._writer is None or self._writer.closed or self._writer.broken:
                self._writer = await psycopg.AsyncConnection.connect(
                    self.url, autocommit=True, row_factory=dict_row, connect_timeout=max(1, round(self.timeout_s))
                )
                await self._configure(self._writer)
            return await fn(self._writer)

    async def _fetch(self, sql: str, args: Sequence[Any] | dict[str, Any] = ()) -> list[dict[str, Any]]:
        async def run(conn: psycopg.AsyncConnection[Any]) -> list[dict[str, Any]]:
            return await (await conn.execute(sql, args)).fetchall()

        return await self._run(run, transaction=False)

    # --- writes -------------------------------------------------------------------
    async def insert(self, record: JobRecord, events: Sequence[Event]) -> tuple[JobRecord, bool]:
        stored, created, _ = await self.admit(record, lambda _position: list(events), queue_limit=None)
        return stored, created

    async def admit(
        self,
        record: JobRecord,
        events_for: Callable[[int], Sequence[Event]],
        queue_limit: int | None,
    ) -> tuple[JobRecord, bool, int]:
        """Queue a new job: (the job, True, its queue position), or (the earlier job with its request_id,
        False, 0). QueueFull when queue_limit jobs wait already, counted over the whole cluster."""

        async def run(conn: psycopg.AsyncConnection[Any]) -> tuple[JobRecord, bool, int, int]:
            # The counter's row lock serialises admissions across the cluster; FOR UPDATE reads its latest
            # committed value once the lock is ours.
            row = await (
                await conn.execute(
                    "SELECT c.queued AS waiting, (SELECT id FROM jobs WHERE request_id = %s) AS existing"
                    " FROM queue_counter c FOR UPDATE OF c",
                    [record.request_id],
                )
            ).fetchone()
            assert row is not None
            if row["existing"] is not None:
                existing = await self._get(conn, row["existing"])
                assert existing is not None
                return existing, False, 0, 0
            if queue_limit is not None and row["waiting"] >= queue_limit:
                raise QueueFull(row["waiting"])
            position = row["waiting"] + 1
            events = list(events_for(position))
            for seq, event in enumerate(events, start=1):
                event.sequence = seq
            values = _values(record)
            await conn.execute(
                f"WITH job AS (INSERT INTO jobs ({', '.join(COLUMNS)}, batch_key, last_seq, reported_position)"
                f" VALUES ({', '.join(f'%({c})s' for c in COLUMNS)}, %(batch_key)s, %(last_seq)s, %(position)s))"
                " INSERT INTO events (job_id, seq, data)"
                " SELECT %(id)s, seq, data FROM unnest(%(seqs)s::integer[], %(datas)s::bytea[]) AS e (seq, data)",
                {
                    **values,
                    "batch_key": self.batch_key_of(record.params),
                    "last_seq": len(events),
                    "position": position,
                    "seqs": [e.sequence for e in events],
                    "datas": [e.SerializeToString() for e in events],
                },
            )
            return record, True, position, len(events)

        try:
            stored, created, position, last_seq = await self._run(run)
        except psycopg.errors.UniqueViolation:
            # The same request_id was admitted by another instance while this one waited for the lock (the
            # lookup above read from before the wait): that job is the answer.
            existing = await self.get_by_request_id(record.request_id or "")
            if existing is None:
                raise
            return existing, False, 0
        if created:
            self._remember([_Row(stored, last_seq)])
        return stored, created, position

    async def apply(self, changes: Sequence[Change]) -> list[Applied | None]:
        """Every change in one transaction, each job's row locked first (in id order, so two transactions
        never wait on each other in a circle); None where a job's expectation did not hold."""
        if not changes:
            return []
        if len(changes) == 1 and changes[0].job_id in self._known:
            fast = await self._apply_known(changes[0])
            if fast is not None:
                return [fast]

        async def run(conn: psycopg.AsyncConnection[Any]) -> tuple[list[Applied | None], list[_Row]]:
            ids = sorted({c.job_id for c in changes})
            rows = await (
                await conn.execute("SELECT * FROM jobs WHERE id = ANY(%s) ORDER BY id FOR UPDATE", [ids])
            ).fetchall()
            current = {r["id"]: _Row(_record(r), r["last_seq"]) for r in rows}
            return await self._transition(conn, current, changes), list(current.values())

        return self._remembering(await self._run(run))

    async def _apply_known(self, change: Change) -> Applied | None:
        """One change computed from the state this instance last committed or read, written in one statement
        that applies only if the row is still at that version (nothing changed it since). None when that
        cannot be decided here; the caller then takes the row's lock and decides on what is committed.

        A running job's stage events, the bulk of all writes, take this path: one round trip instead of four.
        """
        known = self._known[change.job_id]
        if not change.expect(known.record):
            return None
        after = change.change(known.record)
        if after is None:
            return None
        event = change.event(after) if change.event is not None else None
        last_seq = known.last_seq + (1 if event is not None else 0)
        if event is not None:
            event.sequence = last_seq

        statement = _PROGRESS_IF_UNCHANGED if _progress_only(known.record, after) else _WRITE_IF_UNCHANGED

        async def run(conn: psycopg.AsyncConnection[Any]) -> int:
            row = await (
                await conn.execute(
                    statement,
                    {
                        **_values(after),
                        "expected_version": known.record.version,
                        "lease_s": self.lease_s,
                        "last_seq": last_seq,
                        "seq": last_seq if event is not None else None,
                        "data": event.SerializeToString() if event is not None else None,
                    },
                )
            ).fetchone()
            return row["n"] if row else 0

        if await self._run(run, transaction=False, own=True) != 1:
            self._known.pop(change.job_id, None)  # changed elsewhere: look at the row itself
            return None
        self._remember([_Row(after, last_seq)])
        return Applied(known.record, after, event)

    def _remember(self, rows: Iterable[_Row]) -> None:
        for row in rows:
            self._known[row.record.id] = row
            self._known.move_to_end(row.record.id)
        while len(self._known) > KNOWN_JOBS:
            self._known.popitem(last=False)

    def _remembering(self, done: tuple[list[Any], list[_Row]]) -> list[Any]:
        """After a commit: remember the rows as they now are (never before: a rolled-back state is no state)."""
        applied, rows = done
        self._remember(rows)
        return applied

    async def _transition(
        self,
        conn: psycopg.AsyncConnection[Any],
        current: dict[str, _Row],
        changes: Sequence[Change],
        positions: dict[str, int] | None = None,
    ) -> list[Applied | None]:
        """Apply changes to rows this transaction has locked; write them and their events in one go."""
        out: list[Applied | None] = []
        writes: list[dict[str, Any]] = []
        for change in changes:
            row = current.get(change.job_id)
            if row is None or not change.expect(row.record):
                out.append(None)
                continue
            after = change.change(row.record)
            if after is None:
                out.append(None)
                continue
            event = change.event(after) if change.event is not None else None
            last_seq = row.last_seq
            if event is not None:
                last_seq += 1
                event.sequence = last_seq
            writes.append(
                {
                    **_values(after),
                    "lease_s": self.lease_s,
                    "last_seq": last_seq,
                    "reported_position": (positions or {}).get(after.id),
                    "seq": last_seq if event is not None else None,
                    "data": event.SerializeToString() if event is not None else None,
                }
            )
            current[after.id] = _Row(after, last_seq)  # a second change of the same job builds on this one
            out.append(Applied(row.record, after, event))
        if len(writes) == 1:
            await conn.execute(_WRITE, writes[0])
        elif writes:
            async with conn.cursor() as cursor:
                await cursor.executemany(_WRITE, writes)
        return out

    async def record_artifact(self, job_id: str, fmt: str, sha256: str, size: int) -> bool:
        async def run(conn: psycopg.AsyncConnection[Any]) -> bool:
            row = await (
                await conn.execute("SELECT status, result FROM jobs WHERE id = %s FOR UPDATE", [job_id])
            ).fetchone()
            if row is None or row["status"] != "succeeded" or not row["result"]:
                return False
            result = json.loads(row["result"])
            result["sha256"][fmt] = sha256
            result["sizes"][fmt] = size
            await conn.execute(
                "UPDATE jobs SET result = %s, version = version + 1 WHERE id = %s", [json.dumps(result), job_id]
            )
            return True

        self._known.pop(job_id, None)
        return await self._run(run)

    async def expire(self, job_id: str, reason_text: str, at: float) -> bool:
        async def run(conn: psycopg.AsyncConnection[Any]) -> bool:
            row = await (await conn.execute("SELECT status FROM jobs WHERE id = %s FOR UPDATE", [job_id])).fetchone()
            if row is None or row["status"] not in TERMINAL_STATUSES:
                return False
            await conn.execute("DELETE FROM events WHERE job_id = %s", [job_id])
            await conn.execute("DELETE FROM jobs WHERE id = %s", [job_id])
            await conn.execute(
                "INSERT INTO expired (id, reason, expired_at) VALUES (%s, %s, %s)"
                " ON CONFLICT (id) DO UPDATE SET reason = EXCLUDED.reason, expired_at = EXCLUDED.expired_at",
                [job_id, reason_text, at],
            )
            return True

        return await self._run(run)

    # --- the cluster's queue --------------------------------------------------------
    async def claim(
        self, batch_key: str, size: int, make_change: Callable[[JobRecord], Change], now: float | None = None
    ) -> tuple[list[Applied], int]:
        """Up to `size` queued jobs of this batch key, oldest first, moved by make_change (queued ->
        running) in one transaction; rows another instance is claiming are skipped, not waited for.
        Also how many jobs the cluster's queue held after it (as far as this transaction saw)."""

        async def run(conn: psycopg.AsyncConnection[Any]) -> tuple[tuple[list[Applied], int], list[_Row]]:
            rows = await (
                await conn.execute(
                    "SELECT j.*, (SELECT queued FROM queue_counter) AS queued_before FROM jobs j"
                    " WHERE status = 'queued' AND batch_key = %s AND NOT cancel_requested"
                    " AND (deadline IS NULL OR deadline > %s) ORDER BY created_at, id LIMIT %s"
                    " FOR UPDATE OF j SKIP LOCKED",
                    [batch_key, now or time.time(), size],
                )
            ).fetchall()
            current = {r["id"]: _Row(_record(r), r["last_seq"]) for r in rows}
            changes = [make_change(row.record) for row in current.values()]
            applied = [a for a in await self._transition(conn, current, changes) if a is not None]
            left = max(0, rows[0]["queued_before"] - len(applied)) if rows else 0
            return (applied, left), list(current.values())

        done, rows = await self._run(run)
        self._remember(rows)
        return done

    async def renew(self, claim_tokens: Sequence[str]) -> int:
        """The heartbeat: extend the leases of these claims; how many are still held."""
        if not claim_tokens:
            return 0

        async def run(conn: psycopg.AsyncConnection[Any]) -> int:
            cursor = await conn.execute(
                "UPDATE jobs SET leased_until = now() + make_interval(secs => %s)"
                " WHERE status = 'running' AND claim_token = ANY(%s)",
                [self.lease_s, list(claim_tokens)],
            )
            return cursor.rowcount

        return await self._run(run)

    async def reclaim(
        self, make_change: Callable[[JobRecord], Change], owner: str | None = None, limit: int = 100
    ) -> list[Applied]:
        """Running jobs whose lease ran out (their instance stopped renewing it), or, with `owner`, those
        an earlier life of this instance was running: each moved by make_change in one transaction."""

        async def run(conn: psycopg.AsyncConnection[Any]) -> tuple[list[Applied], list[_Row]]:
            mine = "OR left(worker_id, %s) = %s" if owner else ""
            args: list[Any] = [len(owner) + 1, owner + "/"] if owner else []
            rows = await (
                await conn.execute(
                    "SELECT * FROM jobs WHERE status = 'running'"
                    f" AND (leased_until IS NULL OR leased_until < now() {mine})"
                    " ORDER BY id LIMIT %s FOR UPDATE SKIP LOCKED",
                    [*args, limit],
                )
            ).fetchall()
            current = {r["id"]: _Row(_record(r), r["last_seq"]) for r in rows}
            changes = [make_change(row.record) for row in current.values()]
            applied = [a for a in await self._transition(conn, current, changes) if a is not None]
            return applied, list(current.values())

        return self._remembering(await self._run(run))

    async def report_positions(self, depth: int, make_change: Callable[[JobRecord, int], Change]) -> list[Applied]:
        """A note for each of the first `depth` queued jobs whose place moved since it was last told.

        One instance at a time (an advisory lock), each on a fresh view of the queue, so a place is
        told once; rows being claimed meanwhile are skipped."""

        # Most of the time no place moved (an idle queue, a claim of the last jobs): one quick look first.
        moved = await self._fetch(
            "SELECT EXISTS (SELECT 1 FROM (SELECT reported_position, row_number() OVER (ORDER BY created_at, id) AS"
            " position FROM (SELECT reported_position, created_at, id FROM jobs WHERE status = 'queued'"
            " ORDER BY created_at, id LIMIT %s) s) q WHERE reported_position <> position) AS moved",
            [depth],
        )
        if not moved[0]["moved"]:
            return []

        async def run(conn: psycopg.AsyncConnection[Any]) -> tuple[list[Applied], list[_Row]]:
            await conn.execute("SELECT pg_advisory_xact_lock(%s)", [POSITIONS_LOCK])
            rows = await (
                await conn.execute(
                    "SELECT j.*, q.position FROM (SELECT id, row_number() OVER (ORDER BY created_at, id) AS position"
                    " FROM (SELECT id, created_at FROM jobs WHERE status = 'queued' ORDER BY created_at, id LIMIT %s) s"
                    ") q JOIN jobs j ON j.id = q.id"
                    " WHERE j.status = 'queued' AND j.reported_position <> q.position"
                    " ORDER BY j.id FOR UPDATE OF j SKIP LOCKED",
                    [depth],
                )
            ).fetchall()
            current = {r["id"]: _Row(_record(r), r["last_seq"]) for r in rows}
            positions = {r["id"]: r["position"] for r in rows}
            changes = [make_change(current[i].record, positions[i]) for i in current]
            applied = [a for a in await self._transition(conn, current, changes, positions) if a is not None]
            return applied, list(current.values())

        return self._remembering(await self._run(run))

    async def queue_head(self, now: float | None = None) -> JobRecord | None:
        rows = await self._fetch(
            "SELECT * FROM jobs WHERE status = 'queued' AND NOT cancel_requested"
            " AND (deadline IS NULL OR deadline > %s) ORDER BY created_at, id LIMIT 1",
            [now or time.time()],
        )
        return _record(rows[0]) if rows else None

    async def waiting_with(self, batch_key: str, limit: int, head_id: str) -> tuple[int, bool]:
        """(queued jobs of this batch key, up to limit; whether head_id is still queued)."""
        rows = await self._fetch(
            "SELECT (SELECT count(*) FROM (SELECT 1 FROM jobs WHERE status = 'queued' AND batch_key = %s"
            " AND NOT cancel_requested LIMIT %s) q) AS waiting,"
            " EXISTS (SELECT 1 FROM jobs WHERE id = %s AND status = 'queued') AS head_queued",
            [batch_key, limit, head_id],
        )
        return rows[0]["waiting"], rows[0]["head_queued"]

    async def queue_length(self) -> int:
        rows = await self._fetch("SELECT queued AS n FROM queue_counter")
        return rows[0]["n"]

    async def position(self, record: JobRecord) -> int:
        """The job's place in the cluster's queue (1: next), 0 when it is not queued."""
        rows = await self._fetch(
            "SELECT count(*) AS n FROM jobs WHERE status = 'queued' AND (created_at, id) <= (%s, %s)"
            " AND EXISTS (SELECT 1 FROM jobs WHERE id = %s AND status = 'queued')",
            [record.created_at, record.id, record.id],
        )
        return rows[0]["n"]

    async def past_deadline(self, now: float, limit: int = 100) -> list[str]:
        rows = await self._fetch(
            "SELECT id FROM jobs WHERE status = 'queued' AND deadline IS NOT NULL AND deadline <= %s"
            " ORDER BY deadline LIMIT %s",
            [now, limit],
        )
        return [r["id"] for r in rows]

    async def recent_finishes(self, count: int = 10) -> list[float]:
        """When the last jobs ended, newest first (anywhere in the cluster)."""
        rows = await self._fetch(
            "SELECT finished_at FROM jobs WHERE finished_at IS NOT NULL ORDER BY finished_at DESC LIMIT %s", [count]
        )
        return [r["finished_at"] for r in rows]

    async def try_exclusive(self, key: int, fn: Callable[[], Awaitable[T]]) -> tuple[bool, T | None]:
        """Run fn while holding a session advisory lock, if no other instance holds it: (ran, its result)."""
        async with self._pool.connection() as conn:
            got = await (await conn.execute("SELECT pg_try_advisory_lock(%s) AS got", [key])).fetchone()
            if not got or not got["got"]:
                return False, None
            try:
                return True, await fn()
            finally:
                await conn.execute("SELECT pg_advisory_unlock(%s)", [key])

    # --- notifications ----------------------------------------------------------------
    async def listen(
        self,
        on_job: Callable[[Notice], None],
        on_queue: Callable[[], None],
        on_connected: Callable[[], None],
    ) -> None:
        """Deliver the database's notices for ever, on one connection of its own; reconnect when it drops.

        on_connected runs after every (re)connection: whatever was announced while the connection was
        down was missed, so the caller looks again at everything it follows."""
        pause = 0.1
        was_down = False
        while True:
            try:
                conn = await psycopg.AsyncConnection.connect(
                    self.url, autocommit=True, connect_timeout=max(1, round(self.timeout_s))
                )
            except psycopg.OperationalError as exc:
                self._down(reason(exc), was_down)
                was_down = True
                await asyncio.sleep(pause)
                pause = min(pause * 2, 2.0)
                continue
            try:
                await conn.execute(f"LISTEN {JOB_CHANNEL}")
                await conn.execute(f"LISTEN {QUEUE_CHANNEL}")
                if was_down:
                    log.info("the job database is reachable again", extra={"database": self.where})
                    # Pooled connections from before the outage are dead: replace them now, not one failed
                    # call at a time.
                    await self._pool.check()
                self.reachable, self._last_error, was_down, pause = True, "", False, 0.1
                on_connected()
                async for notice in conn.notifies():
                    if notice.channel == QUEUE_CHANNEL:
                        on_queue()
                        continue
                    job_id, version, last_seq, origin = (notice.payload.split(" ", 3) + [""])[:4]
                    on_job(Notice(job_id, int(version), int(last_seq), origin))
            except psycopg.OperationalError as exc:
                self._down(reason(exc), was_down)
                was_down = True
            finally:
                await conn.close()

    def _down(self, detail: str, already: bool) -> None:
        self.reachable = False
        self._last_error = detail
        if not already:
            log.warning("lost the job database; new requests are refused until it is back",
                        extra={"database": self.where, "error": detail})

    # --- reads ----------------------------------------------------------------------------
    @staticmethod
    async def _get(conn: psycopg.AsyncConnection[Any], job_id: str) -> JobRecord | None:
        row = await (await conn.execute("SELECT * FROM jobs WHERE id = %s", [job_id])).fetchone()
        return _record(row) if row else None

    async def get(self, job_id: str) -> JobRecord | None:
        rows = await self._fetch("SELECT * FROM jobs WHERE id = %s", [job_id])
        return _record(rows[0]) if rows else None

    async def get_by_request_id(self, request_id: str) -> JobRecord | None:
        rows = await self._fetch("SELECT * FROM jobs WHERE request_id = %s", [request_id])
        return _record(rows[0]) if rows else None

    async def list_page(self, limit: int, before: tuple[float, str] | None, status: str | None) -> list[JobRecord]:
        clauses: list[str] = []
        args: list[Any] = []
        if before is not None:
            clauses.append("(created_at < %s OR (created_at = %s AND id < %s))")
            args += [before[0], before[0], before[1]]
        if status is not None:
            clauses.append("status = %s")
            args.append(status)
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        rows = await self._fetch(f"SELECT * FROM jobs {where} ORDER BY created_at DESC, id DESC LIMIT %s", [*args, limit])
        return [_record(r) for r in rows]

    async def active(self) -> list[JobRecord]:
        rows = await self._fetch("SELECT * FROM jobs WHERE status IN ('queued', 'running') ORDER BY created_at, id")
        return [_record(r) for r in rows]

    async def finished_before(self, older_than: float) -> list[str]:
        rows = await self._fetch(
            "SELECT id FROM jobs WHERE status IN ('succeeded', 'failed', 'cancelled') AND finished_at < %s",
            [older_than],
        )
        return [r["id"] for r in rows]

    async def finished_oldest_first(self) -> list[tuple[str, float]]:
        rows = await self._fetch(
            "SELECT id, finished_at FROM jobs WHERE status IN ('succeeded', 'failed', 'cancelled')"
            " ORDER BY finished_at, id"
        )
        return [(r["id"], r["finished_at"]) for r in rows]

    async def known_ids(self, ids: Sequence[str]) -> set[str]:
        if not ids:
            return set()
        rows = await self._fetch("SELECT id FROM jobs WHERE id = ANY(%s)", [list(ids)])
        return {r["id"] for r in rows}

    async def tombstone(self, job_id: str) -> tuple[str, float] | None:
        rows = await self._fetch("SELECT reason, expired_at FROM expired WHERE id = %s", [job_id])
        return (rows[0]["reason"], rows[0]["expired_at"]) if rows else None

    async def events(self, job_id: str, after: int = 0) -> list[bytes]:
        rows = await self._fetch("SELECT data FROM events WHERE job_id = %s AND seq > %s ORDER BY seq", [job_id, after])
        return [bytes(r["data"]) for r in rows]

    async def counts(self) -> dict[str, int]:
        rows = await self._fetch("SELECT status, count(*) AS n FROM jobs GROUP BY status")
        return {r["status"]: r["n"] for r in rows}


class QueueFull(Exception):
    def __init__(self, waiting: int) -> None:
        super().__init__(f"{waiting} jobs waiting")
        self.waiting = waiting


def _progress_only(before: JobRecord, after: JobRecord) -> bool:
    """Whether a change only reports a running job's progress: the same claim, status and cancel flag."""
    return (
        before.status == after.status == "running"
        and before.claim_token == after.claim_token
        and before.cancel_requested == after.cancel_requested
        and before.attempts == after.attempts
        and before.result == after.result
        and before.error_code == after.error_code
    )


def _values(job: JobRecord) -> dict[str, Any]:
    return {
        "id": job.id,
        "request_id": job.request_id,
        "payload_sha256": job.payload_sha256,
        "status": job.status,
        "params": json.dumps(job.params),
        "stage": job.stage,
        "progress": job.progress,
        "stage_timings": json.dumps(job.stage_timings),
        "result": json.dumps(job.result) if job.result is not None else None,
        "error_code": job.error_code,
        "error_message": job.error_message,
        "attempts": job.attempts,
        "deadline": job.deadline,
        "cancel_on_disconnect": job.cancel_on_disconnect,
        "created_at": job.created_at,
        "started_at": job.started_at,
        "finished_at": job.finished_at,
        "cancel_requested": job.cancel_requested,
        "claim_token": job.claim_token,
        "version": job.version,
        "worker_id": job.worker_id,
        "device": job.device,
    }


def _record(row: dict[str, Any]) -> JobRecord:
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
        cancel_on_disconnect=row["cancel_on_disconnect"],
        created_at=row["created_at"],
        started_at=row["started_at"],
        finished_at=row["finished_at"],
        cancel_requested=row["cancel_requested"],
        claim_token=row["claim_token"],
        version=row["version"],
        worker_id=row["worker_id"],
        device=row["device"],
    )
