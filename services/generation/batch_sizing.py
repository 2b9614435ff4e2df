"""How many jobs go into one batch, and what the optimizer is told afterwards.

The telemetry service's optimizer decides: it learns the per-item memory
cost from the peaks reported here. When it does not answer within its short
deadline, the TelemetryClient's local conservative rule decides instead. On
top of either, a size that ran out of memory here is never tried again for
the same batch key, even before the optimizer has heard of it.

One sizer per worker: its out-of-memory ceiling is its own, so a split on one
device never lowers another's. Workers that share a device ("cpu,cpu") split
its memory between them.
"""
from __future__ import annotations

from collections.abc import Callable

import psutil
import torch

from services.generation.devices import device_name
from services.generation.pipeline.params import GenerationParams
from services.generation.telemetry_client import BatchOutcome, TelemetryClient
from services.generation.worker import BatchDecision


def memory_snapshot(device: torch.device, cpu_memory_share: float, sharing: int = 1) -> tuple[int, int, int]:
    """(free, total, used) bytes of the memory a batch of one worker may use on this device.

    On the CPU the budget is a configurable share of system memory. `sharing`
    workers on the same device each get an equal part of it.
    """
    parts = max(1, sharing)
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return int(free) // parts, int(total) // parts, int(total - free) // parts
    vm = psutil.virtual_memory()
    total = int(vm.total * cpu_memory_share) // parts
    free = int(vm.available * cpu_memory_share) // parts
    return free, total, max(0, total - free)


class OptimizerBatchSizer:
    def __init__(
        self,
        telemetry: TelemetryClient,
        device: torch.device,
        worker_id: str,
        max_batch_size: int,
        cpu_memory_share: float,
        sharing: int = 1,
        capacity_bytes: int = 0,
        telemetry_name: Callable[[str], str] | None = None,
    ) -> None:
        self.telemetry = telemetry
        self.device = device
        self.device_name = device_name(device)
        self.worker_id = worker_id
        self.max_batch_size = max_batch_size
        self.cpu_memory_share = cpu_memory_share
        # Workers on this device, this one included.
        self.sharing = sharing
        # An injected capacity (GENERATION_MEMORY_LIMIT_MB): what a batch really had, whatever the
        # device reports free, when the optimizer learns from an out-of-memory error. 0: none.
        self.capacity_bytes = capacity_bytes
        # backend -> the name the optimizer learns its costs under (BackendSet.telemetry_name: hunyuan3d's
        # variant and decoder, "hunyuan3d.turbo.flashvdm"); the backend's own name when not told.
        self.telemetry_name = telemetry_name or (lambda backend: backend)
        self._oom_ceiling: dict[tuple[str, int, int], int] = {}
        self._last: dict[tuple[str, int, int], tuple[int, int]] = {}  # key -> (decision id, free bytes)

    async def decide(self, queue_length: int, params: GenerationParams, image_size: tuple[int, int]) -> BatchDecision:
        key = params.batch_key()
        free, total, used = memory_snapshot(self.device, self.cpu_memory_share, self.sharing)
        ceiling = min(self.max_batch_size, self._oom_ceiling.get(key, self.max_batch_size))
        decision = await self.telemetry.recommend_batch_size(
            backend=self.telemetry_name(params.backend),
            resolution=params.resolution,
            steps=params.steps,
            queue_length=queue_length,
            free_memory_bytes=free,
            total_memory_bytes=total,
            used_memory_bytes=used,
            image_width=image_size[0],
            image_height=image_size[1],
            max_batch_size=ceiling,
            worker_id=self.worker_id,
            device=self.device_name,
        )
        self._last[key] = (decision.decision_id, min(free, self.capacity_bytes) if self.capacity_bytes else free)
        # A batch that ran out of memory while the optimizer was being asked lowered the ceiling since.
        ceiling = min(ceiling, self._oom_ceiling.get(key, self.max_batch_size))
        size = max(1, min(decision.size, ceiling, max(1, queue_length)))
        reasoning = decision.reasoning
        if size != decision.size:
            reasoning += f"; capped here at {size} (queue {queue_length}, out-of-memory ceiling {ceiling})"
        return BatchDecision(size=size, reasoning=reasoning, source=decision.source, ceiling=ceiling)

    def record_outcome(self, params: GenerationParams, size: int, peak_bytes: int, out_of_memory: bool) -> None:
        key = params.batch_key()
        if out_of_memory:
            self._oom_ceiling[key] = max(1, min(self._oom_ceiling.get(key, size), size // 2 or 1))
        decision_id, free = self._last.get(key, (0, 0))
        self.telemetry.report_batch_outcome(
            BatchOutcome(
                backend=self.telemetry_name(params.backend),
                resolution=params.resolution,
                steps=params.steps,
                batch_size=size,
                peak_memory_bytes=peak_bytes,
                out_of_memory=out_of_memory,
                available_bytes=free,
                decision_id=decision_id,
                worker_id=self.worker_id,
                device=self.device_name,
            )
        )
