"""Recommendations follow from planted profiles and device samples."""
from __future__ import annotations

import time

import pytest

from pb.orfeas.telemetry.v1 import telemetry_pb2 as tpb
from services.telemetry import device_trends
from services.telemetry.records import DeviceSampleRecord
from tests.telemetry_fixtures import MIB, five_stages, profile, stub, telemetry  # noqa: F401

GIB = 1024 * MIB


def _samples(worker: str, device: str, used: list[int], util: list[float], now: float, total: int = 16 * GIB,
             device_type: str = "cuda") -> list[tpb.DeviceSample]:
    n = len(used)
    return [
        tpb.DeviceSample(
            worker_id=worker, device=device, device_type=device_type, name="Test GPU",
            memory_total_bytes=total, memory_used_bytes=u, memory_free_bytes=total - u,
            utilization_percent=ut, sampled_at=now - 9.0 * (n - i),
        )
        for i, (u, ut) in enumerate(zip(used, util, strict=False))
    ]


@pytest.fixture(scope="module")
def planted(stub) -> None:  # noqa: F811
    profiles = [
        # shape_generation at 48.7%, texture_synthesis at 20%.
        profile("bn1", "bn", five_stages(0.5, 1.0, 4.87, 2.0, 1.63)),
        profile("bn2", "bn", five_stages(1.0, 2.0, 9.74, 4.0, 3.26)),
        # mesh_export dominates at 50%, 200,000 faces.
        profile("mx1", "mx", five_stages(0.5, 0.5, 2.0, 2.0, 5.0), face_count=200_000),
        profile("mx2", "mx", five_stages(1.0, 1.0, 4.0, 4.0, 10.0), face_count=200_000),
        # 200 steps, shape_generation at 60%.
        profile("st1", "st", five_stages(0.5, 0.5, 6.0, 2.0, 1.0), steps=200),
        profile("st2", "st", five_stages(1.0, 1.0, 12.0, 4.0, 2.0), steps=200),
        # The same at the default 50 steps: nothing to reduce.
        profile("sl1", "st-low", five_stages(0.5, 0.5, 6.0, 2.0, 1.0), steps=50),
        # CUDA in fp32, and CUDA already in fp16.
        profile("fp1", "fp", five_stages(0.5, 0.5, 3.0, 1.0, 1.0), device="cuda:0", precision="fp32"),
        profile("fp2", "fp", five_stages(0.5, 0.5, 5.0, 1.0, 1.0), device="cuda:0", precision="fp32"),
        profile("fh1", "fp-ok", five_stages(0.5, 0.5, 3.0, 1.0, 1.0), device="cuda:0", precision="fp16"),
    ]
    stub.ReportProfile(tpb.ReportProfileRequest(profiles=profiles), timeout=10)
    now = time.time()
    samples = (
        _samples("w-idle", "cuda:0", [2 * GIB] * 10, [10, 15, 20, 15, 10, 15, 20, 15, 10, 20], now)
        + _samples("w-busy", "cuda:0", [2 * GIB] * 10, [95.0] * 10, now)
        + _samples("w-leak", "cuda:1", [4 * GIB + i * 512 * MIB for i in range(10)], [90.0] * 10, now)
        + _samples("w-full", "cuda:0", [int(15.5 * GIB)] * 5, [99.0] * 5, now)
    )
    stub.ReportDeviceSamples(tpb.ReportDeviceSamplesRequest(samples=samples), timeout=10)


def _recs(stub, backend: str) -> list[tpb.Recommendation]:  # noqa: F811
    return list(stub.GetRecommendations(tpb.GetRecommendationsRequest(backend=backend), timeout=10).recommendations)


def _by_code(recs: list[tpb.Recommendation], code: str, subject_part: str = "") -> list[tpb.Recommendation]:
    return [r for r in recs if r.code == code and subject_part in r.subject]


def test_a_dominant_stage_is_critical_optimize_it_first(stub, planted) -> None:  # noqa: F811
    recs = _recs(stub, "bn")
    bottlenecks = _by_code(recs, "optimize_bottleneck")
    assert [b.message for b in bottlenecks] == [
        "shape_generation takes 48.7% of the pipeline — optimize it first",
        "texture_synthesis takes 20.0% of the pipeline",
    ]
    first, second = bottlenecks
    assert first.severity == tpb.SEVERITY_CRITICAL and second.severity == tpb.SEVERITY_WARNING
    assert first.figures["share"] == pytest.approx(0.487)
    assert first.figures["share_percent"] == pytest.approx(48.7)
    assert first.figures["avg_duration_s"] == pytest.approx((4.87 + 9.74) / 2)
    assert first.figures["pipelines"] == 2
    assert first.subject == "backend=bn stage=shape_generation"
    # Neither mesh_export nor steps nor precision call for anything here.
    assert not {"lower_face_count", "reduce_steps", "enable_fp16"} & {r.code for r in recs}


def test_mesh_export_dominating_means_lower_face_count(stub, planted) -> None:  # noqa: F811
    (rec,) = _by_code(_recs(stub, "mx"), "lower_face_count")
    assert rec.severity == tpb.SEVERITY_CRITICAL
    assert rec.message == (
        "mesh_export dominates the pipeline (50.0%) at 200,000 faces (median) — lower face_count, e.g. to 100,000"
    )
    assert rec.figures["mesh_export_share"] == pytest.approx(0.5)
    assert rec.figures["suggested_face_count"] == 100_000
    assert not _by_code(_recs(stub, "bn"), "lower_face_count")


def test_high_steps_with_shape_generation_dominating_means_reduce_steps(stub, planted) -> None:  # noqa: F811
    (rec,) = _by_code(_recs(stub, "st"), "reduce_steps")
    assert rec.figures["steps_p50"] == 200
    assert rec.figures["shape_generation_share"] == pytest.approx(0.6)
    assert rec.figures["estimated_shape_generation_s"] == pytest.approx(9.0 * 50 / 200)
    assert "at 200 steps (median) — reduce steps" in rec.message
    assert "about 2.25 s instead of 9.00 s" in rec.message
    assert not _by_code(_recs(stub, "st-low"), "reduce_steps")


def test_cuda_without_fp16_means_enable_fp16(stub, planted) -> None:  # noqa: F811
    (rec,) = _by_code(_recs(stub, "fp"), "enable_fp16")
    assert rec.message == "2 of 2 pipelines on CUDA ran in fp32 — enable fp16; shape_generation averages 4.00 s there"
    assert rec.figures["fp32_cuda_pipelines"] == 2
    assert not _by_code(_recs(stub, "fp-ok"), "enable_fp16")


def test_an_under_used_gpu_means_raise_the_batch_size(stub, planted) -> None:  # noqa: F811
    recs = _recs(stub, "bn")
    (rec,) = _by_code(recs, "raise_batch_size")
    assert rec.subject == "worker=w-idle device=cuda:0"
    assert rec.message == (
        "GPU cuda:0 on w-idle is under-used (avg 15% over 5 min, 14,336 MB free) — raise the batch size"
    )
    assert rec.figures["avg_utilization_5m"] == pytest.approx(15.0)
    assert rec.figures["free_mb"] == pytest.approx(14336.0)


def test_memory_trends_become_recommendations(stub, planted) -> None:  # noqa: F811
    recs = _recs(stub, "bn")
    (rising,) = _by_code(recs, "memory_rising")
    assert rising.subject == "worker=w-leak device=cuda:1"
    # 512 MiB every 9 s.
    assert rising.figures["slope_mb_per_min"] == pytest.approx(512 / 9 * 60)
    (full,) = _by_code(recs, "memory_nearly_full")
    assert full.subject == "worker=w-full device=cuda:0"
    assert full.severity == tpb.SEVERITY_CRITICAL
    assert full.figures["used_share"] == pytest.approx(15.5 / 16)
    # Most severe first.
    severities = [r.severity for r in recs]
    assert severities == sorted(severities, reverse=True)


def test_device_status_keeps_each_worker_and_device(stub, planted) -> None:  # noqa: F811
    status = stub.GetDeviceStatus(tpb.GetDeviceStatusRequest(), timeout=10)
    states = {(d.latest.worker_id, d.latest.device): d for d in status.devices}
    assert set(states) >= {("w-idle", "cuda:0"), ("w-busy", "cuda:0"), ("w-leak", "cuda:1"), ("w-full", "cuda:0")}
    assert states[("w-idle", "cuda:0")].trends.trend == tpb.MEMORY_TREND_STABLE
    assert states[("w-idle", "cuda:0")].trends.avg_utilization == pytest.approx(15.0)
    assert states[("w-busy", "cuda:0")].trends.avg_utilization_5m == pytest.approx(95.0)
    assert states[("w-leak", "cuda:1")].trends.trend == tpb.MEMORY_TREND_RISING
    assert status.trends.trend == tpb.MEMORY_TREND_RISING
    assert status.memory.total_bytes == 4 * 16 * GIB
    assert status.memory.used_bytes == 2 * GIB + 2 * GIB + (4 * GIB + 9 * 512 * MIB) + int(15.5 * GIB)
    assert {r.code for r in status.recommendations} == {"raise_batch_size", "memory_rising", "memory_nearly_full"}

    only = stub.GetDeviceStatus(tpb.GetDeviceStatusRequest(worker_id="w-busy"), timeout=10)
    assert [(d.latest.worker_id, d.latest.device) for d in only.devices] == [("w-busy", "cuda:0")]
    assert list(only.recommendations) == []


# ------------------------------------------------------------ pure trends


def _record(t: float, used: int, util: float | None = 50.0, total: int = 1000) -> DeviceSampleRecord:
    return DeviceSampleRecord("w", "cuda:0", "cuda", "", total, used, total - used, util, None, None, None, None,
                              None, t)


def test_trend_needs_three_recent_samples() -> None:
    now = 1_000_000.0
    assert device_trends.trends([_record(now - 10, 100), _record(now, 900)], now).trend == "unknown"
    # Three samples, but one older than 5 minutes.
    samples = [_record(now - 400, 100), _record(now - 10, 500), _record(now, 900)]
    assert device_trends.trends(samples, now).trend == "unknown"


@pytest.mark.parametrize(
    ("used", "expected"),
    [
        ([100, 110, 120], "rising"),  # +10 per 60 s -> +50 over 5 min, above 2% of 1000
        ([120, 110, 100], "falling"),
        ([100, 101, 102], "stable"),  # +5 over 5 min, below 20
    ],
)
def test_trend_direction(used: list[int], expected: str) -> None:
    now = 1_000_000.0
    samples = [_record(now - 120 + 60 * i, u) for i, u in enumerate(used)]
    assert device_trends.trends(samples, now).trend == expected


def test_utilization_averages_over_1_5_15_minutes() -> None:
    now = 1_000_000.0
    samples = [_record(now - 800, 0, 10.0), _record(now - 200, 0, 20.0), _record(now - 30, 0, 60.0),
               _record(now - 20, 0, None)]
    t = device_trends.trends(samples, now)
    assert t.avg_utilization_1m == pytest.approx(60.0)
    assert t.avg_utilization_5m == pytest.approx(40.0)
    assert t.avg_utilization_15m == pytest.approx(30.0)
    assert t.avg_utilization == t.avg_utilization_5m
    assert t.samples == 4
    assert device_trends.trends([], now).avg_utilization_1m is None
