"""A real PostgreSQL for the tests: Debian's server, started by the suite in a temporary folder.

`initdb` and the server run as the `postgres` user when the suite runs as root (PostgreSQL refuses
root), on a free loopback port, through the same module the launcher uses (services/postgres_local.py).
One server per pytest(-xdist) worker, started the first time a test asks for it; each test takes a
fresh database of its own (`PostgresServer.database()`).
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
import pytest

from services.postgres_local import LocalPostgres
from services.stack import ROOT, free_port


def reachable_temp_dir(prefix: str) -> Path:
    """A fresh folder under /tmp that the `postgres` user can enter (pytest's own are root-only)."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    path.chmod(0o755)
    return path


@dataclass
class PostgresServer:
    local: LocalPostgres
    proc: subprocess.Popen[bytes] | None = None
    databases: list[str] = field(default_factory=list)

    @property
    def admin_url(self) -> str:
        return self.local.url

    def start(self) -> None:
        env = {
            **os.environ,
            "ORFEAS_POSTGRES_FOLDER": str(self.local.folder),
            "ORFEAS_POSTGRES_PORT": str(self.local.port),
        }
        log = open(self.local.folder.parent / "postgres.log", "ab")  # noqa: SIM115 - the child keeps it
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "services.postgres_local"], cwd=ROOT, env=env, stdout=log, stderr=log
        )
        log.close()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                with psycopg.connect(self.admin_url, connect_timeout=1):
                    return
            except psycopg.OperationalError:
                assert self.proc.poll() is None, (self.local.folder.parent / "postgres.log").read_text()
                time.sleep(0.1)
        raise TimeoutError("PostgreSQL did not start")

    def stop(self) -> None:
        """Fast shutdown (what an operator's restart does): clients are cut, nothing committed is lost."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            self.proc.wait(30)

    def database(self) -> str:
        """The URL of a new, empty database."""
        name = f"t_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        self.databases.append(name)
        return self.admin_url.rsplit("/", 1)[0] + f"/{name}"


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    folder = reachable_temp_dir("orfeas-pg-")
    server = PostgresServer(LocalPostgres(folder / "cluster", free_port()))
    server.local.prepare()
    server.start()
    yield server
    server.stop()
    shutil.rmtree(folder, ignore_errors=True)
