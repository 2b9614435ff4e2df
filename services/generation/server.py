"""Entry point: `python -m services.generation.server`.

Owns the device: picks CUDA when torch sees it, the CPU otherwise.
"""
from __future__ import annotations

import asyncio
import logging
import os
import socket

import torch

from pb.orfeas.generation.v1 import generation_pb2
from pb.orfeas.generation.v1 import generation_pb2_grpc as pb_grpc
from services.common import metrics
from services.common.config import GenerationConfig, HunyuanConfig, SecurityConfig
from services.common.grpc_security import bind, server_interceptors
from services.common.grpc_server import create_server, serve_until_signalled, set_serving
from services.common.logging_setup import setup_logging
from services.generation.admission import Admission
from services.generation.artifacts import ArtifactStore
from services.generation.backends.registry import BackendSet, load_plugins
from services.generation.batch_sizing import OptimizerBatchSizer
from services.generation.device_monitor import DeviceSampler
from services.generation.export_pool import ExportPool
from services.generation.profile_reporting import TelemetryProfileSink
from services.generation.telemetry_client import TelemetryClient
from services.generation.job_store import JobStore
from services.generation.jobs import JobManager
from services.generation.retention import RetentionSweeper
from services.generation.servicer import GenerationServicer
from services.generation.storage import StorageMonitor
from services.generation.worker import BatchWorker, MemoryBudget

log = logging.getLogger("services.generation")

SERVICE_NAME = generation_pb2.DESCRIPTOR.services_by_name["GenerationService"].full_name


def select_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


async def serve(config: GenerationConfig) -> None:
    device = select_device()
    config.data_dir.mkdir(parents=True, exist_ok=True)
    store = JobStore(config.data_dir / "generation.db", lock_wait_s=config.store_lock_wait_s)
    await store.open()
    artifacts = ArtifactStore(config.data_dir / "artifacts")
    storage = StorageMonitor(config.data_dir, int(config.min_free_mb * 2**20))
    manager = JobManager(store, artifacts, config.queue_limit, config.max_attempts, storage)
    recovered = await manager.recover()
    memory_limit = config.memory_limit_mb * 2**20
    worker_id = f"{socket.gethostname()}:{config.port}:{device}"
    telemetry = TelemetryClient(
        config.telemetry_address,
        buffer_size=config.telemetry_buffer_size,
        target_utilization=config.target_utilization,
    )
    await telemetry.start()
    sampler = DeviceSampler(worker_id, telemetry.report_device_sample, config.device_sample_interval_s)
    await sampler.start()
    sizer = OptimizerBatchSizer(telemetry, device, worker_id, config.max_batch_size, config.cpu_memory_share)
    # The shape backends of this device, loaded once: inflate at once, hunyuan3d's weights on a thread
    # (requests for it are refused with the reason until they are in; inflate serves meanwhile).
    plugins = load_plugins(config.backend_plugins)
    backends = BackendSet.start_loading(device, HunyuanConfig.from_env())
    worker = BatchWorker(
        manager,
        artifacts,
        sizer,
        device,
        config.max_queue_delay_ms,
        config.max_batch_size,
        MemoryBudget(memory_limit),
        ExportPool(config.export_processes, artifacts.root, config.export_inline_max_faces),
        profiles=TelemetryProfileSink(telemetry, worker_id, backends.precision),
        backends=backends,
        stall_s=config.stall_s,
    )
    admission = Admission()

    security = SecurityConfig.from_env()
    server, health = create_server(
        [SERVICE_NAME], [metrics.MetricsInterceptor("generation"), *server_interceptors(security)]
    )
    pb_grpc.add_GenerationServiceServicer_to_server(GenerationServicer(manager, admission, backends), server)
    address = f"{config.host}:{config.port}"
    bind(server, address, security)
    await server.start()
    manager.start()
    worker.start()
    if config.metrics_port:
        metrics.start_metrics_server(config.host, config.metrics_port)
    metrics.track_queue_length(lambda: manager.queue_length)
    metrics.track_devices(lambda: sampler.latest)
    metrics.track_telemetry_dropped(lambda: telemetry.reports_dropped)
    sweeper = RetentionSweeper(store, artifacts, config.retention_s, int(config.artifact_budget_mb * 2**20))
    sweeping = asyncio.create_task(sweeper.run_forever(config.retention_interval_s))
    await set_serving(health, [SERVICE_NAME], True)
    log.info(
        "serving", extra={"address": address, "device": str(device), "recovered": recovered, "plugins": plugins}
    )

    async def on_stop() -> None:
        sweeping.cancel()
        await asyncio.gather(sweeping, return_exceptions=True)
        await set_serving(health, [SERVICE_NAME], False)
        # Calls are still served while the worker drains, so clients can follow and fetch to the end.
        await worker.stop(config.grace_period_s)
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
    asyncio.run(serve(config))
    # Everything is closed. A stage the stall watchdog gave up on may still hold a thread, and
    # the interpreter would wait for it at exit for ever: leave without waiting.
    logging.shutdown()
    os._exit(0)


if __name__ == "__main__":
    main()
