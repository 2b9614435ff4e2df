"""Aggregates from planted profiles, over the real service: exact numbers,
all-time and windowed, per backend; and the checks on what is reported."""
from __future__ import annotations

import time

import grpc
import numpy as np
import pytest

from pb.orfeas.telemetry.v1 import telemetry_pb2 as tpb
from services.telemetry.aggregates import percentile
from tests.telemetry_fixtures import five_stages, profile, rpc_error, stub, telemetry  # noqa: F401

EXACT = {"rel": 1e-12, "abs": 1e-12}


@pytest.fixture(scope="module")
def planted(stub) -> None:  # noqa: F811
    now = time.time()
    recent = now - 100
    profiles = [
        # Four recent pipelines of 10, 20, 30 and 40 s with the same proportions.
        profile("a1", "agg", five_stages(0.5, 1.0, 5.0, 2.0, 1.5), started_at=recent),
        profile("a2", "agg", five_stages(1.0, 2.0, 10.0, 4.0, 3.0), started_at=recent),
        profile("a3", "agg", five_stages(1.5, 3.0, 15.0, 6.0, 4.5), started_at=recent),
        profile("a4", "agg", five_stages(2.0, 4.0, 20.0, 8.0, 6.0), started_at=recent),
        # Two hours old: outside the 900 s window.
        profile("a5", "agg", five_stages(5.0, 10.0, 50.0, 20.0, 15.0), started_at=now - 7200),
        # Failed after its first stage: counted, but not in the durations.
        profile("a6", "agg", {"image_loading": 1.0}, total=3.0, succeeded=False, started_at=recent),
        # Another backend, left out when filtering by "agg".
        profile("o1", "other", {"image_loading": 1.0, "shape_generation": 1.0}, started_at=recent),
    ]
    reply = stub.ReportProfile(tpb.ReportProfileRequest(profiles=profiles), timeout=10)
    assert (reply.accepted, reply.duplicates) == (7, 0)


def test_all_time_aggregates_are_exact(stub, planted) -> None:  # noqa: F811
    s = stub.GetPerformanceSummary(tpb.GetPerformanceSummaryRequest(backend="agg", window=tpb.WINDOW_ALL), timeout=10)
    assert (s.total_pipelines, s.succeeded_pipelines, s.failed_pipelines) == (6, 5, 1)
    # Totals 10, 20, 30, 40, 100.
    assert s.avg_duration == pytest.approx(40.0, **EXACT)
    assert s.min_duration == pytest.approx(10.0, **EXACT)
    assert s.max_duration == pytest.approx(100.0, **EXACT)
    assert s.p50_duration == pytest.approx(30.0, **EXACT)
    assert s.p95_duration == pytest.approx(40.0 + 0.8 * 60.0, **EXACT)  # rank 3.8

    stages = {st.name: st for st in s.stage_breakdown}
    assert [st.name for st in s.stage_breakdown] == [
        "image_loading", "image_preprocessing", "shape_generation", "texture_synthesis", "mesh_export",
    ]
    shape = stages["shape_generation"]  # 5, 10, 15, 20, 50 of 200 s in all
    assert shape.count == 5
    assert shape.avg_duration == pytest.approx(20.0, **EXACT)
    assert shape.p50 == pytest.approx(15.0, **EXACT)
    assert shape.p95 == pytest.approx(20.0 + 0.8 * 30.0, **EXACT)
    assert shape.max == pytest.approx(50.0, **EXACT)
    assert shape.share == pytest.approx(0.5, **EXACT)
    assert stages["texture_synthesis"].share == pytest.approx(0.2, **EXACT)
    assert stages["mesh_export"].share == pytest.approx(0.15, **EXACT)
    assert stages["image_loading"].share == pytest.approx(0.05, **EXACT)
    # The failed job's image_loading (1.0 s) is not among the durations.
    assert stages["image_loading"].max == pytest.approx(5.0, **EXACT)

    assert [(b.stage, b.severity) for b in s.bottlenecks] == [
        ("shape_generation", tpb.SEVERITY_CRITICAL),
        ("texture_synthesis", tpb.SEVERITY_WARNING),
    ]
    assert s.bottlenecks[0].share == pytest.approx(0.5, **EXACT)
    assert list(s.backends) == ["agg", "other"]


def test_windowed_aggregates_leave_out_old_profiles(stub, planted) -> None:  # noqa: F811
    s = stub.GetPerformanceSummary(
        tpb.GetPerformanceSummaryRequest(backend="agg", window=tpb.WINDOW_RECENT), timeout=10
    )
    assert s.window_seconds == 900.0  # TELEMETRY_WINDOW_S's default
    assert (s.total_pipelines, s.succeeded_pipelines, s.failed_pipelines) == (5, 4, 1)
    # Totals 10, 20, 30, 40.
    assert s.avg_duration == pytest.approx(25.0, **EXACT)
    assert s.min_duration == pytest.approx(10.0, **EXACT)
    assert s.max_duration == pytest.approx(40.0, **EXACT)
    assert s.p50_duration == pytest.approx(25.0, **EXACT)
    assert s.p95_duration == pytest.approx(38.5, **EXACT)  # rank 2.85
    shape = next(st for st in s.stage_breakdown if st.name == "shape_generation")
    assert shape.avg_duration == pytest.approx(12.5, **EXACT)
    assert shape.p95 == pytest.approx(19.25, **EXACT)
    assert shape.share == pytest.approx(0.5, **EXACT)

    # A window narrower than the profiles' age holds none of them.
    empty = stub.GetPerformanceSummary(
        tpb.GetPerformanceSummaryRequest(backend="agg", window=tpb.WINDOW_RECENT, window_seconds=10), timeout=10
    )
    assert empty.total_pipelines == 0
    assert empty.avg_duration == 0.0
    assert list(empty.stage_breakdown) == []


def test_all_backends_together(stub, planted) -> None:  # noqa: F811
    s = stub.GetPerformanceSummary(tpb.GetPerformanceSummaryRequest(), timeout=10)
    assert s.window == tpb.WINDOW_ALL
    assert (s.total_pipelines, s.succeeded_pipelines) == (7, 6)
    assert s.min_duration == pytest.approx(2.0, **EXACT)  # the "other" pipeline


def test_profile_log_line_names_slowest_stage(telemetry, planted) -> None:  # noqa: F811
    lines = [e for e in telemetry.log_entries() if e.get("event") == "profile" and e.get("job_id") == "a2"]
    assert len(lines) == 1
    line = lines[0]
    assert line["total_s"] == 20.0
    assert line["stages_s"] == five_stages(1.0, 2.0, 10.0, 4.0, 3.0)
    assert (line["slowest_stage"], line["slowest_share"]) == ("shape_generation", 0.5)


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda p: setattr(p, "total_duration_s", -1.0), "profiles[0].total_duration_s"),
        (lambda p: setattr(p.stages[1], "duration_s", -0.5), "profiles[0].stages[1].duration_s"),
        (lambda p: setattr(p.stages[2], "duration_s", 99.0), "profiles[0].stages[2].duration_s"),
        (lambda p: setattr(p, "backend", ""), "profiles[0].backend"),
        (lambda p: setattr(p, "job_id", ""), "profiles[0].job_id"),
        (lambda p: setattr(p, "batch_size", 0), "profiles[0].batch_size"),
        (lambda p: setattr(p, "started_at", 0.0), "profiles[0].started_at"),
        (lambda p: setattr(p, "precision", "fp8"), "profiles[0].precision"),
        (lambda p: setattr(p.stages[0], "name", "Image Loading"), "profiles[0].stages[0].name"),
        (lambda p: setattr(p.stages[1], "name", "image_loading"), "profiles[0].stages[1].name"),
    ],
)
def test_invalid_profiles_name_the_field(stub, mutate, field) -> None:  # noqa: F811
    p = profile("bad", "bad", five_stages(1, 1, 1, 1, 1))
    mutate(p)
    err = rpc_error(stub.ReportProfile, tpb.ReportProfileRequest(profiles=[p]))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details().startswith(f"{field}:"), err.details()


def test_a_request_with_one_invalid_profile_stores_none(stub) -> None:  # noqa: F811
    good = profile("whole-1", "whole", five_stages(1, 1, 1, 1, 1))
    bad = profile("whole-2", "whole", five_stages(1, 1, 1, 1, 1), total=-2.0)
    err = rpc_error(stub.ReportProfile, tpb.ReportProfileRequest(profiles=[good, bad]))
    assert err.details().startswith("profiles[1].total_duration_s:")
    s = stub.GetPerformanceSummary(tpb.GetPerformanceSummaryRequest(backend="whole"), timeout=10)
    assert s.total_pipelines == 0


def test_invalid_summary_requests(stub) -> None:  # noqa: F811
    err = rpc_error(stub.GetPerformanceSummary, tpb.GetPerformanceSummaryRequest(backend="no spaces"))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and err.details().startswith("backend:")
    err = rpc_error(stub.GetPerformanceSummary, tpb.GetPerformanceSummaryRequest(window_seconds=-5))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and err.details().startswith("window_seconds:")
    err = rpc_error(stub.ReportProfile, tpb.ReportProfileRequest())
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and err.details().startswith("profiles:")


@pytest.mark.parametrize("values", [[3.0], [1.0, 2.0], [5.0, 1.0, 4.0, 2.0, 3.0], list(np.linspace(0, 7, 23) ** 2)])
@pytest.mark.parametrize("q", [0.0, 0.5, 0.95, 1.0])
def test_percentile_matches_numpy(values: list[float], q: float) -> None:
    assert percentile(sorted(values), q) == pytest.approx(float(np.percentile(values, q * 100)), rel=1e-12)
