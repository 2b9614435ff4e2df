"""`make run`: start every service and the gateway, keep them up, stop them all in order on Ctrl-C.

`python -m services.stack` supervises its children (services/supervisor.py): a part
that dies is started again with back-off while the others keep serving, and one
that crashes in a loop is given up on alone. `Stack` is also what the tests and
benchmarks use to start the real stack on free loopback ports.

With GENERATION_INSTANCES=N (N > 1) there are N generation parts, `generation-1` ...
`generation-N`, on GENERATION_PORT, +1, ... (metrics on GENERATION_METRICS_PORT, +10,
+20, ...), sharing DATA_DIR's results and one PostgreSQL: GENERATION_DATABASE_URL's, or
else a private cluster under DATA_DIR/postgres that runs as the `postgres` part
(services/postgres_local.py) and stops last. The gateway balances over all of them.
"""
from __future__ import annotations

import ctypes
import logging
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.config import GenerationConfig, SecurityConfig, SupervisorConfig
from services.common.grpc_security import sync_channel
from services.common.logging_setup import setup_logging
from services.common.postgres import describe
from services.postgres_local import LocalPostgres, PostgresMissing
from services.supervisor import State, Supervisor, stop_stage

log = logging.getLogger("services.stack")

ROOT = Path(__file__).resolve().parent.parent

MODULES: dict[str, str] = {
    "telemetry": "services.telemetry.server",
    "generation": "services.generation.server",
    "gateway": "gateway.server",
    "postgres": "services.postgres_local",
}
# Each generation instance after the first has its metrics this much higher (9101, 9111, 9121, ...),
# clear of telemetry's 9102.
METRICS_PORT_STEP = 10
# Set in every part's environment: which part it is (bench/launcher.py finds the parts by it).
PART_VARIABLE = "ORFEAS_PART"


def module_of(part: str) -> str:
    """The module a part runs: `generation-2` is a generation instance."""
    return MODULES[part.split("-", 1)[0]]


_PR_SET_DEATHSIG = 1
# Resolved here, not between fork and exec, where the loader's lock may be held by another thread.
_prctl = ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None


def _die_with_parent() -> None:  # runs in the child between fork and exec
    # SIGTERM when the launcher dies, even by SIGKILL: no orphan keeps a port.
    if _prctl is not None:
        _prctl(_PR_SET_DEATHSIG, signal.SIGTERM)


# free_port's ports lie between this and the kernel's ephemeral range, or in FREE_PORTS_VARIABLE's
# "low-high" when it is set: the suite gives each of its parallel workers a range of its own there, since
# a port one process has handed out but its service has not bound yet looks free to every other process.
FREE_PORT_LOW = 20000
FREE_PORTS_VARIABLE = "ORFEAS_FREE_PORTS"
# Ports handed out by free_port in this process, never handed out twice. Its own generator: a test that seeds
# the global one (hypothesis does) must not make two processes pick the same ports.
_HANDED_OUT: set[int] = set()
_RANDOM = random.SystemRandom()


def free_port() -> int:
    """A loopback port nothing listens on at the moment of asking, for a service to bind a moment later.

    Chosen at random below the kernel's ephemeral range: a port the kernel hands out itself (binding
    port 0) comes from the range every outgoing connection takes its local port from, so on a busy
    machine a client socket could hold it by the time the service binds it.
    """
    low, high = free_port_range()
    for _ in range(200):
        port = _RANDOM.randrange(low, high)
        if port in _HANDED_OUT:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _HANDED_OUT.add(port)
        return port
    with socket.socket() as s:  # pragma: no cover - 200 taken ports in a row: take what the kernel gives
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_port_range() -> tuple[int, int]:
    """[low, high) of the ports free_port picks from; ValueError names a malformed FREE_PORTS_VARIABLE."""
    given = os.environ.get(FREE_PORTS_VARIABLE)
    if not given:
        return FREE_PORT_LOW, _ephemeral_low()
    try:
        low, high = (int(bound) for bound in given.split("-"))
    except ValueError:
        low = high = 0
    if not 1024 <= low < high <= 65536:
        raise ValueError(f"{FREE_PORTS_VARIABLE}={given!r}: expected 'low-high', with 1024 <= low < high <= 65536")
    return low, high


def _ephemeral_low() -> int:
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768  # Linux's default
    return low if low > FREE_PORT_LOW + 1000 else 65536


@dataclass
class Stack:
    gateway_port: int
    generation_port: int
    telemetry_port: int
    data_dir: Path
    generation_metrics_port: int = 9101
    telemetry_metrics_port: int = 9102
    extra_env: dict[str, str] = field(default_factory=dict)
    log_dir: Path | None = None
    # The launcher's children: in their own process groups, SIGTERMed if the launcher dies.
    detached: bool = False
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    # Generation processes, on generation_port, +1, ...; more than one needs database_url or `postgres`.
    generation_instances: int = 1
    # The PostgreSQL every generation instance shares (empty: SQLite, one instance).
    database_url: str = ""
    # A private cluster run as the `postgres` part (services/postgres_local.py), or None.
    postgres: LocalPostgres | None = None

    @property
    def parts(self) -> tuple[str, ...]:
        """Every part, in the order they start."""
        return (("postgres",) if self.postgres else ()) + ("telemetry", *self.generation_parts, "gateway")

    @property
    def generation_parts(self) -> tuple[str, ...]:
        if self.generation_instances == 1:
            return ("generation",)
        return tuple(f"generation-{i}" for i in range(1, self.generation_instances + 1))

    def generation_port_of(self, part: str) -> int:
        return self.generation_port + self.generation_parts.index(part)

    @property
    def gateway_url(self) -> str:
        return f"http://127.0.0.1:{self.gateway_port}"

    @property
    def generation_address(self) -> str:
        """The gRPC target of every generation instance (several: the ipv4: list the gateway balances over)."""
        if self.generation_instances == 1:
            return f"127.0.0.1:{self.generation_port}"
        ports = [self.generation_port_of(p) for p in self.generation_parts]
        return "ipv4:" + ",".join(f"127.0.0.1:{port}" for port in ports)

    def instance_address(self, part: str) -> str:
        return f"127.0.0.1:{self.generation_port_of(part)}"

    @property
    def telemetry_address(self) -> str:
        return f"127.0.0.1:{self.telemetry_port}"

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            GATEWAY_PORT=str(self.gateway_port),
            GENERATION_PORT=str(self.generation_port),
            TELEMETRY_PORT=str(self.telemetry_port),
            DATA_DIR=str(self.data_dir),
            GENERATION_METRICS_PORT=str(self.generation_metrics_port),
            TELEMETRY_METRICS_PORT=str(self.telemetry_metrics_port),
            PYTHONUNBUFFERED="1",
        )
        if self.database_url:
            env["GENERATION_DATABASE_URL"] = self.database_url
        if self.generation_instances > 1:
            env["GATEWAY_GENERATION_ADDRESS"] = self.generation_address
        env.update(self.extra_env)
        return env

    def env_of(self, name: str) -> dict[str, str]:
        """One part's environment: its instance's ports for a generation instance."""
        env = self.env()
        env[PART_VARIABLE] = name
        if name.startswith("generation") and self.generation_instances > 1:
            index = self.generation_parts.index(name)
            env["GENERATION_PORT"] = str(self.generation_port + index)
            if self.generation_metrics_port:  # 0: metrics off for every instance
                env["GENERATION_METRICS_PORT"] = str(self.generation_metrics_port + METRICS_PORT_STEP * index)
        if name == "postgres" and self.postgres is not None:
            env["ORFEAS_POSTGRES_FOLDER"] = str(self.postgres.folder)
            env["ORFEAS_POSTGRES_PORT"] = str(self.postgres.port)
        return env

    def start(self, name: str, wait: bool = True) -> subprocess.Popen[bytes]:
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            out = open(self.log_dir / f"{name}.log", "ab")  # noqa: SIM115 - closed below, the child has a copy
        else:
            out = None
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", module_of(name)], cwd=ROOT, env=self.env_of(name), stdout=out, stderr=out,
                # Its own process group: Ctrl-C in the terminal reaches the launcher only, which stops
                # the parts in order.
                process_group=0 if self.detached else None,
                preexec_fn=_die_with_parent if self.detached else None,
            )
        finally:
            if out is not None:
                out.close()
        self.processes[name] = proc
        if wait:
            self.wait_ready(name)
        return proc

    def start_all(self) -> None:
        try:
            for name in self.parts:
                self.start(name, wait=False)
            for name in self.parts:
                self.wait_ready(name)
        except BaseException:
            self.stop_all()  # a part that could not start leaves no others behind
            raise

    def wait_ready(self, name: str, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        proc = self.processes[name]
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with code {proc.returncode}")
            if self.healthy(name):
                return
            time.sleep(0.1)
        raise TimeoutError(f"{name} not ready after {timeout_s:.0f}s")

    def healthy(self, name: str) -> bool:
        """The part answers its health check as serving (the gateway: /healthz)."""
        if name == "gateway":
            try:
                with urllib.request.urlopen(f"{self.gateway_url}/healthz", timeout=1) as r:
                    return r.status == 200
            except OSError:
                return False
        if name == "postgres":
            return self._postgres_accepts()
        port = self.generation_port_of(name) if name.startswith("generation") else self.telemetry_port
        security = SecurityConfig(
            tls_ca=self.env().get("ORFEAS_TLS_CA", ""), service_token=self.env().get("ORFEAS_SERVICE_TOKEN", "")
        )
        with sync_channel(f"127.0.0.1:{port}", security) as channel:
            try:
                response = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1)
            except grpc.RpcError:
                return False
            return response.status == health_pb2.HealthCheckResponse.SERVING

    def _postgres_accepts(self) -> bool:
        import psycopg

        assert self.postgres is not None
        try:
            with psycopg.connect(self.postgres.url, connect_timeout=1):
                return True
        except psycopg.OperationalError:
            return False

    def stop(
        self, name: str, sig: int = signal.SIGTERM, timeout_s: float = 30.0, urgent: Callable[[], bool] = lambda: False
    ) -> int | None:
        """Send `sig`, wait up to timeout_s (less once `urgent()` is true), then SIGKILL; the exit code."""
        proc = self.processes.pop(name, None)
        if proc is None or proc.poll() is not None:
            return proc.returncode if proc else None
        proc.send_signal(sig)
        deadline = time.monotonic() + timeout_s
        while proc.poll() is None:
            if urgent() or time.monotonic() > deadline:
                why = "asked to stop at once" if urgent() else f"not stopped after {timeout_s:.0f} s"
                log.warning("%s %s; killing it", name, why, extra={"part": name, "pid": proc.pid})
                proc.kill()
                break
            time.sleep(0.05)
        return proc.wait()

    def kill(self, name: str) -> None:
        self.stop(name, signal.SIGKILL)

    def stop_all(self) -> None:
        # The gateway first, so no new work arrives while the services drain; PostgreSQL last. The
        # generation instances drain side by side.
        for stage in sorted({stop_stage(name) for name in self.processes}):
            names = [name for name in self.processes if stop_stage(name) == stage]
            threads = [threading.Thread(target=self.stop, args=(name,)) for name in names]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()

    # What services.supervisor.Supervisor needs of its children.

    def spawn(self, name: str) -> int:
        return self.start(name, wait=False).pid

    def exit_code(self, name: str) -> int | None:
        proc = self.processes.get(name)
        return None if proc is None else proc.poll()

    def terminate(self, name: str, timeout_s: float, urgent: Callable[[], bool]) -> int | None:
        return self.stop(name, signal.SIGTERM, timeout_s, urgent)


def main() -> None:
    setup_logging("launcher")
    config = SupervisorConfig.from_env()
    generation = GenerationConfig.from_env()
    data_dir = Path(os.environ.get("DATA_DIR", ROOT / "data")).resolve()
    stack = Stack(
        gateway_port=int(os.environ.get("GATEWAY_PORT", "5000")),
        generation_port=int(os.environ.get("GENERATION_PORT", "50051")),
        telemetry_port=int(os.environ.get("TELEMETRY_PORT", "50052")),
        data_dir=data_dir,
        generation_metrics_port=int(os.environ.get("GENERATION_METRICS_PORT", "9101")),
        telemetry_metrics_port=int(os.environ.get("TELEMETRY_METRICS_PORT", "9102")),
        detached=True,
        generation_instances=max(1, generation.instances),
        database_url=generation.database_url,
    )
    if stack.generation_instances > 1 and not stack.database_url:
        # Several instances share one queue: without a server of the operator's, a private one.
        stack.postgres = LocalPostgres(data_dir / "postgres", config.postgres_port or free_port())
        try:
            stack.postgres.prepare()
        except PostgresMissing as exc:
            log.error("cannot start %d generation instances: %s", stack.generation_instances, exc)
            sys.exit(2)
        stack.database_url = stack.postgres.url
    # Generation drains its running batches for its grace period before it stops.
    generation_stop_s = generation.grace_period_s + config.stop_timeout_s
    supervisor = Supervisor(
        stack,
        stack.parts,
        config,
        stop_timeouts_s={name: generation_stop_s for name in stack.generation_parts},
    )
    signals = 0

    def _signal(signum: int, _frame: object) -> None:
        nonlocal signals
        signals += 1
        if signals == 1:
            log.info("%s: stopping the stack in order (again to kill it at once)", signal.Signals(signum).name)

    signal.signal(signal.SIGINT, _signal)
    signal.signal(signal.SIGTERM, _signal)
    exit_code = 0
    try:
        supervisor.start()
        announced = False
        while not signals:
            supervisor.poll()
            if not announced and supervisor.settled:
                announced = True
                _announce(stack, supervisor)
            if supervisor.all_given_up:
                log.error("every part crashed in a loop; the launcher stops")
                exit_code = 1
                break
            time.sleep(config.poll_interval_s)
    finally:
        supervisor.stop(urgent=lambda: signals > 1)
    sys.exit(exit_code)


def _announce(stack: Stack, supervisor: Supervisor) -> None:
    down = [p.name for p in supervisor.parts.values() if p.state != State.UP]
    database = ""
    if stack.postgres is not None:
        database = f"  job database         PostgreSQL (private) on 127.0.0.1:{stack.postgres.port}\n"
    elif stack.database_url:
        database = f"  job database         PostgreSQL at {describe(stack.database_url)}\n"
    print(
        f"\nORFEAS is up:\n  Studio and REST API  {stack.gateway_url}/\n"
        f"  API docs             {stack.gateway_url}/docs\n"
        f"  generation (gRPC)    {stack.generation_address}\n"
        f"{database}"
        f"  telemetry (gRPC)     {stack.telemetry_address}\n"
        f"  data                 {stack.data_dir}\n"
        + (f"  NOT running (crashed in a loop, or a setting it cannot start with): {', '.join(down)}\n" if down else "")
        + "A part that dies is started again. Press Ctrl-C to stop.\n",
        flush=True,
    )


if __name__ == "__main__":
    main()
