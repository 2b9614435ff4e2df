"""Every Prometheus metric of ORFEAS, defined once, with the functions that record them.

Names follow Triton / text-generation-inference: `orfeas_` + what is counted
+ the unit (`_seconds`, `_bytes`, `_ratio`, `_total` for counters). Every
process imports this module, so every process exposes every name; each fills
the ones it owns (the gateway the HTTP ones, generation the pipeline ones,
both gRPC services the request ones). Prometheus's `job` label says which
process a series came from.

Where each call goes (`from services.common import metrics`)
--------------------------------------------------------------
services/generation/server.py, `serve()`:
    server, health = create_server([SERVICE_NAME], [metrics.MetricsInterceptor("generation"), *server_interceptors(security)])
    after the workers start:
        metrics.declare_devices([slot.device_name for slot in slots])
        metrics.start_metrics_server(config.host, config.metrics_port)
        metrics.track_queue_length(lambda: manager.queue_length)
        metrics.track_devices(lambda: sampler.latest)
        metrics.track_telemetry_dropped(lambda: telemetry.reports_dropped)
services/telemetry/server.py, `serve()` (done):
    create_server([SERVICE_NAME], [*server_interceptors(security), metrics.MetricsInterceptor("telemetry")])
    metrics.start_metrics_server(config.host, config.metrics_port)
services/generation/jobs.py:
    JobManager.submit, after `record.stage_timings["image_loading"] = loading_s`:
        metrics.record_stage("image_loading", loading_s)
    JobManager.mark_running, after `job.record.started_at = time.time()`:
        metrics.record_queue_wait(job.record.started_at - job.record.created_at)
    JobManager.emit_stage, first line inside `if state == "completed":`:
        metrics.record_stage(stage, elapsed_s, record.device)
    JobManager.finish, after `record.finished_at = time.time()`:
        metrics.record_job_finished(status, record.error_code, record.finished_at - record.created_at)
services/generation/worker.py:
    BatchWorker._preparing_loop, after `decision = await self.sizer.decide(...)`:
        metrics.record_batch_decision(decision.source, decision.size, device)
    BatchWorker._generate_shapes, in `run()`: first line `t0 = time.perf_counter()`; before `return shapes, peak`:
        metrics.record_batch(len(batch), time.perf_counter() - t0, peak, str(self.device))
    BatchWorker._generate_shapes, after `self.sizer.record_outcome(params, len(batch), 0, out_of_memory=True)`:
        metrics.record_out_of_memory(len(batch), str(self.device))
gateway/app.py: `install_metrics(app)` at the end of create_app (done), and
    `with subscriber("sse"):` around the body of `_sse`, `with subscriber("websocket"):`
    around the body of `events_ws` after `accept()` (gateway.metrics).
Optional: metrics.set_memory_budget(device, bytes) wherever the batch budget is computed.

The interceptor goes first in the list so that calls the token check refuses
are counted too (as unauthenticated).

Stage durations are recorded where the "completed" event is emitted, so the
histogram and the events a client sees can never disagree.

The `device` label ("cpu", "cuda:1") is the device of the worker that did the
work: one series per device, whatever number of workers share it. It is empty
for image_loading done at admission, before any worker took the job.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from typing import Any, Protocol, Self

import grpc
from prometheus_client import REGISTRY, Counter, Gauge, Histogram, disable_created_metrics, start_http_server
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

# `_created` series double what every scrape carries and no panel reads them.
disable_created_metrics()

TELEMETRY_DROPPED_NAME = "orfeas_telemetry_reports_dropped"

_dropped_lock = threading.Lock()
_dropped_here = 0
_dropped_sources: list[Callable[[], int]] = []
_scrape_hooks: list[Callable[[], object]] = []


class _ScrapeTimeCollector(Collector):
    """Runs the scrape hooks, then yields the telemetry-drop counter.

    The registry collects in registration order and this collector is
    registered before every metric below, so the hooks have filled the
    gauges by the time those are collected.
    """

    def collect(self) -> Iterable[Any]:
        for hook in _scrape_hooks:
            try:
                hook()
            except Exception:
                log.warning("metrics scrape hook failed", exc_info=True)
        total = _dropped_here
        for source in _dropped_sources:
            try:
                total += int(source())
            except Exception:
                log.warning("telemetry drop counter unreadable", exc_info=True)
        yield CounterMetricFamily(
            TELEMETRY_DROPPED_NAME,
            "Telemetry reports (profiles, device samples, batch outcomes) dropped because telemetry was away or refused them",
            value=total,
        )

    def describe(self) -> Iterable[Any]:
        # Describing without collecting keeps registration from running the hooks.
        yield CounterMetricFamily(TELEMETRY_DROPPED_NAME, "", value=0)


REGISTRY.register(_ScrapeTimeCollector())


from services.common.stages import STAGES  # noqa: E402 - beside the other names
JOB_STATUSES: tuple[str, ...] = ("succeeded", "failed", "cancelled")
FAILURE_REASONS: tuple[str, ...] = (
    "invalid",
    "not_found",
    "unauthenticated",
    "overloaded",
    "unavailable",
    "cancelled",
    "deadline",
    "internal",
)
TRANSPORTS: tuple[str, ...] = ("sse", "websocket")

# From a millisecond stage on a GPU to a 1024² export on two CPU cores.
DURATION_BUCKETS: tuple[float, ...] = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
)
# A job waits behind at most queue_limit (64) others of a few seconds each.
QUEUE_BUCKETS: tuple[float, ...] = (
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
)
BATCH_SIZE_BUCKETS: tuple[float, ...] = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)

# --------------------------------------------------------------------- requests
REQUESTS = Counter(
    "orfeas_requests",
    "gRPC requests handled, by method and outcome (the gRPC status code, lower case: ok, invalid_argument, ...)",
    ["service", "method", "outcome"],
)
REQUEST_FAILURES = Counter(
    "orfeas_request_failures",
    "Requests that failed, by reason: invalid, not_found, unauthenticated, overloaded, unavailable, cancelled, deadline, internal",
    ["service", "reason"],
)
REQUEST_DURATION = Histogram(
    "orfeas_request_duration_seconds",
    "Time to handle a gRPC request; for a streaming method, until the stream ends",
    ["service", "method"],
    buckets=DURATION_BUCKETS,
)
HTTP_REQUESTS = Counter(
    "orfeas_http_requests",
    "REST requests the gateway answered, by route template, method and HTTP status",
    ["route", "method", "status"],
)
HTTP_REQUEST_DURATION = Histogram(
    "orfeas_http_request_duration_seconds",
    "Time to answer a REST request, body included (an event stream lasts as long as its job)",
    ["route", "method"],
    buckets=DURATION_BUCKETS,
)
EVENT_SUBSCRIBERS = Gauge(
    "orfeas_event_subscribers",
    "Clients following a job's events now, by transport (sse, websocket)",
    ["transport"],
)
EVENT_STREAM_RESUMES = Counter(
    "orfeas_event_stream_resumes",
    "Event streams whose generation instance went away, resumed from their last event (on another instance "
    "or the same one back), by transport (sse, websocket)",
    ["transport"],
)

# ------------------------------------------------------------------------- jobs
JOBS = Counter("orfeas_jobs", "Jobs that reached a terminal state, by status", ["status"])
JOB_FAILURES = Counter(
    "orfeas_job_failures",
    "Jobs that ended failed or cancelled, by reason (same reasons as orfeas_request_failures_total)",
    ["reason"],
)
JOB_DURATION = Histogram(
    "orfeas_job_duration_seconds",
    "From submission to the terminal state, queue included: the latency a client sees",
    ["status"],
    buckets=DURATION_BUCKETS,
)
QUEUE_LENGTH = Gauge("orfeas_queue_length", "Jobs waiting in the queue")
STORAGE_FREE = Gauge("orfeas_storage_free_bytes", "Free bytes on the filesystem holding DATA_DIR")
QUEUE_DURATION = Histogram(
    "orfeas_queue_duration_seconds",
    "Time a job waited in the queue before a worker took it",
    buckets=QUEUE_BUCKETS,
)
STAGE_DURATION = Histogram(
    "orfeas_stage_duration_seconds",
    "Duration of one pipeline stage for one job (shape_generation: its whole batch's time), by the device "
    "of the worker that ran it (empty for image_loading at admission)",
    ["stage", "device"],
    buckets=DURATION_BUCKETS,
)

# ---------------------------------------------------------------------- batches
BATCH_SIZE = Histogram(
    "orfeas_batch_size", "Jobs per shape_generation batch run on the device", ["device"], buckets=BATCH_SIZE_BUCKETS
)
COMPUTE_DURATION = Histogram(
    "orfeas_compute_duration_seconds",
    "Time one batch spent in shape_generation on the device",
    ["device"],
    buckets=DURATION_BUCKETS,
)
BATCH_PEAK_MEMORY = Gauge(
    "orfeas_batch_memory_peak_bytes",
    "Peak memory of the latest batch (measured on CUDA, modelled on the CPU)",
    ["device"],
)
OUT_OF_MEMORY = Counter(
    "orfeas_batch_out_of_memory",
    "Batches that ran out of memory and were split in half",
    ["device"],
)
OPTIMIZER_DECISIONS = Counter(
    "orfeas_optimizer_decisions",
    "Batch-size decisions, by who made them (telemetry, or the local fallback)",
    ["source"],
)
OPTIMIZER_BATCH_SIZE = Gauge("orfeas_optimizer_batch_size", "The latest batch size decided for a device", ["device"])

# ----------------------------------------------------------------------- devices
DEVICE_MEMORY_USED = Gauge("orfeas_device_memory_used_bytes", "Device memory in use", ["device"])
DEVICE_MEMORY_TOTAL = Gauge("orfeas_device_memory_total_bytes", "Device memory in all", ["device"])
DEVICE_MEMORY_BUDGET = Gauge(
    "orfeas_device_memory_budget_bytes",
    "Memory a batch may use: target utilisation × device memory (a share of system memory on the CPU)",
    ["device"],
)
DEVICE_UTILIZATION = Gauge("orfeas_device_utilization_ratio", "Device compute utilisation, 0 to 1", ["device"])

# Known label values start at zero, so `rate()` and alerts see a series
# before the first event rather than an absent one.
# The only stage that runs before a worker has the job (at admission).
STAGE_DURATION.labels("image_loading", "")
for _status in JOB_STATUSES:
    JOBS.labels(_status)
for _reason in FAILURE_REASONS:
    JOB_FAILURES.labels(_reason)
for _transport in TRANSPORTS:
    EVENT_SUBSCRIBERS.labels(_transport)
    EVENT_STREAM_RESUMES.labels(_transport)


# ---------------------------------------------------------- status → reason
_REASONS: dict[str, str] = {
    "INVALID_ARGUMENT": "invalid",
    "OUT_OF_RANGE": "invalid",
    "FAILED_PRECONDITION": "invalid",
    "ALREADY_EXISTS": "invalid",
    "NOT_FOUND": "not_found",
    "UNAUTHENTICATED": "unauthenticated",
    "PERMISSION_DENIED": "unauthenticated",
    "RESOURCE_EXHAUSTED": "overloaded",
    "UNAVAILABLE": "unavailable",
    "CANCELLED": "cancelled",
    "DEADLINE_EXCEEDED": "deadline",
}


def failure_reason(code: grpc.StatusCode | str) -> str:
    """The reason label of a gRPC status (or its name, as job records store it); anything unknown is internal."""
    name = code.name if isinstance(code, grpc.StatusCode) else str(code).upper()
    return _REASONS.get(name, "internal")


def http_failure_reason(status: int) -> str | None:
    """The reason label of an HTTP status, None for a success."""
    if status < 400:
        return None
    return {
        401: "unauthenticated",
        403: "unauthenticated",
        404: "not_found",
        429: "overloaded",
        499: "cancelled",
        503: "unavailable",
        504: "deadline",
    }.get(status, "invalid" if status < 500 else "internal")


# ---------------------------------------------------------- recording: requests
def declare_service(service: str) -> None:
    """Start `service`'s failure counters at zero, so every reason is a series before its first failure."""
    for reason in FAILURE_REASONS:
        REQUEST_FAILURES.labels(service, reason)


def record_request(service: str, method: str, code: grpc.StatusCode, seconds: float | None = None) -> None:
    REQUESTS.labels(service, method, code.name.lower()).inc()
    if code != grpc.StatusCode.OK:
        REQUEST_FAILURES.labels(service, failure_reason(code)).inc()
    if seconds is not None:
        REQUEST_DURATION.labels(service, method).observe(seconds)


def record_http_request(route: str, method: str, status: int, seconds: float, service: str = "gateway") -> None:
    HTTP_REQUESTS.labels(route, method, str(status)).inc()
    HTTP_REQUEST_DURATION.labels(route, method).observe(seconds)
    reason = http_failure_reason(status)
    if reason is not None:
        REQUEST_FAILURES.labels(service, reason).inc()


def subscriber_joined(transport: str) -> None:
    EVENT_SUBSCRIBERS.labels(transport).inc()


def subscriber_left(transport: str) -> None:
    EVENT_SUBSCRIBERS.labels(transport).dec()


def stream_resumed(transport: str) -> None:
    EVENT_STREAM_RESUMES.labels(transport).inc()


# -------------------------------------------------------------- recording: jobs
def declare_devices(devices: Iterable[str]) -> None:
    """Start every per-device series at zero for the devices this process computes on."""
    for device in devices:
        for stage in STAGES:
            STAGE_DURATION.labels(stage, device)
        BATCH_SIZE.labels(device)
        COMPUTE_DURATION.labels(device)
        OUT_OF_MEMORY.labels(device)


def record_stage(stage: str, seconds: float, device: str | None = "") -> None:
    STAGE_DURATION.labels(stage, device or "").observe(seconds)


def record_queue_wait(seconds: float) -> None:
    QUEUE_DURATION.observe(max(0.0, seconds))


def set_queue_length(n: int) -> None:
    QUEUE_LENGTH.set(n)


def track_queue_length(length: Callable[[], int]) -> None:
    """Read the queue length at scrape time, so no call site has to keep the gauge in step."""
    QUEUE_LENGTH.set_function(lambda: float(length()))


def track_storage_free(free_bytes: Callable[[], float]) -> None:
    STORAGE_FREE.set_function(free_bytes)


def record_job_finished(status: str, error_code: str | None, seconds: float) -> None:
    JOBS.labels(status).inc()
    JOB_DURATION.labels(status).observe(max(0.0, seconds))
    if status != "succeeded":
        JOB_FAILURES.labels(failure_reason(error_code or ("CANCELLED" if status == "cancelled" else "INTERNAL"))).inc()


# ----------------------------------------------------------- recording: batches
def record_batch(size: int, compute_seconds: float, peak_bytes: int = 0, device: str = "cpu") -> None:
    BATCH_SIZE.labels(device).observe(size)
    COMPUTE_DURATION.labels(device).observe(compute_seconds)
    if peak_bytes:
        BATCH_PEAK_MEMORY.labels(device).set(peak_bytes)


def record_out_of_memory(size: int, device: str = "cpu") -> None:
    OUT_OF_MEMORY.labels(device).inc()
    log.debug("out of memory at batch size %d on %s", size, device)


def record_batch_decision(source: str, size: int, device: str = "cpu") -> None:
    OPTIMIZER_DECISIONS.labels(source).inc()
    OPTIMIZER_BATCH_SIZE.labels(device).set(size)


def set_memory_budget(device: str, budget_bytes: int) -> None:
    DEVICE_MEMORY_BUDGET.labels(device).set(budget_bytes)


# ----------------------------------------------------------- recording: devices
class DeviceReading(Protocol):
    """What is read of services.generation.device_monitor.DeviceSample."""

    device: str
    memory_used_bytes: int
    memory_total_bytes: int
    utilization_percent: float | None


def record_device_sample(sample: DeviceReading) -> None:
    DEVICE_MEMORY_USED.labels(sample.device).set(sample.memory_used_bytes)
    DEVICE_MEMORY_TOTAL.labels(sample.device).set(sample.memory_total_bytes)
    if sample.utilization_percent is not None:
        DEVICE_UTILIZATION.labels(sample.device).set(sample.utilization_percent / 100.0)


def track_devices(latest: Callable[[], Sequence[DeviceReading]]) -> None:
    """Copy the sampler's latest readings into the gauges at scrape time: no
    second sampling loop, and the figures match what telemetry receives."""
    _scrape_hooks.append(lambda: [record_device_sample(s) for s in latest()])


# ----------------------------------------------------- recording: telemetry drops
def record_telemetry_dropped(n: int = 1) -> None:
    global _dropped_here
    with _dropped_lock:
        _dropped_here += n


def track_telemetry_dropped(count: Callable[[], int]) -> None:
    """Count drops the telemetry client already keeps (read at scrape time)."""
    _dropped_sources.append(count)


# ---------------------------------------------------------------- HTTP server
def start_metrics_server(host: str = "127.0.0.1", port: int = 9101) -> Any | None:
    """Serve /metrics over HTTP in a daemon thread; port 0 turns it off. Returns the server."""
    if not port:
        return None
    server, _thread = start_http_server(port, addr=host)
    log.info("metrics on http://%s:%d/metrics", host, port, extra={"metrics_port": port})
    return server


def exposition() -> tuple[bytes, str]:
    """The text format of every metric, and its content type."""
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST


# ----------------------------------------------------------------- gRPC interceptor
def _method_name(full: str) -> str:
    # "/orfeas.generation.v1.GenerationService/Generate" → "Generate": the
    # service label already says which service.
    return full.rsplit("/", 1)[-1] or full


def _outcome(exc: BaseException | None, context: grpc.aio.ServicerContext) -> grpc.StatusCode:
    if exc is None or isinstance(exc, grpc.aio.AbortError):
        # An abort (or a code a handler set) leaves its status on the context.
        try:
            code = context.code()
        except Exception:  # noqa: BLE001 - older grpc: no code() on the context
            code = None
        if isinstance(code, grpc.StatusCode):
            return code
        if isinstance(code, int):
            return next((c for c in grpc.StatusCode if c.value[0] == code), grpc.StatusCode.UNKNOWN)
        return grpc.StatusCode.OK if exc is None else grpc.StatusCode.UNKNOWN
    if isinstance(exc, (asyncio.CancelledError, GeneratorExit)):
        return grpc.StatusCode.CANCELLED
    if isinstance(exc, asyncio.TimeoutError):
        return grpc.StatusCode.DEADLINE_EXCEEDED
    code = getattr(exc, "code", None)  # services.common.errors.ServiceError
    return code if isinstance(code, grpc.StatusCode) else grpc.StatusCode.INTERNAL


class MetricsInterceptor(grpc.aio.ServerInterceptor):
    """Counts every call of `service` by method and outcome, and times it.

    Installed after ExceptionToStatusInterceptor (create_server puts extra
    interceptors inside it), it sees the ServiceError a handler raised and so
    knows the status before it becomes an abort. Health and reflection calls
    (`/grpc.*`) are left out: they are probes, not traffic.
    """

    def __init__(self, service: str, skip_prefixes: tuple[str, ...] = ("/grpc.",)) -> None:
        self.service = service
        self.skip_prefixes = skip_prefixes
        declare_service(service)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        full = handler_call_details.method
        if handler is None or full.startswith(self.skip_prefixes):
            return handler
        method = _method_name(full)
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                self._unary(handler.unary_unary, method), handler.request_deserializer, handler.response_serializer
            )
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                self._stream(handler.unary_stream, method), handler.request_deserializer, handler.response_serializer
            )
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(
                self._unary(handler.stream_unary, method), handler.request_deserializer, handler.response_serializer
            )
        if handler.stream_stream:
            return grpc.stream_stream_rpc_method_handler(
                self._stream(handler.stream_stream, method), handler.request_deserializer, handler.response_serializer
            )
        return handler

    def _unary(self, inner: Callable[..., Awaitable[Any]], method: str) -> Callable[..., Awaitable[Any]]:
        async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
            with _Timed(self.service, method, context) as timed:
                try:
                    return await inner(request, context)
                except BaseException as exc:
                    timed.exc = exc
                    raise

        return call

    def _stream(self, inner: Callable[..., AsyncIterator[Any]], method: str) -> Callable[..., AsyncIterator[Any]]:
        async def call(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            with _Timed(self.service, method, context) as timed:
                try:
                    async for item in inner(request, context):
                        yield item
                except BaseException as exc:
                    timed.exc = exc
                    raise

        return call


class _Timed:
    """Records one call on exit, whatever way it ends."""

    def __init__(self, service: str, method: str, context: grpc.aio.ServicerContext) -> None:
        self.service, self.method, self.context = service, method, context
        self.exc: BaseException | None = None
        self.started = 0.0

    def __enter__(self) -> Self:
        self.started = time.perf_counter()
        return self

    def __exit__(self, *_: object) -> None:
        try:
            record_request(self.service, self.method, _outcome(self.exc, self.context), time.perf_counter() - self.started)
        except Exception:
            log.warning("could not record a request metric", exc_info=True)
