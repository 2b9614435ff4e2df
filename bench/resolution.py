"""Each stage's cost against the reconstruction grid (128², 256², 512²,
1024²), in process, and how it grows: the exponent k of cost ∝ pixels^k
fitted over the sweep (1 is linear in the work, 0 is flat). Peak memory per
item comes from bench/memprobe.py, one fresh process per resolution.
"""
from __future__ import annotations

import math
from typing import Any

from bench.common import STAGES, median, photo_png
from bench.inprocess import device_of, params_with, run_once
from bench.memprobe import measure

RESOLUTIONS: tuple[int, ...] = (128, 256, 512, 1024)


def growth_exponent(resolutions: list[int], costs: list[float]) -> float:
    """Least-squares slope of log(cost) against log(resolution²)."""
    points = [(math.log(r * r), math.log(c)) for r, c in zip(resolutions, costs) if c > 0]
    if len(points) < 2:
        return float("nan")
    mx = sum(x for x, _ in points) / len(points)
    my = sum(y for _, y in points) / len(points)
    var = sum((x - mx) ** 2 for x, _ in points)
    return sum((x - mx) * (y - my) for x, y in points) / var if var else float("nan")


def run(runs: int = 3, device: str = "auto", resolutions: tuple[int, ...] = RESOLUTIONS, memory: bool = True) -> dict[str, Any]:
    dev = device_of(device)
    image = photo_png()
    run_once(image, params_with(resolution=resolutions[0]), dev)  # warm-up
    rows = []
    for resolution in resolutions:
        params = params_with(resolution=resolution)
        totals: list[float] = []
        stages: dict[str, list[float]] = {s: [] for s in STAGES}
        for _ in range(runs):
            seconds, timings, mesh = run_once(image, params, dev)
            totals.append(seconds)
            for stage in STAGES:
                stages[stage].append(float(timings.get(stage, 0.0)))
        rows.append(
            {
                "resolution": resolution,
                "total_s": median(totals),
                "stages_s": {s: median(v) for s, v in stages.items()},
                "faces": getattr(mesh, "faces", None),
                "memory": measure(resolution, device) if memory else None,
            }
        )
    res = [r["resolution"] for r in rows]
    exponents = {s: growth_exponent(res, [r["stages_s"][s] for r in rows]) for s in STAGES}
    exponents["total"] = growth_exponent(res, [r["total_s"] for r in rows])
    return {"device": str(dev), "runs": runs, "rows": rows, "growth_exponent": exponents}
