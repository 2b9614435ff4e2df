"""How many jobs go into one batch.

The telemetry service's optimizer decides (it learns the per-item memory
cost from measured peaks); when it does not answer within its deadline, the
local rule here decides instead: the free memory budget divided by the
backend's modelled per-item cost, never more than the queue holds nor the
configured maximum.
"""
from __future__ import annotations

import psutil
import torch

from services.generation.backends.registry import get_backend
from services.generation.pipeline.params import GenerationParams
from services.generation.worker import BatchDecision


def free_memory_bytes(device: torch.device, cpu_memory_share: float) -> int:
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    return int(psutil.virtual_memory().available * cpu_memory_share)


class LocalBatchSizer:
    def __init__(
        self,
        device: torch.device,
        max_batch_size: int,
        target_utilization: float,
        cpu_memory_share: float,
        memory_limit_bytes: int = 0,
    ) -> None:
        self.device = device
        self.max_batch_size = max_batch_size
        self.target_utilization = target_utilization
        self.cpu_memory_share = cpu_memory_share
        self.memory_limit_bytes = memory_limit_bytes
        # Sizes that ran out of memory, per batch key: never try them again.
        self._oom_ceiling: dict[tuple[str, int, int], int] = {}

    def available_bytes(self) -> int:
        free = free_memory_bytes(self.device, self.cpu_memory_share)
        if self.memory_limit_bytes:
            free = min(free, self.memory_limit_bytes)
        return free

    async def decide(self, queue_length: int, params: GenerationParams, image_size: tuple[int, int]) -> BatchDecision:
        return self.decide_now(queue_length, params, source="local")

    def decide_now(self, queue_length: int, params: GenerationParams, source: str) -> BatchDecision:
        item = get_backend(params.backend).estimate_item_bytes(params.resolution, params.steps)
        available = self.available_bytes()
        by_memory = int(available * self.target_utilization // max(1, item))
        ceiling = self._oom_ceiling.get(params.batch_key(), self.max_batch_size)
        size = max(1, min(by_memory, self.max_batch_size, ceiling, max(1, queue_length)))
        reasoning = (
            f"available {available / 2**20:.0f} MB, {item / 2**20:.0f} MB per item at "
            f"{params.resolution}², target {self.target_utilization:.0%} → {by_memory}; "
            f"queue {queue_length}, max {min(self.max_batch_size, ceiling)} → {size}"
        )
        return BatchDecision(size=size, reasoning=reasoning, source=source)

    def record_outcome(self, params: GenerationParams, size: int, peak_bytes: int, out_of_memory: bool) -> None:
        if out_of_memory:
            key = params.batch_key()
            self._oom_ceiling[key] = max(1, min(self._oom_ceiling.get(key, size), size // 2 or 1))
