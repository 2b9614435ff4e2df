"""Device sampling: the real CPU path on this GPU-less machine, and the NVML
path against a stand-in pynvml module (the one thing mocked, as no GPU exists
here)."""
from __future__ import annotations

import sys
import types
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import psutil
import pytest

from services.generation import device_monitor
from services.generation.device_monitor import (
    DeviceSample,
    DeviceSampler,
    free_memory_bytes,
    sample_devices,
)

MIB = 1024 * 1024
HAS_NVIDIA_DRIVER = Path("/proc/driver/nvidia").exists()


@pytest.mark.skipif(device_monitor.cuda_available(), reason="this machine computes on CUDA")
def test_this_machine_samples_as_cpu_without_error() -> None:
    assert not device_monitor.cuda_available()
    samples = sample_devices("w-cpu")
    assert len(samples) == 1
    s = samples[0]
    assert (s.worker_id, s.device, s.device_type) == ("w-cpu", "cpu", "cpu")
    assert s.memory_total_bytes == psutil.virtual_memory().total
    assert 0 < s.memory_free_bytes <= s.memory_total_bytes
    assert s.memory_used_bytes + s.memory_free_bytes == s.memory_total_bytes
    assert s.utilization_percent is not None and 0.0 <= s.utilization_percent <= 100.0
    assert s.torch_max_allocated_bytes is None and s.power_w is None
    assert s.sampled_at > 0 and s.name


def test_cpu_free_memory_is_a_share_of_available() -> None:
    available = psutil.virtual_memory().available
    half = free_memory_bytes("cpu")
    assert 0 < half <= available
    # Available memory moves between the two readings; the share must hold within that.
    assert abs(half - available * device_monitor.DEFAULT_CPU_MEMORY_SHARE) < 0.05 * available
    assert free_memory_bytes("cpu", cpu_memory_share=1.0) > half
    with pytest.raises(ValueError):
        free_memory_bytes("cpu", cpu_memory_share=0.0)


async def test_sampler_hands_samples_to_its_reporter() -> None:
    got: list[DeviceSample] = []
    sampler = DeviceSampler("w-s", got.append, interval_s=60.0)
    samples = await sampler.sample_once()
    assert got == samples and sampler.latest == samples
    assert got[0].device_type == "cpu"
    await sampler.start()
    await sampler.close()


# ------------------------------------------------------------ NVML path


class FakeNVMLError(Exception):
    pass


def fake_pynvml(devices: list[dict[str, Any]], init_error: Exception | None = None) -> types.ModuleType:
    """A pynvml with the calls device_monitor makes, over `devices`."""
    m = types.ModuleType("pynvml")
    m.NVML_TEMPERATURE_GPU = 0
    m.NVMLError = FakeNVMLError
    state = {"init": 0}

    def nvmlInit() -> None:
        if init_error is not None:
            raise init_error
        state["init"] += 1

    def temperature(handle: dict[str, Any], sensor: int) -> int:
        assert sensor == m.NVML_TEMPERATURE_GPU
        if "temp" not in handle:
            raise FakeNVMLError("Not Supported")
        return handle["temp"]

    def by_uuid(uuid: str) -> dict[str, Any]:
        for d in devices:
            if d["uuid"] == uuid:
                return d
        raise FakeNVMLError("Not Found")

    m.nvmlInit = nvmlInit
    m.nvmlShutdown = lambda: None
    m.nvmlDeviceGetCount = lambda: len(devices)
    m.nvmlDeviceGetHandleByIndex = lambda i: devices[i]
    m.nvmlDeviceGetHandleByUUID = by_uuid
    m.nvmlDeviceGetName = lambda h: h["name"]
    m.nvmlDeviceGetMemoryInfo = lambda h: SimpleNamespace(total=h["total"], used=h["used"], free=h["total"] - h["used"])
    m.nvmlDeviceGetUtilizationRates = lambda h: SimpleNamespace(gpu=h["util"], memory=0)
    m.nvmlDeviceGetTemperature = temperature
    m.nvmlDeviceGetPowerUsage = lambda h: h["power_mw"]
    m.state = state
    return m


GPUS = [
    {"uuid": "GPU-aaaa", "name": b"NVIDIA H200", "total": 141 * 1024 * MIB, "used": 20 * 1024 * MIB, "util": 37,
     "temp": 51, "power_mw": 312_500},
    {"uuid": "GPU-bbbb", "name": "NVIDIA L4", "total": 24 * 1024 * MIB, "used": 1024 * MIB, "util": 0,
     "power_mw": 16_000},
]


@pytest.fixture
def nvml(monkeypatch: pytest.MonkeyPatch) -> Iterator[types.ModuleType]:
    module = fake_pynvml(GPUS)
    monkeypatch.setitem(sys.modules, "pynvml", module)
    device_monitor.reset_nvml()
    yield module
    device_monitor.reset_nvml()


def test_nvml_figures_become_samples(nvml: types.ModuleType) -> None:
    samples = device_monitor.sample_nvml_devices("w-gpu")
    assert [s.device for s in samples] == ["cuda:0", "cuda:1"]
    h200, l4 = samples
    assert (h200.device_type, h200.name) == ("cuda", "NVIDIA H200")  # bytes decoded
    assert (h200.memory_total_bytes, h200.memory_used_bytes, h200.memory_free_bytes) == (
        141 * 1024 * MIB, 20 * 1024 * MIB, 121 * 1024 * MIB,
    )
    assert (h200.utilization_percent, h200.temperature_c, h200.power_w) == (37.0, 51.0, 312.5)
    # A figure the device does not support is left out, not an error.
    assert l4.temperature_c is None and l4.power_w == 16.0
    # NVML is initialised once, however often it is sampled.
    device_monitor.sample_nvml_devices("w-gpu")
    assert nvml.state["init"] == 1


def test_torch_device_maps_to_nvml_by_uuid(nvml: types.ModuleType) -> None:
    # CUDA_VISIBLE_DEVICES=1: torch's device 0 is NVML's device 1.
    props = SimpleNamespace(uuid="bbbb", name="NVIDIA L4")
    handle = device_monitor._nvml_handle(nvml, 0, props)
    assert handle is GPUS[1]
    # No UUID to go by: the index.
    assert device_monitor._nvml_handle(nvml, 0, SimpleNamespace(name="x")) is GPUS[0]


@pytest.mark.parametrize("broken", ["missing", "no-driver"])
def test_nvml_missing_or_failing_is_quiet(monkeypatch: pytest.MonkeyPatch, broken: str) -> None:
    if broken == "missing":
        monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml raises ImportError
    else:
        monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml(GPUS, init_error=FakeNVMLError("Driver Not Loaded")))
    device_monitor.reset_nvml()
    try:
        assert device_monitor.sample_nvml_devices("w") == []
        if not device_monitor.cuda_available():
            # And the device samples still come, from the CPU.
            assert [s.device_type for s in sample_devices("w")] == ["cpu"]
    finally:
        device_monitor.reset_nvml()


@pytest.mark.skipif(HAS_NVIDIA_DRIVER, reason="an NVIDIA driver is loaded here")
def test_real_nvml_without_a_driver_is_quiet() -> None:
    """The installed nvidia-ml-py on this machine, which has no NVIDIA driver."""
    device_monitor.reset_nvml()
    try:
        assert device_monitor.sample_nvml_devices("w") == []
    finally:
        device_monitor.reset_nvml()
