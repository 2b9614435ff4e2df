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

`zero_geometry_output=True` zeroes the volume decoder's output layer: every
logit is 0, nothing is inside, and a generation ends with an empty surface.
"""
from __future__ import annotations

import argparse
import copy
import os
from pathlib import Path
from typing import Any

import torch
import yaml

from services.generation.backends.hunyuan3d import CONFIG_FILE, WEIGHTS_FILE

_SCHEDULER = {
    "target": "hy3dgen.shapegen.schedulers.FlowMatchEulerDiscreteScheduler",
    "params": {"num_train_timesteps": 1000},
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

CONFIGS = {"tiny": TINY, "published": PUBLISHED}


def write_checkpoint(
    folder: Path,
    config: dict[str, Any] | str = "tiny",
    *,
    seed: int = 0,
    zero_geometry_output: bool = False,
    build_device: str = "cpu",
) -> Path:
    """Write config.yaml and model.fp16.safetensors with seeded random weights into folder; returns folder.

    build_device: where the parts are built and initialised ("cuda" makes the published size quick).
    """
    from safetensors.torch import save_file

    from services.generation.backends.hunyuan3d import import_hy3dgen

    import_hy3dgen()  # hub offline, and the import errors worded like the backend's
    from hy3dgen.shapegen.pipelines import instantiate_from_config

    spec = copy.deepcopy(CONFIGS[config] if isinstance(config, str) else config)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        with torch.device(build_device):
            for part in ("model", "vae", "conditioner"):
                module = instantiate_from_config(copy.deepcopy(spec[part]))
                if part == "vae" and zero_geometry_output:
                    with torch.no_grad():
                        module.geo_decoder.output_proj.weight.zero_()
                        module.geo_decoder.output_proj.bias.zero_()
                for key, value in module.state_dict().items():
                    tensors[f"{part}.{key}"] = value.detach().to("cpu", torch.float16).contiguous()
                del module
    finally:
        torch.random.set_rng_state(generator_state)
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
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--zero-geometry-output", action="store_true", help="a model that finds no surface")
    parser.add_argument("--build-device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    folder = write_checkpoint(args.folder, args.config, seed=args.seed, zero_geometry_output=args.zero_geometry_output,
                              build_device=args.build_device)
    print(f"{folder}: {parameter_count(folder):,} parameters ({os.path.getsize(folder / WEIGHTS_FILE):,} bytes)")


if __name__ == "__main__":
    main()
