"""TelemetryClient against the real service, a killed one and one that never
answers: reporting never raises or blocks, drops are counted, and batch sizes
fall back to the local rule."""
from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from pb.orfeas.telemetry.v1 import telemetry_pb2 as tpb
from services.common.config import SecurityConfig
from services.generation.batch_sizing import OptimizerBatchSizer
from services.generation.device_monitor import sample_devices
from services.generation.pipeline.params import GenerationParams
from services.generation.telemetry_client import (
    BatchOutcome,
    PipelineProfile,
    StageProfile,
    TelemetryClient,
    fallback_per_item_bytes,
    open_channel,
)
from tests.telemetry_fixtures import MIB, TelemetryProcess, free_port

# Upper bounds on waiting for something that should happen much sooner; they
# keep a broken test from hanging, they are not what is tested.
WAIT_S = 15.0


def _profile(job_id: str, backend: str = "client", total: float = 2.0, shape: float = 1.0) -> PipelineProfile:
    return PipelineProfile(
        job_id=job_id, backend=backend, worker_id="w1", device="cpu", batch_size=1, image_width=64,
        image_height=64, resolution=128, steps=20, started_at=time.time() - 5, total_duration_s=total,
        stages=[
            StageProfile("image_loading", 0.0, total - shape),
            StageProfile("shape_generation", total - shape, shape, memory_peak_bytes=300 * MIB),
        ],
        succeeded=True,
    )


def _pipelines(proc: TelemetryProcess, backend: str) -> int:
    channel, stub = proc.stub()
    with channel:
        return stub.GetPerformanceSummary(tpb.GetPerformanceSummaryRequest(backend=backend), timeout=5).total_pipelines


async def _until(predicate, what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not await asyncio.to_thread(predicate):
        if time.monotonic() > deadline:
            pytest.fail(f"gave up waiting for {what}")
        await asyncio.sleep(0.05)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[TelemetryProcess]:
    proc = TelemetryProcess(tmp_path).start()
    try:
        yield proc
    finally:
        proc.kill()


@pytest.fixture
def blackhole() -> Iterator[str]:
    """A port that accepts TCP connections and never says a word."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(16)
        yield f"127.0.0.1:{s.getsockname()[1]}"


async def test_reports_arrive(server: TelemetryProcess) -> None:
    client = TelemetryClient(server.address)
    await client.start()
    try:
        for i in range(3):
            client.report_profile(_profile(f"arrive-{i}", backend="arrive"))
        (sample,) = sample_devices("w1")
        client.report_device_sample(sample)
        # From another thread too: the pipeline may run in one.
        await asyncio.to_thread(client.report_profile, _profile("arrive-3", backend="arrive"))
        await _until(lambda: _pipelines(server, "arrive") == 4, "4 profiles")
        await _until(lambda: client.reports_sent == 5, "5 reports sent")
        assert client.connected
        assert client.reports_dropped == 0 and client.pending == 0
    finally:
        await client.close()
    channel, stub = server.stub()
    with channel:
        status = stub.GetDeviceStatus(tpb.GetDeviceStatusRequest(worker_id="w1"), timeout=5)
    assert [d.latest.device_type for d in status.devices] == ["cpu"]


async def test_against_a_dead_server_reports_never_raise_and_drops_are_counted() -> None:
    client = TelemetryClient(f"127.0.0.1:{free_port()}", buffer_size=5, batch_max=5, flush_timeout_s=0.5)
    await client.start()
    for i in range(20):
        assert client.report_profile(_profile(f"dead-{i}")) is None
    # Nothing got through; what is not buffered or in flight was dropped.
    assert client.reports_sent == 0
    assert client.reports_dropped + client.pending == 20
    assert client.reports_dropped >= 10
    await client.close()
    assert client.reports_dropped == 20 and client.pending == 0
    assert not client.connected
    # After close a report is still harmless, and counted.
    client.report_profile(_profile("late"))
    assert client.reports_dropped == 21


async def test_recommend_falls_back_when_telemetry_is_down() -> None:
    client = TelemetryClient(f"127.0.0.1:{free_port()}")
    await client.start()
    try:
        d = await asyncio.wait_for(
            client.recommend_batch_size(backend="inflate", resolution=256, steps=50, queue_length=4,
                                        free_memory_bytes=15360 * MIB),
            WAIT_S,
        )
    finally:
        await client.close()
    assert d.source == "local-fallback"
    assert d.reasoning.startswith("telemetry unavailable (UNAVAILABLE")
    # 2048 MiB per item at 256², 85% of 15360 MiB: 6, capped by the queue at 4.
    assert d.per_item_mb == fallback_per_item_bytes(256) / MIB == 2048
    assert "local conservative rule: available 15360 MB, 2048 MB per item at 256²" in d.reasoning
    assert d.size == 4 and d.reasoning.endswith("; queue length 4 → 4")
    assert d.decision_id == 0


async def test_recommend_gives_up_at_its_deadline(blackhole: str) -> None:
    """Telemetry that accepts the connection and never answers: only the
    deadline can end the call, and the reason says it did."""
    client = TelemetryClient(blackhole, recommend_deadline_s=0.2)
    await client.start()
    try:
        d = await asyncio.wait_for(
            client.recommend_batch_size(backend="inflate", resolution=512, steps=50, queue_length=10,
                                        free_memory_bytes=64 * 1024 * MIB),
            WAIT_S,
        )
    finally:
        await client.close()
    assert d.source == "local-fallback"
    assert "DEADLINE_EXCEEDED" in d.reasoning, d.reasoning
    assert d.per_item_mb == 8192  # 2048 MiB × (512/256)²
    assert d.size == 6  # floor(0.85 × 65536 / 8192)


async def test_recommend_uses_telemetry_and_remembers_its_cost(server: TelemetryProcess) -> None:
    client = TelemetryClient(server.address)
    await client.start()
    try:
        d = await client.recommend_batch_size(backend="remember", resolution=256, steps=50, queue_length=10,
                                              free_memory_bytes=10_000 * MIB)
        assert d.source == "telemetry" and d.decision_id > 0
        assert d.available_mb == 10_000
        client.report_batch_outcome(BatchOutcome(backend="remember", resolution=256, steps=50, batch_size=d.size,
                                                 peak_memory_bytes=d.size * 1000 * MIB, decision_id=d.decision_id))
        await _until(lambda: client.reports_sent == 1, "the outcome sent")
        learned = await client.recommend_batch_size(backend="remember", resolution=256, steps=50, queue_length=10,
                                                    free_memory_bytes=10_000 * MIB)
        assert learned.per_item_mb == pytest.approx(1150, abs=0.01)  # 1000 MiB + 15% headroom
        server.kill()
        fallback = await client.recommend_batch_size(backend="remember", resolution=256, steps=50, queue_length=10,
                                                     free_memory_bytes=10_000 * MIB)
    finally:
        await client.close()
    assert fallback.source == "local-fallback"
    # The last cost telemetry gave, plus 25%, beats the blind default.
    assert fallback.per_item_mb == pytest.approx(1150 * 1.25, abs=0.01)
    assert fallback.size == 5  # floor(8500 / 1437.5)


async def test_telemetry_killed_mid_run_then_back(server: TelemetryProcess) -> None:
    client = TelemetryClient(server.address, backoff_max_s=0.5)
    await client.start()
    try:
        for i in range(2):
            client.report_profile(_profile(f"mid-{i}", backend="mid"))
        await _until(lambda: client.reports_sent == 2, "2 reports sent")
        port = server.port
        server.kill()
        for i in range(2, 5):
            client.report_profile(_profile(f"mid-{i}", backend="mid"))  # must not raise
        await _until(lambda: not client.connected, "the client to notice")
        assert client.reports_sent == 2 and client.pending == 3
        # Back on the same port with the same data: the buffered reports go through.
        server.port = port
        server.start()
        await _until(lambda: client.reports_sent == 5, "the buffered reports sent")
        assert client.connected and client.reports_dropped == 0
        assert _pipelines(server, "mid") == 5
    finally:
        await client.close()


async def test_an_invalid_report_is_dropped_alone(server: TelemetryProcess) -> None:
    client = TelemetryClient(server.address)
    bad = _profile("bad", backend="reject", total=-1.0)
    client.report_profile(_profile("ok-1", backend="reject"))  # before start: buffered
    client.report_profile(bad)
    client.report_profile(_profile("ok-2", backend="reject"))
    await client.start()
    try:
        await _until(lambda: client.reports_sent + client.reports_rejected == 3, "all three handled")
    finally:
        await client.close()
    assert (client.reports_sent, client.reports_rejected, client.reports_dropped) == (2, 1, 1)
    assert client.dropped_by_kind == {"profiles": 1, "outcomes": 0, "samples": 0}
    assert _pipelines(server, "reject") == 2


async def test_invalid_batch_request_falls_back_too(server: TelemetryProcess) -> None:
    client = TelemetryClient(server.address)
    await client.start()
    try:
        d = await client.recommend_batch_size(backend="", resolution=256, steps=50, queue_length=-1,
                                              free_memory_bytes=4096 * MIB)
    finally:
        await client.close()
    assert d.source == "local-fallback"
    assert "INVALID_ARGUMENT: backend:" in d.reasoning
    assert d.size == 1



async def test_service_token_is_sent_and_required(tmp_path: Path) -> None:
    proc = TelemetryProcess(tmp_path, env={"ORFEAS_SERVICE_TOKEN": "s3cret"}).start()
    with_token = SecurityConfig(service_token="s3cret")
    good = TelemetryClient(proc.address, channel_factory=lambda a: open_channel(a, with_token))
    bad = TelemetryClient(proc.address, channel_factory=lambda a: open_channel(a, SecurityConfig()))
    await good.start()
    await bad.start()
    try:
        good.report_profile(_profile("tok-1", backend="token"))
        bad.report_profile(_profile("tok-2", backend="token"))
        await _until(lambda: good.reports_sent == 1, "the report with the token sent")
        decision = await bad.recommend_batch_size(backend="token", resolution=256, steps=50, queue_length=1,
                                                  free_memory_bytes=4096 * MIB)
        assert "UNAUTHENTICATED" in decision.reasoning and decision.source == "local-fallback"
        assert bad.reports_sent == 0 and not bad.connected
    finally:
        await good.close()
        await bad.close()
        proc.kill()
    assert bad.reports_dropped == 1


async def test_a_batch_that_ran_out_of_memory_while_the_optimizer_was_asked_caps_that_decision(
    server: TelemetryProcess,
) -> None:
    client = TelemetryClient(server.address)
    await client.start()
    try:
        sizer = OptimizerBatchSizer(client, torch.device("cpu"), "w1", max_batch_size=8, cpu_memory_share=0.5)
        params = GenerationParams(resolution=64, steps=5)
        asking = asyncio.create_task(sizer.decide(8, params, (64, 64)))
        await asyncio.sleep(0)  # the decision is now waiting for the optimizer's answer...
        assert not asking.done()
        sizer.record_outcome(params, 8, 0, out_of_memory=True)  # ...when a batch of 8 runs out of memory
        decision = await asking
    finally:
        await client.close()
    assert decision.ceiling == 4 and decision.size <= 4, decision
