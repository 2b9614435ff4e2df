"""The batch worker: one per entry of GENERATION_DEVICES (services/generation/devices.py).

Every worker takes from the service's one queue; a claim is one committed
transition naming the worker and its device, so a job runs on exactly one
worker. Each worker has its own batch sizer (its out-of-memory ceiling), its
memory budget, its CPU and device threads, its export processes and its stall
watchdog: trouble on one device leaves the others' batches alone. A worker
whose device is busy prepares its next batch ahead only when no other worker
is idle (IdleWorkers), so no job waits behind a busy device while another
device sits free.

Two loops run concurrently so that the device is not idle while the CPU
prepares work:

- the *preparing* loop asks for a batch size, takes a batch of compatible
  jobs from the queue (waiting at most `max_queue_delay_ms` to fill it) and
  runs image_preprocessing for each on the CPU pool;
- the *device* loop runs shape_generation for a whole batch at once
  (B×H×W on the device), then hands each job to texture_synthesis and
  mesh_export on the CPU pool without waiting for them.

So preprocessing of batch n+1 and the export of batch n-1 overlap the shape
generation of batch n.
"""
from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from services.common import metrics
from services.common.errors import Cancelled, ResourceExhausted, ServiceError, internal_message
from services.common.tasks import TaskSupervisor
from services.generation.artifacts import ArtifactStore
from services.generation.backends.base import BatchTimings, ShapeItem, ShapeSettings
from services.generation.backends.registry import BackendSet
from services.generation.devices import device_name
from services.generation.export_pool import ExportPool
from services.generation.faults import InfrastructureFault, OutOfMemory, Stalled, as_fault
from services.generation.jobs import JobManager, LiveJob
from services.generation.pipeline.image_loading import load_image
from services.generation.pipeline.image_preprocessing import prepare_image
from services.generation.pipeline.params import GenerationParams
from services.generation.pipeline.records import PreparedImage, Shape
from services.generation.pipeline.texture_synthesis import synthesize_texture

log = logging.getLogger(__name__)

# What running out of memory looks like on each device.
OOM_ERRORS: tuple[type[BaseException], ...] = (torch.cuda.OutOfMemoryError, MemoryError)


def is_out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, OOM_ERRORS):
        return True
    # The CPU allocator and older CUDA builds raise a plain RuntimeError.
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


@dataclass
class BatchDecision:
    size: int
    reasoning: str
    source: str  # "telemetry" or "local-fallback"
    # The largest size this worker allows for the batch key now: max_batch_size, lowered by its own
    # out-of-memory errors. 0 when the sizer keeps none.
    ceiling: int = 0


class BatchSizer(Protocol):
    async def decide(self, queue_length: int, params: GenerationParams, image_size: tuple[int, int]) -> BatchDecision: ...

    def record_outcome(self, params: GenerationParams, size: int, peak_bytes: int, out_of_memory: bool) -> None: ...


class ProfileSink(Protocol):
    def report(self, job: LiveJob, profile: "JobProfile") -> None: ...


@dataclass
class StageRun:
    name: str
    start_offset_s: float
    duration_s: float
    memory_peak_bytes: int = 0
    # The backend's own parts of the stage, in seconds (hunyuan3d: denoising, volume_decoding, ...).
    substages: dict[str, float] = field(default_factory=dict)


@dataclass
class JobProfile:
    job_id: str
    backend: str
    device: str
    batch_size: int
    image_size: tuple[int, int]
    resolution: int
    steps: int
    face_count: int
    started_at: float
    stages: list[StageRun] = field(default_factory=list)
    succeeded: bool = False

    @property
    def total_s(self) -> float:
        return sum(s.duration_s for s in self.stages)


@dataclass
class _Prepared:
    job: LiveJob
    image: PreparedImage
    profile: JobProfile


class MemoryBudget:
    """Stops a batch that would not fit before the allocator has to.

    On the CPU there is no allocator error to rely on (Linux overcommits and
    the OOM killer strikes instead), so the modelled footprint is checked
    against a limit; `limit_bytes` can also be set to inject a limit in tests.
    """

    def __init__(self, limit_bytes: int) -> None:
        self.limit_bytes = limit_bytes

    def check(self, batch_size: int, item_bytes: int) -> None:
        needed = batch_size * item_bytes
        if self.limit_bytes and needed > self.limit_bytes:
            raise OverCapacity(
                f"batch of {batch_size} needs {needed / 2**20:.0f} MiB, over the limit of "
                f"{self.limit_bytes / 2**20:.0f} MiB"
            )


class IdleWorkers:
    """Which workers of the service have a free device and no batch claimed for it.

    Shared by the workers of one process. A busy worker defers its next claim
    while another is idle (for at most `max_wait_s` at a time, so an idle worker
    that cannot claim never stalls the rest).
    """

    def __init__(self, max_wait_s: float = 2.0) -> None:
        self.max_wait_s = max_wait_s
        self._idle: set[str] = set()
        self._changed = asyncio.Event()

    def set(self, worker_id: str, idle: bool) -> None:
        if idle == (worker_id in self._idle):
            return
        if idle:
            self._idle.add(worker_id)
        else:
            self._idle.discard(worker_id)
        previous, self._changed = self._changed, asyncio.Event()
        previous.set()

    def others_idle(self, worker_id: str) -> bool:
        return bool(self._idle - {worker_id})

    async def changed(self, timeout_s: float) -> None:
        try:
            await asyncio.wait_for(self._changed.wait(), timeout_s)
        except TimeoutError:
            pass


class BatchWorker:
    def __init__(
        self,
        manager: JobManager,
        artifacts: ArtifactStore,
        sizer: BatchSizer,
        device: torch.device,
        max_queue_delay_ms: float,
        max_batch_size: int,
        memory: MemoryBudget,
        exports: ExportPool,
        profiles: ProfileSink | None = None,
        cpu_threads: int = 2,
        backends: BackendSet | None = None,
        stall_s: float = 0.0,
        worker_id: str = "",
        idle: IdleWorkers | None = None,
    ) -> None:
        self.manager = manager
        self.artifacts = artifacts
        self.sizer = sizer
        self.device = device
        # "cpu", "cuda:1": what statuses, metrics and telemetry call the device.
        self.device_name = device_name(device)
        # Unique in the process ("host:port/cuda:1", "host:port/cpu#0"); recorded with every claim.
        self.worker_id = worker_id or self.device_name
        self.max_queue_delay_s = max_queue_delay_ms / 1000.0
        self.max_batch_size = max_batch_size
        self.memory = memory
        self.exports = exports
        self.profiles = profiles
        # The shape backends loaded for this device (inflate only when none are given).
        self.backends = backends if backends is not None else BackendSet(device)
        self._cpu_threads = cpu_threads
        self._cpu = ThreadPoolExecutor(cpu_threads, thread_name_prefix=f"cpu-stage-{self.worker_id}")
        self.stall_limit = StallLimit(stall_s)
        # One thread per worker owns its device, so this worker's batches never interleave on it.
        self._device_thread = ThreadPoolExecutor(1, thread_name_prefix=f"device-{self.worker_id}")
        self._prepared: asyncio.Queue[list[_Prepared]] = asyncio.Queue(maxsize=1)
        # The jobs this worker has claimed and not yet ended (or given back).
        self._in_flight: dict[str, LiveJob] = {}
        # Jobs in a stage that is executing now (not waiting for the device), since when (monotonic).
        self._executing: dict[str, float] = {}
        self._finishing = TaskSupervisor("finishing")
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False
        # Set when the grace period is over: every job still in flight stops at its next step and is requeued.
        self._abandoning = False
        self._waiting_for_work = False
        self._device_busy = False
        # A batch claimed and still being prepared (not yet handed to the device loop).
        self._claimed_pending = False
        # The other workers of the service (none: this one alone).
        self.idle = idle if idle is not None else IdleWorkers()

    # --- lifecycle -----------------------------------------------------------
    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._preparing_loop(), name=f"preparing {self.worker_id}"),
            asyncio.create_task(self._device_loop(), name=f"device {self.worker_id}"),
        ]
        self._publish_idle()
        self._watchdog = asyncio.create_task(self._watchdog_loop(), name=f"watchdog {self.worker_id}")

    async def stop(self, grace_s: float) -> None:
        """Take no new batches; let the work under way finish within the grace period.

        What has not finished by then goes back to the queue without spending
        an attempt: a graceful stop is not a crash.
        """
        self._stopping = True
        self._publish_idle()
        self.manager.stop_accepting()
        self._watchdog.cancel()
        deadline = time.monotonic() + grace_s
        preparing, device = self._tasks
        while (self._in_flight or not preparing.done()) and time.monotonic() < deadline:
            if self._waiting_for_work:
                preparing.cancel()  # idle, or waiting for a batch to fill: nothing of ours is under way
            await asyncio.sleep(0.05)
        # Running stages stop at their next step and leave their jobs to the requeue below. The
        # preparing loop is let finish a claim it is committing, so that no claimed job is missed.
        self._abandoning = True
        device.cancel()
        await self._finishing.close()
        if not preparing.done():
            await asyncio.wait({preparing}, timeout=5.0)
            preparing.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        leftover = [job for job in self._in_flight.values() if not job.record.terminal]
        if leftover:
            requeued = await self.manager.requeue(leftover, count_attempt=False)
            log.info(
                "requeued unfinished jobs for the next start",
                extra={"jobs": requeued, "grace_s": grace_s, "worker_id": self.worker_id},
            )
        self._in_flight.clear()
        self._cpu.shutdown(wait=False, cancel_futures=True)
        self._device_thread.shutdown(wait=False, cancel_futures=True)
        # An export still running in a process is left to die with the service; its job is requeued.
        self.exports.shutdown(wait=not leftover)

    # --- the stall watchdog ------------------------------------------------------
    async def _watchdog_loop(self) -> None:
        """No job stays running for ever: one with no committed change for the stall limit is
        requeued (or, out of attempts, failed "stalled"), and the executor it blocks is replaced."""
        while True:
            limit = self.stall_limit.seconds
            await asyncio.sleep(min(5.0, limit / 4))
            now = time.monotonic()
            for job_id, since in list(self._executing.items()):
                job = self._in_flight.get(job_id)
                if job is None or job.record.terminal or job.abandoned.is_set():
                    continue
                if now - max(since, job.changed_at) < limit:
                    continue
                try:
                    await self._stalled(job, limit)
                except Exception:  # noqa: BLE001 - the watchdog must outlive any one job
                    log.exception("handling a stalled job failed", extra={"job_id": job.id})

    async def _stalled(self, job: LiveJob, limit_s: float) -> None:
        stage = job.record.stage
        log.error(
            "job stalled; giving it up",
            extra={"job_id": job.id, "stage": stage, "stall_s": limit_s, "worker_id": self.worker_id},
        )
        job.abandoned.set()
        # Whatever thread or process is stuck in the stage stays stuck; later work gets fresh ones.
        if stage == "shape_generation":
            self._device_thread.shutdown(wait=False, cancel_futures=True)
            self._device_thread = ThreadPoolExecutor(1, thread_name_prefix=f"device-{self.worker_id}")
        elif stage == "mesh_export":
            self.exports.reset()
        else:
            self._cpu.shutdown(wait=False, cancel_futures=True)
            self._cpu = ThreadPoolExecutor(self._cpu_threads, thread_name_prefix=f"cpu-stage-{self.worker_id}")
        await self._retry_or_fail(job, Stalled(f"stalled: no progress in {stage or 'the queue'} for {limit_s:g} s"))

    async def _cpu_call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._cpu, lambda: fn(*args, **kwargs))

    # --- preparing -----------------------------------------------------------
    async def _preparing_loop(self) -> None:
        while not self._stopping:
            try:
                await self._prepare_next_batch()
            except Exception:  # noqa: BLE001 - the loop must outlive any one batch
                log.exception("preparing a batch failed; carrying on")
                await asyncio.sleep(0.1)

    def _is_idle(self) -> bool:
        return not (self._stopping or self._device_busy or self._claimed_pending or not self._prepared.empty())

    def _publish_idle(self) -> None:
        self.idle.set(self.worker_id, self._is_idle())

    def _defers(self) -> bool:
        """Busy here while another worker idles: the next batch is that one's to take."""
        return not self._is_idle() and self.idle.others_idle(self.worker_id)

    async def _wait_for_turn(self) -> bool:
        """Wait while this worker defers to an idle one; False when it gave up waiting (bounded)."""
        give_up = time.monotonic() + self.idle.max_wait_s
        while self._defers():
            remaining = give_up - time.monotonic()
            if remaining <= 0:
                return False
            await self.idle.changed(remaining)
        return True

    async def _prepare_next_batch(self) -> None:
        """Wait for a batch window, size the batch, take it, preprocess it, hand it to the device."""
        self._waiting_for_work = True
        try:
            waited = await self._wait_for_turn()
            params, waiting = await self.manager.batch_window(self.max_batch_size, self.max_queue_delay_s)
            if waited and self._defers():
                return  # an idle worker turned up during the window: the batch is its to take
            head_size = self.manager.head_image_size()
            decision = await self.sizer.decide(waiting, params, head_size)
            # Below the storage reserve no new job starts: it could not write its results, and
            # would only spend an attempt. The queue waits, and resumes as soon as space returns.
            await self._storage_to_return()
        finally:
            self._waiting_for_work = False
        if self._stopping:
            return
        metrics.record_batch_decision(decision.source, decision.size, self.device_name)
        log.info(
            "batch size decision",
            extra={
                "worker_id": self.worker_id,
                "device": self.device_name,
                "batch_size": decision.size,
                "ceiling": decision.ceiling,
                "waiting": waiting,
                "reasoning": decision.reasoning,
                "source": decision.source,
            },
        )
        batch = await self.manager.take_batch(
            params, decision.size, claim_token=uuid.uuid4().hex, worker_id=self.worker_id, device=self.device_name
        )
        if not batch:
            return
        self._claimed_pending = True
        self._publish_idle()
        try:
            for job in batch:
                self._in_flight[job.id] = job
            prepared = await asyncio.gather(*(self._prepare(job, len(batch)) for job in batch))
            ready = [p for p in prepared if p is not None]
            if ready:
                await self._prepared.put(ready)
        finally:
            self._claimed_pending = False
            self._publish_idle()

    async def _storage_to_return(self) -> None:
        storage = self.manager.storage
        if storage is None or storage.state().ok:
            return
        log.warning("storage below its reserve: no new jobs start until space returns", extra={
            "reason": storage.state().describe()})
        while not storage.state().ok:
            await asyncio.sleep(0.5)
        log.info("storage is back above its reserve: jobs start again")

    async def _prepare(self, job: LiveJob, batch_size: int) -> _Prepared | None:
        params = job.params
        profile = JobProfile(
            job_id=job.id,
            backend=params.backend,
            device=self.device_name,
            batch_size=batch_size,
            image_size=(0, 0),
            resolution=params.resolution,
            steps=params.steps,
            face_count=params.face_count,
            started_at=job.record.created_at,
        )
        try:
            # The claim started the first stage; a cancel committed since then stops the job before it runs.
            self._check_continue(job)
            if job.loaded is None:
                data = await self._cpu_call(self.artifacts.read_input, job.id)
                job.loaded = await self._stage(job, profile, "image_loading", load_image, data, started=True)
            else:
                # Admission decoded the picture; its time counts from the job's creation.
                profile.stages.append(StageRun("image_loading", 0.0, job.record.stage_timings.get("image_loading", 0.0)))
            profile.image_size = job.loaded.size
            self._check_continue(job)
            image = await self._stage(
                job,
                profile,
                "image_preprocessing",
                prepare_image,
                job.loaded,
                started="image_preprocessing" == job.record.stage,
                remove_background=params.remove_background,
                foreground_ratio=params.foreground_ratio,
                resolution=params.resolution,
            )
            job.loaded = None  # the prepared crop is all that is needed from here on
            self._check_continue(job)
            return _Prepared(job, image, profile)
        except BaseException as exc:  # noqa: BLE001 - every failure ends the job, never the worker
            await self._end_with_error(job, profile, exc)
            _reraise_cancellation(exc)
            return None

    async def _stage(
        self,
        job: LiveJob,
        profile: JobProfile,
        stage: str,
        fn: Callable[..., Any],
        *args: Any,
        started: bool = False,
        **kwargs: Any,
    ) -> Any:
        """Run fn on the CPU pool as one timed stage, with its started/completed (or failed) events."""
        return await self._timed_stage(job, profile, stage, lambda: self._cpu_call(fn, *args, **kwargs), started)

    async def _timed_stage(
        self, job: LiveJob, profile: JobProfile, stage: str, run: Callable[[], Awaitable[Any]], started: bool = False
    ) -> Any:
        """`started`: the stage's started event is already committed (the claim made it)."""
        if not started:
            await self._emit(job, stage, "started", 0.0, 0.0)
        offset = time.time() - profile.started_at
        begun = time.perf_counter()
        self._executing[job.id] = time.monotonic()
        try:
            result = await abandonable([job], run())
        except BaseException as exc:
            if not isinstance(exc, (asyncio.CancelledError, _GivenBack)) and not self._abandoning:
                await self._emit(job, stage, "failed", 0.0, time.perf_counter() - begun)
            raise
        finally:
            self._executing.pop(job.id, None)
        elapsed = time.perf_counter() - begun
        profile.stages.append(StageRun(stage, offset, elapsed))
        self.stall_limit.observe(elapsed)
        await self._emit(job, stage, "completed", 1.0, elapsed)
        return result

    async def _emit(self, job: LiveJob, stage: str, state: str, fraction: float, elapsed_s: float, detail: str = "") -> None:
        if not await self.manager.emit_stage(job, stage, state, fraction, elapsed_s, detail):
            raise _GivenBack()  # requeued or ended by someone else: not this worker's to move any more

    def _check_continue(self, job: LiveJob) -> None:
        """The stage boundary: where cancellation, deadlines and the end of a graceful stop take effect."""
        if self._abandoning:
            raise _GivenBack()
        if job.cancel_requested:
            raise Cancelled("cancelled by the client")
        if job.expired():
            raise DeadlineExceededError()

    # --- the device --------------------------------------------------------------
    async def _device_loop(self) -> None:
        while True:
            batch = await self._prepared.get()
            self._device_busy = True
            self._publish_idle()
            try:
                await self._run_batch(batch)
            except Exception as exc:  # noqa: BLE001 - fail this batch's jobs, keep the device loop alive
                log.exception("a batch failed outside its jobs' stages")
                for p in batch:
                    await self._end_with_error(p.job, p.profile, exc)
            finally:
                self._device_busy = False
                self._publish_idle()

    async def _run_batch(self, batch: list[_Prepared]) -> None:
        batch = [p for p in batch if not await self._stopped_before_device(p)]
        if not batch:
            return
        params = batch[0].job.params
        if self.backends.loading(params.backend):
            # Start-up: the weights are still coming in; this batch (and the device) waits for them.
            await asyncio.to_thread(self.backends.wait_loaded)
        try:
            backend = self.backends.get(params.backend, self.device)
        except ServiceError as exc:  # not ready (a job queued before a restart without its weights, say)
            for p in batch:
                await self._end_with_error(p.job, p.profile, exc)
            return
        loop = asyncio.get_running_loop()
        wall_start = time.time()
        started = time.perf_counter()
        for p in list(batch):
            try:
                await self._emit(p.job, "shape_generation", "started", 0.0, 0.0)
            except BaseException as exc:  # noqa: BLE001 - this job ends here, its batch-mates go on
                await self._end_with_error(p.job, p.profile, exc)
                _reraise_cancellation(exc)
                batch.remove(p)
        if not batch:
            return
        executing_since = time.monotonic()
        for p in batch:
            self._executing[p.job.id] = executing_since
        try:
            outcomes = await self._generate_shapes(batch, backend, params, loop, started)
        finally:
            for p in batch:
                self._executing.pop(p.job.id, None)
        elapsed = time.perf_counter() - started
        for p, outcome in zip(batch, outcomes):
            if isinstance(outcome, BaseException):
                if not isinstance(outcome, _GivenBack) and not self._abandoning:
                    await self.manager.emit_stage(p.job, "shape_generation", "failed", 0.0, elapsed)
                await self._end_with_error(p.job, p.profile, outcome)
                continue
            shape, peak_bytes, sub_batch, substages = outcome
            p.profile.batch_size = sub_batch
            p.profile.stages.append(
                StageRun("shape_generation", wall_start - p.profile.started_at, elapsed, peak_bytes, substages)
            )
            try:
                await self._emit(p.job, "shape_generation", "completed", 1.0, elapsed)
            except BaseException as exc:  # noqa: BLE001
                await self._end_with_error(p.job, p.profile, exc)
                _reraise_cancellation(exc)
                continue
            self._finishing.spawn(self._finish(p, shape), f"finish-{p.job.id}")

    async def _stopped_before_device(self, p: _Prepared) -> bool:
        try:
            self._check_continue(p.job)
            return False
        except BaseException as exc:  # noqa: BLE001
            await self._end_with_error(p.job, p.profile, exc)
            _reraise_cancellation(exc)
            return True

    async def _generate_shapes(
        self,
        batch: list[_Prepared],
        backend: Any,
        params: GenerationParams,
        loop: asyncio.AbstractEventLoop,
        started: float,
    ) -> list[tuple[Shape, int, int, dict[str, float]] | BaseException]:
        """Run the batch in one backend call; on out-of-memory split it in half and retry, down to one job.

        An item's own failure (an empty surface) ends that job only. Each success carries the batch's
        peak memory above what was resident before (the weights), its size and the backend's sub-stages.
        """
        item_bytes = backend.estimate_item_bytes(params.resolution, params.steps)
        jobs = [p.job for p in batch]
        items = [ShapeItem(p.image, p.job.params.seed, p.job.params.face_count) for p in batch]
        settings = ShapeSettings(params.resolution, params.steps, params.guidance_scale)
        timings = BatchTimings()

        def progress(fraction: float, detail: str = "") -> None:
            elapsed = time.perf_counter() - started
            for job in jobs:
                self._finishing.spawn_threadsafe(
                    loop, self._progress(job, fraction, elapsed, detail), f"progress-{job.id}"
                )

        def should_stop() -> bool:
            # Only a batch whose every job was cancelled (or is past its deadline) stops mid-call, between
            # two steps; a lone cancelled job stops at the next stage boundary, batch-mates unaffected.
            # At the end of a graceful stop the whole batch stops and is requeued.
            return self._abandoning or all(job.cancel_requested or job.expired() for job in jobs)

        def run() -> tuple[list[Shape | ServiceError], int]:
            compute_started = time.perf_counter()
            self.memory.check(len(batch), item_bytes)
            resident = 0
            if self.device.type == "cuda":
                # This worker's GPU is the device thread's current one, so code that allocates on "the
                # current device" lands here too and not on cuda:0.
                torch.cuda.set_device(self.device)
                torch.cuda.reset_peak_memory_stats(self.device)
                resident = torch.cuda.memory_allocated(self.device)
            shapes = backend.generate_batch(
                items, settings, device=self.device, progress=progress, should_stop=should_stop, timings=timings
            )
            if self.device.type == "cuda":
                # The optimizer learns a per-item cost: the weights, resident once, are not the batch's.
                peak = max(0, torch.cuda.max_memory_allocated(self.device) - resident)
            else:
                peak = item_bytes * len(batch)  # modelled: the CPU has no allocator high-water mark
            metrics.record_batch(len(batch), time.perf_counter() - compute_started, peak, self.device_name)
            return shapes, peak

        try:
            shapes, peak = await abandonable(jobs, loop.run_in_executor(self._device_thread, run))
        except BaseException as exc:  # noqa: BLE001
            if not is_out_of_memory(exc):
                if isinstance(exc, asyncio.CancelledError):
                    raise
                if self._abandoning:
                    return [_GivenBack()] * len(batch)
                if isinstance(exc, Cancelled):
                    # Stopped mid-call because every job was cancelled or out of time: say which.
                    return [DeadlineExceededError() if job.expired() and not job.cancel_requested else exc
                            for job in jobs]
                return [exc] * len(batch)
            self.sizer.record_outcome(params, len(batch), 0, out_of_memory=True)
            metrics.record_out_of_memory(len(batch), self.device_name)
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            if len(batch) == 1:
                message = (
                    f"out of memory: this job does not fit on {self.device_name} even alone "
                    f"(about {item_bytes / 2**20:.0f} MiB needed); lower resolution: {exc}"
                )
                # Over the device's whole capacity it never fits: the job's own fault. An allocator
                # that ran out (fragmentation, another tenant) may well have room on a later try.
                return [ResourceExhausted(message) if isinstance(exc, OverCapacity) else OutOfMemory(message)]
            half = len(batch) // 2
            log.warning(
                "out of memory; splitting the batch",
                extra={
                    "worker_id": self.worker_id,
                    "batch_size": len(batch),
                    "into": [half, len(batch) - half],
                    "error": str(exc),
                },
            )
            first = await self._generate_shapes(batch[:half], backend, params, loop, started)
            second = await self._generate_shapes(batch[half:], backend, params, loop, started)
            return first + second
        self.sizer.record_outcome(params, len(batch), peak, out_of_memory=False)
        substages = {name: round(seconds, 6) for name, seconds in timings.substages.items()}
        # Each job's profile carries the whole batch's peak beside the batch size.
        return [
            shape if isinstance(shape, BaseException) else (shape, peak, len(batch), substages)
            for shape in shapes
        ]

    async def _progress(self, job: LiveJob, fraction: float, elapsed_s: float, detail: str) -> None:
        """A progress event; losing one (the job moved on, the store is busy) costs nothing."""
        try:
            await self.manager.emit_stage(job, "shape_generation", "progress", fraction, elapsed_s, detail)
        except ServiceError as exc:
            log.warning("a progress event was not recorded", extra={"job_id": job.id, "error": exc.message})

    # --- finishing ---------------------------------------------------------------
    async def _finish(self, p: _Prepared, shape: Shape) -> None:
        job, profile, params = p.job, p.profile, p.job.params
        try:
            self._check_continue(job)
            textured = await self._stage(
                job,
                profile,
                "texture_synthesis",
                synthesize_texture,
                shape,
                p.image,
                texture=params.texture,
                texture_size=params.texture_size,
                seed=params.seed,
            )
            self._check_continue(job)
            result = await self._timed_stage(
                job,
                profile,
                "mesh_export",
                # Only the format asked for; the others are written when first downloaded.
                lambda: self.exports.export(
                    job.id, textured, params.face_count, (params.format,), cutout_mask=p.image.source_mask
                ),
            )
            # The last step boundary: a cancel accepted during the export sticks.
            self._check_continue(job)
            profile.succeeded = await self._end(job, "succeeded", result=result)
            if profile.succeeded:
                self._log_job(job, profile)
        except BaseException as exc:  # noqa: BLE001
            await self._end_with_error(job, profile, exc)
            _reraise_cancellation(exc)
        finally:
            if self.profiles is not None:
                self.profiles.report(job, profile)

    async def _end_with_error(self, job: LiveJob, profile: JobProfile, exc: BaseException) -> None:
        if job.record.terminal:
            self._in_flight.pop(job.id, None)
            return
        if isinstance(exc, (asyncio.CancelledError, _GivenBack)):
            if not self._abandoning and isinstance(exc, _GivenBack):
                self._in_flight.pop(job.id, None)  # someone else moved it on
            return  # else a graceful stop requeues it (stop())
        fault = as_fault(exc)
        if fault is not None:
            await self._retry_or_fail(job, fault)
            return
        if isinstance(exc, Cancelled):
            ended = await self._end(job, "cancelled", error=("CANCELLED", exc.message))
        elif isinstance(exc, DeadlineExceededError):
            ended = await self._end(job, "failed", error=("DEADLINE_EXCEEDED", str(exc)))
        elif isinstance(exc, ServiceError):
            ended = await self._end(job, "failed", error=(exc.code.name, exc.message))
        else:
            log.exception("job failed", extra={"job_id": job.id}, exc_info=exc)
            ended = await self._end(job, "failed", error=("INTERNAL", internal_message(exc)))
        if ended:
            self._log_job(job, profile)

    async def _retry_or_fail(self, job: LiveJob, fault: InfrastructureFault) -> None:
        """Requeue (or, out of attempts, fail with the fault's code); retried while the store cannot take it."""
        pause = 0.2
        while not self._abandoning:  # once a graceful stop runs out of time, its requeue takes the job
            try:
                await self.manager.retry_or_fail(job, fault.code, fault.message)
                self._in_flight.pop(job.id, None)
                return
            except ServiceError as exc:
                log.warning("could not requeue a job after a fault; retrying", extra={"job_id": job.id, "error": exc.message})
                await asyncio.sleep(pause)
                pause = min(pause * 2, 5.0)

    async def _end(self, job: LiveJob, status: str, result: dict | None = None, error: tuple[str, str] | None = None) -> bool:
        """Commit the job's end, retrying while the store cannot take it: a job never stays running
        because one write failed. False when the job was not this worker's to end any more."""
        pause = 0.2
        try:
            while True:
                try:
                    return await self.manager.finish(job, status, result=result, error=error)
                except ServiceError as exc:
                    if self._abandoning:
                        return False  # the requeue at the end of the stop, or the next start, takes it
                    log.warning("could not record a job's end; retrying", extra={"job_id": job.id, "error": exc.message})
                    await asyncio.sleep(pause)
                    pause = min(pause * 2, 5.0)
        finally:
            if job.record.terminal:
                self._in_flight.pop(job.id, None)

    def _log_job(self, job: LiveJob, profile: JobProfile) -> None:
        stages = {s.name: round(s.duration_s, 4) for s in profile.stages}
        total = profile.total_s
        slowest = max(profile.stages, key=lambda s: s.duration_s, default=None)
        log.info(
            "job finished",
            extra={
                "job_id": job.id,
                "worker_id": self.worker_id,
                "device": self.device_name,
                "status": job.record.status,
                "error": job.record.error_code,
                "batch_size": profile.batch_size,
                "stages": stages,
                # A backend's parts of a stage: hunyuan3d's denoising apart from its volume decoding.
                "substages": {s.name: s.substages for s in profile.stages if s.substages},
                "total_s": round(total, 4),
                "slowest_stage": slowest.name if slowest else None,
                "slowest_share": round(slowest.duration_s / total, 3) if slowest and total > 0 else None,
            },
        )


async def abandonable(jobs: list[LiveJob], work: Awaitable[Any]) -> Any:
    """Await work, unless the watchdog abandons one of the jobs first (then _GivenBack).

    A thread or process stuck in a stage cannot be stopped from here; it is
    left behind, and the watchdog gives the worker a fresh executor.
    """
    task = asyncio.ensure_future(work)
    waiters = [asyncio.ensure_future(job.abandoned.wait()) for job in jobs]
    try:
        done, _ = await asyncio.wait({task, *waiters}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        task.cancel()
        raise
    finally:
        for waiter in waiters:
            waiter.cancel()
    if task in done:
        return task.result()
    task.cancel()
    raise _GivenBack()


class StallLimit:
    """How long a job may go without a committed change before the watchdog calls it stalled.

    Fixed when GENERATION_STALL_S is set; otherwise several times the longest
    stage this worker has recently run (the profile it reports), and never under
    two minutes: generous, so a slow but healthy job is never taken for a stuck one.
    """

    FACTOR = 5.0
    FLOOR_S = 120.0

    def __init__(self, fixed_s: float = 0.0, window: int = 200) -> None:
        self.fixed_s = fixed_s
        self._recent: deque[float] = deque(maxlen=window)

    def observe(self, stage_s: float) -> None:
        self._recent.append(stage_s)

    @property
    def seconds(self) -> float:
        if self.fixed_s > 0:
            return self.fixed_s
        return max(self.FLOOR_S, self.FACTOR * max(self._recent, default=0.0))


class OverCapacity(MemoryError):
    """A batch whose modelled footprint exceeds the device's whole capacity."""


class DeadlineExceededError(Exception):
    def __init__(self) -> None:
        super().__init__("deadline exceeded before the job could finish")


def _reraise_cancellation(exc: BaseException) -> None:
    """A handler that ends one job and lets the worker go on must not swallow the task's own cancel: a
    graceful stop cancels the worker's loops, and one that went back to waiting for work would keep
    the stop waiting for ever (as the device loop did when a stop arrived while a write waited on
    another process's lock)."""
    if isinstance(exc, asyncio.CancelledError):
        raise exc


class _GivenBack(Exception):
    """The job is no longer this worker's to move: a graceful stop ran out of time, or it was requeued."""


