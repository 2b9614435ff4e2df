"""RecommendBatchSize over the real service: the conservative start, learning
from reported peaks, the caps, out-of-memory floors and the kept history."""
from __future__ import annotations

import math

import grpc
import pytest

from pb.orfeas.telemetry.v1 import telemetry_pb2 as tpb
from services.telemetry.optimizer import HEADROOM
from tests.telemetry_fixtures import (  # noqa: F401
    MIB,
    five_stages,
    profile,
    rpc_error,
    stub,
    telemetry,
)

FREE = 15360 * MIB


def _ask(stub, backend: str, queue_length: int = 10, resolution: int = 256, steps: int = 50,  # noqa: F811
         free: int = FREE, **extra: int) -> tpb.BatchSizeDecision:
    return stub.RecommendBatchSize(
        tpb.RecommendBatchSizeRequest(
            backend=backend, resolution=resolution, steps=steps, queue_length=queue_length,
            memory=tpb.MemorySnapshot(total_bytes=16384 * MIB, free_bytes=free, used_bytes=1024 * MIB),
            worker_id="w1", device="cuda:0", **extra,
        ),
        timeout=10,
    )


def _report_peak(stub, backend: str, peak: int, batch_size: int, resolution: int = 256,  # noqa: F811
                 steps: int = 50, job: str = "") -> None:
    p = profile(job or f"{backend}-{peak}-{batch_size}-{resolution}-{steps}", backend,
                five_stages(0.1, 0.1, 1.0, 0.5, 0.3), batch_size=batch_size, resolution=resolution, steps=steps,
                peaks={"shape_generation": peak, "texture_synthesis": peak // 2})
    stub.ReportProfile(tpb.ReportProfileRequest(profiles=[p]), timeout=10)


def test_starts_from_a_conservative_default(stub) -> None:  # noqa: F811
    d = _ask(stub, "fresh")
    # 2048 MiB per item at 256² until something is measured.
    assert d.basis == "default"
    assert d.per_item_bytes == 2048 * MIB
    assert d.size == 6 and d.memory_bound_size == 6  # floor(13056 / 2048)
    assert d.reasoning == (
        "available 15360 MB, 2048 MB per item at 256² (default estimate, no measurements yet), target 85% → 6"
    )
    assert d.budget_bytes == int(FREE * 0.85)
    assert d.target_utilization == pytest.approx(0.85)


def test_learns_the_per_item_cost_from_reported_peaks(stub, telemetry) -> None:  # noqa: F811
    # A batch of 2 peaking at 3652 MiB: 1826 MiB per item, 2100 MiB with headroom.
    _report_peak(stub, "learn", 3652 * MIB, batch_size=2)
    d = _ask(stub, "learn")
    assert d.basis == "measured"
    assert d.per_item_bytes == math.ceil(1826 * MIB * HEADROOM)
    assert d.reasoning == "available 15360 MB, 2100 MB per item at 256² (measured, 1 peak), target 85% → 6"
    assert d.size == 6

    # A higher peak raises the cost: the maximum rules while peaks are few.
    _report_peak(stub, "learn", 2600 * MIB, batch_size=1)
    d = _ask(stub, "learn")
    assert d.per_item_bytes == math.ceil(2600 * MIB * HEADROOM)
    assert d.size == 13056 * MIB // d.per_item_bytes == 4

    line = next(e for e in telemetry.log_entries()
                if e.get("event") == "batch_size_decision" and e.get("decision_id") == d.decision_id)
    assert line["reasoning"] == d.reasoning
    assert line["size"] == 4


def test_never_more_than_the_queue_and_never_less_than_one(stub) -> None:  # noqa: F811
    d = _ask(stub, "caps", queue_length=3)
    assert (d.memory_bound_size, d.size) == (6, 3)
    assert d.reasoning.endswith("; queue length 3 → 3")
    assert _ask(stub, "caps", queue_length=0).size == 1
    d = _ask(stub, "caps", queue_length=50, max_batch_size=4)
    assert d.size == 4 and d.reasoning.endswith("; max_batch_size 4 → 4")
    d = _ask(stub, "caps", free=1024 * MIB)
    assert (d.memory_bound_size, d.size) == (0, 1)
    assert "not even one item fits the budget → 1" in d.reasoning


def test_unmeasured_keys_borrow_from_measured_ones(stub) -> None:  # noqa: F811
    _report_peak(stub, "borrow", 1000 * MIB, batch_size=1, resolution=128, steps=50)
    other_steps = _ask(stub, "borrow", resolution=128, steps=80)
    assert other_steps.basis == "measured-other-steps"
    assert other_steps.per_item_bytes == math.ceil(1000 * MIB * HEADROOM)
    scaled = _ask(stub, "borrow", resolution=256, steps=50)
    assert scaled.basis == "scaled"
    assert scaled.per_item_bytes == math.ceil(1000 * MIB * 8 * HEADROOM)  # (256/128)³
    assert "scaled from 128² by (256/128)^3" in scaled.reasoning


def test_out_of_memory_lowers_the_size_until_that_size_succeeds(stub) -> None:  # noqa: F811
    _report_peak(stub, "oom", 1826 * MIB * 2, batch_size=2)
    first = _ask(stub, "oom")
    assert first.size == 6
    reply = stub.RecordBatchOutcome(
        tpb.RecordBatchOutcomeRequest(decision_id=first.decision_id, backend="oom", resolution=256, steps=50,
                                      batch_size=6, out_of_memory=True, available_bytes=FREE),
        timeout=10,
    )
    assert reply.cost.basis == "oom-floor"
    assert reply.cost.oom_floor_bytes == math.ceil(FREE / 6)  # 2560 MiB
    second = _ask(stub, "oom")
    assert second.size == 5  # floor(13056 / 2560)
    assert second.reasoning == (
        "available 15360 MB, 2560 MB per item at 256² (raised after out-of-memory at batch size 6), target 85% → 5"
    )
    # Size 6 then runs fine after all: the floor goes, the measured cost returns.
    stub.RecordBatchOutcome(
        tpb.RecordBatchOutcomeRequest(decision_id=second.decision_id, backend="oom", resolution=256, steps=50,
                                      batch_size=6, peak_memory_bytes=6 * 1826 * MIB),
        timeout=10,
    )
    assert _ask(stub, "oom").basis == "measured"


def test_state_shows_costs_and_decisions_with_reasoning(stub) -> None:  # noqa: F811
    _report_peak(stub, "state", 800 * MIB, batch_size=1)
    d = _ask(stub, "state", queue_length=2)
    stub.RecordBatchOutcome(
        tpb.RecordBatchOutcomeRequest(decision_id=d.decision_id, backend="state", resolution=256, steps=50,
                                      batch_size=2, peak_memory_bytes=1700 * MIB),
        timeout=10,
    )
    state = stub.GetOptimizerState(tpb.GetOptimizerStateRequest(backend="state"), timeout=10)
    assert state.target_utilization == pytest.approx(0.85)
    assert state.headroom == pytest.approx(HEADROOM)
    (cost,) = state.costs
    assert (cost.backend, cost.resolution, cost.steps) == ("state", 256, 50)
    assert cost.observations == 2  # the profile and the batch
    assert cost.last_per_item_bytes == 850 * MIB
    assert cost.max_per_item_bytes == 850 * MIB
    assert cost.per_item_bytes == math.ceil(850 * MIB * HEADROOM)
    (decision,) = state.decisions
    assert decision.id == d.decision_id
    assert decision.reasoning == d.reasoning and decision.size == d.size == 2
    assert (decision.ran_size, decision.peak_memory_bytes, decision.out_of_memory) == (2, 1700 * MIB, False)
    assert state.total_decisions == 1

    everything = stub.GetOptimizerState(tpb.GetOptimizerStateRequest(decisions_limit=3), timeout=10)
    assert len(everything.decisions) == 3
    assert everything.total_decisions > 3
    ids = [x.id for x in everything.decisions]
    assert ids == sorted(ids, reverse=True)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"queue_length": -1}, "queue_length"),
        ({"backend": ""}, "backend"),
        ({"resolution": 0}, "resolution"),
        ({"steps": -3}, "steps"),
        ({"max_batch_size": 5000}, "max_batch_size"),
        ({"memory": tpb.MemorySnapshot(total_bytes=10, free_bytes=20)}, "memory.free_bytes"),
        ({"memory": None}, "memory"),
    ],
)
def test_invalid_batch_requests_name_the_field(stub, change, field) -> None:  # noqa: F811
    fields = dict(backend="v", resolution=256, steps=50, queue_length=4,
                  memory=tpb.MemorySnapshot(total_bytes=100, free_bytes=50))
    fields.update(change)
    request = tpb.RecommendBatchSizeRequest(**{k: v for k, v in fields.items() if v is not None})
    err = rpc_error(stub.RecommendBatchSize, request)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details().startswith(f"{field}:"), err.details()


def test_invalid_outcomes_name_the_field(stub) -> None:  # noqa: F811
    err = rpc_error(stub.RecordBatchOutcome, tpb.RecordBatchOutcomeRequest(backend="v", resolution=256, steps=50,
                                                                           batch_size=0))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and err.details().startswith("batch_size:")
    err = rpc_error(stub.RecordBatchOutcome, tpb.RecordBatchOutcomeRequest(backend="v", resolution=256, steps=50,
                                                                           batch_size=2, peak_memory_bytes=-1))
    assert err.details().startswith("peak_memory_bytes:")
