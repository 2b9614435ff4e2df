"""One worker per device (issue 11): GENERATION_DEVICES=cpu,cpu on a real stack, plus the pure parts.

On the stack, the first worker (cpu#0) has an injected capacity of 2.5 items at RES and the
second (cpu#1) none, so an out-of-memory split can happen on one worker only.
"""
from __future__ import annotations

from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc
import httpx
import pytest
import torch

from pb.orfeas.generation.v1 import generation_pb2 as pb
from pb.orfeas.generation.v1 import generation_pb2_grpc
from pb.orfeas.telemetry.v1 import telemetry_pb2 as tpb
from pb.orfeas.telemetry.v1 import telemetry_pb2_grpc
from services.common.errors import FailedPrecondition
from services.generation import lifecycle
from services.generation.backends.registry import LOADING, UNAVAILABLE, BackendSet, get_backend
from services.generation.devices import (
    DeviceBackends,
    DeviceConfigError,
    parse_devices,
    parse_memory_limits,
    plan_workers,
)
from services.generation.job_store import JobRecord
from services.stack import Stack
from tests.conftest import new_stack
from tests.images import disk_png
from tests.lifecycle_helpers import wait_until
from tests.logs import entries

RES = 128
OOM = {"resolution": RES, "steps": 20, "face_count": 2000, "texture": False}
TINY = {"resolution": 64, "steps": 5, "face_count": 1000, "texture": False}
SEEDS = (0, 1, 2)
BURST = 24
MAX_BATCH = 4


# ------------------------------------------------------------------ the pure parts
def test_devices_default_to_every_cuda_device_else_the_cpu() -> None:
    assert parse_devices("", cuda_count=0) == [torch.device("cpu")]
    assert parse_devices(" ", cuda_count=2) == [torch.device("cuda:0"), torch.device("cuda:1")]
    assert parse_devices("cpu, CPU", cuda_count=0) == [torch.device("cpu")] * 2
    assert parse_devices("cuda:1,cuda", cuda_count=2) == [torch.device("cuda:1"), torch.device("cuda:0")]


@pytest.mark.parametrize(
    ("spec", "cuda_count", "says"),
    [
        ("tpu", 0, "unknown device 'tpu'"),
        ("cuda:x", 1, "unknown device 'cuda:x'"),
        ("cuda:2", 2, "cuda:2 is out of range: torch sees 2 CUDA devices (cuda:0 to cuda:1)"),
        ("cuda:0", 0, "torch sees no CUDA device"),
        ("cpu,,cpu", 0, "entry 2 of 'cpu,,cpu' is empty"),
    ],
)
def test_bad_devices_are_refused_naming_the_setting(spec: str, cuda_count: int, says: str) -> None:
    with pytest.raises(DeviceConfigError) as err:
        parse_devices(spec, cuda_count)
    assert str(err.value).startswith("GENERATION_DEVICES: ")
    assert says in str(err.value)


def test_worker_ids_name_the_device_and_are_unique() -> None:
    devices = [torch.device("cpu"), torch.device("cpu"), torch.device("cuda:1")]
    slots = plan_workers(devices, "host:50051", parse_memory_limits("300,0,0", 3))
    assert [s.worker_id for s in slots] == ["host:50051/cpu#0", "host:50051/cpu#1", "host:50051/cuda:1"]
    assert [s.sharing for s in slots] == [2, 2, 1]
    assert [s.memory_limit_bytes for s in slots] == [300 * 2**20, 0, 0]
    assert parse_memory_limits("5", 2) == [5 * 2**20] * 2
    with pytest.raises(DeviceConfigError, match="GENERATION_MEMORY_LIMIT_MB: 2 values for 3 devices"):
        parse_memory_limits("1,2", 3)


def test_the_claim_records_worker_and_device_and_a_requeue_clears_them() -> None:
    queued = JobRecord(id="j", status=lifecycle.QUEUED, params={}, payload_sha256="x", created_at=1.0, version=1)
    running = lifecycle.claim(queued, "t", "image_preprocessing", 0.05, worker_id="h:1/cpu#1", device="cpu")
    assert (running.worker_id, running.device) == ("h:1/cpu#1", "cpu")
    back = lifecycle.requeue(running, count_attempt=False, progress=0.0)
    assert (back.worker_id, back.device) == (None, None)
    done = lifecycle.finish(running, lifecycle.SUCCEEDED, result={})
    assert (done.worker_id, done.device) == ("h:1/cpu#1", "cpu")  # a finished job says where it ran


def test_a_backend_serves_only_when_it_serves_on_every_device() -> None:
    ready, broken = BackendSet(torch.device("cpu")), BackendSet(torch.device("cpu"))
    broken._set("inflate", UNAVAILABLE, "weights at /x are missing")
    both = DeviceBackends({"cuda:0": ready, "cuda:1": broken})
    with pytest.raises(FailedPrecondition) as err:
        both.require_ready("inflate")
    assert err.value.message == "backend: inflate is not available: weights at /x are missing (on cuda:1)"
    (inflate,) = [s for s in both.statuses() if s.name == "inflate"]
    assert (inflate.state, inflate.device) == (UNAVAILABLE, "cuda:0,cuda:1")
    assert inflate.reason == "weights at /x are missing (on cuda:1)"
    broken._set("inflate", LOADING, "loading")
    both.require_ready("inflate", loading_is_fine=True)
    assert both.loading("inflate")
    # One device: its own answers, unchanged.
    assert DeviceBackends({"cpu": ready}).statuses() == ready.statuses()


def test_a_bad_device_list_stops_the_service_at_start_up_with_the_reason(tmp_path) -> None:
    stack = new_stack(tmp_path, "multi-device-bad", GENERATION_DEVICES="cpu,gpu:0")
    proc = stack.start("generation", wait=False)
    assert proc.wait(timeout=60) == 2
    (line,) = entries(stack.log_dir / "generation.log", "cannot start")
    assert line["error"] == "GENERATION_DEVICES: unknown device 'gpu:0' (expected cpu, cuda or cuda:N)"


# ------------------------------------------------------------------- the real stack
@pytest.fixture(scope="module")
def two_cpus(tmp_path_factory) -> Stack:
    item = get_backend("inflate").estimate_item_bytes(RES, OOM["steps"])
    stack = new_stack(
        tmp_path_factory.mktemp("two-cpus"),
        "multi-device",
        GENERATION_DEVICES="cpu,cpu",
        # Room for two items at RES on cpu#0 (a batch of four splits there); none injected on cpu#1.
        GENERATION_MEMORY_LIMIT_MB=f"{max(1, int(2.5 * item / 2**20))},0",
        GENERATION_MAX_BATCH_SIZE=str(MAX_BATCH),
        # A window long enough that a burst of eight is all queued before it closes, even on a loaded
        # machine: at 200 ms the batches were sometimes too small for cpu#0 to run out of memory.
        GENERATION_MAX_QUEUE_DELAY_MS="1000",
        GENERATION_BACKEND_PLUGINS="tests.slow_backend",
    )
    stack.start_all()
    yield stack
    stack.stop_all()


@pytest.fixture(scope="module")
def stub(two_cpus: Stack):
    with grpc.insecure_channel(two_cpus.generation_address) as channel:
        yield generation_pb2_grpc.GenerationServiceStub(channel)


def worker_ids(stack: Stack) -> tuple[str, str]:
    (serving,) = entries(stack.log_dir / "generation.log", "serving")
    first, second = serving["workers"]
    assert first.endswith("/cpu#0") and second.endswith("/cpu#1")
    return first, second


def submit_all(stub, requests: list[pb.GenerateRequest]) -> list[str]:
    """Submitted together, as concurrent clients would: a burst both workers' batch windows see."""
    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(lambda r: stub.SubmitGeneration(r, timeout=30).id, requests))


def events_to_end(stub, job_id: str) -> list[pb.GenerationEvent]:
    return list(stub.WatchGeneration(pb.WatchGenerationRequest(id=job_id), timeout=180))


def result_bytes(stub, job_id: str) -> bytes:
    chunks = stub.DownloadResult(pb.DownloadResultRequest(id=job_id, format=pb.MESH_FORMAT_GLB), timeout=60)
    return b"".join(c.data for c in chunks)


@dataclass
class Burst:
    ids: list[str]
    seeds: dict[str, int]
    events: dict[str, list[pb.GenerationEvent]]
    statuses: dict[str, pb.Generation]


@pytest.fixture(scope="module")
def burst(two_cpus: Stack, stub) -> Burst:
    """24 small jobs at once: three seeds, eight jobs each, every one the same picture."""
    seeds = [SEEDS[i % len(SEEDS)] for i in range(BURST)]
    ids = submit_all(stub, [pb.GenerateRequest(image=disk_png(128), seed=s, **TINY) for s in seeds])
    events = {job_id: events_to_end(stub, job_id) for job_id in ids}
    statuses = {job_id: stub.GetGeneration(pb.GetGenerationRequest(id=job_id), timeout=10) for job_id in ids}
    return Burst(ids, dict(zip(ids, seeds)), events, statuses)


def test_a_burst_of_24_all_succeeds_on_both_workers(two_cpus: Stack, burst: Burst) -> None:
    workers = set(worker_ids(two_cpus))
    failed = {i: s.error.message for i, s in burst.statuses.items() if s.status != pb.JOB_STATUS_SUCCEEDED}
    assert not failed
    ran_on = Counter(s.worker_id for s in burst.statuses.values())
    assert set(ran_on) == workers, ran_on  # both workers ran jobs, and no other
    assert {s.device for s in burst.statuses.values()} == {"cpu"}


def test_no_job_ran_twice(two_cpus: Stack, burst: Burst) -> None:
    finished = [e for e in entries(two_cpus.log_dir / "generation.log", "job finished") if e["job_id"] in burst.ids]
    per_job = Counter(e["job_id"] for e in finished)
    assert set(per_job.values()) == {1} and len(per_job) == BURST
    for e in finished:
        assert e["worker_id"] == burst.statuses[e["job_id"]].worker_id  # the one worker the status names
    for job_id, events in burst.events.items():
        starts = [
            e for e in events
            if e.stage == pb.STAGE_IMAGE_PREPROCESSING and e.state == pb.STAGE_STATE_STARTED
        ]
        assert len(starts) == 1, job_id  # one claim: one start
        assert burst.statuses[job_id].attempts == 1
        assert sum(e.kind == pb.EVENT_KIND_TERMINAL for e in events) == 1


def test_the_same_input_gives_the_same_bytes_whichever_worker_ran_it(stub, burst: Burst) -> None:
    spanning = 0
    for seed in SEEDS:
        same = [i for i in burst.ids if burst.seeds[i] == seed]
        files = {i: result_bytes(stub, i) for i in same}
        assert len(set(files.values())) == 1, f"seed {seed}: the results differ"
        spanning += len({burst.statuses[i].worker_id for i in same}) == 2
    assert spanning, "no seed ran on both workers; the comparison would prove nothing"


def test_telemetry_and_the_performance_panel_show_both_workers(two_cpus: Stack, burst: Burst) -> None:
    workers = set(worker_ids(two_cpus))
    with grpc.insecure_channel(two_cpus.telemetry_address) as channel:
        telemetry = telemetry_pb2_grpc.TelemetryServiceStub(channel)

        def per_worker() -> dict[str, tpb.WorkerStats]:
            summary = telemetry.GetPerformanceSummary(tpb.GetPerformanceSummaryRequest(), timeout=10)
            mine = {w.worker_id: w for w in summary.workers}
            done = sum(w.succeeded_pipelines for w in mine.values())
            return mine if set(mine) == workers and done >= BURST else {}

        stats = wait_until(per_worker, 30, 0.2, "profiles from both workers")
        ran_on = Counter(s.worker_id for s in burst.statuses.values())
        for worker_id, w in stats.items():
            assert w.device == "cpu" and w.succeeded_pipelines >= ran_on[worker_id]
        one = next(iter(workers))
        only = telemetry.GetPerformanceSummary(tpb.GetPerformanceSummaryRequest(worker_id=one), timeout=10)
        assert [w.worker_id for w in only.workers] == [one] and only.worker_id == one
    with httpx.Client(base_url=two_cpus.gateway_url, timeout=10) as http:
        summary = http.get("/api/performance/summary").json()
        assert {w["worker_id"] for w in summary["workers"]} == workers
        gpu = wait_until(
            lambda: (g := http.get("/api/gpu/status").json())
            and {d["worker_id"] for d in g["devices"]} == workers
            and g,
            30, 0.2, "a device sample from both workers",
        )
        assert {d["device"] for d in gpu["devices"]} == {"cpu"}
        # Two workers on one CPU: its memory counts once in the totals.
        assert gpu["memory"]["total_mb"] == gpu["devices"][0]["memory"]["total_mb"]


def test_cancelling_a_job_on_one_worker_leaves_the_other_workers_batch_alone(two_cpus: Stack, stub) -> None:
    first, second = worker_ids(two_cpus)
    # Two batches that cannot merge (their grids differ), each of two jobs spending 3 s in shape_generation.
    slow = [{"backend": "slow", "resolution": r, "steps": 3, "face_count": 1000, "texture": False} for r in (96, 97)]
    ids = submit_all(stub, [pb.GenerateRequest(image=disk_png(128), seed=i, **slow[i % 2]) for i in range(4)])

    def both_on_device() -> dict[str, pb.Generation]:
        now = {i: stub.GetGeneration(pb.GetGenerationRequest(id=i), timeout=10) for i in ids}
        computing = {g.worker_id for g in now.values() if g.stage == pb.STAGE_SHAPE_GENERATION}
        return now if computing == {first, second} else {}

    running = wait_until(both_on_device, 60, 0.05, "a slow batch on each worker at once")
    victim = next(i for i, g in running.items() if g.worker_id == second and g.stage == pb.STAGE_SHAPE_GENERATION)
    stub.CancelGeneration(pb.CancelGenerationRequest(id=victim), timeout=10)
    ends = {i: events_to_end(stub, i)[-1].outcome for i in ids}
    assert ends[victim].status == pb.JOB_STATUS_CANCELLED
    others = {i: o for i, o in ends.items() if i != victim}
    assert all(o.status == pb.JOB_STATUS_SUCCEEDED for o in others.values()), others
    on_first = [i for i, g in running.items() if g.worker_id == first]
    assert on_first, "the first worker ran none of these"
    for i in on_first:
        assert not stub.GetGeneration(pb.GetGenerationRequest(id=i), timeout=10).cancel_requested


def test_an_out_of_memory_split_on_one_worker_does_not_lower_the_others_ceiling(two_cpus: Stack, stub) -> None:
    first, second = worker_ids(two_cpus)
    log = two_cpus.log_dir / "generation.log"

    def splits() -> list[dict]:
        return entries(log, "out of memory; splitting the batch")

    rounds = 0
    # A burst of eight: each worker's batch window sees four waiting; cpu#0 cannot hold four.
    while not splits() and rounds < 3:
        rounds += 1
        ids = submit_all(stub, [pb.GenerateRequest(image=disk_png(), seed=i, **OOM) for i in range(8)])
        assert all(events_to_end(stub, i)[-1].outcome.status == pb.JOB_STATUS_SUCCEEDED for i in ids)
    assert splits(), "cpu#0 never took a batch too large for its injected capacity"
    assert {s["worker_id"] for s in splits()} == {first}, "only the limited worker may run out of memory"
    split_at = min(s["ts"] for s in splits())

    # Now both workers size batches for the same work again.
    after: list[str] = []
    for _ in range(3):
        ids = submit_all(stub, [pb.GenerateRequest(image=disk_png(), seed=10 + i, **OOM) for i in range(8)])
        assert all(events_to_end(stub, i)[-1].outcome.status == pb.JOB_STATUS_SUCCEEDED for i in ids)
        after += ids
        finished = [e for e in entries(log, "job finished") if e["job_id"] in after]
        if any(e["worker_id"] == second and e["batch_size"] > 2 for e in finished):
            break
    decisions = [
        d for d in entries(log, "batch size decision")
        if d["ts"] > split_at and f"at {RES}²" in d["reasoning"]
    ]
    # Lowered where it ran out (to 2 after a batch of 4; to 1 when a batch of 3 split as well).
    lowered = {d["ceiling"] for d in decisions if d["worker_id"] == first}
    assert lowered and lowered <= {1, 2}, lowered
    assert {d["ceiling"] for d in decisions if d["worker_id"] == second} == {MAX_BATCH}  # untouched
    finished = [e for e in entries(log, "job finished") if e["job_id"] in after]
    assert max(e["batch_size"] for e in finished if e["worker_id"] == second) > 2
    assert max(e["batch_size"] for e in finished if e["worker_id"] == first) <= max(lowered)
