"""Peak memory of one item at one resolution, measured in a fresh process so
that nothing else this suite allocated counts: `python -m bench.memprobe
--resolution 512 --device cpu` prints one JSON line.

On the CPU: the kernel's high-water mark of resident memory (VmHWM) during
the generation, less the resident memory just before it (after a warm-up at
the smallest resolution has loaded every library). On CUDA:
torch.cuda.max_memory_allocated over the generation.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from typing import Any

import psutil
import torch

from bench.common import ROOT, peak_rss_bytes, photo_png, reset_peak_rss
from bench.inprocess import device_of, params_with, run_once
from services.generation.backends.registry import get_backend


def probe(resolution: int, device_name: str) -> dict[str, Any]:
    device = device_of(device_name)
    image = photo_png()
    run_once(image, params_with(resolution=64), device)
    params = params_with(resolution=resolution)
    pid = psutil.Process().pid
    rss_before = psutil.Process().memory_info().rss
    reset = reset_peak_rss(pid)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        allocated_before = torch.cuda.memory_allocated(device)
    seconds, _timings, _mesh = run_once(image, params, device)
    out: dict[str, Any] = {
        "resolution": resolution,
        "device": str(device),
        "seconds": seconds,
        "host_peak_bytes": max(0, peak_rss_bytes(pid) - rss_before),
        "host_peak_exact": reset,
        "modelled_item_bytes": get_backend(params.backend).estimate_item_bytes(resolution, params.steps),
    }
    if device.type == "cuda":
        out["device_peak_bytes"] = torch.cuda.max_memory_allocated(device) - allocated_before
    return out


def measure(resolution: int, device: str, timeout_s: float = 600.0) -> dict[str, Any]:
    """Run the probe in a child process and return its JSON."""
    done = subprocess.run(
        [sys.executable, "-m", "bench.memprobe", "--resolution", str(resolution), "--device", device],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        return {"resolution": resolution, "error": (done.stderr or done.stdout)[-500:]}
    return json.loads(lines[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--resolution", type=int, required=True)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    print(json.dumps(probe(args.resolution, args.device)))


if __name__ == "__main__":
    main()
