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

Variants: the folder's config says which model it is (hunyuan3d_variant.py):
standard, turbo (the consistency scheduler, 5 steps by default), mini (the
0.6 B denoiser), ... The same code runs them all; the variant sets the
default steps and the name telemetry learns the costs under.
HUNYUAN3D_VAE_PATH swaps in a separate VAE folder (such as
`hunyuan3d-vae-v2-0-turbo`), loaded with hy3dgen's own VAE loader, and
HUNYUAN3D_FLASHVDM=1 turns on hy3dgen's FlashVDM ("lightning") decoder.

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
3. Volume decoding, done here (hunyuan3d_decoding.py): vae(latents /
   scale_factor), then the VAE's own volume decoder, dense or lightning,
   handed a wrapper around vae.geo_decoder that counts chunks (progress,
   stop checks). Nothing of hy3dgen is patched.
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
from services.generation.backends.hunyuan3d_decoding import decode_dense, decode_lightning
from services.generation.backends.hunyuan3d_variant import STANDARD, telemetry_name, variant_of
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
    # False for a guidance-distilled denoiser (fast, turbo), which embeds the scale instead of doubling the batch.
    classifier_free_guidance: bool = True


def check_folder(model_path: str) -> tuple[Path, Path, dict[str, Any]]:
    """(config path, weights path, parsed config) of a model folder, or BackendUnavailable saying what is wrong."""
    if not model_path:
        raise BackendUnavailable("HUNYUAN3D_MODEL_PATH is not set")
    config_path, weights_path, config = _read_folder("HUNYUAN3D_MODEL_PATH", model_path, "weights")
    for part in CONFIG_PARTS:
        _check_target(config_path, config.get(part), f"{part}.target")
    _check_weights(weights_path, required=("model", "vae"))
    return config_path, weights_path, config


def check_vae_folder(vae_path: str) -> tuple[Path, Path, dict[str, Any]]:
    """The same for a separate VAE folder (HUNYUAN3D_VAE_PATH): config.yaml with `target` and `params`, and
    model.fp16.safetensors holding the VAE's own tensors (no `vae.` prefix)."""
    config_path, weights_path, config = _read_folder("HUNYUAN3D_VAE_PATH", vae_path, "VAE weights")
    whole_model = f"HUNYUAN3D_VAE_PATH={config_path.parent} holds a whole model, not a VAE folder such as " \
        "hunyuan3d-vae-v2-0-turbo"
    if "model" in config and "vae" in config:
        raise BackendUnavailable(whole_model)
    _check_target(config_path, config, "target")
    if not isinstance(config.get("params"), dict):
        raise BackendUnavailable(f"{config_path} is not valid: params is missing")
    parts = _check_weights(weights_path, required=(), what="VAE weights")
    if "vae" in parts or "model" in parts:
        raise BackendUnavailable(f"{whole_model} (its weights are model.* and vae.* tensors)")
    if "geo_decoder" not in parts:
        raise BackendUnavailable(f"VAE weights at {weights_path} could not be loaded: no geo_decoder.* tensors")
    return config_path, weights_path, config


def _read_folder(variable: str, path: str, what: str) -> tuple[Path, Path, dict[str, Any]]:
    import yaml

    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise BackendUnavailable(f"{variable}={folder} is not a folder")
    config_path = folder / CONFIG_FILE
    weights_path = folder / WEIGHTS_FILE
    if not config_path.is_file():
        raise BackendUnavailable(f"{config_path} is missing")
    if not weights_path.is_file():
        raise BackendUnavailable(f"{what} at {weights_path} are missing")
    try:
        config = yaml.safe_load(config_path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise BackendUnavailable(f"{config_path} is not valid: {_first_line(exc)}") from None
    if not isinstance(config, dict):
        raise BackendUnavailable(f"{config_path} is not valid: not a mapping")
    return config_path, weights_path, config


def _check_target(config_path: Path, section: Any, where: str) -> None:
    target = section.get("target") if isinstance(section, dict) else None
    if not isinstance(target, str):
        raise BackendUnavailable(f"{config_path} is not valid: {where} is missing")
    if not target.startswith(ALLOWED_TARGET_PREFIX):
        raise BackendUnavailable(
            f"{config_path} is not valid: {where} {target!r} is not a class of {ALLOWED_TARGET_PREFIX[:-1]}"
        )


def _check_weights(weights_path: Path, required: tuple[str, ...], what: str = "weights") -> set[str]:
    """The key prefixes of a readable safetensors file holding the `required` parts: checked before hy3dgen is
    imported at all."""
    from safetensors import safe_open

    try:
        with safe_open(str(weights_path), "pt") as weights:
            parts = {key.split(".", 1)[0] for key in weights.keys()}
    except Exception as exc:  # noqa: BLE001 - truncated, not safetensors, unreadable: all one reason
        raise BackendUnavailable(
            f"{what} at {weights_path} could not be loaded: {type(exc).__name__}: {_first_line(exc)}"
        ) from None
    missing = [part for part in required if part not in parts]
    if missing:
        raise BackendUnavailable(
            f"{what} at {weights_path} could not be loaded: no {' or '.join(p + '.*' for p in missing)} tensors"
        )
    return parts


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

    def __init__(
        self,
        pipeline: Any,
        device: torch.device,
        config: HunyuanConfig,
        weights_path: Path,
        variant: str = STANDARD,
    ) -> None:
        self.pipeline = pipeline
        self.device = device
        self.config = config
        self.weights_path = weights_path
        # "standard", "turbo", "mini", ... (hunyuan3d_variant.py): what the folder's config says it is.
        self.variant = variant
        self.flashvdm = config.flashvdm
        self.precision = "fp16" if pipeline.dtype == torch.float16 else "fp32"
        self.dimensions = _dimensions(pipeline)
        # One call at a time: the pipeline's scheduler keeps per-call state, and so does FlashVDM's attention.
        self._lock = threading.Lock()

    @property
    def telemetry_name(self) -> str:
        """What telemetry learns this backend's costs under: its name, then its variant and decoder where they
        are not the standard ones ("hunyuan3d", "hunyuan3d.turbo.flashvdm")."""
        return telemetry_name(self.name, self.variant, self.flashvdm)

    @classmethod
    def load(cls, config: HunyuanConfig, device: torch.device) -> "Hunyuan3DBackend":
        config_path, weights_path, model_config = check_folder(config.model_path)
        # A separate VAE folder is checked before anything heavy is loaded, so its faults are quick to see.
        vae_files = check_vae_folder(config.vae_path) if config.vae_path else None
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
        if vae_files is not None:
            pipeline.vae = _load_vae(*vae_files, expected=pipeline.vae, device=device, dtype=dtype)
        if config.flashvdm:
            # hy3dgen's own switch: the lightning volume decoder and top-k attention in the geometry decoder.
            # mc_algo names the surface extractor the VAE would use itself ("mc": scikit-image's, no CUDA
            # package); this backend extracts surfaces itself (pipeline/surface.py).
            pipeline.vae.enable_flashvdm_decoder(enabled=True, adaptive_kv_selection=True, mc_algo="mc")
        backend = cls(pipeline, device, config, weights_path, variant_of(model_config))
        log.info(
            "hunyuan3d loaded",
            extra={
                "path": str(weights_path),
                "vae_path": str(vae_files[1]) if vae_files else "",
                "variant": backend.variant,
                "flashvdm": backend.flashvdm,
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
        # Denoising, classifier-free guidance doubling the batch (a guidance-distilled model embeds the scale
        # instead): a DiT block's activations over latents and condition tokens (qkv, 4x MLP, norms and
        # residuals: about 16 widths), and on the CPU the attention matrix, which its SDPA kernel materialises.
        copies = 2 if d.classifier_free_guidance else 1
        tokens = d.num_latents + d.condition_tokens
        denoising = copies * tokens * d.dit_hidden * 16 * element
        if on_cpu:
            denoising += copies * d.dit_heads * tokens * tokens * 4
        # Image encoding: the encoder's activations (small beside the rest).
        encoding = d.condition_tokens * d.condition_hidden * 16 * element
        # Volume decoding: one chunk of queries through the cross-attention decoder (about 12 widths per
        # query), its attention over the latents on the CPU (FlashVDM: over the third it keeps), and the
        # logit grid.
        chunk = self.config.decode_chunk_points
        decoding = chunk * d.vae_width * 12 * element
        if on_cpu:
            decoding += chunk * d.vae_heads * (d.num_latents // 3 if self.flashvdm else d.num_latents) * 4
        points = (resolution + 1) ** 3
        if self.flashvdm:
            # The finest grid's logits, marks and dilation (3 elements), the fill's float32 copies and votes
            # (about 24 bytes), and the indices and query points of the band it evaluates, taken as a quarter
            # of the grid (a trained model's band is thinner; the optimizer learns the real peak on CUDA).
            grid = points * (3 * element + 24) + points // 4 * 48
        else:
            # Chunk outputs, their concatenation and a float32 copy; the shared query grid counted per item
            # to be safe.
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
        """Each item's float32 logit volume, on the host (hunyuan3d_decoding.py)."""
        vae = self.pipeline.vae

        def decoding(fraction: float, detail: str) -> None:
            report(progress, DENOISING_SHARE + DECODING_SHARE * fraction, detail)

        with torch.inference_mode():
            shape_latents = vae(latents / vae.scale_factor)
            if self.flashvdm:
                return decode_lightning(
                    vae, shape_latents, resolution=resolution, bound=self.config.box_bound,
                    chunk_points=self.config.decode_chunk_points, level=SURFACE_LEVEL, report=decoding,
                    should_stop=should_stop,
                )
            return decode_dense(
                vae, shape_latents, resolution=resolution, bound=self.config.box_bound,
                chunk_points=self.config.decode_chunk_points, report=decoding, should_stop=should_stop,
            )

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
        classifier_free_guidance=getattr(model, "guidance_embed", False) is not True,
    )


def _load_vae(config_path: Path, weights_path: Path, config: dict[str, Any], *, expected: Any,
              device: torch.device, dtype: torch.dtype) -> Any:
    """A separate VAE folder through hy3dgen's own loader (VectsetVAE.from_single_file); its latents must be
    the ones the model's denoiser makes."""
    from hy3dgen.shapegen.models.autoencoders import VectsetVAE
    from hy3dgen.shapegen.pipelines import get_obj_from_str

    try:
        vae_class = get_obj_from_str(config["target"])
    except Exception as exc:  # noqa: BLE001 - a name that does not import is a reason, not a crash
        raise BackendUnavailable(
            f"{config_path} is not valid: target {config['target']!r}: {_first_line(exc)}"
        ) from None
    if not (isinstance(vae_class, type) and issubclass(vae_class, VectsetVAE)):
        raise BackendUnavailable(f"{config_path} is not valid: target {config['target']!r} is not a VAE")
    try:
        vae = vae_class.from_single_file(
            str(weights_path), str(config_path), device=str(device), dtype=dtype, use_safetensors=True
        )
    except Exception as exc:  # noqa: BLE001 - a broken VAE is a reason, not a crash
        raise BackendUnavailable(
            f"VAE weights at {weights_path} could not be loaded: {type(exc).__name__}: {_first_line(exc)}"
        ) from None
    if tuple(vae.latent_shape) != tuple(expected.latent_shape):
        raise BackendUnavailable(
            f"the VAE at {weights_path.parent} takes latents of shape {tuple(vae.latent_shape)}, the model makes "
            f"{tuple(expected.latent_shape)}"
        )
    return vae


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__
