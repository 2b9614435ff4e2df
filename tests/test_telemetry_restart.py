"""Telemetry killed and started again on the same DATA_DIR keeps its
aggregates, device samples and optimizer state; SIGTERM stops it cleanly."""
from __future__ import annotations

from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pb.orfeas.telemetry.v1 import telemetry_pb2 as tpb
from tests.telemetry_fixtures import MIB, TelemetryProcess, five_stages, profile


def _snapshot(proc: TelemetryProcess) -> tuple[tpb.PerformanceSummary, tpb.PerformanceSummary, tpb.OptimizerState,
                                               tpb.DeviceStatus]:
    channel, stub = proc.stub()
    with channel:
        return (
            stub.GetPerformanceSummary(tpb.GetPerformanceSummaryRequest(backend="keep"), timeout=10),
            stub.GetPerformanceSummary(tpb.GetPerformanceSummaryRequest(window=tpb.WINDOW_RECENT), timeout=10),
            stub.GetOptimizerState(tpb.GetOptimizerStateRequest(), timeout=10),
            stub.GetDeviceStatus(tpb.GetDeviceStatusRequest(), timeout=10),
        )


def test_a_killed_telemetry_keeps_everything(tmp_path: Path) -> None:
    proc = TelemetryProcess(tmp_path).start()
    try:
        channel, stub = proc.stub()
        with channel:
            stub.ReportProfile(
                tpb.ReportProfileRequest(profiles=[
                    profile("k1", "keep", five_stages(1, 1, 4, 2, 2), peaks={"shape_generation": 900 * MIB}),
                    profile("k2", "keep", five_stages(1, 2, 6, 2, 1)),
                    profile("k3", "keep", {"image_loading": 0.5}, total=0.5, succeeded=False),
                ]),
                timeout=10,
            )
            stub.ReportDeviceSamples(
                tpb.ReportDeviceSamplesRequest(samples=[
                    tpb.DeviceSample(worker_id="w1", device="cpu", device_type="cpu", memory_total_bytes=8 * 1024 * MIB,
                                     memory_used_bytes=1024 * MIB, memory_free_bytes=7 * 1024 * MIB,
                                     utilization_percent=30.0, sampled_at=1.0 + i)
                    for i in range(3)
                ]),
                timeout=10,
            )
            decision = stub.RecommendBatchSize(
                tpb.RecommendBatchSizeRequest(backend="keep", resolution=256, steps=50, queue_length=8,
                                              memory=tpb.MemorySnapshot(free_bytes=8192 * MIB)),
                timeout=10,
            )
            stub.RecordBatchOutcome(
                tpb.RecordBatchOutcomeRequest(decision_id=decision.decision_id, backend="keep", resolution=256,
                                              steps=50, batch_size=decision.size, out_of_memory=True,
                                              available_bytes=8192 * MIB),
                timeout=10,
            )
        before = _snapshot(proc)
        assert before[0].total_pipelines == 3
        assert before[2].costs[0].oom_floor_bytes > 0
        assert len(before[2].decisions) == 1

        proc.kill()  # SIGKILL: nothing is flushed on the way out
        proc.port = 0
        proc.start()
        after = _snapshot(proc)
    finally:
        proc.kill()

    assert after[0] == before[0]
    assert after[1] == before[1]
    assert after[2] == before[2]
    assert [d.latest for d in after[3].devices] == [d.latest for d in before[3].devices]
    assert after[2].decisions[0].out_of_memory is True


def test_reports_are_idempotent(tmp_path: Path) -> None:
    proc = TelemetryProcess(tmp_path).start()
    try:
        channel, stub = proc.stub()
        with channel:
            p = profile("d1", "dup", five_stages(0.5, 1.0, 5.0, 2.0, 1.5))
            first = stub.ReportProfile(tpb.ReportProfileRequest(profiles=[p]), timeout=10)
            second = stub.ReportProfile(tpb.ReportProfileRequest(profiles=[p]), timeout=10)
            assert (first.accepted, first.duplicates) == (1, 0)
            assert (second.accepted, second.duplicates) == (0, 1)
            s = stub.GetPerformanceSummary(tpb.GetPerformanceSummaryRequest(backend="dup"), timeout=10)
            assert s.total_pipelines == 1
    finally:
        proc.kill()


def test_sigterm_stops_cleanly_and_health_says_serving(tmp_path: Path) -> None:
    proc = TelemetryProcess(tmp_path).start()
    try:
        with grpc.insecure_channel(proc.address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            reply = health.Check(health_pb2.HealthCheckRequest(service="orfeas.telemetry.v1.TelemetryService"),
                                 timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        assert proc.terminate() == 0
    finally:
        proc.kill()
    events = [e.get("event") for e in proc.log_entries()]
    assert "stopped" in events
    assert not [e for e in proc.log_entries() if e.get("level") == "error"]
