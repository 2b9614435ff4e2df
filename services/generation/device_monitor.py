"""What the generation service's devices are doing, for telemetry and for
sizing batches.

`torch.cuda.is_available()` picks the path. On CUDA, NVML (the `pynvml`
module of the `nvidia-ml-py` distribution) gives memory, utilisation,
temperature and power, and torch adds its own view of free memory and its
peak allocation. Without a GPU the CPU and system memory are sampled with
psutil, as device type "cpu". NVML is imported lazily; a missing module or
driver only costs the NVML figures, never an error.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import psutil

log = logging.getLogger(__name__)

# The share of available system memory that batches may use on the CPU
# (GenerationConfig.cpu_memory_share).
DEFAULT_CPU_MEMORY_SHARE = 0.5


@dataclass(frozen=True)
class DeviceSample:
    worker_id: str
    device: str  # "cpu", "cuda:0", ...
    device_type: str  # "cpu" | "cuda"
    name: str
    memory_total_bytes: int
    memory_used_bytes: int
    memory_free_bytes: int
    utilization_percent: float | None  # compute, 0-100
    temperature_c: float | None = None
    power_w: float | None = None
    torch_free_bytes: int | None = None
    torch_total_bytes: int | None = None
    torch_max_allocated_bytes: int | None = None
    sampled_at: float = 0.0  # unix seconds


def cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def sample_devices(worker_id: str) -> list[DeviceSample]:
    """One sample per device this process can see. Never raises for a missing GPU or driver."""
    if cuda_available():
        samples = sample_cuda_devices(worker_id)
        if samples:
            return samples
    return [sample_cpu(worker_id)]


def sample_device(worker_id: str, device: str) -> DeviceSample:
    """A sample of one device, "cpu" or "cuda:N"."""
    if device.startswith("cuda"):
        return sample_cuda_device(worker_id, _cuda_index(device))
    return sample_cpu(worker_id)


def free_memory_bytes(device: str = "cpu", cpu_memory_share: float = DEFAULT_CPU_MEMORY_SHARE) -> int:
    """Memory a batch may use on `device` now: CUDA's free memory, or on the
    CPU `cpu_memory_share` of the available system memory."""
    if device.startswith("cuda"):
        import torch

        free, _total = torch.cuda.mem_get_info(_cuda_index(device))
        return int(free)
    if not 0 < cpu_memory_share <= 1:
        raise ValueError(f"cpu_memory_share must be in (0, 1], got {cpu_memory_share}")
    return int(psutil.virtual_memory().available * cpu_memory_share)


# ------------------------------------------------------------------- CPU

_cpu_lock = threading.Lock()
_cpu_primed = False


def _cpu_percent() -> float:
    """System-wide CPU use since the previous call; the very first call measures a short interval."""
    global _cpu_primed
    with _cpu_lock:
        if not _cpu_primed:
            _cpu_primed = True
            # psutil's first non-blocking reading is meaningless (0.0).
            return float(psutil.cpu_percent(interval=0.05))
        return float(psutil.cpu_percent(interval=None))


def sample_cpu(worker_id: str) -> DeviceSample:
    mem = psutil.virtual_memory()
    temperature = None
    try:
        sensors = psutil.sensors_temperatures() if hasattr(psutil, "sensors_temperatures") else {}
        readings = [t.current for entries in sensors.values() for t in entries if t.current]
        temperature = max(readings) if readings else None
    except (OSError, RuntimeError):
        temperature = None
    return DeviceSample(
        worker_id=worker_id,
        device="cpu",
        device_type="cpu",
        name=_cpu_name(),
        memory_total_bytes=int(mem.total),
        memory_used_bytes=int(mem.total - mem.available),
        memory_free_bytes=int(mem.available),
        utilization_percent=_cpu_percent(),
        temperature_c=temperature,
        sampled_at=time.time(),
    )


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()} ({psutil.cpu_count()} threads)"
    except OSError:
        pass
    return f"cpu ({psutil.cpu_count()} threads)"


# ------------------------------------------------------------------ CUDA

_nvml_lock = threading.Lock()
_nvml: ModuleType | None = None
_nvml_failed = False


def _load_nvml() -> ModuleType | None:
    """pynvml, initialised once; None (logged once) when the module or the driver is missing."""
    global _nvml, _nvml_failed
    with _nvml_lock:
        if _nvml is not None or _nvml_failed:
            return _nvml
        try:
            import pynvml

            pynvml.nvmlInit()
        except Exception as exc:  # noqa: BLE001 - ImportError, NVMLError_LibraryNotFound, ...
            _nvml_failed = True
            log.info("NVML unavailable, sampling without it: %s", exc)
            return None
        _nvml = pynvml
        return _nvml


def reset_nvml() -> None:
    """Forget NVML's state, so the next sample loads it again."""
    global _nvml, _nvml_failed
    with _nvml_lock:
        if _nvml is not None:
            try:
                _nvml.nvmlShutdown()
            except Exception:  # noqa: BLE001 - shutting down is best effort
                pass
        _nvml, _nvml_failed = None, False


def _cuda_index(device: str) -> int:
    _, _, index = device.partition(":")
    return int(index) if index else 0


def _call(fn: Any, *args: Any) -> Any:
    """An NVML query, or None when this device does not support it."""
    try:
        return fn(*args)
    except Exception:  # noqa: BLE001 - NVMLError_NotSupported and kin
        return None


def _nvml_handle(nvml: ModuleType, index: int, props: Any) -> Any:
    """The NVML handle of torch's device `index`. CUDA_VISIBLE_DEVICES renumbers
    devices for torch but not for NVML, so match by UUID, then PCI bus id."""
    uuid = getattr(props, "uuid", None)
    if uuid is not None:
        text = str(uuid)
        handle = _call(nvml.nvmlDeviceGetHandleByUUID, text if text.startswith("GPU-") else f"GPU-{text}")
        if handle is not None:
            return handle
    bus = getattr(props, "pci_bus_id", None)
    if bus is not None:
        domain = getattr(props, "pci_domain_id", 0)
        dev = getattr(props, "pci_device_id", 0)
        handle = _call(nvml.nvmlDeviceGetHandleByPciBusId, f"{domain:08X}:{bus:02X}:{dev:02X}.0")
        if handle is not None:
            return handle
    return _call(nvml.nvmlDeviceGetHandleByIndex, index)


def nvml_reading(nvml: ModuleType, handle: Any) -> dict[str, Any]:
    """What NVML says about one device; a figure it cannot give is None."""
    reading: dict[str, Any] = {}
    name = _call(nvml.nvmlDeviceGetName, handle)
    reading["name"] = name.decode() if isinstance(name, bytes) else (name or "")
    mem = _call(nvml.nvmlDeviceGetMemoryInfo, handle)
    if mem is not None:
        reading |= {"total": int(mem.total), "used": int(mem.used), "free": int(mem.free)}
    util = _call(nvml.nvmlDeviceGetUtilizationRates, handle)
    reading["utilization"] = float(util.gpu) if util is not None else None
    temp = _call(nvml.nvmlDeviceGetTemperature, handle, nvml.NVML_TEMPERATURE_GPU)
    reading["temperature"] = float(temp) if temp is not None else None
    power_mw = _call(nvml.nvmlDeviceGetPowerUsage, handle)
    reading["power"] = power_mw / 1000.0 if power_mw is not None else None
    return reading


def sample_cuda_devices(worker_id: str) -> list[DeviceSample]:
    """One sample per CUDA device torch sees, NVML figures where available."""
    import torch

    return [sample_cuda_device(worker_id, index) for index in range(torch.cuda.device_count())]


def sample_cuda_device(worker_id: str, index: int) -> DeviceSample:
    """torch's device `index`, NVML figures where available."""
    import torch

    nvml = _load_nvml()
    props = torch.cuda.get_device_properties(index)
    torch_free, torch_total = (int(v) for v in torch.cuda.mem_get_info(index))
    reading: dict[str, Any] = {}
    if nvml is not None:
        handle = _nvml_handle(nvml, index, props)
        if handle is not None:
            reading = nvml_reading(nvml, handle)
    total = reading.get("total", torch_total)
    free = reading.get("free", torch_free)
    return DeviceSample(
        worker_id=worker_id,
        device=f"cuda:{index}",
        device_type="cuda",
        name=reading.get("name") or str(props.name),
        memory_total_bytes=total,
        memory_used_bytes=reading.get("used", total - free),
        memory_free_bytes=free,
        utilization_percent=reading.get("utilization"),
        temperature_c=reading.get("temperature"),
        power_w=reading.get("power"),
        torch_free_bytes=torch_free,
        torch_total_bytes=torch_total,
        torch_max_allocated_bytes=int(torch.cuda.max_memory_allocated(index)),
        sampled_at=time.time(),
    )


def sample_nvml_devices(worker_id: str) -> list[DeviceSample]:
    """Every GPU NVML sees, without torch: for a process that does not compute
    on them (an operator's probe). Empty when NVML is unavailable."""
    nvml = _load_nvml()
    if nvml is None:
        return []
    count = _call(nvml.nvmlDeviceGetCount) or 0
    samples = []
    for index in range(count):
        handle = _call(nvml.nvmlDeviceGetHandleByIndex, index)
        if handle is None:
            continue
        reading = nvml_reading(nvml, handle)
        if "total" not in reading:
            continue
        samples.append(
            DeviceSample(
                worker_id=worker_id,
                device=f"cuda:{index}",
                device_type="cuda",
                name=reading["name"],
                memory_total_bytes=reading["total"],
                memory_used_bytes=reading["used"],
                memory_free_bytes=reading["free"],
                utilization_percent=reading["utilization"],
                temperature_c=reading["temperature"],
                power_w=reading["power"],
                sampled_at=time.time(),
            )
        )
    return samples


# --------------------------------------------------------------- sampler


class DeviceSampler:
    """Samples every `interval_s` seconds and hands each sample to `report`
    (TelemetryClient.report_device_sample). Sampling runs in a thread, so a
    slow driver never stalls the event loop; a failed sample is logged and
    the next one tried.

    `workers`: the (worker_id, device) of each worker of the process. Each
    device is sampled once per round (two readings of the CPU in a row would
    split its utilisation between them) and reported once per worker on it,
    so every worker shows its device. Without workers: every device the
    process sees, under `worker_id`.
    """

    def __init__(
        self,
        worker_id: str,
        report: Callable[[DeviceSample], None],
        interval_s: float = 5.0,
        workers: Sequence[tuple[str, str]] = (),
    ) -> None:
        if interval_s <= 0:
            raise ValueError(f"interval_s must be positive, got {interval_s}")
        self.worker_id = worker_id
        self.workers = list(workers)
        self.interval_s = interval_s
        self._report = report
        self._task: asyncio.Task[None] | None = None
        self.latest: list[DeviceSample] = []

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"device-sampler-{self.worker_id}")

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def sample_once(self) -> list[DeviceSample]:
        samples = await asyncio.to_thread(self._sample)
        self.latest = samples
        for sample in samples:
            self._report(sample)
        return samples

    def _sample(self) -> list[DeviceSample]:
        if not self.workers:
            return sample_devices(self.worker_id)
        readings: dict[str, DeviceSample] = {}
        for _worker, device in self.workers:
            if device not in readings:
                readings[device] = sample_device(self.worker_id, device)
        return [dataclasses.replace(readings[device], worker_id=worker) for worker, device in self.workers]

    async def _run(self) -> None:
        while True:
            try:
                await self.sample_once()
            except Exception:  # noqa: BLE001 - a sampler must outlive a bad reading
                log.warning("device sampling failed", exc_info=True)
            await asyncio.sleep(self.interval_s)
