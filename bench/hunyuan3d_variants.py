"""Hunyuan3D-2 variants side by side (issue 17): standard, Turbo with the dense decoder, Turbo with FlashVDM's
lightning decoder and, at the published size, mini-Turbo with FlashVDM; shape_generation per object alone
and in one batched call, its parts, and the ratio of dense to lightning volume decoding.

    .venv/bin/python -m bench.hunyuan3d_variants --size tiny --device cpu          # `make bench`'s figures
    python -m bench.hunyuan3d_variants --size published --device cuda              # bench/gpu.sh's

Every variant is a random-weight folder written for the run (hunyuan3d_checkpoint: the published
architectures, or tiny ones) and loaded through the service's own loading code, then timed in process on
the loaded backend after a warm-up. Each runs at its own default steps (30 standard, 5 turbo).

The folders' volume decoders are scaled (hunyuan3d_checkpoint's logit_scale) so their logits are large
away from the surface, as a trained decoder's are; random ones are all small, and FlashVDM would refine
everywhere. The dense decoder's cost does not depend on what the weights hold; the lightning decoder's
depends on how much of the finest grid lies near the surface, so each FlashVDM run reports the share of
the finest grid it evaluated: the figure to compare with a trained model's.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from bench.common import fmt_s, median, photo_png
from services.common.config import HunyuanConfig
from services.generation.backends.base import BatchTimings, ShapeItem, ShapeSettings
from services.generation.backends.registry import BackendSet
from services.generation.pipeline.image_loading import load_image
from services.generation.pipeline.image_preprocessing import prepare_image

# Targets of issue 17 on one H200 at octree resolution 256 (shape_generation per object).
TURBO_ALONE_TARGET_S = 1.5
TURBO_BATCHED_TARGET_S = 0.75
MINI_TURBO_ALONE_TARGET_S = 0.5
LOGIT_SCALE = 30.0
PICTURES = ("astronaut", "coffee", "chelsea", "rocket")
SUBSTAGES = ("denoising", "volume_decoding", "surface_extraction")


@dataclass(frozen=True)
class Variant:
    label: str
    model: str  # a hunyuan3d_checkpoint CONFIGS name
    vae: str | None  # a VAE_CONFIGS name for HUNYUAN3D_VAE_PATH; None: the model folder's own VAE
    flashvdm: bool


VARIANTS: dict[str, tuple[Variant, ...]] = {
    "tiny": (
        Variant("standard", "tiny", None, False),
        Variant("turbo", "tiny-turbo", None, False),
        Variant("turbo+flashvdm", "tiny-turbo", "tiny-turbo", True),
    ),
    "published": (
        Variant("standard", "published", None, False),
        Variant("turbo", "published-turbo", None, False),
        Variant("turbo+flashvdm", "published-turbo", "published-turbo", True),
        Variant("mini-turbo+flashvdm", "published-mini-turbo", "published-mini-turbo", True),
    ),
}


def run(size: str, device: torch.device, tmp: Path, resolution: int, batch: int = 4, repeats: int = 2,
        face_count: int = 1000, standard_folder: Path | None = None) -> dict[str, Any]:
    """standard_folder: a random-weight folder of the standard model already written (bench/hunyuan3d's), used
    instead of writing another; the dense decoder's cost does not depend on its logits' scale."""
    from services.generation.backends.hunyuan3d_checkpoint import write_checkpoint, write_vae_checkpoint

    pictures = [prepare_image(load_image(photo_png(name, 512)), remove_background="auto", foreground_ratio=0.85,
                              resolution=64) for name in PICTURES]
    items = [ShapeItem(pictures[i % len(pictures)], seed=i, face_count=face_count) for i in range(batch)]
    written: dict[str, Path] = {f"model-{size}": standard_folder} if standard_folder else {}

    def folder(kind: str, name: str) -> Path:
        key = f"{kind}-{name}"
        if key not in written:
            writer = write_vae_checkpoint if kind == "vae" else write_checkpoint
            written[key] = writer(tmp / key, name, build_device=device.type, logit_scale=LOGIT_SCALE)
        return written[key]

    loaded = []
    for variant in VARIANTS[size]:
        config = HunyuanConfig(
            model_path=str(folder("model", variant.model)),
            vae_path=str(folder("vae", variant.vae)) if variant.vae else "",
            flashvdm=variant.flashvdm,
        )
        loaded.append(_Loaded.load(variant, config, device, resolution))
    # Interleaved, call by call: a machine that slows down for a while slows every variant alike.
    for loaded_variant in loaded:
        loaded_variant.call(items[:1], device)  # warm-up: kernels, allocator
    for _ in range(repeats):
        for item in items:
            for loaded_variant in loaded:
                loaded_variant.alone.append(loaded_variant.call([item], device))
        for loaded_variant in loaded:
            loaded_variant.batched.append(loaded_variant.call(items, device))
    runs = [loaded_variant.result(items, resolution) for loaded_variant in loaded]
    del loaded
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    by_label = {r["label"]: r for r in runs}
    result: dict[str, Any] = {"size": size, "device": str(device), "resolution": resolution, "batch": batch,
                              "repeats": repeats, "logit_scale": LOGIT_SCALE, "runs": runs}
    dense, lightning = by_label.get("turbo"), by_label.get("turbo+flashvdm")
    if dense and lightning and lightning["substages_alone_s"]["volume_decoding"] > 0:
        result["decoding_ratio"] = (dense["substages_alone_s"]["volume_decoding"]
                                    / lightning["substages_alone_s"]["volume_decoding"])
    standard = by_label.get("standard")
    if standard and lightning:
        result["turbo_speedup"] = standard["alone_per_object_s"] / lightning["alone_per_object_s"]
    return result


@dataclass
class _Loaded:
    """One variant loaded through the service's code, and what its calls measured."""

    variant: Variant
    backends: BackendSet
    backend: Any
    settings: ShapeSettings
    # (seconds, peak bytes above the weights on CUDA, sub-stages) per call
    alone: list[tuple[float, int, dict[str, float]]] = field(default_factory=list)
    batched: list[tuple[float, int, dict[str, float]]] = field(default_factory=list)

    @classmethod
    def load(cls, variant: Variant, config: HunyuanConfig, device: torch.device, resolution: int) -> _Loaded:
        backends = BackendSet.load(device, config)
        status = next(s for s in backends.statuses() if s.name == "hunyuan3d")
        if status.state != "ready":
            raise RuntimeError(f"{variant.label} did not load: {status.reason}")
        # Each at its own default steps: 30 for the standard model, 5 for turbo.
        settings = ShapeSettings(resolution, int(status.parameters.steps.default), 5.0)
        return cls(variant, backends, backends.get("hunyuan3d", device), settings)

    def call(self, items: list[ShapeItem], device: torch.device) -> tuple[float, int, dict[str, float]]:
        return timed_call(self.backend, items, self.settings, device)

    def result(self, items: list[ShapeItem], resolution: int) -> dict[str, Any]:
        status = next(s for s in self.backends.statuses() if s.name == "hunyuan3d")
        result: dict[str, Any] = {
            "label": self.variant.label,
            "variant": status.variant,
            "telemetry_name": self.backends.telemetry_name("hunyuan3d"),
            "precision": status.precision,
            "steps": self.settings.steps,
            "weights_bytes": self.backend.dimensions.weight_bytes,
            "alone_per_object_s": median([seconds for seconds, _, _ in self.alone]),
            "batched_per_object_s": median([seconds / len(items) for seconds, _, _ in self.batched]),
            "substages_alone_s": {s: median([parts.get(s, 0.0) for _, _, parts in self.alone]) for s in SUBSTAGES},
        }
        if self.backend.device.type == "cuda":
            result.update(alone_peak_bytes=max(peak for _, peak, _ in self.alone),
                          batched_peak_bytes=max(peak for _, peak, _ in self.batched))
        if self.variant.flashvdm:
            result["evaluated_share"] = _evaluated_share(self.backend, items[0], resolution, self.settings.steps)
        return result


def timed_call(backend: Any, items: list[ShapeItem], settings: ShapeSettings,
               device: torch.device) -> tuple[float, int, dict[str, float]]:
    """(seconds, peak bytes above the resident weights on CUDA, sub-stages) of one generate_batch call."""
    timings = BatchTimings()
    resident = 0
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        resident = torch.cuda.memory_allocated(device)
    started = time.perf_counter()
    shapes = backend.generate_batch(items, settings, device=device, timings=timings)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - started
    failures = [s for s in shapes if isinstance(s, Exception)]
    if failures:
        raise RuntimeError(f"{len(failures)} of {len(items)} objects failed: {failures[0]}")
    peak = torch.cuda.max_memory_allocated(device) - resident if device.type == "cuda" else 0
    return seconds, peak, dict(timings.substages)


def _evaluated_share(backend: Any, item: ShapeItem, resolution: int, steps: int) -> float:
    """The share of the finest grid FlashVDM evaluated for one object (the rest it skipped as far from the
    surface): one more decode of the same latents, through the VAE's own lightning decoder."""
    from services.generation.backends.hunyuan3d import SURFACE_LEVEL, model_picture

    pipeline = backend.pipeline
    latents = pipeline(image=[model_picture(item.image)], num_inference_steps=steps, guidance_scale=5.0,
                       generator=[torch.Generator(device=backend.device).manual_seed(item.seed)],
                       octree_resolution=resolution, output_type="latent", enable_pbar=False)
    with torch.inference_mode():
        shape_latents = pipeline.vae(latents / pipeline.vae.scale_factor)
        grid = pipeline.vae.volume_decoder(shape_latents, pipeline.vae.geo_decoder, bounds=backend.config.box_bound,
                                           num_chunks=backend.config.decode_chunk_points, mc_level=SURFACE_LEVEL,
                                           octree_resolution=resolution, enable_pbar=False)
    return float((~torch.isnan(grid)).float().mean())


# ----------------------------------------------------------------------------------------------
# Report


def summary_rows(v: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    by_label = {r["label"]: r for r in v["runs"]}
    measured = v["device"].startswith("cuda") and v["size"] == "published" and v["resolution"] == 256
    note = "" if measured else " (targets: GPU, published size, 256)"

    def met(ok: bool) -> str:
        return ("yes" if ok else "**no**") if measured else "n/a"

    rows = []
    where = f"{v['size']}, {v['device']}, {v['resolution']}²"
    lightning = by_label.get("turbo+flashvdm")
    if lightning:
        rows += [
            (f"turbo+flashvdm ({where}, {lightning['steps']} steps): shape per object alone",
             fmt_s(lightning["alone_per_object_s"]), f"≤ {TURBO_ALONE_TARGET_S} s{note}",
             met(lightning["alone_per_object_s"] <= TURBO_ALONE_TARGET_S)),
            (f"turbo+flashvdm: shape per object in a batch of {v['batch']}", fmt_s(lightning["batched_per_object_s"]),
             f"≤ {TURBO_BATCHED_TARGET_S} s{note}", met(lightning["batched_per_object_s"] <= TURBO_BATCHED_TARGET_S)),
        ]
    mini = by_label.get("mini-turbo+flashvdm")
    if mini:
        rows.append((f"mini-turbo+flashvdm ({where}): shape per object alone", fmt_s(mini["alone_per_object_s"]),
                     f"≤ {MINI_TURBO_ALONE_TARGET_S} s{note}",
                     met(mini["alone_per_object_s"] <= MINI_TURBO_ALONE_TARGET_S)))
    standard = by_label.get("standard")
    if standard:
        rows.append((f"standard ({standard['steps']} steps, dense): shape per object alone",
                     fmt_s(standard["alone_per_object_s"]), "", ""))
    if "turbo_speedup" in v:
        rows.append(("turbo+flashvdm against standard, per object alone", f"{v['turbo_speedup']:.1f}×", "", ""))
    if "decoding_ratio" in v:
        rows.append(("volume decoding, dense / lightning (turbo, per object alone)", f"{v['decoding_ratio']:.2f}×",
                     "", ""))
    return rows


def markdown(v: dict[str, Any]) -> list[str]:
    from bench.report import table

    rows = []
    for r in v["runs"]:
        parts = r["substages_alone_s"]
        share = f"{r['evaluated_share']:.0%}" if "evaluated_share" in r else ""
        peak = r.get("alone_peak_bytes")
        rows.append((
            r["label"], r["variant"], str(r["steps"]), fmt_s(r["alone_per_object_s"]), fmt_s(r["batched_per_object_s"]),
            fmt_s(parts["denoising"]), fmt_s(parts["volume_decoding"]), fmt_s(parts["surface_extraction"]), share,
            f"{peak / 2**20:,.0f} MiB" if peak else "",
        ))
    header = ("variant", "config says", "steps", "per object alone", f"per object, batch of {v['batch']}",
              "denoising", "volume decoding", "surface", "grid evaluated", "peak alone")
    lines = [
        (f"### Variants side by side ({v['size']} random weights, {v['device']}, octree {v['resolution']}; "
         f"medians of {v['repeats']} rounds)"),
        "",
        table(rows, header),
        "",
    ]
    if "decoding_ratio" in v:
        lines += [
            (f"Dense against lightning volume decoding, one object: **{v['decoding_ratio']:.2f}×**; turbo with "
             f"FlashVDM against the standard model: **{v.get('turbo_speedup', math.nan):.1f}×** per object. The "
             f"lightning decoder evaluated the share of its finest grid shown (decoder output scaled "
             f"×{v['logit_scale']:g} so the random model's logits are large away from the surface, as a trained "
             "one's are)."),
            "",
        ]
    return lines


def main(argv: list[str] | None = None) -> int:
    import tempfile

    from bench.report import table

    parser = argparse.ArgumentParser(prog="bench.hunyuan3d_variants", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=tuple(VARIANTS), default="tiny")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--resolution", type=int, default=None, help="default: 256 on CUDA, 128 on the CPU")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory(prefix="orfeas-variants-") as tmp:
        results = run(args.size, device, Path(tmp), args.resolution or (256 if device.type == "cuda" else 128),
                      args.batch, args.repeats)
    print(table(summary_rows(results), ("measure", "median", "target", "met")))
    print("\n".join(markdown(results)))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
