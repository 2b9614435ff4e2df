"""`make run`: start every service and the gateway, print the URL, stop them all on Ctrl-C.

Also used by the tests to start the real stack on free loopback ports.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.config import SecurityConfig
from services.common.grpc_security import sync_channel

ROOT = Path(__file__).resolve().parent.parent

MODULES: dict[str, str] = {
    "telemetry": "services.telemetry.server",
    "generation": "services.generation.server",
    "gateway": "gateway.server",
}


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
            out = open(self.log_dir / f"{name}.log", "ab")  # noqa: SIM115 - the child owns it
        else:
            out = None
        proc = subprocess.Popen(
            [sys.executable, "-m", MODULES[name]], cwd=ROOT, env=self.env(), stdout=out, stderr=out
        )
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
            if self._ready(name):
                return
            time.sleep(0.1)
        raise TimeoutError(f"{name} not ready after {timeout_s:.0f}s")

    def _ready(self, name: str) -> bool:
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

    def stop(self, name: str, sig: int = signal.SIGTERM, timeout_s: float = 30.0) -> int | None:
        proc = self.processes.pop(name, None)
        if proc is None or proc.poll() is not None:
            return proc.returncode if proc else None
        proc.send_signal(sig)
        try:
            return proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.wait()

    def kill(self, name: str) -> None:
        self.stop(name, signal.SIGKILL)

    def stop_all(self) -> None:
        # The gateway first, so no new work arrives while the services drain.
        for name in ("gateway", "generation", "telemetry"):
            self.stop(name)


def main() -> None:
    stack = Stack(
        gateway_port=int(os.environ.get("GATEWAY_PORT", "5000")),
        generation_port=int(os.environ.get("GENERATION_PORT", "50051")),
        telemetry_port=int(os.environ.get("TELEMETRY_PORT", "50052")),
        data_dir=Path(os.environ.get("DATA_DIR", ROOT / "data")).resolve(),
        generation_metrics_port=int(os.environ.get("GENERATION_METRICS_PORT", "9101")),
        telemetry_metrics_port=int(os.environ.get("TELEMETRY_METRICS_PORT", "9102")),
    )
    stop = False

    def _signal(signum: int, _frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGINT, _signal)
    signal.signal(signal.SIGTERM, _signal)
    try:
        stack.start_all()
        print(
            f"\nORFEAS is up:\n  Studio and REST API  {stack.gateway_url}/\n"
            f"  API docs             {stack.gateway_url}/docs\n"
            f"  generation (gRPC)    {stack.generation_address}\n"
            f"  telemetry (gRPC)     {stack.telemetry_address}\n"
            f"  data                 {stack.data_dir}\nPress Ctrl-C to stop.\n",
            flush=True,
        )
        while not stop:
            for name, proc in list(stack.processes.items()):
                if proc.poll() is not None:
                    print(f"{name} exited with code {proc.returncode}; stopping the stack", file=sys.stderr)
                    stop = True
            time.sleep(0.5)
    finally:
        stack.stop_all()


if __name__ == "__main__":
    main()
