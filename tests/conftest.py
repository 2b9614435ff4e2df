"""The real stack, started once per test session on free loopback ports."""
from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest

from pb.orfeas.generation.v1 import generation_pb2_grpc
from services.stack import FREE_PORTS_VARIABLE, Stack, free_port, free_port_range
from tests.postgres_fixtures import postgres  # noqa: F401 - a session fixture: one PostgreSQL per worker, on demand

ARTIFACTS = Path(__file__).parent / "artifacts"


def new_stack(tmp: Path, name: str, **extra_env: str) -> Stack:
    log_dir = ARTIFACTS / "logs" / name
    shutil.rmtree(log_dir, ignore_errors=True)
    return Stack(
        gateway_port=free_port(),
        generation_port=free_port(),
        telemetry_port=free_port(),
        generation_metrics_port=free_port(),
        telemetry_metrics_port=free_port(),
        data_dir=tmp / name,
        extra_env={"GENERATION_DEVICE_SAMPLE_INTERVAL_S": "1", **extra_env},
        log_dir=log_dir,
    )


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    # One session stack per pytest-xdist worker, each logging to its own folder.
    s = new_stack(tmp_path_factory.mktemp("stack"), f"session-{os.environ.get('PYTEST_XDIST_WORKER', 'main')}")
    s.start_all()
    yield s
    s.stop_all()


@pytest.fixture(scope="session")
def generation_stub(stack: Stack) -> Iterator[generation_pb2_grpc.GenerationServiceStub]:
    with grpc.insecure_channel(stack.generation_address) as channel:
        yield generation_pb2_grpc.GenerationServiceStub(channel)


@pytest.fixture(scope="session")
def http(stack: Stack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=stack.gateway_url, timeout=60.0) as client:
        yield client


def pytest_configure(config: pytest.Config) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    # Each xdist worker (and every process it starts) takes its free ports from a slice of its own: two
    # workers picking the same port, each before its service bound it, made a service fail to start.
    worker, workers = os.environ.get("PYTEST_XDIST_WORKER"), os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if worker and workers:
        low, high = worker_ports(free_port_range(), int(worker.removeprefix("gw")), int(workers))
        os.environ[FREE_PORTS_VARIABLE] = f"{low}-{high}"


def worker_ports(ports: tuple[int, int], worker: int, workers: int) -> tuple[int, int]:
    """Worker number `worker`'s own [low, high) of `ports`, one of `workers` equal slices."""
    low, high = ports
    width = (high - low) // workers
    return low + worker * width, low + (worker + 1) * width


# Seconds each of the longest test files took under `make test`'s pytest command (2-core AMD EPYC, 2026-12-08,
# setup included, from --junitxml). `make test` runs files on xdist workers in collection order
# (--no-loadscope-reorder; xdist would otherwise put the files with the most tests first, and these, with few
# tests each, last), and a worker that starts a long file near the end keeps the others waiting. So the
# longest go first; every other file follows in its usual order.
LONGEST_FILES = {
    "test_lifecycle_regressions.py": 171, "test_hunyuan3d_service.py": 129, "test_durability.py": 121,
    "test_supervisor.py": 120, "test_lifecycle_property.py": 92, "test_lifecycle_streams.py": 88,
    "test_cluster.py": 80, "test_soak.py": 75, "test_faults.py": 60, "test_schemathesis.py": 54,
    "test_hunyuan3d_turbo_service.py": 41, "test_batching_backpressure.py": 37, "test_studio_browser.py": 36,
    "test_multi_device.py": 27, "test_hunyuan3d_turbo.py": 26, "test_telemetry_end_to_end.py": 23,
}  # fmt: skip


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    items.sort(key=lambda item: -LONGEST_FILES.get(item.path.name, 0))  # stable: a file keeps its own order
