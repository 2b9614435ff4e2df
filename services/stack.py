"""`make run`: start every service and the gateway, keep them up, stop them all in order on Ctrl-C.

`python -m services.stack` supervises its children (services/supervisor.py): a part
that dies is started again with back-off while the others keep serving, and one
that crashes in a loop is given up on alone. `Stack` is also what the tests and
benchmarks use to start the real stack on free loopback ports.
"""
from __future__ import annotations

import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
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
from services.supervisor import STOP_ORDER, State, Supervisor

log = logging.getLogger("services.stack")

ROOT = Path(__file__).resolve().parent.parent

MODULES: dict[str, str] = {
    "telemetry": "services.telemetry.server",
    "generation": "services.generation.server",
    "gateway": "gateway.server",
}


_PR_SET_DEATHSIG = 1
# Resolved here, not between fork and exec, where the loader's lock may be held by another thread.
_prctl = ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None


def _die_with_parent() -> None:  # runs in the child between fork and exec
    # SIGTERM when the launcher dies, even by SIGKILL: no orphan keeps a port.
    if _prctl is not None:
        _prctl(_PR_SET_DEATHSIG, signal.SIGTERM)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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

    @property
    def gateway_url(self) -> str:
        return f"http://127.0.0.1:{self.gateway_port}"

    @property
    def generation_address(self) -> str:
        return f"127.0.0.1:{self.generation_port}"

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
        env.update(self.extra_env)
        return env

    def start(self, name: str, wait: bool = True) -> subprocess.Popen[bytes]:
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            out = open(self.log_dir / f"{name}.log", "ab")  # noqa: SIM115 - closed below, the child has a copy
        else:
            out = None
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", MODULES[name]], cwd=ROOT, env=self.env(), stdout=out, stderr=out,
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
        for name in MODULES:
            self.start(name, wait=False)
        for name in MODULES:
            self.wait_ready(name)

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
        port = self.generation_port if name == "generation" else self.telemetry_port
        security = SecurityConfig(
            tls_ca=self.env().get("ORFEAS_TLS_CA", ""), service_token=self.env().get("ORFEAS_SERVICE_TOKEN", "")
        )
        with sync_channel(f"127.0.0.1:{port}", security) as channel:
            try:
                response = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1)
            except grpc.RpcError:
                return False
            return response.status == health_pb2.HealthCheckResponse.SERVING

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
        # The gateway first, so no new work arrives while the services drain.
        for name in STOP_ORDER:
            self.stop(name)

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
    stack = Stack(
        gateway_port=int(os.environ.get("GATEWAY_PORT", "5000")),
        generation_port=int(os.environ.get("GENERATION_PORT", "50051")),
        telemetry_port=int(os.environ.get("TELEMETRY_PORT", "50052")),
        data_dir=Path(os.environ.get("DATA_DIR", ROOT / "data")).resolve(),
        generation_metrics_port=int(os.environ.get("GENERATION_METRICS_PORT", "9101")),
        telemetry_metrics_port=int(os.environ.get("TELEMETRY_METRICS_PORT", "9102")),
        detached=True,
    )
    # Generation drains its running batches for its grace period before it stops.
    generation_stop_s = GenerationConfig.from_env().grace_period_s + config.stop_timeout_s
    supervisor = Supervisor(stack, tuple(MODULES), config, stop_timeouts_s={"generation": generation_stop_s})
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
    print(
        f"\nORFEAS is up:\n  Studio and REST API  {stack.gateway_url}/\n"
        f"  API docs             {stack.gateway_url}/docs\n"
        f"  generation (gRPC)    {stack.generation_address}\n"
        f"  telemetry (gRPC)     {stack.telemetry_address}\n"
        f"  data                 {stack.data_dir}\n"
        + (f"  NOT running (crashed in a loop, or a setting it cannot start with): {', '.join(down)}\n" if down else "")
        + "A part that dies is started again. Press Ctrl-C to stop.\n",
        flush=True,
    )


if __name__ == "__main__":
    main()
