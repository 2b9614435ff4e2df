"""The generation service's side of telemetry: reporting that never slows or
fails a generation, and batch sizes with a local fallback.

    client = TelemetryClient(config.telemetry_address)
    await client.start()
    client.report_profile(profile)          # returns at once, never raises
    decision = await client.recommend_batch_size(backend="inflate", resolution=256, steps=50,
                                                 queue_length=5, free_memory_bytes=free)
    await client.close()

Reports (profiles, device samples, batch outcomes) go into bounded buffers,
one per kind. When a buffer is full the OLDEST report is dropped and counted:
the newest say most about the service now. A background task sends them in
batches with a short deadline and retries with exponential back-off while
telemetry is away; telemetry stores them idempotently, so a retry after a
deadline cannot count a job twice. A batch telemetry rejects as invalid is
sent again one report at a time and only the invalid ones are dropped.

`report_*` may be called from any thread.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import threading
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc

from pb.orfeas.telemetry.v1 import telemetry_pb2 as tpb
from pb.orfeas.telemetry.v1 import telemetry_pb2_grpc
from services.common.config import SecurityConfig
from services.common.grpc_security import create_channel
from services.generation.device_monitor import DeviceSample
from services.common.telemetry_messages import device_sample_message

log = logging.getLogger(__name__)

MIB = 1024 * 1024
DEFAULT_TARGET_UTILIZATION = 0.85
# The local rule's cost when telemetry never answered for this key: the same
# conservative default telemetry starts from (2 GiB per item at 256², growing
# with the grid's area, at least 256 MiB).
FALLBACK_PER_ITEM_BYTES_AT_256 = 2 * 1024 * MIB
FALLBACK_MIN_PER_ITEM_BYTES = 256 * MIB
# When telemetry did answer before, its last cost for the key plus this margin.
FALLBACK_MARGIN = 1.25
# Reconnect quickly once telemetry is back (gRPC's own back-off grows to 2 minutes).
# The connect timeout (grpc.min_reconnect_backoff_ms, 20 s) stays: a busy server
# may take a while to answer a new connection.
CHANNEL_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2000),
]
_RETRYABLE_NEVER = {grpc.StatusCode.INVALID_ARGUMENT}


def open_channel(address: str, security: SecurityConfig | None = None) -> grpc.aio.Channel:
    """A channel to telemetry, with quick reconnects, and the service token and TLS when ORFEAS_* asks for them."""
    return create_channel(address, security, options=CHANNEL_OPTIONS)


@dataclass(frozen=True)
class StageProfile:
    name: str  # "shape_generation", ...
    start_offset_s: float  # from the start of the job
    duration_s: float
    memory_peak_bytes: int = 0  # for the whole batch; 0 when not measured


@dataclass(frozen=True)
class PipelineProfile:
    job_id: str
    backend: str
    worker_id: str
    device: str  # "cpu", "cuda:0"
    batch_size: int
    image_width: int
    image_height: int
    resolution: int
    steps: int
    started_at: float  # unix seconds
    total_duration_s: float
    stages: Sequence[StageProfile]
    succeeded: bool
    face_count: int = 0  # 0 when unknown
    precision: str = ""  # "fp32", "fp16", "bf16"; "" when unknown
    # A backend's parts of a stage: stage -> (part -> seconds), e.g. hunyuan3d's denoising.
    substages: Mapping[str, Mapping[str, float]] = field(default_factory=dict)


@dataclass(frozen=True)
class BatchOutcome:
    """What a batch did, so the optimizer learns (the size to use after an out-of-memory error, say)."""

    backend: str
    resolution: int
    steps: int
    batch_size: int
    peak_memory_bytes: int = 0  # the whole batch's measured peak
    out_of_memory: bool = False
    available_bytes: int = 0  # free memory when the batch started
    image_width: int = 0
    image_height: int = 0
    duration_s: float = 0.0
    decision_id: int = 0  # BatchDecision.decision_id; 0 when none
    worker_id: str = ""
    device: str = ""


@dataclass(frozen=True)
class BatchDecision:
    size: int
    reasoning: str
    source: str  # "telemetry" | "local-fallback"
    per_item_mb: float
    available_mb: float
    decision_id: int = 0  # quote it in BatchOutcome; 0 for a local decision


def fallback_per_item_bytes(resolution: int) -> int:
    return max(FALLBACK_MIN_PER_ITEM_BYTES, int(FALLBACK_PER_ITEM_BYTES_AT_256 * (resolution / 256) ** 2))


# ------------------------------------------------------------ conversions


def profile_to_proto(p: PipelineProfile) -> tpb.PipelineProfile:
    return tpb.PipelineProfile(
        job_id=p.job_id,
        backend=p.backend,
        worker_id=p.worker_id,
        device=p.device,
        batch_size=p.batch_size,
        image_width=p.image_width,
        image_height=p.image_height,
        resolution=p.resolution,
        steps=p.steps,
        face_count=p.face_count,
        precision=p.precision,
        started_at=p.started_at,
        total_duration_s=p.total_duration_s,
        stages=[
            tpb.StageProfile(
                name=s.name, start_offset_s=s.start_offset_s, duration_s=s.duration_s,
                memory_peak_bytes=s.memory_peak_bytes,
            )
            for s in p.stages
        ],
        succeeded=p.succeeded,
        substages=[
            tpb.SubStageTiming(stage=stage, name=name, duration_s=seconds)
            for stage, parts in p.substages.items()
            for name, seconds in parts.items()
        ],
    )


def sample_to_proto(s: DeviceSample) -> tpb.DeviceSample:
    # One conversion for both sides (services.common): telemetry's record has the same fields.
    return device_sample_message(s)


def outcome_to_proto(o: BatchOutcome) -> tpb.RecordBatchOutcomeRequest:
    return tpb.RecordBatchOutcomeRequest(
        decision_id=o.decision_id,
        worker_id=o.worker_id,
        device=o.device,
        backend=o.backend,
        resolution=o.resolution,
        steps=o.steps,
        batch_size=o.batch_size,
        peak_memory_bytes=o.peak_memory_bytes,
        out_of_memory=o.out_of_memory,
        available_bytes=o.available_bytes,
        image_width=o.image_width,
        image_height=o.image_height,
        duration_s=o.duration_s,
    )


# ----------------------------------------------------------------- client


@dataclass
class _Buffer:
    kind: str
    capacity: int
    items: deque[Any] = field(default_factory=deque)
    dropped: int = 0


class TelemetryClient:
    def __init__(
        self,
        address: str,
        *,
        buffer_size: int = 1_000,
        sample_buffer_size: int = 120,
        batch_max: int = 100,
        report_deadline_s: float = 0.5,
        recommend_deadline_s: float = 0.2,
        backoff_initial_s: float = 0.1,
        backoff_max_s: float = 5.0,
        target_utilization: float = DEFAULT_TARGET_UTILIZATION,
        flush_timeout_s: float = 1.0,
        channel_factory: Callable[[str], grpc.aio.Channel] = open_channel,
    ) -> None:
        if buffer_size < 1 or sample_buffer_size < 1 or batch_max < 1:
            raise ValueError("buffer sizes and batch_max must be at least 1")
        self.address = address
        self.report_deadline_s = report_deadline_s
        self.recommend_deadline_s = recommend_deadline_s
        self.target_utilization = target_utilization
        self._batch_max = batch_max
        self._backoff_initial_s = backoff_initial_s
        self._backoff_max_s = backoff_max_s
        self._flush_timeout_s = flush_timeout_s
        self._channel_factory = channel_factory
        self._buffers = {
            "profiles": _Buffer("profiles", buffer_size),
            "outcomes": _Buffer("outcomes", buffer_size),
            "samples": _Buffer("samples", sample_buffer_size),
        }
        self._senders: dict[str, Callable[[list[Any]], Any]] = {}
        self._lock = threading.Lock()
        self._inflight: list[Any] = []
        self._sent = 0
        self._rejected = 0
        self._connected = False
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._channel: grpc.aio.Channel | None = None
        self._stub: telemetry_pb2_grpc.TelemetryServiceStub | None = None
        # (backend, resolution, steps) -> telemetry's last per-item cost, for the fallback.
        self._known_costs: dict[tuple[str, int, int], int] = {}

    # -------------------------------------------------------------- state

    @property
    def reports_sent(self) -> int:
        return self._sent

    @property
    def reports_dropped(self) -> int:
        with self._lock:
            return sum(b.dropped for b in self._buffers.values())

    @property
    def reports_rejected(self) -> int:
        """Reports telemetry refused as invalid (also counted as dropped)."""
        return self._rejected

    @property
    def dropped_by_kind(self) -> dict[str, int]:
        with self._lock:
            return {k: b.dropped for k, b in self._buffers.items()}

    @property
    def pending(self) -> int:
        """Reports buffered or being sent."""
        with self._lock:
            return sum(len(b.items) for b in self._buffers.values()) + len(self._inflight)

    @property
    def connected(self) -> bool:
        """The last call to telemetry succeeded."""
        return self._connected

    # ---------------------------------------------------------- lifecycle

    async def start(self) -> None:
        if self._task is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._wake = asyncio.Event()
        self._channel = self._channel_factory(self.address)
        self._stub = telemetry_pb2_grpc.TelemetryServiceStub(self._channel)
        stub = self._stub
        self._senders = {
            "outcomes": lambda items: self._send_each(stub.RecordBatchOutcome, items),
            "profiles": lambda items: stub.ReportProfile(
                tpb.ReportProfileRequest(profiles=items), timeout=self.report_deadline_s
            ),
            "samples": lambda items: stub.ReportDeviceSamples(
                tpb.ReportDeviceSamplesRequest(samples=items), timeout=self.report_deadline_s
            ),
        }
        self._task = asyncio.create_task(self._run(), name="telemetry-reporter")
        if self.pending:
            self._wake.set()

    async def close(self) -> None:
        """Send what is buffered for up to flush_timeout_s, then drop (and count) the rest."""
        if self._closed:
            return
        self._closed = True
        task = self._task
        if task is not None and self._wake is not None:
            self._wake.set()
            try:
                await asyncio.wait_for(asyncio.shield(task), self._flush_timeout_s)
            except (TimeoutError, Exception):  # noqa: BLE001 - closing is best effort
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        with self._lock:
            for item in self._inflight:
                self._buffers[item[0]].dropped += 1
            self._inflight = []
            for buf in self._buffers.values():
                buf.dropped += len(buf.items)
                buf.items.clear()
        if self._channel is not None:
            await self._channel.close()
        self._task = None

    # ---------------------------------------------------------- reporting

    def report_profile(self, profile: PipelineProfile) -> None:
        """Queue a job profile; returns at once and never raises."""
        self._enqueue("profiles", profile, profile_to_proto)

    def report_device_sample(self, sample: DeviceSample) -> None:
        self._enqueue("samples", sample, sample_to_proto)

    def report_batch_outcome(self, outcome: BatchOutcome) -> None:
        self._enqueue("outcomes", outcome, outcome_to_proto)

    def _enqueue(self, kind: str, record: Any, convert: Callable[[Any], Any]) -> None:
        try:
            message = convert(record)
        except Exception:  # noqa: BLE001 - a malformed record must not fail the job
            log.warning("telemetry %s record could not be encoded; dropped", kind, exc_info=True)
            with self._lock:
                self._buffers[kind].dropped += 1
            return
        with self._lock:
            buf = self._buffers[kind]
            if self._closed:
                buf.dropped += 1
                return
            buf.items.append(message)
            overflow = len(buf.items) - buf.capacity
            for _ in range(max(0, overflow)):
                buf.items.popleft()
                buf.dropped += 1
        self._poke()

    def _poke(self) -> None:
        loop, wake = self._loop, self._wake
        if loop is None or wake is None:
            return
        if threading.get_ident() == self._loop_thread:
            wake.set()
        else:
            with contextlib.suppress(RuntimeError):  # the loop has closed
                loop.call_soon_threadsafe(wake.set)

    # ------------------------------------------------------------ sending

    async def _run(self) -> None:
        assert self._wake is not None
        backoff = self._backoff_initial_s
        while True:
            if not self.pending:
                if self._closed:
                    return
                await self._wake.wait()
                self._wake.clear()
                continue
            if await self._send_round():
                backoff = self._backoff_initial_s
                continue
            if self._closed:
                return  # close() counts what is left
            # Full jitter: several workers must not retry in step.
            await asyncio.sleep(random.uniform(backoff / 2, backoff))
            backoff = min(backoff * 2, self._backoff_max_s)

    def _take(self, kind: str) -> list[Any]:
        with self._lock:
            buf = self._buffers[kind]
            n = min(len(buf.items), self._batch_max)
            batch = [buf.items.popleft() for _ in range(n)]
            self._inflight = [(kind, m) for m in batch]
            return batch

    def _put_back(self, kind: str, batch: Sequence[Any]) -> None:
        """Return unsent reports to the front, dropping the oldest beyond capacity."""
        with self._lock:
            buf = self._buffers[kind]
            buf.items.extendleft(reversed(batch))
            while len(buf.items) > buf.capacity:
                buf.items.popleft()
                buf.dropped += 1
            self._inflight = []

    def _done(self, sent: int, rejected: int = 0, kind: str = "") -> None:
        with self._lock:
            self._sent += sent
            self._rejected += rejected
            if rejected:
                self._buffers[kind].dropped += rejected
            self._inflight = []

    async def _send_round(self) -> bool:
        """Send one batch of each kind; False when telemetry could not be reached."""
        for kind in ("outcomes", "profiles", "samples"):
            batch = self._take(kind)
            if not batch:
                continue
            try:
                await self._senders[kind](batch)
            except grpc.aio.AioRpcError as exc:
                if exc.code() in _RETRYABLE_NEVER:
                    await self._send_individually(kind, batch)
                    continue
                self._put_back(kind, batch)
                self._set_connected(False, f"{exc.code().name}: {exc.details()}")
                return False
            except Exception as exc:  # noqa: BLE001 - the channel may be closing; retry later
                self._put_back(kind, batch)
                self._set_connected(False, f"{type(exc).__name__}: {exc}")
                return False
            self._done(len(batch))
            self._set_connected(True)
        return True

    async def _send_individually(self, kind: str, batch: list[Any]) -> None:
        """After INVALID_ARGUMENT: find the invalid reports, send the others."""
        for i, message in enumerate(batch):
            try:
                await self._senders[kind]([message])
            except grpc.aio.AioRpcError as exc:
                if exc.code() in _RETRYABLE_NEVER:
                    log.warning("telemetry rejected a %s report: %s", kind, exc.details())
                    self._done(0, rejected=1, kind=kind)
                    continue
                self._put_back(kind, batch[i:])
                self._set_connected(False, f"{exc.code().name}: {exc.details()}")
                return
            self._done(1)
            self._set_connected(True)
        with self._lock:
            self._inflight = []

    async def _send_each(self, rpc: Any, items: list[Any]) -> None:
        # RecordBatchOutcome takes one outcome a call; they are rare.
        for i, item in enumerate(items):
            try:
                await rpc(item, timeout=self.report_deadline_s)
            except grpc.aio.AioRpcError:
                if i:
                    # The first i arrived: count them and retry only the rest.
                    with self._lock:
                        self._sent += i
                        self._inflight = self._inflight[i:]
                    del items[:i]
                raise

    def _set_connected(self, ok: bool, why: str = "") -> None:
        if ok and not self._connected:
            log.info("telemetry reachable at %s", self.address)
        elif not ok and self._connected:
            log.warning(
                "telemetry unreachable at %s (%s); buffering reports, %d dropped so far",
                self.address, why, self.reports_dropped,
            )
        self._connected = ok

    # ------------------------------------------------------------ batching

    async def recommend_batch_size(
        self,
        *,
        backend: str,
        resolution: int,
        steps: int,
        queue_length: int,
        free_memory_bytes: int,
        total_memory_bytes: int = 0,
        used_memory_bytes: int = 0,
        image_width: int = 0,
        image_height: int = 0,
        max_batch_size: int = 0,
        worker_id: str = "",
        device: str = "",
    ) -> BatchDecision:
        """Telemetry's batch size, or within recommend_deadline_s a local
        conservative one (source "local-fallback", the reason in the reasoning)."""
        key = (backend, resolution, steps)
        if self._stub is None or self._closed:
            why = "client closed" if self._closed else "client not started"
        else:
            try:
                request = tpb.RecommendBatchSizeRequest(
                    worker_id=worker_id,
                    device=device,
                    backend=backend,
                    resolution=resolution,
                    steps=steps,
                    image_width=image_width,
                    image_height=image_height,
                    queue_length=queue_length,
                    memory=tpb.MemorySnapshot(
                        total_bytes=total_memory_bytes, free_bytes=free_memory_bytes, used_bytes=used_memory_bytes
                    ),
                    max_batch_size=max_batch_size,
                )
                # The outer timeout only guards against a call that ignores its own deadline.
                reply = await asyncio.wait_for(
                    self._stub.RecommendBatchSize(request, timeout=self.recommend_deadline_s),
                    self.recommend_deadline_s + 0.1,
                )
            except grpc.aio.AioRpcError as exc:
                why = f"{exc.code().name}: {exc.details()}"
                if exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
                    log.warning("telemetry rejected a batch-size request: %s", exc.details())
                else:
                    self._set_connected(False, why)
            except (TimeoutError, Exception) as exc:  # noqa: BLE001 - any failure falls back
                why = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
                if isinstance(exc, asyncio.TimeoutError):
                    self._set_connected(False, why)
            else:
                self._set_connected(True)
                self._known_costs[key] = reply.per_item_bytes
                return BatchDecision(
                    size=reply.size,
                    reasoning=reply.reasoning,
                    source="telemetry",
                    per_item_mb=reply.per_item_bytes / MIB,
                    available_mb=reply.available_bytes / MIB,
                    decision_id=reply.decision_id,
                )
        return self._local_decision(
            why, key, queue_length, max(0, free_memory_bytes), max_batch_size
        )

    def _local_decision(
        self, why: str, key: tuple[str, int, int], queue_length: int, free: int, max_batch_size: int
    ) -> BatchDecision:
        known = self._known_costs.get(key)
        if known:
            per_item = int(known * FALLBACK_MARGIN)
            basis = f"telemetry's last cost +{FALLBACK_MARGIN - 1:.0%}"
        else:
            per_item = fallback_per_item_bytes(key[1])
            basis = "default estimate"
        budget = int(free * self.target_utilization)
        bound = budget // per_item
        size = max(1, bound)
        reasoning = (
            f"telemetry unavailable ({why}); local conservative rule: available {free / MIB:.0f} MB, "
            f"{per_item / MIB:.0f} MB per item at {key[1]}² ({basis}), "
            f"target {self.target_utilization:.0%} → {bound}"
        )
        if bound < 1:
            reasoning += "; not even one item fits the budget → 1"
        if size > max(1, queue_length):
            size = max(1, queue_length)
            reasoning += f"; queue length {queue_length} → {size}"
        if max_batch_size > 0 and size > max_batch_size:
            size = max_batch_size
            reasoning += f"; max_batch_size {max_batch_size} → {size}"
        log.info(
            "batch size %d (local fallback): %s",
            size,
            reasoning,
            extra={"event": "batch_size_decision", "source": "local-fallback", "size": size},
        )
        return BatchDecision(
            size=size, reasoning=reasoning, source="local-fallback", per_item_mb=per_item / MIB,
            available_mb=free / MIB,
        )
