"""The hunyuan3d backend's cost: every stage (shape_generation split into denoising, volume decoding and
surface extraction), one object at a time against one batched call, and, with --serve, the whole
service under mixed resolutions: peak device memory against the 85 % budget, out-of-memory errors.

    .venv/bin/python -m bench.hunyuan3d --model tiny --device cpu            # `make bench`'s hunyuan3d suite
    .venv/bin/python -m bench.hunyuan3d --model tiny --device cpu --serve    # the GPU run's code, on the CPU
    python -m bench.hunyuan3d --model published --device cuda --serve       # bench/gpu.sh without weights
    python -m bench.hunyuan3d --model /models/hunyuan3d-dit-v2-0 --device cuda --serve   # real weights

--model: "tiny" (126 k parameters), "published" (the architecture of hunyuan3d-dit-v2-0, about 2.5 B
parameters with random weights: the same time and memory as the trained model) or a folder holding
config.yaml and model.fp16.safetensors. Random-weight folders are written into a temporary folder.

Batching ratio: the same B pictures through shape_generation one call each, against one call with all
B; ratio = (time of the B single calls) / (time of the batched call), so > 1 means the batch is faster
per object. Both are in-process, on the loaded pipeline, after a warm-up.

With a random-weight model ("tiny", "published") the suite also runs the variants side by side
(bench/hunyuan3d_variants.py): standard, Turbo, Turbo with FlashVDM and, at the published size,
mini-Turbo with FlashVDM, at octree resolution 256 on CUDA (128 on the CPU); --no-variants skips them.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import torch

from bench import hunyuan3d_variants
from bench.common import STAGES, fmt_bytes, fmt_s, generate_via_gateway, median, metric_sum, own_stack, photo_png
from services.common.config import HunyuanConfig
from services.generation.backends.base import ShapeItem, ShapeSettings
from services.generation.backends.registry import BackendSet
from services.generation.pipeline.image_loading import load_image
from services.generation.pipeline.image_preprocessing import prepare_image
from services.generation.pipeline.params import GenerationParams
from services.generation.pipeline.run import run_pipeline

SUBSTAGES = ("denoising", "volume_decoding", "surface_extraction")
# Targets of issue 10 on one H200 (shape at defaults, batching, peak memory share of the device).
SHAPE_TARGET_S = 10.0
BATCHING_TARGET = 2.0
PEAK_SHARE_TARGET = 0.90
PICTURES = ("astronaut", "coffee", "chelsea", "rocket")


def run(
    model: str = "tiny",
    device_name: str = "cpu",
    resolution: int = 64,
    steps: int = 5,
    batch: int = 4,
    repeats: int = 3,
    serve: bool = False,
    mixed_resolutions: tuple[int, ...] = (64, 96),
    serve_jobs: int = 8,
    face_count: int = 1000,
    variants: bool = True,
    variant_resolution: int | None = None,
) -> dict[str, Any]:
    device = torch.device(device_name)
    with tempfile.TemporaryDirectory(prefix="orfeas-hunyuan3d-") as tmp:
        folder, written_s = _model_folder(model, Path(tmp), device)
        results: dict[str, Any] = {
            "model": model,
            "device": str(device),
            "folder_written_s": written_s,
            "settings": {"resolution": resolution, "steps": steps, "guidance_scale": 5.0, "batch": batch},
        }
        results.update(_in_process(folder, device, resolution, steps, batch, repeats, face_count))
        if serve:
            results["service"] = _served(folder, mixed_resolutions, steps, serve_jobs, face_count)
        if variants and model in hunyuan3d_variants.VARIANTS:
            results["variants"] = hunyuan3d_variants.run(
                model, device, Path(tmp) / "variants",
                variant_resolution or (256 if device.type == "cuda" else 128),
                batch=batch, repeats=min(repeats, 2), face_count=face_count, standard_folder=folder,
            )
    return results


def _model_folder(model: str, tmp: Path, device: torch.device) -> tuple[Path, float]:
    if model not in ("tiny", "published"):
        return Path(model), 0.0
    from services.generation.backends.hunyuan3d_checkpoint import write_checkpoint

    started = time.perf_counter()
    # Built on the device being measured: initialising 2.5 B parameters on the CPU takes minutes.
    folder = write_checkpoint(tmp / model, model, build_device=device.type)
    return folder, time.perf_counter() - started


def _in_process(folder: Path, device: torch.device, resolution: int, steps: int, batch: int, repeats: int,
                face_count: int) -> dict[str, Any]:
    started = time.perf_counter()
    backends = BackendSet.load(device, HunyuanConfig(model_path=str(folder)))
    load_s = time.perf_counter() - started
    status = next(s for s in backends.statuses() if s.name == "hunyuan3d")
    if status.state != "ready":
        raise RuntimeError(f"hunyuan3d did not load: {status.reason}")
    backend = backends.get("hunyuan3d", device)
    pictures = [photo_png(name, 512) for name in PICTURES]
    prepared = [prepare_image(load_image(p), remove_background="auto", foreground_ratio=0.85, resolution=64)
                for p in pictures]
    items = [ShapeItem(prepared[i % len(prepared)], seed=i, face_count=face_count) for i in range(batch)]
    settings = ShapeSettings(resolution, steps, 5.0)
    backend.generate_batch(items[:1], settings, device=device)  # warm-up: kernels, allocator

    # Every stage of one job, in process.
    params = GenerationParams(backend="hunyuan3d", resolution=resolution, steps=steps, guidance_scale=5.0,
                              face_count=face_count, texture_size=1024, seed=1)
    stage_runs: list[dict[str, float]] = []
    substage_runs: list[dict[str, float]] = []
    for index in range(repeats):
        parts: dict[str, float] = {}
        _, timings = run_pipeline(pictures[index % len(pictures)], params, device=device, backends=backends,
                                  substages=parts)
        stage_runs.append(timings)
        substage_runs.append(parts)

    # shape_generation: B single calls against one batched call.
    alone_s: list[float] = []
    batched_s: list[float] = []
    alone_peak = batched_peak = 0
    batched_parts: list[dict[str, float]] = []
    for _ in range(repeats):
        total = 0.0
        for item in items:
            seconds, peak, _ = hunyuan3d_variants.timed_call(backend, [item], settings, device)
            total += seconds
            alone_peak = max(alone_peak, peak)
        alone_s.append(total)
        seconds, peak, parts = hunyuan3d_variants.timed_call(backend, items, settings, device)
        batched_s.append(seconds)
        batched_peak = max(batched_peak, peak)
        batched_parts.append(parts)

    ratio = median(alone_s) / median(batched_s)
    result: dict[str, Any] = {
        "load_s": load_s,
        "precision": status.precision,
        "weights_bytes": backend.dimensions.weight_bytes,
        "modelled_item_bytes": backend.estimate_item_bytes(resolution, steps),
        "stages_s": {s: median([r[s] for r in stage_runs]) for s in STAGES},
        "shape_substages_s": {s: median([r.get(s, 0.0) for r in substage_runs]) for s in SUBSTAGES},
        "shape_alone_per_object_s": median(alone_s) / batch,
        "shape_batched_per_object_s": median(batched_s) / batch,
        "batched_substages_s": {s: median([r.get(s, 0.0) for r in batched_parts]) for s in SUBSTAGES},
        "batching_ratio": ratio,
        "repeats": repeats,
    }
    if device.type == "cuda":
        total_memory = torch.cuda.get_device_properties(device).total_memory
        result.update(
            alone_peak_bytes=alone_peak,
            batched_peak_bytes=batched_peak,
            device_total_bytes=total_memory,
            resident_bytes=torch.cuda.memory_allocated(device),
        )
    return result


def _served(folder: Path, resolutions: tuple[int, ...], steps: int, jobs: int, face_count: int) -> dict[str, Any]:
    """The service with these weights: jobs of mixed resolutions submitted at once; what the optimizer did."""
    with own_stack("hunyuan3d", HUNYUAN3D_MODEL_PATH=str(folder)) as stack:
        metrics_url = f"http://127.0.0.1:{stack.generation_metrics_port}/metrics"
        return asyncio.run(_served_run(stack.gateway_url, metrics_url, stack.log_dir, resolutions, steps, jobs,
                                       face_count))


async def _served_run(gateway: str, metrics_url: str, log_dir: Path | None, resolutions: tuple[int, ...],
                      steps: int, jobs: int, face_count: int) -> dict[str, Any]:
    from bench.common import log_records, scrape

    async with httpx.AsyncClient(base_url=gateway, limits=httpx.Limits(max_connections=4 * jobs + 8)) as client:
        load_started = time.perf_counter()
        while True:  # the weights load on a thread after the service is up
            listed = (await client.get("/api/v1/backends", timeout=30)).json()["backends"]
            hunyuan = next(b for b in listed if b["name"] == "hunyuan3d")
            if hunyuan["state"] != "loading":
                break
            await asyncio.sleep(0.5)
        if not hunyuan["ready"]:
            raise RuntimeError(f"the service did not load hunyuan3d: {hunyuan['reason']}")
        loaded_s = time.perf_counter() - load_started
        picture = photo_png("astronaut", 512)
        params = [{"backend": "hunyuan3d", "resolution": resolutions[i % len(resolutions)], "steps": steps,
                   "face_count": face_count, "texture_size": 1024, "seed": i} for i in range(jobs)]
        await generate_via_gateway(client, picture, params[0])  # warm-up
        before = scrape(metrics_url)
        stop = asyncio.Event()
        sampler = asyncio.create_task(_memory_peak(client, metrics_url, stop))
        started = time.perf_counter()
        runs = await asyncio.gather(*(generate_via_gateway(client, picture, p, download=False) for p in params))
        wall = time.perf_counter() - started
        stop.set()
        used_peak, total, budget = await sampler
        after = scrape(metrics_url)
    ids = {r.job_id for r in runs}
    logged = [e for e in log_records(log_dir / "generation.log", "job finished") if e.get("job_id") in ids] \
        if log_dir else []
    return {
        "jobs": jobs,
        "resolutions": list(resolutions),
        "service_load_s": loaded_s,
        "succeeded": sum(r.status == "succeeded" for r in runs),
        "errors": sorted({r.error for r in runs if r.error}),
        "wall_s": wall,
        "throughput_jobs_per_s": jobs / wall,
        "batch_sizes": sorted((int(e["batch_size"]) for e in logged if e.get("batch_size")), reverse=True),
        "out_of_memory_batches": metric_sum(after, "orfeas_batch_out_of_memory_total")
        - metric_sum(before, "orfeas_batch_out_of_memory_total"),
        "device_memory_peak_bytes": used_peak,
        "device_memory_total_bytes": total,
        "device_memory_budget_bytes": budget,
    }


async def _memory_peak(client: httpx.AsyncClient, url: str, stop: asyncio.Event) -> tuple[float, float, float]:
    """(highest memory in use, total, budget) the service's device gauges showed while the run went on."""
    peak = total = budget = 0.0
    while not stop.is_set():
        try:
            text = (await client.get(url, timeout=5)).text
            for line in text.splitlines():
                if not line.startswith("orfeas_"):
                    continue
                name, value = line.split("{", 1)[0], float(line.split()[-1])
                if name in ("orfeas_device_memory_used_bytes", "orfeas_batch_memory_peak_bytes"):
                    peak = max(peak, value)
                elif name == "orfeas_device_memory_total_bytes":
                    total = max(total, value)
                elif name == "orfeas_device_memory_budget_bytes":
                    budget = max(budget, value)
        except (httpx.HTTPError, ValueError):
            pass
        try:
            await asyncio.wait_for(stop.wait(), 0.25)
        except TimeoutError:
            pass
    return peak, total, budget


# ----------------------------------------------------------------------------------------------
# Report


def summary_rows(h: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    on_gpu = h["device"].startswith("cuda")
    target_note = "" if on_gpu and h["model"] != "tiny" else " (targets: GPU, published size)"

    def met(ok: bool) -> str:
        return ("yes" if ok else "**no**") if on_gpu and h["model"] != "tiny" else "n/a"

    s = h["settings"]
    rows = [
        (f"hunyuan3d ({h['model']}, {h['device']}, {h['precision']}): shape per object alone, "
         f"{s['resolution']}², {s['steps']} steps", fmt_s(h["shape_alone_per_object_s"]),
         f"≤ {SHAPE_TARGET_S:.0f} s{target_note}", met(h["shape_alone_per_object_s"] <= SHAPE_TARGET_S)),
        (f"hunyuan3d: shape per object in a batch of {s['batch']}", fmt_s(h["shape_batched_per_object_s"]), "", ""),
        ("hunyuan3d: batching throughput ratio", f"{h['batching_ratio']:.2f}×",
         f"≥ {BATCHING_TARGET:.0f}×{target_note}", met(h["batching_ratio"] >= BATCHING_TARGET)),
    ]
    served = h.get("service")
    if served and served.get("device_memory_total_bytes"):
        share = served["device_memory_peak_bytes"] / served["device_memory_total_bytes"]
        budget = served["device_memory_budget_bytes"]
        memory = f"peak device memory (budget {fmt_bytes(budget)})" if on_gpu else "peak memory in use (whole machine)"
        rows.append((
            f"hunyuan3d served, resolutions {served['resolutions']}: {memory}; out-of-memory batches",
            f"{fmt_bytes(served['device_memory_peak_bytes'])} ({share:.0%}); {served['out_of_memory_batches']:.0f}",
            f"≤ {PEAK_SHARE_TARGET:.0%}; 0", met(share <= PEAK_SHARE_TARGET and served["out_of_memory_batches"] == 0),
        ))
    if h.get("variants"):
        rows += hunyuan3d_variants.summary_rows(h["variants"])
    return rows


def markdown(h: dict[str, Any]) -> list[str]:
    from bench.report import table

    s = h["settings"]
    stage_rows = [(name, fmt_s(h["stages_s"][name])) for name in STAGES]
    stage_rows += [(f"  shape_generation: {name}", fmt_s(h["shape_substages_s"][name])) for name in SUBSTAGES]
    lines = [
        (f"## hunyuan3d backend ({h['model']} weights, {h['device']}, {h['precision']}; resolution "
         f"{s['resolution']}, {s['steps']} steps, guidance {s['guidance_scale']}; medians of {h['repeats']})"),
        "",
        (f"Weights {fmt_bytes(h['weights_bytes'])}, loaded in {h['load_s']:.1f} s"
         + (f" (written in {h['folder_written_s']:.1f} s)" if h["folder_written_s"] else "")
         + f"; modelled memory per object {fmt_bytes(h['modelled_item_bytes'])}."),
        "",
        table(stage_rows, ("stage (one job, in process)", "median")),
        "",
        (f"shape_generation for {s['batch']} pictures: {fmt_s(h['shape_alone_per_object_s'])} per object one call "
         f"each, {fmt_s(h['shape_batched_per_object_s'])} per object in one batched call: "
         f"**{h['batching_ratio']:.2f}×** throughput. Batched call's parts: "
         + ", ".join(f"{k} {fmt_s(v)}" for k, v in h["batched_substages_s"].items()) + "."),
        "",
    ]
    if "batched_peak_bytes" in h:
        lines += [
            (f"Peak device memory above the resident weights ({fmt_bytes(h['resident_bytes'])}): one object "
             f"{fmt_bytes(h['alone_peak_bytes'])}, the batch {fmt_bytes(h['batched_peak_bytes'])}; device "
             f"{fmt_bytes(h['device_total_bytes'])}."),
            "",
        ]
    served = h.get("service")
    if served:
        lines += [
            (f"Served: {served['jobs']} jobs at once over resolutions {served['resolutions']}, "
             f"{served['succeeded']} succeeded in {served['wall_s']:.1f} s ({served['throughput_jobs_per_s']:.2f} "
             f"jobs/s); batches {served['batch_sizes']}; out-of-memory batches {served['out_of_memory_batches']:.0f}; "
             f"peak memory in use {fmt_bytes(served['device_memory_peak_bytes'])} of "
             f"{fmt_bytes(served['device_memory_total_bytes'])}"
             + (f" (budget {fmt_bytes(served['device_memory_budget_bytes'])})"
                if served["device_memory_budget_bytes"] else " (the whole machine's, on the CPU)")
             + (f"; errors {served['errors']}" if served["errors"] else "") + "."),
            "",
        ]
    if h.get("variants"):
        lines += hunyuan3d_variants.markdown(h["variants"])
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.hunyuan3d", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", help="tiny, published, or a model folder")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="the tiny model at tiny settings, on the CPU")
    parser.add_argument("--resolution", type=int, default=None, help="default: 256 on CUDA, 64 on the CPU")
    parser.add_argument("--steps", type=int, default=None, help="default: 30 on CUDA, 5 on the CPU")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--serve", action="store_true", help="also run the service with mixed resolutions")
    parser.add_argument("--mixed", default=None, help="resolutions for --serve (default: 128,256,384 on CUDA)")
    parser.add_argument("--serve-jobs", type=int, default=None)
    parser.add_argument("--no-variants", action="store_true", help="skip the variants side by side")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args(argv)
    if args.tiny:
        args.model, args.device = "tiny", "cpu"
    gpu = args.device.startswith("cuda")
    results = run(
        model=args.model,
        device_name=args.device,
        resolution=args.resolution or (GenerationParams().resolution if gpu else 64),
        steps=args.steps or (30 if gpu else 5),
        batch=args.batch,
        repeats=args.repeats,
        serve=args.serve,
        mixed_resolutions=tuple(int(r) for r in (args.mixed or ("128,256,384" if gpu else "64,96")).split(",")),
        serve_jobs=args.serve_jobs or (12 if gpu else 6),
        variants=not args.no_variants,
    )
    from bench.report import table

    print(table(summary_rows(results), ("measure", "median", "target", "met")))
    print("\n".join(markdown(results)))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str) + "\n")
    served = results.get("service")
    return 1 if served and served["succeeded"] != served["jobs"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
