"""The `hunyuan3d` backend: Tencent Hunyuan3D-2's shape model through hy3dgen 2.0.2 (shape half only).

Loading: HUNYUAN3D_MODEL_PATH is a local folder laid out like the
`hunyuan3d-dit-v2-0` folder of `tencent/Hunyuan3D-2` (config.yaml and
model.fp16.safetensors). It goes through hy3dgen's own loader,
`Hunyuan3DDiTFlowMatchingPipeline.from_single_file`, once per device at
start-up: fp16 on CUDA, fp32 on the CPU. The service never downloads
(HF_HUB_OFFLINE=1 is set before hy3dgen is imported), and the config may
only name classes of hy3dgen.shapegen, since its `target` strings are
imported by name. What goes wrong while loading becomes the backend's
reason for not being ready; it never stops the service.

One call per batch:
1. The model's own image processor (ImageProcessorV2, inside the pipeline)
   takes each cut-out as an RGBA picture; the conditioner, the denoiser and
   the VAE all run on the whole batch.
2. Denoising: one pipeline call with a torch.Generator per item seeded from
   the job's seed, so an item's starting noise depends on its own seed only.
   The pipeline's `callback` (callback_steps=1) reports each step and is
   where cancellation and deadlines take effect: raising from it stops the
   call, and the next call resets the scheduler, so the pipeline stays usable.
   Latents come back with output_type="latent".
3. Volume decoding, done here: vae(latents / scale_factor), then the VAE's
   own volume decoder, handed a callable around vae.geo_decoder that counts
   chunks (progress, stop checks). Nothing of hy3dgen is patched.
4. Surface extraction (pipeline/surface.py): padded with "outside", marching
   cubes, welded, the largest piece kept, wound outward. An empty volume is
   this item's own INVALID_ARGUMENT; the batch-mates go on.

Frame: hy3dgen samples the volume on an `ij`-indexed grid, so the mesh's
axes are the volume's (x, y, z). In Hunyuan3D-2 that frame is y up, x to the
right of the input picture and +z toward its camera: the texturing half
(hy3dgen/texgen) renders its first, "front" view (azimuth 0, elevation 0)
from +z after turning the mesh (x, y, z) into its renderer's z-up frame
(-x, z, -y), and its camera at azimuth 0 sits on that frame's +y, which is
the mesh's +z, with screen right along the mesh's +x. That is the shared
frame of pipeline/records.py, so only scale and offset change: the mesh is
fitted into the cut-out's silhouette (bounding boxes, uniform scale, z
centred on 0) so that projecting the picture along z lands on it.
"""
from __future__ import annotations

import logging
import math
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from services.common.config import HunyuanConfig
from services.common.errors import InvalidArgument, ServiceError
from services.generation.backends.base import (
    BatchTimings,
    ProgressCallback,
    ShapeBackend,
    ShapeItem,
    ShapeSettings,
    StopCheck,
    check_stop,
    ensure_memory_fits,
    report,
)
from services.generation.pipeline.records import PreparedImage, Shape
from services.generation.pipeline.surface import EmptySurface, extract_surface

log = logging.getLogger(__name__)

CONFIG_FILE = "config.yaml"
WEIGHTS_FILE = "model.fp16.safetensors"
CONFIG_PARTS = ("model", "vae", "conditioner", "scheduler", "image_processor")
# config.yaml's `target` strings are imported by name: only the package's own classes may be named.
ALLOWED_TARGET_PREFIX = "hy3dgen.shapegen."
SURFACE_LEVEL = 0.0  # occupancy logits: above is inside

# Shares of the shape_generation progress bar.
DENOISING_SHARE = 0.70
DECODING_SHARE = 0.25
# At most this many decoding progress reports per call (chunks can number thousands at 512).
DECODING_REPORTS = 50


class BackendUnavailable(Exception):
    """Why the backend cannot serve: not configured, weights missing or broken."""


@dataclass(frozen=True)
class ModelDimensions:
    """What the memory model needs from the loaded architecture."""

    num_latents: int
    latent_channels: int
    dit_hidden: int
    dit_heads: int
    dit_blocks: int
    condition_tokens: int
    condition_hidden: int
    vae_width: int
    vae_heads: int
    weight_bytes: int


def check_folder(model_path: str) -> tuple[Path, Path, dict[str, Any]]:
    """(config path, weights path, parsed config) of a model folder, or BackendUnavailable saying what is wrong."""
    import yaml

    if not model_path:
        raise BackendUnavailable("HUNYUAN3D_MODEL_PATH is not set")
    folder = Path(model_path).expanduser()
    if not folder.is_dir():
        raise BackendUnavailable(f"HUNYUAN3D_MODEL_PATH={folder} is not a folder")
    config_path = folder / CONFIG_FILE
    weights_path = folder / WEIGHTS_FILE
    if not config_path.is_file():
        raise BackendUnavailable(f"{config_path} is missing")
    if not weights_path.is_file():
        raise BackendUnavailable(f"weights at {weights_path} are missing")
    try:
        config = yaml.safe_load(config_path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise BackendUnavailable(f"{config_path} is not valid: {_first_line(exc)}") from None
    if not isinstance(config, dict):
        raise BackendUnavailable(f"{config_path} is not valid: not a mapping")
    for part in CONFIG_PARTS:
        section = config.get(part)
        target = section.get("target") if isinstance(section, dict) else None
        if not isinstance(target, str):
            raise BackendUnavailable(f"{config_path} is not valid: {part}.target is missing")
        if not target.startswith(ALLOWED_TARGET_PREFIX):
            raise BackendUnavailable(
                f"{config_path} is not valid: {part}.target {target!r} is not a class of {ALLOWED_TARGET_PREFIX[:-1]}"
            )
    _check_weights(weights_path)
    return config_path, weights_path, config


def _check_weights(weights_path: Path) -> None:
    """A readable safetensors file with the parts hy3dgen loads: checked before hy3dgen is imported at all."""
    from safetensors import safe_open

    try:
        with safe_open(str(weights_path), "pt") as weights:
            parts = {key.split(".", 1)[0] for key in weights.keys()}
    except Exception as exc:  # noqa: BLE001 - truncated, not safetensors, unreadable: all one reason
        raise BackendUnavailable(
            f"weights at {weights_path} could not be loaded: {type(exc).__name__}: {_first_line(exc)}"
        ) from None
    missing = [part for part in ("model", "vae") if part not in parts]
    if missing:
        raise BackendUnavailable(
            f"weights at {weights_path} could not be loaded: no {' or '.join(p + '.*' for p in missing)} tensors"
        )


def import_native_dependencies_here() -> None:
    """Import, on the calling thread, what must not be imported first on another one.

    pymeshlab (which hy3dgen.shapegen's __init__ imports) corrupts the heap when it is first imported on
    a thread other than the main one: the process then aborts at exit ("malloc_consolidate(): unaligned
    fastbin chunk detected", SIGABRT; pymeshlab 2025.7). The service loads the weights on a thread, so it
    calls this on its main thread first. A failed import is left for the loader to report.
    """
    try:
        import pymeshlab  # noqa: F401
    except Exception:  # noqa: BLE001 - the loading thread says why hy3dgen cannot be imported
        pass


def import_hy3dgen() -> Any:
    """hy3dgen's pipeline class, imported with the hub offline and its log lines going to ours."""
    # Before the import: diffusers and transformers read it when they load.
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        from hy3dgen.shapegen.pipelines import Hunyuan3DDiTFlowMatchingPipeline
        from hy3dgen.shapegen.utils import logger as hy3dgen_logger
    except Exception as exc:  # noqa: BLE001 - any import failure is a reason, not a crash
        raise BackendUnavailable(f"hy3dgen could not be imported: {type(exc).__name__}: {_first_line(exc)}") from None
    # hy3dgen gives its logger a plain-text handler of its own; ours writes JSON lines.
    hy3dgen_logger.handlers.clear()
    hy3dgen_logger.propagate = True
    return Hunyuan3DDiTFlowMatchingPipeline


class Hunyuan3DBackend(ShapeBackend):
    name = "hunyuan3d"

    def __init__(self, pipeline: Any, device: torch.device, config: HunyuanConfig, weights_path: Path) -> None:
        self.pipeline = pipeline
        self.device = device
        self.config = config
        self.weights_path = weights_path
        self.precision = "fp16" if pipeline.dtype == torch.float16 else "fp32"
        self.dimensions = _dimensions(pipeline)
        # One call at a time: the pipeline's scheduler keeps per-call state.
        self._lock = threading.Lock()

    @classmethod
    def load(cls, config: HunyuanConfig, device: torch.device) -> "Hunyuan3DBackend":
        config_path, weights_path, _ = check_folder(config.model_path)
        pipeline_class = import_hy3dgen()
        dtype = torch.float16 if device.type == "cuda" else torch.float32
        started = time.perf_counter()
        try:
            pipeline = pipeline_class.from_single_file(
                str(weights_path), str(config_path), device=str(device), dtype=dtype, use_safetensors=True
            )
        except Exception as exc:  # noqa: BLE001 - a broken checkpoint is a reason, not a crash
            raise BackendUnavailable(
                f"weights at {weights_path} could not be loaded: {type(exc).__name__}: {_first_line(exc)}"
            ) from None
        backend = cls(pipeline, device, config, weights_path)
        log.info(
            "hunyuan3d loaded",
            extra={
                "path": str(weights_path),
                "device": str(device),
                "precision": backend.precision,
                "weights_mib": round(backend.dimensions.weight_bytes / 2**20, 1),
                "load_s": round(time.perf_counter() - started, 3),
            },
        )
        return backend

    # ------------------------------------------------------------------------------------------
    # Memory

    def estimate_item_bytes(self, resolution: int, steps: int) -> int:
        """Peak bytes one item adds on top of the resident weights (steps do not change it)."""
        d = self.dimensions
        element = 2 if self.precision == "fp16" else 4
        on_cpu = self.device.type == "cpu"
        # Denoising, classifier-free guidance doubling the batch: a DiT block's activations over latents
        # and condition tokens (qkv, 4x MLP, norms and residuals: about 16 widths), and on the CPU the
        # attention matrix, which its SDPA kernel materialises.
        tokens = d.num_latents + d.condition_tokens
        denoising = 2 * tokens * d.dit_hidden * 16 * element
        if on_cpu:
            denoising += 2 * d.dit_heads * tokens * tokens * 4
        # Image encoding: the encoder's activations (small beside the rest).
        encoding = d.condition_tokens * d.condition_hidden * 16 * element
        # Volume decoding: one chunk of queries through the cross-attention decoder (about 12 widths per
        # query), its attention over the latents on the CPU, and the whole logit grid (chunk outputs,
        # their concatenation, float32 copy); the shared query grid counted per item to be safe.
        chunk = self.config.decode_chunk_points
        decoding = chunk * d.vae_width * 12 * element
        if on_cpu:
            decoding += chunk * d.vae_heads * d.num_latents * 4
        points = (resolution + 1) ** 3
        grid = points * (2 * element + 4) + points * 3 * element
        return int(max(denoising, encoding, decoding) + grid)

    # ------------------------------------------------------------------------------------------
    # Generation

    def generate_batch(
        self,
        items: list[ShapeItem],
        settings: ShapeSettings,
        *,
        device: torch.device,
        progress: ProgressCallback | None = None,
        should_stop: StopCheck | None = None,
        timings: BatchTimings | None = None,
    ) -> list[Shape | ServiceError]:
        if not items:
            return []
        if device != self.device:
            raise ValueError(f"hunyuan3d is loaded on {self.device}, not on {device}")
        if settings.steps < 1:
            raise ValueError(f"steps must be at least 1, got {settings.steps}")
        ensure_memory_fits(len(items), self.estimate_item_bytes(settings.resolution, settings.steps), device)
        check_stop(should_stop)
        measured: dict[str, float] = {}
        with self._lock:
            started = time.perf_counter()
            latents = self._denoise(items, settings, progress, should_stop)
            measured["denoising"] = time.perf_counter() - started

            started = time.perf_counter()
            volumes = self._decode(latents, settings.resolution, progress, should_stop)
            del latents
            measured["volume_decoding"] = time.perf_counter() - started

        started = time.perf_counter()
        results: list[Shape | ServiceError] = []
        for index, item in enumerate(items):
            check_stop(should_stop)
            results.append(self._surface(volumes[index], item))
            volumes[index] = None  # free each volume once used
            report(
                progress,
                DENOISING_SHARE + DECODING_SHARE + (1 - DENOISING_SHARE - DECODING_SHARE) * (index + 1) / len(items),
                f"extracting surface {index + 1} of {len(items)}",
            )
        measured["surface_extraction"] = time.perf_counter() - started
        if timings is not None:
            timings.substages.update(measured)
        return results

    def _denoise(
        self,
        items: list[ShapeItem],
        settings: ShapeSettings,
        progress: ProgressCallback | None,
        should_stop: StopCheck | None,
    ) -> torch.Tensor:
        total = settings.steps

        def on_step(step: int, _timestep: Any, _outputs: Any) -> None:
            done = step + 1
            report(progress, DENOISING_SHARE * done / total, f"denoising step {done} of {total}")
            # Raising here ends the pipeline call between two steps.
            check_stop(should_stop)

        generators = [torch.Generator(device=self.device).manual_seed(item.seed) for item in items]
        report(progress, 0.0, f"denoising step 0 of {total}")
        return self.pipeline(
            image=[model_picture(item.image) for item in items],
            num_inference_steps=total,
            guidance_scale=float(settings.guidance_scale),
            generator=generators,
            octree_resolution=settings.resolution,
            output_type="latent",
            enable_pbar=False,
            callback=on_step,
            callback_steps=1,
        )

    def _decode(
        self,
        latents: torch.Tensor,
        resolution: int,
        progress: ProgressCallback | None,
        should_stop: StopCheck | None,
    ) -> list[np.ndarray | None]:
        """Each item's (R+1)^3 float32 logit volume, on the host."""
        vae = self.pipeline.vae
        chunk = max(1, self.config.decode_chunk_points)
        chunks = math.ceil((resolution + 1) ** 3 / chunk)
        every = max(1, chunks // DECODING_REPORTS)
        decoded = 0

        def geometry_decoder(**kwargs: Any) -> torch.Tensor:
            nonlocal decoded
            check_stop(should_stop)
            logits = vae.geo_decoder(**kwargs)
            decoded += 1
            if decoded % every == 0 or decoded == chunks:
                report(
                    progress,
                    DENOISING_SHARE + DECODING_SHARE * decoded / chunks,
                    f"decoding chunk {decoded} of {chunks}",
                )
            return logits

        with torch.inference_mode():
            shape_latents = vae(latents / vae.scale_factor)
            grids = vae.volume_decoder(
                shape_latents,
                geometry_decoder,
                bounds=self.config.box_bound,
                num_chunks=chunk,
                octree_resolution=resolution,
                enable_pbar=False,
            )
            del shape_latents
            volumes: list[np.ndarray | None] = [grid.float().cpu().numpy() for grid in grids]
        return volumes

    def _surface(self, volume: np.ndarray | None, item: ShapeItem) -> Shape | ServiceError:
        assert volume is not None
        try:
            vertices, faces = extract_surface(volume, bound=self.config.box_bound, level=SURFACE_LEVEL)
        except EmptySurface as exc:
            return InvalidArgument(
                "image",
                f"the model found no surface for this picture ({exc}); try another seed, a higher guidance_scale "
                "or another picture",
            )
        vertices = fit_to_silhouette(vertices, item.image.mask)
        return Shape(vertices=vertices, faces=faces, texture_mapping="atlas", face_budget=item.face_count)


def model_picture(image: PreparedImage) -> Image.Image:
    """The cut-out as the RGBA picture hy3dgen's image processor expects (alpha: the object)."""
    rgba = np.empty((*image.rgb.shape[:2], 4), np.uint8)
    rgba[..., :3] = image.rgb
    rgba[..., 3] = np.where(image.mask, 255, 0)
    return Image.fromarray(rgba, "RGBA")


def fit_to_silhouette(vertices: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Move and scale (uniformly) a mesh in the model's frame so its x-y bounding box sits on the cut-out's
    silhouette in the shared frame (the crop spans [-0.5, 0.5]^2), z centred on 0."""
    size = mask.shape[0]
    rows, cols = np.nonzero(mask)
    if len(rows) == 0:
        rows, cols = np.array([0, size - 1]), np.array([0, size - 1])
    # Silhouette bounds in the shared frame: x right, y up.
    target_low = np.array([cols.min() / size - 0.5, 0.5 - (rows.max() + 1) / size])
    target_high = np.array([(cols.max() + 1) / size - 0.5, 0.5 - rows.min() / size])
    low, high = vertices.min(0).astype(np.float64), vertices.max(0).astype(np.float64)
    extent = np.maximum(high[:2] - low[:2], 1e-9)
    target_extent = target_high - target_low
    # Match the longer of the mesh's two image-plane extents.
    axis = int(np.argmax(extent))
    scale = target_extent[axis] / extent[axis]
    centre = (low + high) * 0.5
    target_centre = np.array([*(target_low + target_high) * 0.5, 0.0])
    return ((vertices - centre) * scale + target_centre).astype(np.float32)


def _dimensions(pipeline: Any) -> ModelDimensions:
    model, vae, conditioner = pipeline.model, pipeline.vae, pipeline.conditioner
    encoder = conditioner.main_image_encoder
    weight_bytes = sum(
        p.numel() * p.element_size() for module in (model, vae, conditioner) for p in module.parameters()
    )
    return ModelDimensions(
        num_latents=int(vae.latent_shape[0]),
        latent_channels=int(vae.latent_shape[1]),
        dit_hidden=int(model.hidden_size),
        dit_heads=int(model.num_heads),
        dit_blocks=len(model.double_blocks) + len(model.single_blocks),
        condition_tokens=int(encoder.num_patches),
        condition_hidden=int(encoder.model.config.hidden_size),
        vae_width=int(vae.post_kl.out_features),
        vae_heads=int(vae.geo_decoder.cross_attn_decoder.attn.heads),
        weight_bytes=int(weight_bytes),
    )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__
