"""Telemetry's history in PostgreSQL (TELEMETRY_DATABASE_URL), so the service can move between machines
and keep what it learned: every generation instance's profiles, samples, the optimizer's observations,
out-of-memory floors and decisions, each with its worker_id (per worker and in total, as on SQLite).

The same queries as the SQLite store (store.py) through a thin connection that speaks them to
PostgreSQL; only what SQLite says its own way (INSERT OR IGNORE, INSERT OR REPLACE, lastrowid) is
written again here. Like the SQLite store, calls are short indexed queries made on the event loop's
thread. A lost connection is made again at the next call; a call that cannot reach the database fails
UNAVAILABLE (the generation service keeps its reports and sends them again).
"""
from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg

from services.common.errors import Unavailable
from services.common.postgres import describe, migrate_sync, reason
from services.telemetry.records import DecisionRecord, DeviceSampleRecord, OomFloor, ProfileRecord
from services.telemetry.store import DECISIONS_KEPT, SAMPLE_RETENTION_S, TelemetryStore, _key

log = logging.getLogger(__name__)

MIGRATIONS = Path(__file__).parent / "migrations" / "postgres"


class _Connection:
    """What TelemetryStore asks of its sqlite3 connection, on PostgreSQL: `?` placeholders, a cursor back."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.where = describe(url)
        self._conn: psycopg.Connection[Any] | None = None

    def connection(self) -> psycopg.Connection[Any]:
        if self._conn is None or self._conn.closed or self._conn.broken:
            try:
                self._conn = psycopg.connect(self.url, autocommit=True, connect_timeout=5)
            except psycopg.OperationalError as exc:
                raise self._unreachable(exc) from exc
        return self._conn

    def _unreachable(self, exc: BaseException) -> Unavailable:
        return Unavailable(f"the telemetry database (PostgreSQL at {self.where}) is unreachable: {reason(exc)}")

    def execute(self, sql: str, args: Sequence[Any] = ()) -> psycopg.Cursor[Any]:
        try:
            return self.connection().execute(sql.replace("?", "%s"), tuple(args))
        except psycopg.OperationalError as exc:
            raise self._unreachable(exc) from exc

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        rows = list(rows)
        if not rows:
            return
        try:
            with self.connection().cursor() as cursor:
                cursor.executemany(sql.replace("?", "%s"), rows)
        except psycopg.OperationalError as exc:
            raise self._unreachable(exc) from exc

    @contextmanager
    def transaction(self) -> Iterator[None]:
        try:
            with self.connection().transaction():
                yield
        except psycopg.OperationalError as exc:
            raise self._unreachable(exc) from exc

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()


class PgTelemetryStore(TelemetryStore):
    def __init__(self, url: str) -> None:
        self._db = _Connection(url)  # type: ignore[assignment]
        self.path = Path(f"postgresql://{self._db.where}")
        applied = migrate_sync(self._db.connection(), MIGRATIONS, "telemetry")
        if applied:
            log.info("telemetry database migrated", extra={"database": self._db.where, "applied": applied})
        self._samples_since_prune = 0

    def close(self) -> None:
        self._db.close()

    def _transaction(self):  # type: ignore[override]
        return self._db.transaction()  # type: ignore[attr-defined]

    def add_profiles(self, profiles: Iterable[ProfileRecord], received_at: float) -> tuple[list[ProfileRecord], int]:
        stored: list[ProfileRecord] = []
        duplicates = 0
        with self._transaction():
            for p in profiles:
                row = self._db.execute(
                    "INSERT INTO profiles (job_id, backend, worker_id, device, batch_size, image_width,"
                    " image_height, resolution, steps, face_count, precision, started_at, total_duration_s,"
                    " ended_at, succeeded, received_at) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)"
                    " ON CONFLICT (job_id, started_at) DO NOTHING RETURNING id",
                    (
                        p.job_id, p.backend, p.worker_id, p.device, p.batch_size, p.image_width, p.image_height,
                        p.resolution, p.steps, p.face_count, p.precision, p.started_at, p.total_duration_s,
                        p.ended_at, int(p.succeeded), received_at,
                    ),
                ).fetchone()
                if row is None:
                    duplicates += 1
                    continue
                profile_id = row[0]
                self._db.executemany(
                    "INSERT INTO stages (profile_id, name, start_offset_s, duration_s, memory_peak_bytes)"
                    " VALUES (?,?,?,?,?)",
                    [(profile_id, s.name, s.start_offset_s, s.duration_s, s.memory_peak_bytes) for s in p.stages],
                )
                self._db.executemany(
                    "INSERT INTO substages (profile_id, stage, name, position, duration_s) VALUES (?,?,?,?,?)",
                    [
                        (profile_id, s.name, name, position, duration)
                        for s in p.stages
                        for position, (name, duration) in enumerate(s.substages)
                    ],
                )
                stored.append(p)
        return stored, duplicates

    def add_samples(self, samples: Iterable[DeviceSampleRecord]) -> tuple[int, int]:
        accepted = duplicates = 0
        with self._transaction():
            for s in samples:
                cursor = self._db.execute(
                    "INSERT INTO device_samples (worker_id, device, device_type, name, memory_total_bytes,"
                    " memory_used_bytes, memory_free_bytes, utilization_percent, temperature_c, power_w,"
                    " torch_free_bytes, torch_total_bytes, torch_max_allocated_bytes, sampled_at)"
                    " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?) ON CONFLICT DO NOTHING",
                    (
                        s.worker_id, s.device, s.device_type, s.name, s.memory_total_bytes, s.memory_used_bytes,
                        s.memory_free_bytes, s.utilization_percent, s.temperature_c, s.power_w, s.torch_free_bytes,
                        s.torch_total_bytes, s.torch_max_allocated_bytes, s.sampled_at,
                    ),
                )
                if cursor.rowcount:
                    accepted += 1
                else:
                    duplicates += 1
            self._samples_since_prune += accepted
            if self._samples_since_prune >= 1_000:
                self._samples_since_prune = 0
                self._db.execute("DELETE FROM device_samples WHERE sampled_at < ?", (time.time() - SAMPLE_RETENTION_S,))
        return accepted, duplicates

    def set_oom_floor(self, key, floor: OomFloor) -> None:  # type: ignore[no-untyped-def]
        with self._transaction():
            self._db.execute(
                "INSERT INTO oom_floors (backend, resolution, steps, floor_bytes, size, observed_at)"
                " VALUES (?,?,?,?,?,?) ON CONFLICT (backend, resolution, steps) DO UPDATE SET"
                " floor_bytes = EXCLUDED.floor_bytes, size = EXCLUDED.size, observed_at = EXCLUDED.observed_at",
                (*_key(key), floor.floor_bytes, floor.size, floor.observed_at),
            )

    def add_decision(self, d: DecisionRecord) -> int:
        with self._transaction():
            row = self._db.execute(
                "INSERT INTO decisions (decided_at, worker_id, device, backend, resolution, steps, queue_length,"
                " image_width, image_height, available_bytes, budget_bytes, per_item_bytes, basis,"
                " memory_bound_size, size, reasoning) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?) RETURNING id",
                (
                    d.decided_at, d.worker_id, d.device, d.backend, d.resolution, d.steps, d.queue_length,
                    d.image_width, d.image_height, d.available_bytes, d.budget_bytes, d.per_item_bytes, d.basis,
                    d.memory_bound_size, d.size, d.reasoning,
                ),
            ).fetchone()
            decision_id = int(row[0])
            if decision_id % 100 == 0:
                self._db.execute("DELETE FROM decisions WHERE id <= ?", (decision_id - DECISIONS_KEPT,))
        return decision_id
