"""Telemetry per worker (issue 11), over the real service: the summary broken down by worker
with exact numbers, one worker's own summary, and device memory counted once per device when
several workers share it."""
from __future__ import annotations

import time

import pytest

from pb.orfeas.telemetry.v1 import telemetry_pb2 as tpb
from tests.telemetry_fixtures import five_stages, profile, rpc_error, stub, telemetry  # noqa: F401

EXACT = {"rel": 1e-12, "abs": 1e-12}
GIB = 2**30
GPU0, GPU1 = "node:50051/cuda:0", "node:50051/cuda:1"


@pytest.fixture(scope="module")
def planted(stub) -> None:  # noqa: F811
    recent = time.time() - 100
    profiles = [
        # cuda:0 ran three pipelines of 10, 20 and 30 s, in batches of 4, 4 and 1.
        profile("w0-a", "perw", five_stages(1, 1, 6, 1, 1), worker_id=GPU0, device="cuda:0", batch_size=4),
        profile("w0-b", "perw", five_stages(2, 2, 12, 2, 2), worker_id=GPU0, device="cuda:0", batch_size=4),
        profile("w0-c", "perw", five_stages(3, 3, 18, 3, 3), worker_id=GPU0, device="cuda:0", batch_size=1),
        # cuda:1 one of 40 s in a batch of 2, and one that failed.
        profile("w1-a", "perw", five_stages(4, 4, 24, 4, 4), worker_id=GPU1, device="cuda:1", batch_size=2),
        profile("w1-b", "perw", {"image_loading": 1.0}, total=2.0, succeeded=False, worker_id=GPU1, device="cuda:1"),
    ]
    for p in profiles:
        p.started_at = recent
    reply = stub.ReportProfile(tpb.ReportProfileRequest(profiles=profiles), timeout=10)
    assert reply.accepted == len(profiles)


def test_the_summary_breaks_down_per_worker(stub, planted) -> None:  # noqa: F811
    s = stub.GetPerformanceSummary(tpb.GetPerformanceSummaryRequest(backend="perw"), timeout=10)
    assert (s.total_pipelines, s.succeeded_pipelines) == (5, 4)  # the whole, as before
    assert s.worker_id == ""
    first, second = s.workers
    assert (first.worker_id, first.device, second.worker_id, second.device) == (GPU0, "cuda:0", GPU1, "cuda:1")
    assert (first.total_pipelines, first.succeeded_pipelines, first.failed_pipelines) == (3, 3, 0)
    assert (second.total_pipelines, second.succeeded_pipelines, second.failed_pipelines) == (2, 1, 1)
    assert first.avg_duration == pytest.approx(20.0, **EXACT)
    assert first.p50_duration == pytest.approx(20.0, **EXACT)
    assert first.p95_duration == pytest.approx(29.0, **EXACT)  # rank 1.9 of 10, 20, 30
    assert first.avg_batch_size == pytest.approx(3.0, **EXACT)
    assert first.share == pytest.approx(0.75, **EXACT)
    assert second.avg_duration == pytest.approx(40.0, **EXACT)
    assert second.avg_batch_size == pytest.approx(2.0, **EXACT)  # over its succeeded jobs only
    assert second.share == pytest.approx(0.25, **EXACT)


def test_one_workers_summary_covers_its_profiles_only(stub, planted) -> None:  # noqa: F811
    s = stub.GetPerformanceSummary(tpb.GetPerformanceSummaryRequest(backend="perw", worker_id=GPU1), timeout=10)
    assert s.worker_id == GPU1
    assert (s.total_pipelines, s.succeeded_pipelines, s.failed_pipelines) == (2, 1, 1)
    assert s.avg_duration == pytest.approx(40.0, **EXACT)
    assert [w.worker_id for w in s.workers] == [GPU1]
    assert {st.name: st.avg_duration for st in s.stage_breakdown}["shape_generation"] == pytest.approx(24.0, **EXACT)
    err = rpc_error(stub.GetPerformanceSummary, tpb.GetPerformanceSummaryRequest(worker_id="w" * 129))
    assert err.details().startswith("worker_id: ")


def _sample(worker_id: str, device: str, used_gib: int, total_gib: int = 64) -> tpb.DeviceSample:
    return tpb.DeviceSample(
        worker_id=worker_id,
        device=device,
        device_type="cpu" if device == "cpu" else "cuda",
        memory_total_bytes=total_gib * GIB,
        memory_used_bytes=used_gib * GIB,
        memory_free_bytes=(total_gib - used_gib) * GIB,
        sampled_at=time.time(),
    )


def test_workers_sharing_a_device_count_its_memory_once(stub) -> None:  # noqa: F811
    samples = [
        # Two workers of one instance on its CPU, nearly full: one device, reported twice.
        _sample("box:1/cpu#0", "cpu", 62),
        _sample("box:1/cpu#1", "cpu", 62),
        # Another instance's CPU is another device.
        _sample("box:2/cpu", "cpu", 8),
    ]
    stub.ReportDeviceSamples(tpb.ReportDeviceSamplesRequest(samples=samples), timeout=10)
    status = stub.GetDeviceStatus(tpb.GetDeviceStatusRequest(), timeout=10)
    # Every worker is shown with its device...
    assert sorted(d.latest.worker_id for d in status.devices) == ["box:1/cpu#0", "box:1/cpu#1", "box:2/cpu"]
    # ...but box:1's CPU counts once in the totals, beside box:2's.
    assert status.memory.total_bytes == 128 * GIB
    assert status.memory.used_bytes == 70 * GIB
    # ...and the advice about it is given once, not once per worker.
    full = [r for r in status.recommendations if r.code == "memory_nearly_full"]
    assert [r.subject for r in full] == ["worker=box:1/cpu#0 device=cpu"]
