"""Which Hunyuan3D-2 model a folder holds, read from its config.yaml alone (no weights, no hy3dgen import).

Tencent publishes one architecture in several trainings, and the folder's
config is what tells them apart:

- family: "mini" (`Hunyuan3D-2mini`, 0.6 B) when the denoiser has the
  published width (hidden_size 1024) but fewer blocks than Hunyuan3D-2's
  16 double + 32 single (mini has 8 + 16); every other Hunyuan3DDiT is the
  standard family, which includes the tiny random-weight folders of the
  tests, whatever their size.
- distillation: "turbo" when the scheduler is the consistency one
  (`ConsistencyFlowMatchEulerDiscreteScheduler`: step distillation, trained
  for 5 steps); "fast" when the denoiser embeds the guidance scale instead
  of running classifier-free guidance (guidance distillation, flow-matching
  scheduler); neither: the plain model.

The variant is the two together: "standard", "fast", "turbo", "mini",
"mini-fast" or "mini-turbo". Each one's default steps live in
pipeline/params.py.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

STANDARD = "standard"
CONSISTENCY_SCHEDULER = "ConsistencyFlowMatchEulerDiscreteScheduler"
# Hunyuan3D-2's published denoiser: hidden width and blocks (double + single).
PUBLISHED_HIDDEN = 1024
PUBLISHED_BLOCKS = 16 + 32
# The last part of a telemetry name whose volumes FlashVDM decodes.
FLASHVDM_SUFFIX = "flashvdm"


def variant_of(config: dict[str, Any]) -> str:
    """The variant of a parsed config.yaml; "standard" when a part it looks at is missing."""
    model = _params(config, "model")
    scheduler = config.get("scheduler") if isinstance(config.get("scheduler"), dict) else {}
    target = str(scheduler.get("target", ""))
    blocks = int(model.get("depth", 0) or 0) + int(model.get("depth_single_blocks", 0) or 0)
    mini = int(model.get("hidden_size", 0) or 0) == PUBLISHED_HIDDEN and 0 < blocks < PUBLISHED_BLOCKS
    if target.rsplit(".", 1)[-1] == CONSISTENCY_SCHEDULER:
        distilled = "turbo"
    elif model.get("guidance_embed") is True:
        distilled = "fast"
    else:
        distilled = ""
    if mini:
        return f"mini-{distilled}" if distilled else "mini"
    return distilled or STANDARD


def telemetry_name(name: str, variant: str, flashvdm: bool) -> str:
    """The name telemetry learns a backend's costs under: the memory and time of a batch depend on the model
    and the decoder, so each pair is its own ("hunyuan3d", "hunyuan3d.turbo", "hunyuan3d.mini-turbo.flashvdm").
    The standard model with the dense decoder keeps the plain name."""
    parts = [name]
    if variant and variant != STANDARD:
        parts.append(variant)
    if flashvdm:
        parts.append(FLASHVDM_SUFFIX)
    return ".".join(parts)


def folder_variant(model_path: str) -> str:
    """The variant of a model folder from its config.yaml alone, before its weights load; "" when the config
    cannot be read (loading then says why)."""
    import yaml

    try:
        config = yaml.safe_load((Path(model_path).expanduser() / "config.yaml").read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return ""
    return variant_of(config) if isinstance(config, dict) else ""


def _params(config: dict[str, Any], part: str) -> dict[str, Any]:
    section = config.get(part)
    params = section.get("params") if isinstance(section, dict) else None
    return params if isinstance(params, dict) else {}
