"""Entry point: `python -m services.generation.server`.

Owns the devices: one batch worker per entry of GENERATION_DEVICES (every
CUDA device torch sees when unset, else the CPU), all taking from one queue.
"""
from __future__ import annotations

import asyncio
import logging
import os
import socket
import sys

from psycopg_pool import PoolTimeout

from pb.orfeas.generation.v1 import generation_pb2
from pb.orfeas.generation.v1 import generation_pb2_grpc as pb_grpc
from services.common import metrics
from services.common.config import GenerationConfig, HunyuanConfig, SecurityConfig
from services.common.grpc_security import bind, server_interceptors
from services.common.grpc_server import create_server, serve_until_signalled, set_serving
from services.common.logging_setup import setup_logging
from services.common.postgres import SchemaTooNew
from services.generation.admission import Admission
from services.generation.artifacts import ArtifactStore
from services.generation.backends.registry import BackendSet, load_plugins
from services.generation.batch_sizing import OptimizerBatchSizer
from services.generation.cluster_jobs import ClusterJobManager, batch_key_text
from services.generation.device_monitor import DeviceSampler
from services.generation.devices import DeviceBackends, DeviceConfigError, WorkerSlot, resolve_workers
from services.generation.export_pool import ExportPool
from services.generation.job_store import JobStore
from services.generation.jobs import JobManager
from services.generation.pg_store import SWEEP_LOCK, PgJobStore
from services.generation.profile_reporting import TelemetryProfileSink
from services.generation.retention import RetentionSweeper
from services.generation.servicer import GenerationServicer
from services.generation.storage import StorageMonitor
from services.generation.telemetry_client import TelemetryClient
from services.generation.worker import BatchWorker, IdleWorkers, MemoryBudget

log = logging.getLogger("services.generation")

SERVICE_NAME = generation_pb2.DESCRIPTOR.services_by_name["GenerationService"].full_name


def plan(config: GenerationConfig) -> list[WorkerSlot]:
    """The workers this service runs; DeviceConfigError names a device the machine cannot serve."""
    instance = f"{socket.gethostname()}:{config.port}"
    return resolve_workers(config.devices, config.memory_limit_mb, instance)


def build_workers(
    config: GenerationConfig,
    slots: list[WorkerSlot],
    manager: JobManager,
    artifacts: ArtifactStore,
    telemetry: TelemetryClient,
    backend_sets: dict[str, BackendSet],
) -> list[BatchWorker]:
    """One worker per slot, each with its own sizer, memory budget, export processes and profile sink."""
    # The configured export processes are shared out, at least one each when there are any.
    export_processes = max(1, config.export_processes // len(slots)) if config.export_processes > 0 else 0
    idle = IdleWorkers()
    workers = []
    for slot in slots:
        backends = backend_sets[slot.device_name]
        sizer = OptimizerBatchSizer(
            telemetry,
            slot.device,
            slot.worker_id,
            config.max_batch_size,
            config.cpu_memory_share,
            sharing=slot.sharing,
            capacity_bytes=slot.memory_limit_bytes,
            telemetry_name=backends.telemetry_name,
        )
        workers.append(
            BatchWorker(
                manager,
                artifacts,
                sizer,
                slot.device,
                config.max_queue_delay_ms,
                config.max_batch_size,
                MemoryBudget(slot.memory_limit_bytes),
                ExportPool(export_processes, artifacts.root, config.export_inline_max_faces),
                profiles=TelemetryProfileSink(telemetry, slot.worker_id, backends.precision, backends.telemetry_name),
                backends=backends,
                stall_s=config.stall_s,
                worker_id=slot.worker_id,
                idle=idle,
            )
        )
    return workers


class ExclusiveSweeper(RetentionSweeper):
    """Retention for a cluster: one instance sweeps at a time (an advisory lock); the others skip that round."""

    store: PgJobStore

    async def sweep(self) -> dict[str, int]:
        _, counts = await self.store.try_exclusive(SWEEP_LOCK, super().sweep)
        return counts or {}


async def open_jobs(
    config: GenerationConfig, instance: str
) -> tuple[JobStore | PgJobStore, JobManager, ArtifactStore]:
    """The store and the manager: SQLite and the in-memory queue for one instance, or PostgreSQL and the
    database's queue when GENERATION_DATABASE_URL names one (any number of instances)."""
    artifacts = ArtifactStore(config.artifacts_path)
    # The reserve is watched where the results are written.
    watched = config.artifacts_path if config.artifacts_dir else config.data_dir
    storage = StorageMonitor(watched, int(config.min_free_mb * 2**20))
    if not config.database_url:
        sqlite = JobStore(config.data_dir / "generation.db", lock_wait_s=config.store_lock_wait_s)
        await sqlite.open()
        return sqlite, JobManager(sqlite, artifacts, config.queue_limit, config.max_attempts, storage), artifacts
    store = PgJobStore(
        config.database_url,
        origin=instance,
        batch_key_of=batch_key_text,
        lease_s=config.lease_s,
        pool_size=config.database_pool_size,
        timeout_s=config.database_timeout_s,
    )
    await store.open()
    manager = ClusterJobManager(
        store,
        artifacts,
        config.queue_limit,
        config.max_attempts,
        storage,
        instance=instance,
        lease_s=config.lease_s,
        queue_events_depth=config.queue_events_depth,
    )
    return store, manager, artifacts


async def serve(config: GenerationConfig, slots: list[WorkerSlot]) -> None:
    config.data_dir.mkdir(parents=True, exist_ok=True)
    instance = slots[0].worker_id.rsplit("/", 1)[0]
    store, manager, artifacts = await open_jobs(config, instance)
    recovered = await manager.recover()
    telemetry = TelemetryClient(
        config.telemetry_address,
        buffer_size=config.telemetry_buffer_size,
        target_utilization=config.target_utilization,
    )
    await telemetry.start()
    sampler = DeviceSampler(
        instance,
        telemetry.report_device_sample,
        config.device_sample_interval_s,
        workers=[(slot.worker_id, slot.device_name) for slot in slots],
    )
    await sampler.start()
    # The shape backends of each device, loaded once however many workers share it: inflate at once,
    # hunyuan3d's weights on a thread (requests for it are refused with the reason until they are in;
    # inflate serves meanwhile).
    plugins = load_plugins(config.backend_plugins)
    hunyuan = HunyuanConfig.from_env()
    backend_sets: dict[str, BackendSet] = {}
    for slot in slots:
        if slot.device_name not in backend_sets:
            backend_sets[slot.device_name] = BackendSet.start_loading(slot.device, hunyuan)
    workers = build_workers(config, slots, manager, artifacts, telemetry, backend_sets)
    admission = Admission()

    security = SecurityConfig.from_env()
    server, health = create_server(
        [SERVICE_NAME], [metrics.MetricsInterceptor("generation"), *server_interceptors(security)]
    )
    servicer = GenerationServicer(manager, admission, DeviceBackends(backend_sets))  # type: ignore[arg-type]
    pb_grpc.add_GenerationServiceServicer_to_server(servicer, server)
    address = f"{config.host}:{config.port}"
    bind(server, address, security)
    await server.start()
    manager.start()
    for worker in workers:
        worker.start()
    metrics.declare_devices(list(backend_sets))
    if config.metrics_port:
        metrics.start_metrics_server(config.host, config.metrics_port)
    metrics.track_queue_length(lambda: manager.queue_length)
    metrics.track_devices(lambda: sampler.latest)
    metrics.track_telemetry_dropped(lambda: telemetry.reports_dropped)
    sweeper_class = ExclusiveSweeper if isinstance(store, PgJobStore) else RetentionSweeper
    sweeper = sweeper_class(store, artifacts, config.retention_s, int(config.artifact_budget_mb * 2**20))  # type: ignore[arg-type]
    sweeping = asyncio.create_task(sweeper.run_forever(config.retention_interval_s))
    await set_serving(health, [SERVICE_NAME], True)
    log.info(
        "serving",
        extra={
            "address": address,
            "devices": [slot.device_name for slot in slots],
            "workers": [slot.worker_id for slot in slots],
            "recovered": recovered,
            "plugins": plugins,
            "job_store": f"postgresql {store.where}" if isinstance(store, PgJobStore) else "sqlite",
        },
    )

    async def on_stop() -> None:
        sweeping.cancel()
        await asyncio.gather(sweeping, return_exceptions=True)
        await set_serving(health, [SERVICE_NAME], False)
        # Calls are still served while the workers drain, all within the one grace period, so clients
        # can follow and fetch to the end; each requeues what it could not finish.
        await asyncio.gather(*(worker.stop(config.grace_period_s) for worker in workers))
        # Then every open stream ends with UNAVAILABLE naming the restart, not with a cut connection.
        await manager.close()
        admission.close()
        await sampler.close()
        await telemetry.close()

    await serve_until_signalled(server, on_stop=on_stop, grace_s=config.grace_period_s)
    await store.close()
    log.info("stopped")


def main() -> None:
    config = GenerationConfig.from_env()
    setup_logging("generation", config.log_level)
    try:
        slots = plan(config)
    except DeviceConfigError as exc:
        # A setting no restart can fix: say what is wrong, once, and stop.
        log.error("cannot start", extra={"error": str(exc)})
        logging.shutdown()
        sys.exit(2)
    try:
        asyncio.run(serve(config, slots))
    except SchemaTooNew as exc:
        log.error("cannot start", extra={"error": str(exc)})
        logging.shutdown()
        sys.exit(2)
    except PoolTimeout as exc:
        # The supervisor (or Kubernetes) starts the service again after a back-off.
        log.error("cannot start: the job database is unreachable", extra={"error": str(exc)})
        logging.shutdown()
        sys.exit(1)
    # Everything is closed. A stage the stall watchdog gave up on may still hold a thread, and
    # the interpreter would wait for it at exit for ever: leave without waiting.
    logging.shutdown()
    os._exit(0)


if __name__ == "__main__":
    main()
