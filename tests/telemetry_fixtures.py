"""The real telemetry service as a subprocess, for the telemetry tests, plus
builders for the records they plant."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from pb.orfeas.telemetry.v1 import telemetry_pb2 as tpb
from pb.orfeas.telemetry.v1 import telemetry_pb2_grpc
from services.stack import free_port  # noqa: F401 - the telemetry tests take it from here

REPO = Path(__file__).resolve().parent.parent
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 15.0
MIB = 1024 * 1024
STAGES = ("image_loading", "image_preprocessing", "shape_generation", "texture_synthesis", "mesh_export")


class TelemetryProcess:
    """`python -m services.telemetry.server` on 127.0.0.1, its log in a file."""

    def __init__(self, data_dir: Path, port: int = 0, env: dict[str, str] | None = None) -> None:
        self.data_dir = data_dir
        self.port = port
        self.env = env or {}
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = data_dir / f"telemetry-{time.monotonic_ns()}.log"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> TelemetryProcess:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.data_dir / f"telemetry-{time.monotonic_ns()}.log"
        env = dict(os.environ)
        # Plain loopback unless self.env says otherwise: no service token or
        # TLS from the surrounding environment.
        for name in ("TELEMETRY_DATA_DIR", "ORFEAS_SERVICE_TOKEN", "ORFEAS_TLS_CERT", "ORFEAS_TLS_KEY",
                     "ORFEAS_TLS_CA"):
            env.pop(name, None)
        env |= {
            "DATA_DIR": str(self.data_dir),
            "TELEMETRY_HOST": "127.0.0.1",
            "TELEMETRY_PORT": str(self.port),
            "TELEMETRY_METRICS_PORT": "0",
            **self.env,
        }
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "services.telemetry.server"],
                cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=log,
            )
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            for entry in self.log_entries():
                if entry.get("event") == "listening":
                    self.port = int(entry["port"])
                    return self
            if self.proc.poll() is not None:
                raise RuntimeError(f"telemetry exited with {self.proc.returncode}:\n{self.log_path.read_text()}")
            time.sleep(0.05)
        self.kill()
        raise RuntimeError(f"telemetry did not start within {START_TIMEOUT_S}s:\n{self.log_path.read_text()}")

    def log_entries(self) -> list[dict[str, Any]]:
        entries = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            try:
                entries.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return entries

    def kill(self) -> None:
        """SIGKILL: no chance to tidy up."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(STOP_TIMEOUT_S)

    def terminate(self) -> int:
        """SIGTERM and wait; the exit status."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(STOP_TIMEOUT_S)
            raise

    def stub(self) -> tuple[grpc.Channel, telemetry_pb2_grpc.TelemetryServiceStub]:
        channel = grpc.insecure_channel(self.address)
        return channel, telemetry_pb2_grpc.TelemetryServiceStub(channel)


@pytest.fixture(scope="module")
def telemetry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TelemetryProcess]:
    """A telemetry server of the test module's own, on a fresh DATA_DIR."""
    proc = TelemetryProcess(tmp_path_factory.mktemp("telemetry")).start()
    try:
        yield proc
    finally:
        proc.kill()


@pytest.fixture(scope="module")
def stub(telemetry: TelemetryProcess) -> Iterator[telemetry_pb2_grpc.TelemetryServiceStub]:
    channel, s = telemetry.stub()
    try:
        yield s
    finally:
        channel.close()


def profile(
    job_id: str,
    backend: str,
    stages: dict[str, float],
    *,
    total: float | None = None,
    started_at: float | None = None,
    succeeded: bool = True,
    steps: int = 50,
    resolution: int = 256,
    batch_size: int = 1,
    device: str = "cpu",
    precision: str = "fp32",
    face_count: int = 40_000,
    worker_id: str = "w1",
    peaks: dict[str, int] | None = None,
) -> tpb.PipelineProfile:
    """A profile whose stages run back to back in the order given."""
    offset = 0.0
    msgs = []
    for name, duration in stages.items():
        msgs.append(
            tpb.StageProfile(
                name=name, start_offset_s=offset, duration_s=duration, memory_peak_bytes=(peaks or {}).get(name, 0)
            )
        )
        offset += duration
    return tpb.PipelineProfile(
        job_id=job_id,
        backend=backend,
        worker_id=worker_id,
        device=device,
        batch_size=batch_size,
        image_width=512,
        image_height=512,
        resolution=resolution,
        steps=steps,
        face_count=face_count,
        precision=precision,
        started_at=time.time() - 100 if started_at is None else started_at,
        total_duration_s=offset if total is None else total,
        stages=msgs,
        succeeded=succeeded,
    )


def five_stages(loading: float, prep: float, shape: float, texture: float, export: float) -> dict[str, float]:
    return dict(zip(STAGES, (loading, prep, shape, texture, export), strict=False))


def rpc_error(fn: Any, request: Any) -> grpc.RpcError:
    """The error `fn(request)` raises; fails the test when it succeeds."""
    with pytest.raises(grpc.RpcError) as info:
        fn(request, timeout=10)
    return info.value
