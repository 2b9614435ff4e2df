"""What the benchmark scripts share: the machine, a stack of their own on
free loopback ports, one generation through the gateway, statistics, RSS.
"""
from __future__ import annotations

import asyncio
import datetime as dt
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil

from services.stack import Stack, free_port

ROOT = Path(__file__).resolve().parent.parent
BENCH_DIR = ROOT / "bench"
# Ignored by git (.gitignore: bench/out/): logs are evidence for a run, not source.
LOG_DIR = BENCH_DIR / "out" / "logs"

# The photo of every latency figure: issue 2 asks for a 512-pixel photo.
PHOTO = ("astronaut", 512)
# Settings small enough for a thousand jobs in a few minutes on two cores.
SMALL = {"resolution": 64, "face_count": 1000, "texture_size": 256}
from services.common.logging_setup import read_log as log_records  # noqa: F401 - re-exported
from services.generation.pipeline.records import STAGES  # noqa: F401 - re-exported for the bench modules


def photo_png(name: str = PHOTO[0], side: int = PHOTO[1]) -> bytes:
    from tests.images import photo_png as make

    return make(name, side)


# ----------------------------------------------------------------- machine
def machine() -> dict[str, Any]:
    import torch

    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    info: dict[str, Any] = {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "kernel": platform.release(),
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cuda": torch.cuda.is_available(),
        # Anything else running skews every figure; the report says so.
        "load_average": [round(v, 2) for v in os.getloadavg()],
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = f"{props.name} ({props.total_memory / 2**30:.0f} GiB)"
    return info


# -------------------------------------------------------------- statistics
def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile, q in [0, 100]; NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = (len(ordered) - 1) * q / 100.0
    low = int(k)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (k - low)


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def summary(values: list[float]) -> dict[str, float]:
    return {
        "n": len(values),
        "median": median(values),
        "p50": percentile(values, 50),
        "p95": percentile(values, 95),
        "p99": percentile(values, 99),
        "min": min(values) if values else float("nan"),
        "max": max(values) if values else float("nan"),
    }


# --------------------------------------------------------------------- stack
@contextmanager
def own_stack(name: str, **extra_env: str) -> Iterator[Stack]:
    """A whole stack on free loopback ports with a throw-away data dir; logs under bench/out/logs/<name>/."""
    log_dir = LOG_DIR / name
    if log_dir.exists():
        for old in log_dir.glob("*.log"):
            old.unlink()
    with tempfile.TemporaryDirectory(prefix=f"orfeas-bench-{name}-") as tmp:
        stack = Stack(
            gateway_port=free_port(),
            generation_port=free_port(),
            telemetry_port=free_port(),
            generation_metrics_port=free_port(),
            telemetry_metrics_port=free_port(),
            data_dir=Path(tmp) / "data",
            extra_env={"GENERATION_DEVICE_SAMPLE_INTERVAL_S": "1", **extra_env},
            log_dir=log_dir,
        )
        stack.start_all()
        try:
            yield stack
        finally:
            stack.stop_all()


def process_tree(pid: int) -> list[psutil.Process]:
    """A service's process and its children (the generation service's export workers)."""
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.Error:
        return []


def rss_bytes(stack: Stack) -> dict[str, int]:
    """Resident memory of each service now, its worker processes included."""
    out = {}
    for name, proc in stack.processes.items():
        total = 0
        for p in process_tree(proc.pid):
            try:
                total += p.memory_info().rss
            except psutil.Error:
                pass
        out[name] = total
    return out


def peak_rss_bytes(pid: int) -> int:
    """The kernel's high-water mark of resident memory (VmHWM) of a process."""
    try:
        with open(f"/proc/{pid}/status", encoding="utf-8") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def reset_peak_rss(pid: int) -> bool:
    """Reset VmHWM to the current RSS (Linux ≥ 4.0: write 5 to clear_refs); False when not allowed."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w", encoding="utf-8") as f:
            f.write("5")
        return True
    except OSError:
        return False


# ----------------------------------------------------- one job through the gateway
@dataclass
class JobRun:
    job_id: str = ""
    status: str = ""
    http_status: int = 0
    submit_s: float = 0.0  # POST answered (202)
    terminal_s: float = 0.0  # terminal SSE event received
    total_s: float = 0.0  # result downloaded
    result_bytes: int = 0
    stage_timings: dict[str, float] = field(default_factory=dict)
    error: str = ""
    retry_after: str | None = None


async def follow_events(client: httpx.AsyncClient, job_id: str, timeout_s: float) -> tuple[str, str]:
    """Read the job's SSE stream to its terminal event: (terminal event name, error text)."""
    name = ""
    async with client.stream("GET", f"/api/v1/generations/{job_id}/events", timeout=timeout_s) as response:
        if response.status_code != 200:
            return "", f"events HTTP {response.status_code}"
        async for line in response.aiter_lines():
            if line.startswith("event:"):
                name = line[6:].strip()
                if name in ("succeeded", "failed", "cancelled"):
                    return name, ""
                if name == "error":
                    return name, "stream error"
    return name, "stream ended before a terminal event"


async def generate_via_gateway(
    client: httpx.AsyncClient,
    image: bytes,
    params: dict[str, Any],
    fmt: str = "glb",
    timeout_s: float = 300.0,
    download: bool = True,
) -> JobRun:
    """POST multipart, follow the SSE to the end, download the result: the whole user path.

    A transport failure is recorded in `error`, never raised: one broken job
    must not lose the figures of the others.
    """
    run = JobRun()
    started = time.perf_counter()
    try:
        await _whole_path(client, run, started, image, params, fmt, timeout_s, download)
    except httpx.TimeoutException:
        run.error = "timeout"
    except httpx.HTTPError as exc:
        run.error = f"{type(exc).__name__}: {exc}"[:200]
    run.total_s = time.perf_counter() - started
    return run


async def _whole_path(
    client: httpx.AsyncClient,
    run: JobRun,
    started: float,
    image: bytes,
    params: dict[str, Any],
    fmt: str,
    timeout_s: float,
    download: bool,
) -> None:
    response = await client.post(
        "/api/v1/generations",
        files={"image": ("photo.png", image, "image/png")},
        data={k: str(v) for k, v in {**params, "format": fmt}.items()},
        timeout=timeout_s,
    )
    run.http_status = response.status_code
    run.submit_s = time.perf_counter() - started
    if response.status_code != 202:
        run.retry_after = response.headers.get("retry-after")
        run.error = _error_code(response)
        return
    run.job_id = response.json()["id"]
    run.status, run.error = await follow_events(client, run.job_id, timeout_s)
    run.terminal_s = time.perf_counter() - started
    if run.status == "succeeded" and download:
        result = await client.get(f"/api/v1/generations/{run.job_id}/result", params={"format": fmt}, timeout=timeout_s)
        if result.status_code == 200:
            run.result_bytes = len(result.content)
        else:
            run.error = f"download HTTP {result.status_code}"


async def job_record(client: httpx.AsyncClient, job_id: str) -> dict[str, Any]:
    response = await client.get(f"/api/v1/generations/{job_id}", timeout=30)
    return response.json() if response.status_code == 200 else {}


def _error_code(response: httpx.Response) -> str:
    try:
        return str(response.json()["error"]["code"])
    except (ValueError, KeyError, TypeError):
        return f"HTTP {response.status_code}"


# ------------------------------------------------------------------- scraping
def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(url, timeout=10).text
    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def metric_sum(scraped: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return sum(v for (n, l), v in scraped.items() if n == name and set(labels.items()) <= set(l))


def run_async(coro: Any) -> Any:
    return asyncio.run(coro)


def fmt_s(seconds: float) -> str:
    if math.isnan(seconds):
        return "n/a"
    return f"{seconds * 1000:.1f} ms" if seconds < 1 else f"{seconds:.3f} s"


def fmt_bytes(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


def machine_line() -> str:
    """One line about the machine, for a benchmark section run on its own."""
    m = machine()
    return (f"{m['nproc']} CPUs ({m['cpu']}), {m['ram_gib']} GiB RAM, Python {m['python']}; "
            f"{m['date']}; load average at the start {m['load_average'][0]}")


def write_section(markdown_path: Path, title: str, section: str) -> None:
    """Replace one benchmark's section of RESULTS.md (or append it), leaving every other section alone."""
    text = markdown_path.read_text() if markdown_path.exists() else ""
    pattern = re.compile(re.escape(title) + r"\n.*?(?=^## |\Z)", re.DOTALL | re.MULTILINE)
    if pattern.search(text):
        text = pattern.sub(lambda _: section + "\n", text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + section
    markdown_path.write_text(text)


# ----------------------------------------------------- this code against an earlier commit
@contextmanager
def exported_commit(reference: str) -> Iterator[Path]:
    """The commit's files in a temporary folder, with its own pb/ built from its own protos (generated code is
    not in git); it runs with this virtual environment."""
    with tempfile.TemporaryDirectory(prefix="bench-reference-") as folder:
        archive = subprocess.run(["git", "archive", reference], check=False, cwd=ROOT, capture_output=True)
        if archive.returncode != 0:
            raise SystemExit(f"--reference {reference}: not a commit git can export "
                             f"({archive.stderr.decode(errors='replace').strip()})")
        subprocess.run(["tar", "-x", "-C", folder], input=archive.stdout, check=True)
        built = subprocess.run(["bash", "scripts/build_protos.sh"], check=False, cwd=folder, capture_output=True,
                               text=True, env={**os.environ, "PYTHON": sys.executable})
        if built.returncode != 0:
            raise SystemExit(f"--reference {reference}: its protos do not build: {built.stderr.strip()[-500:]}")
        yield Path(folder)


def comparison_section(
    title: str, command: str, reference: str, description: str, column: str, rows: list[tuple[str, float, float]]
) -> list[str]:
    """A RESULTS.md section comparing the working tree with `reference`: rows of (name, before ms, now ms).
    `description` may name the commit as {commit}."""
    commit = subprocess.run(["git", "rev-parse", "--short", reference], cwd=ROOT, check=True, capture_output=True,
                            text=True).stdout.strip()
    lines = [
        title, "", f"Command: `{command}`", "", f"Machine: {machine_line()}", "", description.format(commit=commit), "",
        f"| {column} | before | now | ratio |", "|---|---|---|---|",
    ]
    lines += [f"| {name} | {before:.1f} ms | {after:.1f} ms | {after / before:.2f}× |" for name, before, after in rows]
    return lines
