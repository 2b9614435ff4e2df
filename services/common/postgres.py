"""What both services need of PostgreSQL: versioned migrations under an advisory lock, and plain names
for a database and for what went wrong with it.

Migrations are plain SQL files, `NNNN_what.sql`, in a folder of the service's own. They are applied
in order at start-up, in one transaction that first takes an advisory lock, so two instances starting
together never race: the second waits, then finds the work done. Each applied file is recorded in
`schema_migrations` (per service, by `scope`); a database that has a version this code does not know
stops the start with a clear message rather than being written to by older code.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict
from psycopg.rows import tuple_row

MIGRATION_NAME = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str


def migrations_in(folder: Path) -> list[Migration]:
    found = []
    for path in sorted(folder.iterdir()):
        match = MIGRATION_NAME.match(path.name)
        if match:
            found.append(Migration(int(match.group(1)), path.name, path.read_text()))
    versions = [m.version for m in found]
    if versions != list(range(1, len(found) + 1)):
        raise RuntimeError(f"{folder}: migrations must be numbered 0001, 0002, ... without gaps, found {versions}")
    return found


def advisory_key(name: str) -> int:
    """A stable signed 64-bit key for pg_advisory_*lock, from a readable name."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)


class SchemaTooNew(RuntimeError):
    pass


async def migrate(conn: psycopg.AsyncConnection[Any], folder: Path, scope: str) -> list[str]:
    """Apply the folder's migrations that `scope` has not applied yet; the names applied now."""
    wanted = migrations_in(folder)
    applied_now: list[str] = []
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(%s)", [advisory_key(f"orfeas.migrations.{scope}")])
        await conn.execute(_MIGRATIONS_TABLE)
        cursor = conn.cursor(row_factory=tuple_row)
        await cursor.execute("SELECT version FROM schema_migrations WHERE scope = %s", [scope])
        done = {row[0] for row in await cursor.fetchall()}
        _refuse_newer(done, len(wanted), scope)
        for migration in wanted:
            if migration.version in done:
                continue
            await conn.execute(migration.sql.encode())  # several statements: the simple query protocol
            await conn.execute(
                "INSERT INTO schema_migrations (scope, version, name) VALUES (%s, %s, %s)",
                [scope, migration.version, migration.name],
            )
            applied_now.append(migration.name)
    return applied_now


def migrate_sync(conn: psycopg.Connection[Any], folder: Path, scope: str) -> list[str]:
    """`migrate` for a blocking connection (the telemetry service's)."""
    wanted = migrations_in(folder)
    applied_now: list[str] = []
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", [advisory_key(f"orfeas.migrations.{scope}")])
        conn.execute(_MIGRATIONS_TABLE)
        cursor = conn.cursor(row_factory=tuple_row)
        cursor.execute("SELECT version FROM schema_migrations WHERE scope = %s", [scope])
        done = {row[0] for row in cursor.fetchall()}
        _refuse_newer(done, len(wanted), scope)
        for migration in wanted:
            if migration.version not in done:
                conn.execute(migration.sql.encode())
                conn.execute(
                    "INSERT INTO schema_migrations (scope, version, name) VALUES (%s, %s, %s)",
                    [scope, migration.version, migration.name],
                )
                applied_now.append(migration.name)
    return applied_now


_MIGRATIONS_TABLE = (
    "CREATE TABLE IF NOT EXISTS schema_migrations ("
    " scope text NOT NULL, version integer NOT NULL, name text NOT NULL,"
    " applied_at timestamptz NOT NULL DEFAULT now(), PRIMARY KEY (scope, version))"
)


def _refuse_newer(done: set[int], known: int, scope: str) -> None:
    unknown = sorted(v for v in done if v > known)
    if unknown:
        raise SchemaTooNew(
            f"the {scope} database has schema version {max(unknown)}, newer than this code's {known}; "
            "run the newer release (or restore a backup from before the upgrade)"
        )


def describe(url: str) -> str:
    """host:port/dbname of a connection string, without user or password (for messages and logs)."""
    try:
        info = conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        return "an unparsable URL"
    host = info.get("host") or info.get("hostaddr") or "localhost"
    return f"{host}:{info.get('port') or 5432}/{info.get('dbname') or info.get('user') or ''}"


def reason(exc: BaseException) -> str:
    """The first line of a driver error, which says what happened (connection refused, shutting down, ...)."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
