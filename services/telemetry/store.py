"""SQLite under DATA_DIR: profiles, device samples, the optimizer's
observations, out-of-memory floors and decisions. WAL mode with
synchronous=NORMAL: a committed write survives the process being killed,
and readers never wait for the writer.

One connection, used from the service's event-loop thread only; every call is
a short indexed query, so blocking the loop briefly is cheaper than handing
each to a thread.
"""
from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path

from services.telemetry.records import (
    CostKey,
    CostObservation,
    DecisionRecord,
    DeviceSampleRecord,
    OomFloor,
    ProfileRecord,
    StageRecord,
)

SCHEMA_VERSION = 1
# Device samples older than this are pruned: trends look back 15 minutes.
SAMPLE_RETENTION_S = 24 * 3600.0
# Per cost key, the newest observations kept: enough for a stable high quantile.
OBSERVATIONS_PER_KEY = 200
DECISIONS_KEPT = 10_000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS profiles (
    id INTEGER PRIMARY KEY,
    job_id TEXT NOT NULL,
    backend TEXT NOT NULL,
    worker_id TEXT NOT NULL,
    device TEXT NOT NULL,
    batch_size INTEGER NOT NULL,
    image_width INTEGER NOT NULL,
    image_height INTEGER NOT NULL,
    resolution INTEGER NOT NULL,
    steps INTEGER NOT NULL,
    face_count INTEGER NOT NULL,
    precision TEXT NOT NULL,
    started_at REAL NOT NULL,
    total_duration_s REAL NOT NULL,
    ended_at REAL NOT NULL,
    succeeded INTEGER NOT NULL,
    received_at REAL NOT NULL,
    UNIQUE (job_id, started_at)
);
CREATE INDEX IF NOT EXISTS profiles_backend_ended ON profiles (backend, ended_at);
CREATE INDEX IF NOT EXISTS profiles_ended ON profiles (ended_at);
CREATE TABLE IF NOT EXISTS stages (
    profile_id INTEGER NOT NULL REFERENCES profiles (id),
    name TEXT NOT NULL,
    start_offset_s REAL NOT NULL,
    duration_s REAL NOT NULL,
    memory_peak_bytes INTEGER NOT NULL,
    PRIMARY KEY (profile_id, name)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS substages (
    profile_id INTEGER NOT NULL REFERENCES profiles (id),
    stage TEXT NOT NULL,
    name TEXT NOT NULL,
    position INTEGER NOT NULL,
    duration_s REAL NOT NULL,
    PRIMARY KEY (profile_id, stage, name)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS device_samples (
    worker_id TEXT NOT NULL,
    device TEXT NOT NULL,
    device_type TEXT NOT NULL,
    name TEXT NOT NULL,
    memory_total_bytes INTEGER NOT NULL,
    memory_used_bytes INTEGER NOT NULL,
    memory_free_bytes INTEGER NOT NULL,
    utilization_percent REAL,
    temperature_c REAL,
    power_w REAL,
    torch_free_bytes INTEGER,
    torch_total_bytes INTEGER,
    torch_max_allocated_bytes INTEGER,
    sampled_at REAL NOT NULL,
    PRIMARY KEY (worker_id, device, sampled_at)
);
CREATE INDEX IF NOT EXISTS device_samples_time ON device_samples (sampled_at);
CREATE TABLE IF NOT EXISTS cost_observations (
    id INTEGER PRIMARY KEY,
    backend TEXT NOT NULL,
    resolution INTEGER NOT NULL,
    steps INTEGER NOT NULL,
    per_item_bytes INTEGER NOT NULL,
    image_pixels INTEGER NOT NULL,
    source TEXT NOT NULL,
    observed_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS cost_observations_key ON cost_observations (backend, resolution, steps, id);
CREATE TABLE IF NOT EXISTS oom_floors (
    backend TEXT NOT NULL,
    resolution INTEGER NOT NULL,
    steps INTEGER NOT NULL,
    floor_bytes INTEGER NOT NULL,
    size INTEGER NOT NULL,
    observed_at REAL NOT NULL,
    PRIMARY KEY (backend, resolution, steps)
);
CREATE TABLE IF NOT EXISTS decisions (
    id INTEGER PRIMARY KEY,
    decided_at REAL NOT NULL,
    worker_id TEXT NOT NULL,
    device TEXT NOT NULL,
    backend TEXT NOT NULL,
    resolution INTEGER NOT NULL,
    steps INTEGER NOT NULL,
    queue_length INTEGER NOT NULL,
    image_width INTEGER NOT NULL,
    image_height INTEGER NOT NULL,
    available_bytes INTEGER NOT NULL,
    budget_bytes INTEGER NOT NULL,
    per_item_bytes INTEGER NOT NULL,
    basis TEXT NOT NULL,
    memory_bound_size INTEGER NOT NULL,
    size INTEGER NOT NULL,
    reasoning TEXT NOT NULL,
    ran_size INTEGER,
    peak_memory_bytes INTEGER,
    out_of_memory INTEGER
);
CREATE INDEX IF NOT EXISTS decisions_backend ON decisions (backend, id);
"""

_SAMPLE_COLUMNS = (
    "worker_id, device, device_type, name, memory_total_bytes, memory_used_bytes, memory_free_bytes, "
    "utilization_percent, temperature_c, power_w, torch_free_bytes, torch_total_bytes, "
    "torch_max_allocated_bytes, sampled_at"
)
_DECISION_COLUMNS = (
    "id, decided_at, worker_id, device, backend, resolution, steps, queue_length, image_width, image_height, "
    "available_bytes, budget_bytes, per_item_bytes, basis, memory_bound_size, size, reasoning, ran_size, "
    "peak_memory_bytes, out_of_memory"
)


class TelemetryStore:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._db = sqlite3.connect(str(path), isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA foreign_keys=ON")
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise RuntimeError(f"{path}: schema version {version} is newer than this code's {SCHEMA_VERSION}")
        self._db.executescript(_SCHEMA)
        self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        self._samples_since_prune = 0

    def close(self) -> None:
        self._db.close()

    # ------------------------------------------------------------ profiles

    def add_profiles(self, profiles: Iterable[ProfileRecord], received_at: float) -> tuple[list[ProfileRecord], int]:
        """Store in one transaction; returns the profiles newly stored and the duplicate count."""
        stored: list[ProfileRecord] = []
        duplicates = 0
        with self._transaction():
            for p in profiles:
                cur = self._db.execute(
                    "INSERT OR IGNORE INTO profiles (job_id, backend, worker_id, device, batch_size, image_width,"
                    " image_height, resolution, steps, face_count, precision, started_at, total_duration_s,"
                    " ended_at, succeeded, received_at) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                    (
                        p.job_id, p.backend, p.worker_id, p.device, p.batch_size, p.image_width, p.image_height,
                        p.resolution, p.steps, p.face_count, p.precision, p.started_at, p.total_duration_s,
                        p.ended_at, int(p.succeeded), received_at,
                    ),
                )
                if cur.rowcount == 0:
                    duplicates += 1
                    continue
                self._db.executemany(
                    "INSERT INTO stages (profile_id, name, start_offset_s, duration_s, memory_peak_bytes)"
                    " VALUES (?,?,?,?,?)",
                    [(cur.lastrowid, s.name, s.start_offset_s, s.duration_s, s.memory_peak_bytes) for s in p.stages],
                )
                self._db.executemany(
                    "INSERT INTO substages (profile_id, stage, name, position, duration_s) VALUES (?,?,?,?,?)",
                    [
                        (cur.lastrowid, s.name, name, position, duration)
                        for s in p.stages
                        for position, (name, duration) in enumerate(s.substages)
                    ],
                )
                stored.append(p)
        return stored, duplicates

    def profiles(self, backend: str = "", ended_since: float | None = None, worker_id: str = "") -> list[ProfileRecord]:
        """Oldest first; empty filters match everything."""
        where, args = self._profile_filter(backend, ended_since, worker_id)
        rows = self._db.execute(
            "SELECT id, job_id, backend, worker_id, device, batch_size, image_width, image_height, resolution,"
            f" steps, face_count, precision, started_at, total_duration_s, succeeded FROM profiles {where}"
            " ORDER BY id",
            args,
        ).fetchall()
        stages: dict[int, list[StageRecord]] = {}
        for pid, name, offset, duration, peak in self._db.execute(
            "SELECT s.profile_id, s.name, s.start_offset_s, s.duration_s, s.memory_peak_bytes FROM stages s"
            f" JOIN profiles ON profiles.id = s.profile_id {where} ORDER BY s.profile_id, s.start_offset_s",
            args,
        ):
            stages.setdefault(pid, []).append(StageRecord(name, offset, duration, peak))
        parts: dict[tuple[int, str], list[tuple[str, float]]] = {}
        for pid, stage, name, duration in self._db.execute(
            "SELECT u.profile_id, u.stage, u.name, u.duration_s FROM substages u"
            f" JOIN profiles ON profiles.id = u.profile_id {where} ORDER BY u.profile_id, u.stage, u.position",
            args,
        ):
            parts.setdefault((pid, stage), []).append((name, duration))
        if parts:
            stages = {
                pid: [replace(s, substages=tuple(parts.get((pid, s.name), ()))) for s in records]
                for pid, records in stages.items()
            }
        return [
            ProfileRecord(
                job_id=r[1], backend=r[2], worker_id=r[3], device=r[4], batch_size=r[5], image_width=r[6],
                image_height=r[7], resolution=r[8], steps=r[9], face_count=r[10], precision=r[11],
                started_at=r[12], total_duration_s=r[13], stages=tuple(stages.get(r[0], ())), succeeded=bool(r[14]),
            )
            for r in rows
        ]

    def backends(self) -> list[str]:
        return [r[0] for r in self._db.execute("SELECT DISTINCT backend FROM profiles ORDER BY backend")]

    @staticmethod
    def _profile_filter(backend: str, ended_since: float | None, worker_id: str = "") -> tuple[str, tuple[object, ...]]:
        clauses: list[str] = []
        args: list[object] = []
        if backend:
            clauses.append("profiles.backend = ?")
            args.append(backend)
        if worker_id:
            clauses.append("profiles.worker_id = ?")
            args.append(worker_id)
        if ended_since is not None:
            clauses.append("profiles.ended_at >= ?")
            args.append(ended_since)
        return ("WHERE " + " AND ".join(clauses) if clauses else ""), tuple(args)

    # ------------------------------------------------------------- devices

    def add_samples(self, samples: Iterable[DeviceSampleRecord]) -> tuple[int, int]:
        accepted = duplicates = 0
        with self._transaction():
            for s in samples:
                cur = self._db.execute(
                    f"INSERT OR IGNORE INTO device_samples ({_SAMPLE_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                    (
                        s.worker_id, s.device, s.device_type, s.name, s.memory_total_bytes, s.memory_used_bytes,
                        s.memory_free_bytes, s.utilization_percent, s.temperature_c, s.power_w, s.torch_free_bytes,
                        s.torch_total_bytes, s.torch_max_allocated_bytes, s.sampled_at,
                    ),
                )
                if cur.rowcount:
                    accepted += 1
                else:
                    duplicates += 1
            self._samples_since_prune += accepted
            if self._samples_since_prune >= 1_000:
                self._samples_since_prune = 0
                self._db.execute("DELETE FROM device_samples WHERE sampled_at < ?", (time.time() - SAMPLE_RETENTION_S,))
        return accepted, duplicates

    def samples(self, since: float, worker_id: str = "") -> list[DeviceSampleRecord]:
        """Samples taken at or after `since`, oldest first."""
        sql = f"SELECT {_SAMPLE_COLUMNS} FROM device_samples WHERE sampled_at >= ?"
        args: tuple[object, ...] = (since,)
        if worker_id:
            sql += " AND worker_id = ?"
            args += (worker_id,)
        return [DeviceSampleRecord(*row) for row in self._db.execute(sql + " ORDER BY sampled_at", args)]

    def latest_samples(self, worker_id: str = "") -> list[DeviceSampleRecord]:
        """The newest sample of every (worker, device), however old."""
        sql = (
            f"SELECT {_SAMPLE_COLUMNS} FROM device_samples d WHERE sampled_at = ("
            " SELECT MAX(sampled_at) FROM device_samples x WHERE x.worker_id = d.worker_id AND x.device = d.device)"
        )
        args: tuple[object, ...] = ()
        if worker_id:
            sql += " AND worker_id = ?"
            args = (worker_id,)
        return [DeviceSampleRecord(*row) for row in self._db.execute(sql + " ORDER BY worker_id, device", args)]

    # ----------------------------------------------------------- optimizer

    def add_observation(self, key: CostKey, obs: CostObservation, source: str) -> None:
        with self._transaction():
            self._db.execute(
                "INSERT INTO cost_observations (backend, resolution, steps, per_item_bytes, image_pixels, source,"
                " observed_at) VALUES (?,?,?,?,?,?,?)",
                (key.backend, key.resolution, key.steps, obs.per_item_bytes, obs.image_pixels, source, obs.observed_at),
            )
            self._db.execute(
                "DELETE FROM cost_observations WHERE backend = ? AND resolution = ? AND steps = ? AND id NOT IN ("
                " SELECT id FROM cost_observations WHERE backend = ? AND resolution = ? AND steps = ?"
                " ORDER BY id DESC LIMIT ?)",
                (*_key(key), *_key(key), OBSERVATIONS_PER_KEY),
            )

    def observations(self, key: CostKey) -> list[CostObservation]:
        """Newest first."""
        return [
            CostObservation(*row)
            for row in self._db.execute(
                "SELECT per_item_bytes, image_pixels, observed_at FROM cost_observations"
                " WHERE backend = ? AND resolution = ? AND steps = ? ORDER BY id DESC",
                _key(key),
            )
        ]

    def cost_keys(self, backend: str = "") -> list[CostKey]:
        """Every key with an observation or a floor."""
        sql = (
            "SELECT backend, resolution, steps FROM cost_observations UNION"
            " SELECT backend, resolution, steps FROM oom_floors"
        )
        keys = [CostKey(*row) for row in self._db.execute(sql)]
        return sorted((k for k in keys if not backend or k.backend == backend),
                      key=lambda k: (k.backend, k.resolution, k.steps))

    def oom_floor(self, key: CostKey) -> OomFloor | None:
        row = self._db.execute(
            "SELECT floor_bytes, size, observed_at FROM oom_floors WHERE backend = ? AND resolution = ? AND steps = ?",
            _key(key),
        ).fetchone()
        return OomFloor(*row) if row else None

    def set_oom_floor(self, key: CostKey, floor: OomFloor) -> None:
        with self._transaction():
            self._db.execute(
                "INSERT OR REPLACE INTO oom_floors (backend, resolution, steps, floor_bytes, size, observed_at)"
                " VALUES (?,?,?,?,?,?)",
                (*_key(key), floor.floor_bytes, floor.size, floor.observed_at),
            )

    def clear_oom_floor(self, key: CostKey) -> None:
        with self._transaction():
            self._db.execute("DELETE FROM oom_floors WHERE backend = ? AND resolution = ? AND steps = ?", _key(key))

    def add_decision(self, d: DecisionRecord) -> int:
        with self._transaction():
            cur = self._db.execute(
                "INSERT INTO decisions (decided_at, worker_id, device, backend, resolution, steps, queue_length,"
                " image_width, image_height, available_bytes, budget_bytes, per_item_bytes, basis,"
                " memory_bound_size, size, reasoning) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (
                    d.decided_at, d.worker_id, d.device, d.backend, d.resolution, d.steps, d.queue_length,
                    d.image_width, d.image_height, d.available_bytes, d.budget_bytes, d.per_item_bytes, d.basis,
                    d.memory_bound_size, d.size, d.reasoning,
                ),
            )
            decision_id = int(cur.lastrowid or 0)
            if decision_id % 100 == 0:
                self._db.execute("DELETE FROM decisions WHERE id <= ?", (decision_id - DECISIONS_KEPT,))
        return decision_id

    def record_outcome(self, decision_id: int, ran_size: int, peak_memory_bytes: int, out_of_memory: bool) -> bool:
        """Attach an outcome to its decision; False when the decision is unknown."""
        with self._transaction():
            cur = self._db.execute(
                "UPDATE decisions SET ran_size = ?, peak_memory_bytes = ?, out_of_memory = ? WHERE id = ?",
                (ran_size, peak_memory_bytes, int(out_of_memory), decision_id),
            )
        return cur.rowcount > 0

    def decisions(self, limit: int, backend: str = "") -> list[DecisionRecord]:
        """Newest first."""
        sql = f"SELECT {_DECISION_COLUMNS} FROM decisions"
        args: tuple[object, ...] = ()
        if backend:
            sql += " WHERE backend = ?"
            args = (backend,)
        rows = self._db.execute(sql + " ORDER BY id DESC LIMIT ?", (*args, limit)).fetchall()
        names = [n.strip() for n in _DECISION_COLUMNS.split(",")]
        decisions = []
        for row in rows:
            values = dict(zip(names, row, strict=True))
            if values["out_of_memory"] is not None:
                values["out_of_memory"] = bool(values["out_of_memory"])
            decisions.append(DecisionRecord(**values))
        return decisions

    def decision_count(self, backend: str = "") -> int:
        if backend:
            return int(self._db.execute("SELECT COUNT(*) FROM decisions WHERE backend = ?", (backend,)).fetchone()[0])
        return int(self._db.execute("SELECT COUNT(*) FROM decisions").fetchone()[0])

    # ------------------------------------------------------------ plumbing

    def _transaction(self) -> _Transaction:
        return _Transaction(self._db)


class _Transaction:
    """BEGIN/COMMIT around a block, ROLLBACK if it raises (autocommit mode otherwise)."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self._db.execute("COMMIT" if exc_type is None else "ROLLBACK")


def _key(key: CostKey) -> tuple[str, int, int]:
    return (key.backend, key.resolution, key.steps)
