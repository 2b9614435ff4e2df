"""Entry point: `python -m services.generation.server`.

Owns the device: picks CUDA when torch sees it, the CPU otherwise.
"""
from __future__ import annotations

import asyncio
import logging

import torch

from pb.orfeas.generation.v1 import generation_pb2
from pb.orfeas.generation.v1 import generation_pb2_grpc as pb_grpc
from services.common.config import GenerationConfig
from services.common.grpc_server import create_server, serve_until_signalled, set_serving
from services.common.logging_setup import setup_logging
from services.generation.admission import Admission
from services.generation.artifacts import ArtifactStore
from services.generation.batch_sizing import LocalBatchSizer
from services.generation.job_store import JobStore
from services.generation.jobs import JobManager
from services.generation.servicer import GenerationServicer
from services.generation.worker import BatchWorker, MemoryBudget

log = logging.getLogger("services.generation")

SERVICE_NAME = generation_pb2.DESCRIPTOR.services_by_name["GenerationService"].full_name


def select_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


async def serve(config: GenerationConfig) -> None:
    device = select_device()
    config.data_dir.mkdir(parents=True, exist_ok=True)
    store = JobStore(config.data_dir / "generation.db")
    artifacts = ArtifactStore(config.data_dir / "artifacts")
    manager = JobManager(store, artifacts, config.queue_limit, config.max_attempts)
    recovered = manager.recover()
    memory_limit = config.memory_limit_mb * 2**20
    sizer = LocalBatchSizer(
        device, config.max_batch_size, config.target_utilization, config.cpu_memory_share, memory_limit
    )
    worker = BatchWorker(
        manager,
        artifacts,
        sizer,
        device,
        config.max_queue_delay_ms,
        MemoryBudget(memory_limit),
    )
    admission = Admission()

    server, health = create_server([SERVICE_NAME])
    pb_grpc.add_GenerationServiceServicer_to_server(GenerationServicer(manager, admission), server)
    address = f"{config.host}:{config.port}"
    server.add_insecure_port(address)
    await server.start()
    worker.start()
    await set_serving(health, [SERVICE_NAME], True)
    log.info("serving", extra={"address": address, "device": str(device), "recovered": recovered})

    async def on_stop() -> None:
        await set_serving(health, [SERVICE_NAME], False)
        await worker.stop(config.grace_period_s)
        admission.close()

    await serve_until_signalled(server, on_stop=on_stop, grace_s=config.grace_period_s)
    store.close()
    log.info("stopped")


def main() -> None:
    config = GenerationConfig.from_env()
    setup_logging("generation", config.log_level)
    asyncio.run(serve(config))


if __name__ == "__main__":
    main()
