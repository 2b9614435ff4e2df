"""Sub-stage timings (hunyuan3d's denoising apart from its volume decoding) in telemetry: checked, stored
and aggregated. Pure functions and a real SQLite store; the service path is in test_hunyuan3d_service."""
from __future__ import annotations

from pathlib import Path

import pytest

from pb.orfeas.telemetry.v1 import telemetry_pb2 as tpb
from services.common.errors import InvalidArgument
from services.generation.telemetry_client import PipelineProfile, StageProfile, profile_to_proto
from services.telemetry import validation
from services.telemetry.aggregates import summarize
from services.telemetry.store import TelemetryStore


def _profile(job_id: str, denoising: float, decoding: float, **changes: object) -> tpb.PipelineProfile:
    record = PipelineProfile(
        job_id=job_id, backend="hunyuan3d", worker_id="w", device="cuda:0", batch_size=2, image_width=512,
        image_height=512, resolution=256, steps=30, started_at=1_700_000_000.0, total_duration_s=10.0,
        stages=[StageProfile("image_loading", 0.0, 1.0, 0), StageProfile("shape_generation", 1.0, 8.0, 2**30)],
        succeeded=True, precision="fp16",
        substages={"shape_generation": {"denoising": denoising, "volume_decoding": decoding}},
    )
    message = profile_to_proto(record)
    for name, value in changes.items():
        setattr(message, name, value)
    return message


def test_substages_travel_with_their_stage_and_are_aggregated(tmp_path: Path) -> None:
    records = [validation.profile("p", _profile(f"j{i}", 5.0 + i, 2.0)) for i in range(3)]
    shape = records[0].stages[1]
    assert shape.substages == (("denoising", 5.0), ("volume_decoding", 2.0))
    assert records[0].stages[0].substages == ()

    store = TelemetryStore(tmp_path / "telemetry.db")
    stored, duplicates = store.add_profiles(records, received_at=1_700_000_100.0)
    assert len(stored) == 3 and duplicates == 0
    assert [p.stages for p in store.profiles("hunyuan3d")] == [p.stages for p in records]

    stats = {s.name: s for s in summarize(store.profiles("hunyuan3d")).stage_breakdown}
    parts = {p.name: p for p in stats["shape_generation"].substages}
    assert list(parts) == ["denoising", "volume_decoding"]
    assert parts["denoising"].avg_duration == pytest.approx(6.0) and parts["denoising"].count == 3
    assert parts["volume_decoding"].share_of_stage == pytest.approx(6.0 / 24.0)
    assert stats["image_loading"].substages == ()


def test_a_substage_must_name_a_stage_of_its_profile_and_fit_in_it() -> None:
    orphan = _profile("j", 1.0, 1.0)
    orphan.substages.add(stage="texture_synthesis", name="baking", duration_s=0.1)
    with pytest.raises(InvalidArgument, match=r"substages\[2\]\.stage: must name one of the profile's stages"):
        validation.profile("p", orphan)
    with pytest.raises(InvalidArgument, match=r"substages\[0\]\.duration_s: must be at most its stage's"):
        validation.profile("p", _profile("j", 30.0, 1.0))
    twice = _profile("j", 1.0, 1.0)
    twice.substages.add(stage="shape_generation", name="denoising", duration_s=0.5)
    with pytest.raises(InvalidArgument, match="shape_generation.denoising appears twice"):
        validation.profile("p", twice)
    badly_named = _profile("j", 1.0, 1.0)
    badly_named.substages[0].name = "Denoising!"
    with pytest.raises(InvalidArgument, match=r"substages\[0\]\.name"):
        validation.profile("p", badly_named)
