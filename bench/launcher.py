"""`python -m services.stack` (what `make run` starts) as a child process, and its parts found in /proc.

Shared by the supervisor tests and the chaos soak (bench/soak.py): the parts' pids come from /proc
(the launcher's children and their command lines), never guessed.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from services.common.logging_setup import read_log
from services.stack import MODULES, PART_VARIABLE, ROOT, free_port

PART_OF_MODULE = {module: name for name, module in MODULES.items()}


def children_of(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            found.extend(int(p) for p in (task / "children").read_text().split())
        except OSError:
            continue
    return found


def part_of(pid: int) -> str | None:
    """Which part a process runs: the ORFEAS_PART the launcher gave it (`generation-2`), else its command
    line (`python -m services.telemetry.server`)."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
        if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
            return None  # exited, not yet reaped
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    marker = f"{PART_VARIABLE}=".encode()
    for entry in environ:
        if entry.startswith(marker):
            return entry[len(marker):].decode()
    if "-m" in argv and argv.index("-m") + 1 < len(argv):
        return PART_OF_MODULE.get(argv[argv.index("-m") + 1])
    return None


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_for(what: str, check: Callable[[], Any], timeout_s: float = 90.0, every_s: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every_s)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


@dataclass
class Launcher:
    """`python -m services.stack` with its ports and DATA_DIR from the environment, as `make run` passes them."""

    name: str
    data_dir: Path
    extra_env: dict[str, str] = field(default_factory=dict)
    log_root: Path = ROOT / "tests" / "artifacts" / "logs"
    ports: dict[str, int] = field(default_factory=lambda: {
        name: free_port() for name in (
            "GATEWAY_PORT", "GENERATION_PORT", "TELEMETRY_PORT", "GENERATION_METRICS_PORT", "TELEMETRY_METRICS_PORT",
        )
    })
    proc: subprocess.Popen[bytes] | None = None

    @property
    def log_file(self) -> Path:
        return self.log_root / self.name / "launcher.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.ports['GATEWAY_PORT']}"

    def start(self) -> Launcher:
        shutil.rmtree(self.log_file.parent, ignore_errors=True)
        self.log_file.parent.mkdir(parents=True)
        env = {
            **os.environ,
            **{k: str(v) for k, v in self.ports.items()},
            "DATA_DIR": str(self.data_dir),
            "GENERATION_DEVICE_SAMPLE_INTERVAL_S": "1",
            "PYTHONUNBUFFERED": "1",
            **self.extra_env,
        }
        with open(self.log_file, "wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "services.stack"], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT
            )
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def parts(self) -> dict[str, int]:
        """The running parts' pids, read from /proc."""
        found: dict[str, int] = {}
        for pid in children_of(self.pid):
            name = part_of(pid)
            if name is not None:
                found[name] = pid
        return found

    def log(self, msg_startswith: str = "") -> list[dict[str, Any]]:
        return [
            e for e in read_log(self.log_file)
            if e.get("service") == "launcher" and e.get("msg", "").startswith(msg_startswith)
        ]

    def events(self, event: str, part: str | None = None) -> list[dict[str, Any]]:
        return [e for e in self.log() if e.get("event") == event and (part is None or e.get("part") == part)]

    def wait_up(self, timeout_s: float = 120.0) -> dict[str, int]:
        wait_for("the launcher's banner", lambda: self._alive_and("ORFEAS is up"), timeout_s)
        wait_for("/readyz ready", lambda: self.readyz()[1].get("status") == "ready", timeout_s)
        return self.parts()

    def _alive_and(self, banner: str) -> bool:
        assert self.proc is not None and self.proc.poll() is None, f"launcher exited: {self.log_file.read_text()}"
        return banner in self.log_file.read_text(errors="replace")

    def readyz(self) -> tuple[int, dict[str, Any]]:
        try:
            r = httpx.get(f"{self.url}/readyz", timeout=5)
        except httpx.HTTPError:
            return 0, {}
        return r.status_code, r.json()

    def kill_part(self, name: str) -> int:
        pid = self.parts()[name]
        os.kill(pid, signal.SIGKILL)
        wait_for(f"{name} ({pid}) to die", lambda: not alive(pid), 10)
        return pid

    def wait_back(self, name: str, old_pid: int, timeout_s: float = 120.0) -> int:
        """The part's new pid once the launcher has restarted it and it is healthy again."""
        wait_for(f"{name} back", lambda: self.events("part_back", name), timeout_s)
        new = self.parts()[name]
        assert new != old_pid
        return new

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 90.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout_s)

    def close(self) -> None:
        """Whatever the test did: nothing it started is left running."""
        if self.proc is None:
            return
        pids = self.parts() if self.proc.poll() is None else {}
        try:
            self.stop(signal.SIGTERM, 90)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for pid in pids.values():
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
