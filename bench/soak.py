"""A bounded chaos soak: mixed load through the gateway while faults are injected at random.

    python -m bench.soak --seconds 600                # `make soak` (SOAK_S sets the seconds)
    python -m bench.soak --seconds 600 --instances 2  # `make soak SOAK_INSTANCES=2`: a cluster

The stack is the real launcher (`python -m services.stack`, what `make run` starts), on free loopback
ports, with DATA_DIR on a tmpfs of its own (mounting needs root, as CI has). The faults, one at a
time, each kind in turn in a seeded order:
- kill -9 of one service (the launcher restarts it);
- the disk filling below the storage reserve, then freed;
- an export process killed mid-export;
- telemetry paused with SIGSTOP, then resumed.
With --instances N > 1 the stack is N generation instances on the launcher's private PostgreSQL (under
the same tmpfs, so a full disk reaches the database too), and two faults are added: the database killed
with kill -9 (the launcher restarts it) and the database frozen with SIGSTOP, then resumed. Report:
bench/SOAK_CLUSTER.md.
The report (bench/SOAK.md by default) counts accepted, succeeded, failed by code, refused by code,
stuck (accepted and never ended: must be 0), lost (accepted and gone: must be 0), and the p95
latency of jobs that ran entirely outside fault windows.
"""
from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import statistics
import subprocess
import tempfile
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from bench.launcher import Launcher, alive, children_of, wait_for
from tests.images import disk_png, photo_png

FAULTS = ("kill_service", "fill_disk", "kill_export", "pause_telemetry")
CLUSTER_FAULTS = (*FAULTS, "kill_database", "pause_database")
TERMINAL = {"succeeded", "failed", "cancelled"}
# After a fault ends, this long still counts as its window (clients retrying, queues draining).
SETTLE_S = 5.0
RESERVE_MB = 24
DISK_MB = 160
ARTIFACT_BUDGET_MB = 48


@dataclass
class Job:
    id: str
    submitted: float
    ended: float | None = None
    status: str = "queued"
    error_code: str | None = None


@dataclass
class Tally:
    jobs: dict[str, Job] = field(default_factory=dict)
    refused: Counter = field(default_factory=Counter)
    faults: list[tuple[str, float, float]] = field(default_factory=list)  # kind, start, end
    lock: threading.Lock = field(default_factory=threading.Lock)


def pictures() -> list[tuple[bytes, dict[str, str]]]:
    """A mix of pictures and settings, all small enough for a 2-core machine."""
    return [
        (disk_png(), {"resolution": "96", "steps": "20", "face_count": "2000", "texture_size": "256"}),
        (disk_png(256, 0.3), {"resolution": "128", "face_count": "4000", "texture": "false"}),
        (photo_png("astronaut", 256), {"resolution": "128", "face_count": "5000", "texture_size": "512"}),
        (photo_png("coffee", 256), {"resolution": "160", "face_count": "8000", "format": "stl"}),
    ]


class Client(threading.Thread):
    """Submits, follows to the end, sometimes cancels; retries what a fault interrupted."""

    def __init__(self, url: str, tally: Tally, stop: threading.Event, seed: int) -> None:
        super().__init__(daemon=True)
        self.url, self.tally, self.stop, self.random = url, tally, stop, random.Random(seed)
        self.mix = pictures()

    def run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=30) as http:
            while not self.stop.is_set():
                job = self._submit(http)
                if job is not None:
                    if self.random.random() < 0.1:
                        time.sleep(self.random.uniform(0.0, 0.5))
                        self._retrying(lambda: http.delete(f"/api/v1/generations/{job.id}"))
                    self._follow(http, job)
                time.sleep(self.random.uniform(0.05, 0.3))

    def _submit(self, http: httpx.Client) -> Job | None:
        image, fields = self.random.choice(self.mix)
        key = uuid.uuid4().hex  # the same key on every retry: a retried POST never makes a second job
        began = time.time()
        while not self.stop.is_set():
            try:
                response = http.post(
                    "/api/v1/generations",
                    files={"image": ("p.png", image, "image/png")},
                    data=fields,
                    headers={"Idempotency-Key": key},
                )
            except httpx.TransportError:
                time.sleep(0.3)  # the gateway is restarting
                continue
            if response.status_code == 202:
                job = Job(response.json()["id"], began)
                with self.tally.lock:
                    self.tally.jobs.setdefault(job.id, job)
                return job
            with self.tally.lock:
                self.tally.refused[response.status_code] += 1
            if response.status_code in (429, 502, 503, 507):
                time.sleep(float(response.headers.get("Retry-After", "1")) if response.status_code != 507 else 1.0)
                continue
            return None  # a 4xx for the request itself: not retried
        return None

    def _retrying(self, call):  # noqa: ANN001, ANN202
        for _ in range(50):
            try:
                response = call()
                if response.status_code < 500:
                    return response
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        return None

    def _follow(self, http: httpx.Client, job: Job) -> None:
        while not self.stop.is_set() or job.ended is None:
            response = self._retrying(lambda: http.get(f"/api/v1/generations/{job.id}"))
            if response is not None and response.status_code == 200:
                body = response.json()
                if body["status"] in TERMINAL:
                    job.status = body["status"]
                    job.error_code = (body.get("error") or {}).get("code")
                    job.ended = time.time()
                    return
            if self.stop.is_set():
                return  # the final check takes over
            time.sleep(0.2)


class Injector(threading.Thread):
    def __init__(self, launcher: Launcher, disk: Path | None, tally: Tally, stop: threading.Event, seed: int) -> None:
        super().__init__(daemon=True)
        self.launcher, self.disk, self.tally, self.stop = launcher, disk, tally, stop
        self.random = random.Random(seed)
        self.whole = launcher.parts()  # every part, as the stack started
        self.faults = CLUSTER_FAULTS if "postgres" in self.whole else FAULTS

    def run(self) -> None:
        kinds: list[str] = []
        while not self.stop.wait(self.random.uniform(4.0, 8.0)):
            if not kinds:
                kinds = [k for k in self.faults if k != "fill_disk" or self.disk is not None]
                self.random.shuffle(kinds)
            kind = kinds.pop()
            began = time.time()
            getattr(self, kind)()
            with self.tally.lock:
                self.tally.faults.append((kind, began, time.time()))
            self._wait_healthy()

    def kill_service(self) -> None:
        part = self.random.choice(sorted(name for name in self.whole if name != "postgres"))
        self.launcher.kill_part(part)

    def kill_database(self) -> None:
        self.launcher.kill_part("postgres")

    def pause_database(self) -> None:
        """Every PostgreSQL process frozen: connections stay open and nothing answers, as in a network
        partition, rather than the refused connections of a database that is down."""
        postmaster = self.launcher.parts().get("postgres")
        if postmaster is None:
            return
        frozen = [postmaster, *children_of(postmaster)]
        for pid in frozen:
            os.kill(pid, signal.SIGSTOP)
        try:
            self.stop.wait(5.0)
        finally:
            for pid in frozen:
                if alive(pid):
                    os.kill(pid, signal.SIGCONT)

    def fill_disk(self) -> None:
        assert self.disk is not None
        filler = self.disk / "filler"
        stat = os.statvfs(self.disk)
        try:
            with open(filler, "wb") as f:
                f.write(b"\0" * max(0, stat.f_bavail * stat.f_frsize - 4 * 2**20))
        except OSError:
            pass
        self.stop.wait(5.0)
        filler.unlink(missing_ok=True)

    def kill_export(self) -> None:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            instances = [pid for name, pid in self.launcher.parts().items() if name.startswith("generation")]
            victims = [pid for g in instances for pid in children_of(g) if _is_export_process(pid)]
            if victims:
                for pid in victims:
                    os.kill(pid, signal.SIGKILL)
                return
            time.sleep(0.1)

    def pause_telemetry(self) -> None:
        pid = self.launcher.parts().get("telemetry")
        if pid is None:
            return
        os.kill(pid, signal.SIGSTOP)
        try:
            self.stop.wait(5.0)
        finally:
            os.kill(pid, signal.SIGCONT)

    def _wait_healthy(self) -> None:
        try:
            wait_for("the stack to be whole again", lambda: self.launcher.parts().keys() == self.whole.keys(), 60, 0.2)
        except AssertionError:
            pass


def _is_export_process(pid: int) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return False
    return alive(pid) and "multiprocessing" in cmdline and "resource_tracker" not in cmdline


@dataclass
class SoakReport:
    seconds: float
    disk_faults: bool
    instances: int
    accepted: int
    succeeded: int
    failed: dict[str, int]
    cancelled: int
    refused: dict[int, int]
    stuck: list[str]
    lost: list[str]
    expired: int
    faults: dict[str, int]
    p95_quiet_s: float | None
    quiet_jobs: int

    def markdown(self, command: str) -> str:
        failed = ", ".join(f"{code}: {n}" for code, n in sorted(self.failed.items())) or "none"
        refused = ", ".join(f"{code}: {n}" for code, n in sorted(self.refused.items())) or "none"
        faults = ", ".join(f"{kind} ×{n}" for kind, n in sorted(self.faults.items()))
        p95 = f"{self.p95_quiet_s:.2f} s over {self.quiet_jobs} jobs" if self.p95_quiet_s is not None else "n/a"
        disk = "" if self.disk_faults else " (no disk faults: not run as root, so no tmpfs)"
        title, stack = "Chaos soak", "The real launcher (`python -m services.stack`)"
        if self.instances > 1:
            title = f"Chaos soak of a cluster: {self.instances} generation instances on PostgreSQL"
            stack += (f" with GENERATION_INSTANCES={self.instances}: its private PostgreSQL, under DATA_DIR, and the"
                      " gateway balancing over the instances,")
        return f"""# {title}

Command: `{command}` on this machine (2 cores, no GPU), {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.
{stack} on loopback, DATA_DIR on a {DISK_MB} MB tmpfs with a
{RESERVE_MB} MB storage reserve{disk}; clients post a mix of pictures through the gateway (10 % cancelled),
follow each job to its end, and retry what a fault interrupted with the same Idempotency-Key.

| measure | value |
| --- | --- |
| duration | {self.seconds:.0f} s |
| faults injected | {faults} |
| accepted | {self.accepted} |
| succeeded | {self.succeeded} |
| cancelled | {self.cancelled} |
| failed, by code | {failed} |
| refused, by HTTP status | {refused} |
| **stuck** (accepted, never ended) | **{len(self.stuck)}** |
| **lost** (accepted, then unknown) | **{len(self.lost)}** |
| ended, then removed by the artifact budget ({ARTIFACT_BUDGET_MB} MB; a tombstone says so) | {self.expired} |
| p95 latency outside fault windows (submit to end) | {p95} |

A refusal is a clean, temporary answer (507 while the disk is below its reserve, 503 while a service
restarts, 429 when the queue is full); the client retries it. Failures by code are the job's own or an
infrastructure fault that ran out of attempts (GENERATION_MAX_ATTEMPTS=3).
"""


def run_soak(
    seconds: float, seed: int = 7, work_dir: Path | None = None, log_root: Path | None = None, instances: int = 1
) -> SoakReport:
    work = Path(tempfile.mkdtemp(prefix="orfeas-soak-", dir=work_dir))
    work.chmod(0o755)  # a cluster's private PostgreSQL runs as `postgres` under it
    disk: Path | None = work / "disk"
    disk.mkdir()
    if os.geteuid() == 0:
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={DISK_MB}m", "tmpfs", str(disk)], check=True)
    else:
        disk = None
    launcher = Launcher(
        "soak",
        (disk or work) / "data",
        {
            "GENERATION_MIN_FREE_MB": str(RESERVE_MB),
            "GENERATION_MAX_ATTEMPTS": "3",
            "GENERATION_EXPORT_INLINE_MAX_FACES": "0",
            "GENERATION_GRACE_PERIOD_S": "5",
            "GENERATION_QUEUE_LIMIT": "16",
            # Finished jobs' files go oldest first beyond this, as an operator sizes it for the disk: the
            # soak then runs for as long as asked instead of filling its small disk for good.
            "GENERATION_ARTIFACT_BUDGET_MB": str(ARTIFACT_BUDGET_MB),
            "GENERATION_RETENTION_INTERVAL_S": "2",
            "SUPERVISOR_BACKOFF_INITIAL_S": "0.2",
            "SUPERVISOR_MAX_RESTARTS": "1000",
            "GENERATION_INSTANCES": str(instances),
        },
        **({"log_root": log_root} if log_root else {}),
    )
    tally = Tally()
    stop = threading.Event()
    try:
        launcher.start().wait_up()
        clients = [Client(launcher.url, tally, stop, seed + i) for i in range(2)]
        injector = Injector(launcher, disk, tally, stop, seed)
        began = time.time()
        for thread in (*clients, injector):
            thread.start()
        time.sleep(seconds)
        stop.set()
        injector.join(30)
        for client in clients:
            client.join(60)
        elapsed = time.time() - began
        stuck, lost, expired = _final_check(launcher, tally)
    finally:
        launcher.close()
        if disk is not None:
            subprocess.run(["umount", "-l", str(disk)], check=False)
        shutil.rmtree(work, ignore_errors=True)
    return _report(tally, elapsed, disk is not None, instances, stuck, lost, expired)


def _final_check(launcher: Launcher, tally: Tally) -> tuple[list[str], list[str], int]:
    """Every accepted job must end (within two minutes of the load stopping) and still be known: as itself,
    or, when the artifact budget removed its files, as a tombstone saying so (counted, not lost)."""
    stuck: list[str] = []
    lost: list[str] = []
    expired = 0
    deadline = time.monotonic() + 120
    with httpx.Client(base_url=launcher.url, timeout=30) as http:
        for job in tally.jobs.values():
            while True:
                try:
                    response = http.get(f"/api/v1/generations/{job.id}")
                except httpx.TransportError:
                    response = None
                if response is not None and response.status_code == 404:
                    if "expired" in response.json()["error"]["message"]:
                        expired += 1  # retention removes finished jobs only: it ended, then its files went
                    else:
                        lost.append(job.id)
                    break
                if response is not None and response.status_code == 200:
                    body = response.json()
                    if body["status"] in TERMINAL:
                        job.status = body["status"]
                        job.error_code = (body.get("error") or {}).get("code")
                        job.ended = job.ended or time.time()
                        break
                if time.monotonic() > deadline:
                    stuck.append(job.id)
                    break
                time.sleep(0.3)
    return stuck, lost, expired


def _report(
    tally: Tally, elapsed: float, disk_faults: bool, instances: int, stuck: list[str], lost: list[str], expired: int
) -> SoakReport:
    jobs = list(tally.jobs.values())
    windows = [(start, end + SETTLE_S) for _, start, end in tally.faults]
    quiet = [
        j.ended - j.submitted
        for j in jobs
        if j.ended is not None and j.status == "succeeded"
        and not any(j.submitted < end and j.ended > start for start, end in windows)
    ]
    p95 = statistics.quantiles(quiet, n=20)[-1] if len(quiet) >= 2 else (quiet[0] if quiet else None)
    return SoakReport(
        seconds=elapsed,
        disk_faults=disk_faults,
        instances=instances,
        accepted=len(jobs),
        succeeded=sum(j.status == "succeeded" for j in jobs),
        failed=dict(Counter(j.error_code or "unknown" for j in jobs if j.status == "failed")),
        cancelled=sum(j.status == "cancelled" for j in jobs),
        refused=dict(tally.refused),
        stuck=stuck,
        lost=lost,
        expired=expired,
        faults=dict(Counter(kind for kind, _, _ in tally.faults)),
        p95_quiet_s=p95,
        quiet_jobs=len(quiet),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=float(os.environ.get("SOAK_S", "600")))
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--instances", type=int, default=int(os.environ.get("SOAK_INSTANCES", "1")))
    parser.add_argument("--report", type=Path, help="default: bench/SOAK.md, or bench/SOAK_CLUSTER.md for a cluster")
    args = parser.parse_args()
    report = run_soak(args.seconds, args.seed, instances=args.instances)
    command = f"make soak SOAK_S={args.seconds:g}" + (f" SOAK_INSTANCES={args.instances}" if args.instances > 1 else "")
    default = "SOAK_CLUSTER.md" if args.instances > 1 else "SOAK.md"
    (args.report or Path(__file__).parent / default).write_text(report.markdown(command))
    print(report.markdown(command))
    if report.stuck or report.lost:
        raise SystemExit(f"stuck: {report.stuck}, lost: {report.lost}")


if __name__ == "__main__":
    main()
