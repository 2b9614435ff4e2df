"""The batch worker: one per device.

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
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from services.common import metrics
from services.common.errors import Cancelled, ResourceExhausted, ServiceError
from services.generation.artifacts import ArtifactStore
from services.generation.export_pool import ExportPool
from services.generation.jobs import JobManager, LiveJob
from services.generation.pipeline.image_loading import load_image
from services.generation.pipeline.image_preprocessing import prepare_image
from services.generation.pipeline.params import FORMATS, GenerationParams
from services.generation.pipeline.records import PreparedImage, Shape
from services.generation.pipeline.texture_synthesis import synthesize_texture
from services.generation.backends.registry import get_backend

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
            raise MemoryError(
                f"batch of {batch_size} needs {needed / 2**20:.0f} MiB, over the limit of "
                f"{self.limit_bytes / 2**20:.0f} MiB"
            )


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
    ) -> None:
        self.manager = manager
        self.artifacts = artifacts
        self.sizer = sizer
        self.device = device
        self.max_queue_delay_s = max_queue_delay_ms / 1000.0
        self.max_batch_size = max_batch_size
        self.memory = memory
        self.exports = exports
        self.profiles = profiles
        self._cpu = ThreadPoolExecutor(cpu_threads, thread_name_prefix="cpu-stage")
        # One thread owns the device, so batches never interleave on it.
        self._device_thread = ThreadPoolExecutor(1, thread_name_prefix="device")
        self._prepared: asyncio.Queue[list[_Prepared]] = asyncio.Queue(maxsize=1)
        self._finishing: set[asyncio.Task[None]] = set()
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False
        self._device_busy = False

    # --- lifecycle -----------------------------------------------------------
    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._preparing_loop(), name="preparing"),
            asyncio.create_task(self._device_loop(), name="device"),
        ]

    async def stop(self, grace_s: float) -> None:
        """Take no new batches; let the ones under way finish within the grace period."""
        self._stopping = True
        self.manager.stop_accepting()
        self._tasks[0].cancel()
        await asyncio.gather(self._tasks[0], return_exceptions=True)
        deadline = time.monotonic() + grace_s
        while (not self._prepared.empty() or self._device_busy or self._finishing) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        self._tasks[1].cancel()
        await asyncio.gather(self._tasks[1], return_exceptions=True)
        self._cpu.shutdown(wait=False, cancel_futures=True)
        self._device_thread.shutdown(wait=False, cancel_futures=True)
        self.exports.shutdown(wait=not self._finishing)

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

    async def _prepare_next_batch(self) -> None:
        """Wait for a batch window, size the batch, take it, preprocess it, hand it to the device."""
        params, waiting = await self.manager.batch_window(self.max_batch_size, self.max_queue_delay_s)
        head_size = self.manager.head_image_size()
        decision = await self.sizer.decide(waiting, params, head_size)
        metrics.record_batch_decision(decision.source, decision.size)
        log.info(
            "batch size decision",
            extra={
                "batch_size": decision.size,
                "waiting": waiting,
                "reasoning": decision.reasoning,
                "source": decision.source,
            },
        )
        batch = await self.manager.take_batch(params, decision.size)
        if not batch:
            return
        prepared = await asyncio.gather(*(self._prepare(job, len(batch)) for job in batch))
        ready = [p for p in prepared if p is not None]
        if ready:
            await self._prepared.put(ready)

    async def _prepare(self, job: LiveJob, batch_size: int) -> _Prepared | None:
        params = job.params
        await self.manager.mark_running(job)
        profile = JobProfile(
            job_id=job.id,
            backend=params.backend,
            device=str(self.device),
            batch_size=batch_size,
            image_size=(0, 0),
            resolution=params.resolution,
            steps=params.steps,
            face_count=params.face_count,
            started_at=job.record.created_at,
        )
        try:
            if job.loaded is None:
                job.loaded = await self._stage(job, profile, "image_loading", load_image, self.artifacts.read_input(job.id))
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
                remove_background=params.remove_background,
                foreground_ratio=params.foreground_ratio,
                resolution=params.resolution,
            )
            job.loaded = None  # the prepared crop is all that is needed from here on
            self._check_continue(job)
            return _Prepared(job, image, profile)
        except BaseException as exc:  # noqa: BLE001 - every failure ends the job, never the worker
            await self._end_with_error(job, profile, exc)
            if isinstance(exc, asyncio.CancelledError):
                raise
            return None

    async def _stage(self, job: LiveJob, profile: JobProfile, stage: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run fn on the CPU pool as one timed stage, with its started/completed (or failed) events."""
        return await self._timed_stage(job, profile, stage, lambda: self._cpu_call(fn, *args, **kwargs))

    async def _timed_stage(
        self, job: LiveJob, profile: JobProfile, stage: str, run: Callable[[], Awaitable[Any]]
    ) -> Any:
        await self.manager.emit_stage(job, stage, "started", 0.0, 0.0)
        offset = time.time() - profile.started_at
        started = time.perf_counter()
        try:
            result = await run()
        except BaseException:
            await self.manager.emit_stage(job, stage, "failed", 0.0, time.perf_counter() - started)
            raise
        elapsed = time.perf_counter() - started
        profile.stages.append(StageRun(stage, offset, elapsed))
        await self.manager.emit_stage(job, stage, "completed", 1.0, elapsed)
        return result

    def _check_continue(self, job: LiveJob) -> None:
        """The stage boundary: where cancellation and deadlines take effect."""
        if job.cancel_requested:
            raise Cancelled("cancelled by the client")
        if job.expired():
            raise DeadlineExceededError()

    # --- the device --------------------------------------------------------------
    async def _device_loop(self) -> None:
        while True:
            batch = await self._prepared.get()
            self._device_busy = True
            try:
                await self._run_batch(batch)
            except Exception as exc:  # noqa: BLE001 - fail this batch's jobs, keep the device loop alive
                log.exception("a batch failed outside its jobs' stages")
                for p in batch:
                    await self._end_with_error(p.job, p.profile, exc)
            finally:
                self._device_busy = False

    async def _run_batch(self, batch: list[_Prepared]) -> None:
        batch = [p for p in batch if not await self._stopped_before_device(p)]
        if not batch:
            return
        params = batch[0].job.params
        backend = get_backend(params.backend)
        loop = asyncio.get_running_loop()
        wall_start = time.time()
        started = time.perf_counter()
        for p in batch:
            await self.manager.emit_stage(p.job, "shape_generation", "started", 0.0, 0.0)
        outcomes = await self._generate_shapes(batch, backend, params, loop, started)
        elapsed = time.perf_counter() - started
        for p, outcome in zip(batch, outcomes):
            if isinstance(outcome, BaseException):
                await self.manager.emit_stage(p.job, "shape_generation", "failed", 0.0, elapsed)
                await self._end_with_error(p.job, p.profile, outcome)
                continue
            shape, peak_bytes, sub_batch = outcome
            p.profile.batch_size = sub_batch
            p.profile.stages.append(
                StageRun("shape_generation", wall_start - p.profile.started_at, elapsed, peak_bytes)
            )
            await self.manager.emit_stage(p.job, "shape_generation", "completed", 1.0, elapsed)
            task = asyncio.create_task(self._finish(p, shape))
            self._finishing.add(task)
            task.add_done_callback(self._finishing.discard)

    async def _stopped_before_device(self, p: _Prepared) -> bool:
        try:
            self._check_continue(p.job)
            return False
        except BaseException as exc:  # noqa: BLE001
            await self._end_with_error(p.job, p.profile, exc)
            return True

    async def _generate_shapes(
        self,
        batch: list[_Prepared],
        backend: Any,
        params: GenerationParams,
        loop: asyncio.AbstractEventLoop,
        started: float,
    ) -> list[tuple[Shape, int, int] | BaseException]:
        """Run the batch; on out-of-memory split it in half and retry, down to one job."""
        item_bytes = backend.estimate_item_bytes(params.resolution, params.steps)
        jobs = [p.job for p in batch]

        def progress(fraction: float) -> None:
            elapsed = time.perf_counter() - started
            for job in jobs:
                asyncio.run_coroutine_threadsafe(
                    self.manager.emit_stage(job, "shape_generation", "progress", fraction, elapsed), loop
                )

        def should_stop() -> bool:
            # Only a batch whose every job was cancelled stops mid-solve; a lone
            # cancelled job stops at the next stage boundary, batch-mates unaffected.
            return all(job.cancel_requested for job in jobs)

        def run() -> tuple[list[Shape], int]:
            compute_started = time.perf_counter()
            self.memory.check(len(batch), item_bytes)
            if self.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(self.device)
            shapes = backend.generate(
                [p.image.grid_mask for p in batch],
                steps=params.steps,
                device=self.device,
                progress=progress,
                should_stop=should_stop,
            )
            if self.device.type == "cuda":
                peak = torch.cuda.max_memory_allocated(self.device)
            else:
                peak = item_bytes * len(batch)  # modelled: the CPU has no allocator high-water mark
            metrics.record_batch(len(batch), time.perf_counter() - compute_started, peak, str(self.device))
            return shapes, peak

        try:
            shapes, peak = await loop.run_in_executor(self._device_thread, run)
        except BaseException as exc:  # noqa: BLE001
            if not is_out_of_memory(exc):
                if isinstance(exc, asyncio.CancelledError):
                    raise
                return [exc] * len(batch)
            self.sizer.record_outcome(params, len(batch), 0, out_of_memory=True)
            metrics.record_out_of_memory(len(batch), str(self.device))
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            if len(batch) == 1:
                return [
                    ResourceExhausted(
                        f"out of memory: this job does not fit on {self.device} even alone "
                        f"(about {item_bytes / 2**20:.0f} MiB needed); lower resolution: {exc}"
                    )
                ]
            half = len(batch) // 2
            log.warning(
                "out of memory; splitting the batch",
                extra={"batch_size": len(batch), "into": [half, len(batch) - half], "error": str(exc)},
            )
            first = await self._generate_shapes(batch[:half], backend, params, loop, started)
            second = await self._generate_shapes(batch[half:], backend, params, loop, started)
            return first + second
        self.sizer.record_outcome(params, len(batch), peak, out_of_memory=False)
        # Each job's profile carries the whole batch's peak beside the batch size.
        return [(shape, peak, len(batch)) for shape in shapes]

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
                lambda: self.exports.export(job.id, textured, params.face_count, FORMATS),
            )
            profile.succeeded = True
            await self.manager.finish(job, "succeeded", result=result)
            self._log_job(job, profile)
        except BaseException as exc:  # noqa: BLE001
            await self._end_with_error(job, profile, exc)
            if isinstance(exc, asyncio.CancelledError):
                raise
        finally:
            if self.profiles is not None:
                self.profiles.report(job, profile)

    async def _end_with_error(self, job: LiveJob, profile: JobProfile, exc: BaseException) -> None:
        if job.record.terminal:
            return
        if isinstance(exc, Cancelled):
            await self.manager.finish(job, "cancelled", error=("CANCELLED", exc.message))
        elif isinstance(exc, DeadlineExceededError):
            await self.manager.finish(job, "failed", error=("DEADLINE_EXCEEDED", str(exc)))
        elif isinstance(exc, asyncio.CancelledError):
            return  # shutdown: the record stays "running" and the next start requeues it
        elif isinstance(exc, ServiceError):
            await self.manager.finish(job, "failed", error=(exc.code.name, exc.message))
        else:
            log.exception("job failed", extra={"job_id": job.id}, exc_info=exc)
            await self.manager.finish(job, "failed", error=("INTERNAL", f"internal error: {type(exc).__name__}: {exc}"))
        self._log_job(job, profile)

    def _log_job(self, job: LiveJob, profile: JobProfile) -> None:
        stages = {s.name: round(s.duration_s, 4) for s in profile.stages}
        total = profile.total_s
        slowest = max(profile.stages, key=lambda s: s.duration_s, default=None)
        log.info(
            "job finished",
            extra={
                "job_id": job.id,
                "status": job.record.status,
                "error": job.record.error_code,
                "batch_size": profile.batch_size,
                "stages": stages,
                "total_s": round(total, 4),
                "slowest_stage": slowest.name if slowest else None,
                "slowest_share": round(slowest.duration_s / total, 3) if slowest and total > 0 else None,
            },
        )


class DeadlineExceededError(Exception):
    def __init__(self) -> None:
        super().__init__("deadline exceeded before the job could finish")

