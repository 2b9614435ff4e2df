"""Model folders for the hunyuan3d backend with random weights: for tests and benchmarks, never for users.

A folder holds what HUNYUAN3D_MODEL_PATH points at: config.yaml and
model.fp16.safetensors, keys prefixed `model.`, `vae.` and `conditioner.`
as in Tencent's published checkpoint. The parts are built by hy3dgen's own
`instantiate_from_config` from the config, randomly initialised (seeded),
and saved; the service then loads them through its real loading code.

- TINY: about 126 k parameters; a whole generation takes about a second
  on the CPU at resolution 64 with a few steps.
- PUBLISHED: the architecture of `hunyuan3d-dit-v2-0` (about 2.5 B
  parameters: DiT hidden 1024, 16 heads, 16 double and 32 single blocks,
  context 1536; ShapeVAE 3072 latents, width 1024, 16 decoder layers;
  Dinov2-giant image encoder, hidden 1536, 40 layers, SwiGLU, 518 px).
  Random weights cost the same time and memory as the trained ones, so a
  GPU benchmark needs no download.
- The Turbo family (`*-turbo`): the same architectures with what makes a
  model step-distilled: the consistency scheduler
  (`ConsistencyFlowMatchEulerDiscreteScheduler`, 100 PCM timesteps; 5 steps
  by default) and a denoiser that embeds the guidance scale instead of
  running classifier-free guidance (one pass per step, not two).
- PUBLISHED_MINI: `Hunyuan3D-2mini`'s 0.6 B denoiser as public
  reimplementations give it (8 double and 16 single blocks at width 1024)
  with a ShapeVAE of 512 latents.

A separate VAE folder (HUNYUAN3D_VAE_PATH) holds `config.yaml` with
`target` and `params` and the VAE's own tensors without a prefix, the
layout of `hunyuan3d-vae-v2-0-turbo`; `write_vae_checkpoint` writes one.
Its VAE_CONFIGS are modelled on FlashVDM's efficiency-oriented decoder (a
geometry decoder half as wide, without MLP expansion or a final norm).

`zero_geometry_output=True` zeroes the volume decoder's output layer: every
logit is 0, nothing is inside, and a generation ends with an empty surface.
`logit_scale` multiplies that layer instead. A trained decoder's occupancy
logits are large away from the surface; a random one's are all small, and
FlashVDM, which refines only where a logit is under 0.95 in size or the
sign changes, would take the whole volume for the surface's neighbourhood.
Scaling leaves the surface where it is (the sign of every logit is kept)
and gives the lightning decoder the narrow band a trained model gives it.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import yaml

from services.generation.backends.hunyuan3d import CONFIG_FILE, WEIGHTS_FILE

_SCHEDULER = {
    "target": "hy3dgen.shapegen.schedulers.FlowMatchEulerDiscreteScheduler",
    "params": {"num_train_timesteps": 1000},
}
_CONSISTENCY_SCHEDULER = {
    "target": "hy3dgen.shapegen.schedulers.ConsistencyFlowMatchEulerDiscreteScheduler",
    "params": {"num_train_timesteps": 1000, "pcm_timesteps": 100},
}
_IMAGE_PROCESSOR = {
    "target": "hy3dgen.shapegen.preprocessors.ImageProcessorV2",
    "params": {"size": 512, "border_ratio": 0.15},
}

TINY: dict[str, Any] = {
    "model": {
        "target": "hy3dgen.shapegen.models.Hunyuan3DDiT",
        "params": {
            "in_channels": 8, "context_in_dim": 32, "hidden_size": 32, "mlp_ratio": 4.0, "num_heads": 2,
            "depth": 1, "depth_single_blocks": 1, "axes_dim": [16], "theta": 10000, "qkv_bias": True,
            "guidance_embed": False,
        },
    },
    "vae": {
        "target": "hy3dgen.shapegen.models.ShapeVAE",
        "params": {
            # num_freqs 2, not the published 8: random weights over 8 frequencies decode to noise whose
            # surface has ~250 k faces at resolution 64; over 2 it is a few blobs of ~30 k, which
            # decimate and unwrap in a fraction of a second.
            "num_latents": 64, "embed_dim": 8, "num_freqs": 2, "include_pi": False, "heads": 2, "width": 32,
            "num_decoder_layers": 1, "qkv_bias": False, "qk_norm": True, "scale_factor": 1.0,
        },
    },
    "conditioner": {
        "target": "hy3dgen.shapegen.models.SingleImageEncoder",
        "params": {
            "main_image_encoder": {
                "type": "DinoImageEncoder",
                "kwargs": {
                    # A Dinov2Config as a dict: built locally, no hub access. The encoder hard-codes
                    # patches of 14, so the image is a multiple of 14.
                    "config": {
                        "model_type": "dinov2", "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                        "mlp_ratio": 4, "patch_size": 14, "image_size": 56, "use_swiglu_ffn": False,
                        "hidden_act": "gelu", "layer_norm_eps": 1e-6, "layerscale_value": 1.0, "qkv_bias": True,
                    },
                    "image_size": 56,
                },
            }
        },
    },
    "scheduler": _SCHEDULER,
    "image_processor": _IMAGE_PROCESSOR,
}

PUBLISHED: dict[str, Any] = {
    "model": {
        "target": "hy3dgen.shapegen.models.Hunyuan3DDiT",
        "params": {
            "in_channels": 64, "context_in_dim": 1536, "hidden_size": 1024, "mlp_ratio": 4.0, "num_heads": 16,
            "depth": 16, "depth_single_blocks": 32, "axes_dim": [64], "theta": 10000, "qkv_bias": True,
            "guidance_embed": False,
        },
    },
    "vae": {
        "target": "hy3dgen.shapegen.models.ShapeVAE",
        "params": {
            "num_latents": 3072, "embed_dim": 64, "num_freqs": 8, "include_pi": False, "heads": 16, "width": 1024,
            "num_decoder_layers": 16, "qkv_bias": False, "qk_norm": True, "scale_factor": 0.9990943042622529,
        },
    },
    "conditioner": {
        "target": "hy3dgen.shapegen.models.SingleImageEncoder",
        "params": {
            "main_image_encoder": {
                "type": "DinoImageEncoder",
                "kwargs": {
                    "config": {  # Dinov2-giant
                        "model_type": "dinov2", "hidden_size": 1536, "num_hidden_layers": 40,
                        "num_attention_heads": 24, "mlp_ratio": 4, "patch_size": 14, "image_size": 518,
                        "use_swiglu_ffn": True, "hidden_act": "gelu", "layer_norm_eps": 1e-6,
                        "layerscale_value": 1.0, "qkv_bias": True, "drop_path_rate": 0.0,
                        "attention_probs_dropout_prob": 0.0, "hidden_dropout_prob": 0.0,
                    },
                    "image_size": 518,
                },
            }
        },
    },
    "scheduler": _SCHEDULER,
    "image_processor": _IMAGE_PROCESSOR,
}



def turbo(spec: dict[str, Any]) -> dict[str, Any]:
    """The step-distilled variant of an architecture: consistency scheduler, guidance embedded."""
    distilled = copy.deepcopy(spec)
    distilled["model"]["params"]["guidance_embed"] = True
    distilled["scheduler"] = copy.deepcopy(_CONSISTENCY_SCHEDULER)
    return distilled


def _mini(spec: dict[str, Any]) -> dict[str, Any]:
    mini = copy.deepcopy(spec)
    mini["model"]["params"].update(depth=8, depth_single_blocks=16)
    mini["vae"]["params"].update(num_latents=512, scale_factor=1.0188137142395404)
    return mini


def lightning_vae(vae: dict[str, Any]) -> dict[str, Any]:
    """A separate VAE folder's config for an architecture's VAE section, with the lighter geometry decoder."""
    spec = copy.deepcopy(vae)
    ratio = 2
    spec["params"].update(geo_decoder_downsample_ratio=ratio, geo_decoder_mlp_expand_ratio=1, geo_decoder_ln_post=False)
    # The geometry decoder gets heads // ratio heads, and FlashVDM's top-k attention needs at least two (it
    # squeezes the heads' axis away when there is one); only the tiny VAE has so few.
    spec["params"]["heads"] = max(spec["params"]["heads"], 2 * ratio)
    return spec


PUBLISHED_MINI = _mini(PUBLISHED)
CONFIGS = {
    "tiny": TINY,
    "tiny-turbo": turbo(TINY),
    "published": PUBLISHED,
    "published-turbo": turbo(PUBLISHED),
    "published-mini": PUBLISHED_MINI,
    "published-mini-turbo": turbo(PUBLISHED_MINI),
}
VAE_CONFIGS = {
    "tiny-turbo": lightning_vae(TINY["vae"]),
    "published-turbo": lightning_vae(PUBLISHED["vae"]),
    "published-mini-turbo": lightning_vae(PUBLISHED_MINI["vae"]),
}


def write_checkpoint(
    folder: Path,
    config: dict[str, Any] | str = "tiny",
    *,
    seed: int = 0,
    zero_geometry_output: bool = False,
    build_device: str = "cpu",
    logit_scale: float = 1.0,
) -> Path:
    """Write config.yaml and model.fp16.safetensors with seeded random weights into folder; returns folder.

    build_device: where the parts are built and initialised ("cuda" makes the published size quick).
    """
    spec = copy.deepcopy(CONFIGS[config] if isinstance(config, str) else config)
    tensors: dict[str, torch.Tensor] = {}
    with _seeded(seed):
        for part in ("model", "vae", "conditioner"):
            module = _build(spec[part], build_device)
            if part == "vae":
                _scale_geometry_output(module, 0.0 if zero_geometry_output else logit_scale)
            tensors.update(_half(module.state_dict(), f"{part}."))
            del module
    return _save(Path(folder), spec, tensors)


def write_vae_checkpoint(
    folder: Path,
    config: dict[str, Any] | str = "tiny-turbo",
    *,
    seed: int = 0,
    build_device: str = "cpu",
    logit_scale: float = 1.0,
) -> Path:
    """A separate VAE folder (what HUNYUAN3D_VAE_PATH points at): config.yaml with `target` and `params`, and
    model.fp16.safetensors with the VAE's own keys, seeded random weights; returns folder."""
    spec = copy.deepcopy(VAE_CONFIGS[config] if isinstance(config, str) else config)
    with _seeded(seed):
        module = _build(spec, build_device)
        _scale_geometry_output(module, logit_scale)
        tensors = _half(module.state_dict(), "")
        del module
    return _save(Path(folder), spec, tensors)


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seeded initialisation that leaves the caller's random state as it was."""
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        yield
    finally:
        torch.random.set_rng_state(generator_state)


def _build(section: dict[str, Any], build_device: str) -> torch.nn.Module:
    from services.generation.backends.hunyuan3d import import_hy3dgen

    import_hy3dgen()  # hub offline, and the import errors worded like the backend's
    from hy3dgen.shapegen.pipelines import instantiate_from_config

    with torch.device(build_device):
        return instantiate_from_config(copy.deepcopy(section))


def _scale_geometry_output(vae: torch.nn.Module, factor: float) -> None:
    if factor != 1.0:
        with torch.no_grad():
            vae.geo_decoder.output_proj.weight.mul_(factor)
            vae.geo_decoder.output_proj.bias.mul_(factor)


def _half(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {f"{prefix}{key}": value.detach().to("cpu", torch.float16).contiguous() for key, value in state.items()}


def _save(folder: Path, spec: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Path:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / WEIGHTS_FILE))
    (folder / CONFIG_FILE).write_text(yaml.safe_dump(spec, sort_keys=False))
    return folder


def parameter_count(folder: Path) -> int:
    from safetensors import safe_open

    with safe_open(str(Path(folder) / WEIGHTS_FILE), "pt") as weights:
        return sum(_product(weights.get_slice(key).get_shape()) for key in weights.keys())


def _product(shape: list[int]) -> int:
    total = 1
    for size in shape:
        total *= size
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description="Write a random-weight Hunyuan3D-2 model folder (tests, benchmarks)")
    parser.add_argument("folder", type=Path)
    parser.add_argument("--config", choices=tuple(CONFIGS), default="tiny")
    parser.add_argument("--vae", action="store_true", help=f"a separate VAE folder instead ({', '.join(VAE_CONFIGS)})")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--zero-geometry-output", action="store_true", help="a model that finds no surface")
    parser.add_argument("--logit-scale", type=float, default=1.0, help="multiply the volume decoder's output")
    parser.add_argument("--build-device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    if args.vae and args.config not in VAE_CONFIGS:
        parser.error(f"--vae: --config must be one of {', '.join(VAE_CONFIGS)}")
    if args.vae:
        folder = write_vae_checkpoint(args.folder, args.config, seed=args.seed, build_device=args.build_device,
                                      logit_scale=args.logit_scale)
    else:
        folder = write_checkpoint(args.folder, args.config, seed=args.seed,
                                  zero_geometry_output=args.zero_geometry_output, build_device=args.build_device,
                                  logit_scale=args.logit_scale)
    print(f"{folder}: {parameter_count(folder):,} parameters ({os.path.getsize(folder / WEIGHTS_FILE):,} bytes)")


if __name__ == "__main__":
    main()
