"""A private PostgreSQL cluster for `GENERATION_INSTANCES=N make run` (and the tests), under DATA_DIR.

Debian's `postgresql` package provides the programs (`make install` installs it); nothing of the
system's own clusters is touched. `LocalPostgres.prepare()` runs `initdb` once (the cluster stays in
DATA_DIR/postgres between runs, with a generated password in DATA_DIR/postgres/password); then the
launcher supervises `python -m services.postgres_local` like any other part: it becomes `postgres`,
listening on 127.0.0.1 only (no Unix socket), as the `postgres` user when started as root (PostgreSQL
refuses to run as root), and it stops with the stack, last.
"""
from __future__ import annotations

import ctypes
import glob
import os
import pwd
import secrets
import shutil
import signal
import stat
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

USER = "orfeas"
DATABASE = "orfeas"
SYSTEM_USER = "postgres"


class PostgresMissing(RuntimeError):
    pass


def binaries() -> Path:
    """The folder holding initdb and postgres: on PATH, else Debian's newest /usr/lib/postgresql/N/bin."""
    on_path = shutil.which("initdb")
    if on_path:
        return Path(on_path).resolve().parent
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    if not found:
        raise PostgresMissing(
            "PostgreSQL is not installed (no initdb): `make install` installs Debian's postgresql package, "
            "or set GENERATION_DATABASE_URL to a server of your own"
        )
    return Path(found[-1]).parent


def _system_user() -> pwd.struct_passwd | None:
    """Whom the server runs as: `postgres` when we are root, else ourselves (None)."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam(SYSTEM_USER)
    except KeyError:
        raise PostgresMissing(f"running as root needs the {SYSTEM_USER!r} user (Debian's postgresql package makes it)")


def _reachable(path: Path, user: pwd.struct_passwd) -> Path | None:
    """The first folder above `path` that `user` may not pass through, or None."""
    groups = set(os.getgrouplist(user.pw_name, user.pw_gid))
    for folder in reversed(path.parents):
        mode = folder.stat()
        if mode.st_uid == user.pw_uid:
            ok = mode.st_mode & stat.S_IXUSR
        elif mode.st_gid in groups:
            ok = mode.st_mode & stat.S_IXGRP
        else:
            ok = mode.st_mode & stat.S_IXOTH
        if not ok:
            return folder
    return None


@dataclass
class LocalPostgres:
    """A cluster in `folder` (DATA_DIR/postgres), served on 127.0.0.1:`port`."""

    folder: Path
    port: int

    @property
    def pgdata(self) -> Path:
        return self.folder / "data"

    @property
    def password_file(self) -> Path:
        return self.folder / "password"

    @property
    def url(self) -> str:
        password = self.password_file.read_text().strip()
        return f"postgresql://{USER}:{password}@127.0.0.1:{self.port}/{DATABASE}"

    def prepare(self) -> None:
        """initdb once; later runs find the cluster and its password in place."""
        user = _system_user()
        self.folder.mkdir(parents=True, exist_ok=True)
        if user is not None:
            blocked = _reachable(self.folder, user)
            if blocked is not None:
                raise PostgresMissing(
                    f"the private PostgreSQL runs as {SYSTEM_USER!r}, who cannot enter {blocked}: "
                    f"choose a DATA_DIR it can reach, or set GENERATION_DATABASE_URL"
                )
        if not self.password_file.exists():
            self.password_file.write_text(secrets.token_urlsafe(24) + "\n")
            self.password_file.chmod(0o600)
        if user is not None:
            for path in (self.folder, self.password_file):
                os.chown(path, user.pw_uid, user.pw_gid)
        if (self.pgdata / "PG_VERSION").exists():
            return
        done = subprocess.run(
            [
                str(binaries() / "initdb"),
                "--pgdata", str(self.pgdata),
                "--username", USER,
                "--pwfile", str(self.password_file),
                "--auth", "scram-sha-256",
                "--encoding", "UTF8",
                "--no-locale",
            ],
            capture_output=True,
            text=True,
            check=False,
            user=user.pw_uid if user else None,
            group=user.pw_gid if user else None,
            extra_groups=[] if user else None,
        )
        if done.returncode != 0:
            raise PostgresMissing(f"initdb failed: {done.stderr.strip() or done.stdout.strip()}")
        # The database the services use, made with the server in single-user mode (no port opened).
        created = subprocess.run(
            [str(binaries() / "postgres"), "--single", "-D", str(self.pgdata), "postgres"],
            input=f"CREATE DATABASE {DATABASE} OWNER {USER};\n",
            capture_output=True,
            text=True,
            check=False,
            user=user.pw_uid if user else None,
            group=user.pw_gid if user else None,
            extra_groups=[] if user else None,
        )
        if created.returncode != 0:
            raise PostgresMissing(f"creating the database failed: {created.stderr.strip()}")

    def command(self) -> list[str]:
        return [
            str(binaries() / "postgres"),
            "-D", str(self.pgdata),
            "-c", "listen_addresses=127.0.0.1",
            "-c", f"port={self.port}",
            "-c", "unix_socket_directories=",
            "-c", "max_connections=200",
            "-c", "log_min_messages=warning",
        ]


_PR_SET_PDEATHSIG = 1


def main() -> None:
    """Become the server (the launcher's `postgres` part): drop to the postgres user when root, exec."""
    server = LocalPostgres(Path(os.environ["ORFEAS_POSTGRES_FOLDER"]), int(os.environ["ORFEAS_POSTGRES_PORT"]))
    user = _system_user()
    if user is not None:
        os.setgroups([])
        os.setgid(user.pw_gid)
        os.setuid(user.pw_uid)
    if sys.platform.startswith("linux"):
        # A change of user clears the parent-death signal the launcher set: ask again. SIGINT is
        # PostgreSQL's fast shutdown (clients cut, everything committed kept).
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGINT)
    command = server.command()
    os.execv(command[0], command)


if __name__ == "__main__":
    main()
