"""The pipeline alone, in this process: the baseline every serving figure is compared with.

Run as a script, it compares the working tree with another commit, in process, job by job:

    .venv/bin/python -m bench.inprocess --reference HEAD --runs 20

Each side is a worker process of its own (the commit's files exported with `git archive` into a
temporary folder, the working tree as it is), and the jobs alternate between them, so whatever
else the machine does touches both sides alike. It prints each stage's median per side and the
ratio of the medians.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from services.generation.pipeline.params import GenerationParams

ROOT = Path(__file__).resolve().parent.parent
STAGES = ("image_loading", "image_preprocessing", "shape_generation", "texture_synthesis", "mesh_export")
# What a worker runs: one job per line read, one JSON line of timings written back.
_WORKER = """
import json, sys
from bench.inprocess import device_of, run_once
from bench.common import photo_png
from services.generation.pipeline.params import GenerationParams
image, params, device = photo_png(), GenerationParams(), device_of(sys.argv[1])
for _ in sys.stdin:
    wall, stages, mesh = run_once(image, params, device)
    print(json.dumps({"total": wall, **stages, "faces": mesh.faces}), flush=True)
"""


def device_of(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def run_once(image: bytes, params: GenerationParams, device: torch.device) -> tuple[float, dict[str, float], Any]:
    """(wall seconds, {stage: seconds}, the exported mesh) of one in-process generation."""
    from services.generation.pipeline.run import run_pipeline

    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    mesh, timings = run_pipeline(image, params, device=device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - started, dict(timings), mesh


def params_with(**changes: Any) -> GenerationParams:
    return replace(GenerationParams(), **changes)


class _Worker:
    """A process running jobs from one source tree, one per request."""

    def __init__(self, tree: Path, device: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-c", _WORKER, device], cwd=tree, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )

    def job(self) -> dict[str, float]:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write("\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"worker exited with {self.process.wait()}")
        return json.loads(line)

    def close(self) -> None:
        if self.process.stdin is not None:
            self.process.stdin.close()
        self.process.wait()


def compare(reference: str, runs: int, warmup: int = 2, device: str = "auto") -> dict[str, dict[str, list[float]]]:
    """{"reference" | "working": {stage or "total" or "faces": [values, one per job]}}, interleaved."""
    from bench.common import exported_commit

    with exported_commit(reference) as folder:
        workers = {"reference": _Worker(folder, device), "working": _Worker(ROOT, device)}
        results: dict[str, dict[str, list[float]]] = {name: {} for name in workers}
        try:
            for index in range(warmup + runs):
                # Alternate which side goes first, so neither always follows the other.
                order = list(workers) if index % 2 == 0 else list(reversed(workers))
                for name in order:
                    timings = workers[name].job()
                    if index >= warmup:
                        for key, value in timings.items():
                            results[name].setdefault(key, []).append(float(value))
        finally:
            for worker in workers.values():
                worker.close()
    return results


def _medians(results: dict[str, dict[str, list[float]]]) -> list[tuple[str, float, float]]:
    """(stage or "total", reference ms, working ms), medians, in pipeline order."""
    return [(key, statistics.median(results["reference"][key]) * 1000, statistics.median(results["working"][key]) * 1000)
            for key in (*STAGES, "total")]


def _faces(results: dict[str, dict[str, list[float]]]) -> tuple[float, float]:
    return statistics.median(results["reference"]["faces"]), statistics.median(results["working"]["faces"])


def _table(results: dict[str, dict[str, list[float]]]) -> str:
    rows = [f"{'stage':<22}{'reference ms':>14}{'working ms':>12}{'ratio':>8}"]
    rows += [f"{key:<22}{before:>14.1f}{after:>12.1f}{after / before:>8.2f}" for key, before, after in _medians(results)]
    faces_before, faces_after = _faces(results)
    rows.append(f"{'faces':<22}{faces_before:>14.0f}{faces_after:>12.0f}")
    return "\n".join(rows)


SECTION_TITLE = "## In process: this code against an earlier commit"


def _section(results: dict[str, dict[str, list[float]]], reference: str, runs: int) -> str:
    from bench.common import comparison_section

    lines = comparison_section(
        SECTION_TITLE, f".venv/bin/python -m bench.inprocess --reference {reference} --runs {runs} --write", reference,
        (f"Default settings, the 512-px astronaut, {runs} jobs a side after 2 warm-ups, the two sides (commit "
         "{commit} and the working tree, each in a process of its own) alternating job by job; medians."),
        "stage", _medians(results),
    )
    faces_before, faces_after = _faces(results)
    lines.append(f"| faces | {faces_before:.0f} | {faces_after:.0f} | |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference", default="HEAD", help="the commit to compare the working tree with")
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--write", action="store_true", help="also write the comparison into bench/RESULTS.md")
    args = parser.parse_args()
    results = compare(args.reference, args.runs, device=args.device)
    print(_table(results))
    if args.write:
        from bench.common import BENCH_DIR, write_section

        write_section(BENCH_DIR / "RESULTS.md", SECTION_TITLE, _section(results, args.reference, args.runs))


if __name__ == "__main__":
    main()
