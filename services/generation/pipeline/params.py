"""The parameters of one generation: defaults and ranges in one place.

The ranges here are the ones documented in protos/orfeas/generation/v1/
generation.proto; `validate` is the single check every door (gRPC, REST
through gRPC, the in-process pipeline) goes through.

`resolution`, `steps` and `guidance_scale` mean different things per
backend, so their ranges and defaults are per backend (BACKEND_PARAMETERS):
for `inflate` the reconstruction grid and the solver's iteration cap, for
`hunyuan3d` the octree resolution of the decoded volume, the denoising steps
and the classifier-free guidance scale. `inflate` has no guidance: its
guidance_scale is always 0. A backend with weights may change its default
steps by the variant it has loaded (VARIANT_STEPS: hunyuan3d's turbo
models default to 5); the ranges stay the backend's.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, fields, replace

from services.common.errors import InvalidArgument

FORMATS: tuple[str, ...] = ("glb", "obj", "stl", "ply")
BACKGROUND_MODES: tuple[str, ...] = ("auto", "on", "off")
DEFAULT_BACKEND = "inflate"

MAX_IMAGE_BYTES = 20 * 1024 * 1024
MAX_IMAGE_SIDE = 8192
MAX_IMAGE_PIXELS = 40_000_000
MAX_SEED = 2**63 - 1


@dataclass(frozen=True)
class ParameterRange:
    """One backend-specific parameter: inclusive range and default."""

    name: str
    minimum: float
    maximum: float
    default: float
    meaning: str


@dataclass(frozen=True)
class BackendParameters:
    name: str
    description: str
    resolution: ParameterRange
    steps: ParameterRange
    guidance_scale: ParameterRange | None  # None: the backend has no guidance (always 0)

    def ranges(self) -> tuple[ParameterRange, ...]:
        return tuple(r for r in (self.resolution, self.steps, self.guidance_scale) if r is not None)


BACKEND_PARAMETERS: dict[str, BackendParameters] = {
    "inflate": BackendParameters(
        name="inflate",
        description="a silhouette blown up into a smooth closed solid (Poisson solve); no weights",
        resolution=ParameterRange("resolution", 64, 1024, 256, "reconstruction grid, cells a side"),
        steps=ParameterRange("steps", 1, 500, 50, "solver iterations (cap)"),
        guidance_scale=None,
    ),
    "hunyuan3d": BackendParameters(
        name="hunyuan3d",
        description="Tencent Hunyuan3D-2 shape model (hy3dgen), weights from HUNYUAN3D_MODEL_PATH",
        resolution=ParameterRange("resolution", 64, 512, 256, "octree resolution of the decoded volume"),
        steps=ParameterRange("steps", 1, 100, 30, "denoising steps"),
        guidance_scale=ParameterRange("guidance_scale", 0.0, 20.0, 5.0, "classifier-free guidance scale"),
    ),
}


# hunyuan3d's variants (read from its checkpoint's config, backends/hunyuan3d_variant.py) and the denoising
# steps each takes by default: the step-distilled (turbo) models are trained for 5, the others keep 30.
HUNYUAN3D_VARIANT_STEPS: dict[str, int] = {
    "standard": 30,
    "fast": 30,
    "mini": 30,
    "mini-fast": 30,
    "turbo": 5,
    "mini-turbo": 5,
}
VARIANT_STEPS: dict[str, dict[str, int]] = {"hunyuan3d": HUNYUAN3D_VARIANT_STEPS}


def variant_parameters(backend: str, variant: str) -> BackendParameters:
    """A backend's ranges with the defaults of the variant it has loaded ("" or an unknown variant: its own)."""
    spec = BACKEND_PARAMETERS[backend]
    steps = VARIANT_STEPS.get(backend, {}).get(variant)
    if steps is None or steps == spec.steps.default:
        return spec
    return replace(spec, steps=replace(spec.steps, default=steps))


def backend_names() -> tuple[str, ...]:
    return tuple(BACKEND_PARAMETERS)


def register_backend_parameters(parameters: BackendParameters) -> None:
    """A backend from a plugin module (GENERATION_BACKEND_PLUGINS) declares its ranges here."""
    if parameters.name in BACKEND_PARAMETERS:
        raise ValueError(f"backend {parameters.name!r} is already registered")
    BACKEND_PARAMETERS[parameters.name] = parameters

# field -> (min, max), inclusive, for the parameters every backend shares.
RANGES: dict[str, tuple[float, float]] = {
    "seed": (0, MAX_SEED),
    "face_count": (1_000, 500_000),
    "texture_size": (256, 4096),
    "foreground_ratio": (0.5, 1.0),
}
# The widest range any backend accepts (what a schema can say without knowing the backend).
WIDEST_RANGES: dict[str, tuple[float, float]] = {
    name: (
        min(getattr(b, name).minimum for b in BACKEND_PARAMETERS.values() if getattr(b, name) is not None),
        max(getattr(b, name).maximum for b in BACKEND_PARAMETERS.values() if getattr(b, name) is not None),
    )
    for name in ("resolution", "steps", "guidance_scale")
}
FLOAT_PARAMETERS = ("foreground_ratio", "guidance_scale")

REQUEST_ID_PATTERN = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


@dataclass(frozen=True)
class GenerationParams:
    seed: int = 0
    resolution: int = 256
    steps: int = 50
    face_count: int = 40_000
    texture: bool = True
    texture_size: int = 1024
    remove_background: str = "auto"
    foreground_ratio: float = 0.85
    format: str = "glb"
    backend: str = DEFAULT_BACKEND
    guidance_scale: float = 0.0

    def batch_key(self) -> tuple[str, int, int, float]:
        """Jobs with the same key can share one batched shape_generation call (never across backends)."""
        return (self.backend, self.resolution, self.steps, self.guidance_scale)

    def to_dict(self) -> dict[str, object]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def backend_defaults(backend: str, spec: BackendParameters | None = None) -> GenerationParams:
    """GenerationParams with the backend's own defaults for resolution, steps and guidance_scale: those of
    `spec` when given (the loaded variant's, from variant_parameters), else the backend's registered ones."""
    spec = spec if spec is not None and spec.name == backend else BACKEND_PARAMETERS.get(backend)
    if spec is None:
        return GenerationParams(backend=backend)
    return GenerationParams(
        backend=backend,
        resolution=int(spec.resolution.default),
        steps=int(spec.steps.default),
        guidance_scale=float(spec.guidance_scale.default) if spec.guidance_scale else 0.0,
    )


def validate(params: GenerationParams) -> GenerationParams:
    """Raise InvalidArgument naming the first field out of range; return params (guidance_scale
    set to 0 for a backend without guidance)."""
    if params.backend not in BACKEND_PARAMETERS:
        raise InvalidArgument("backend", f"must be one of {', '.join(backend_names())}, got {params.backend!r}")
    spec = BACKEND_PARAMETERS[params.backend]
    checks: list[tuple[str, float, float]] = [(name, low, high) for name, (low, high) in RANGES.items()]
    checks += [(r.name, r.minimum, r.maximum) for r in (spec.resolution, spec.steps)]
    # The guidance range is checked for every backend, so a nonsense value is refused whatever the backend.
    guidance = spec.guidance_scale
    checks.append(("guidance_scale", *(
        (guidance.minimum, guidance.maximum) if guidance else WIDEST_RANGES["guidance_scale"]
    )))
    for name, low, high in checks:
        value = getattr(params, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InvalidArgument(name, f"must be a number, got {value!r}")
        if value != value or not low <= value <= high:  # value != value: NaN
            where = f" for the {params.backend} backend" if name in ("resolution", "steps", "guidance_scale") else ""
            raise InvalidArgument(name, f"must be between {_fmt(low)} and {_fmt(high)}{where}, got {_fmt(value)}")
        if name not in FLOAT_PARAMETERS and int(value) != value:
            raise InvalidArgument(name, f"must be a whole number, got {value!r}")
    if params.format not in FORMATS:
        raise InvalidArgument("format", f"must be one of {', '.join(FORMATS)}, got {params.format!r}")
    if params.remove_background not in BACKGROUND_MODES:
        raise InvalidArgument(
            "remove_background", f"must be one of {', '.join(BACKGROUND_MODES)}, got {params.remove_background!r}"
        )
    if not isinstance(params.texture, bool):
        raise InvalidArgument("texture", f"must be true or false, got {params.texture!r}")
    if guidance is None and params.guidance_scale != 0.0:
        params = replace(params, guidance_scale=0.0)
    return params


def validate_request_id(request_id: str) -> str:
    if request_id and not REQUEST_ID_PATTERN.match(request_id):
        raise InvalidArgument("request_id", "must be 1 to 128 characters of A-Z a-z 0-9 . _ : -")
    return request_id


def _fmt(value: float) -> str:
    return f"{value:,}" if isinstance(value, int) else f"{value:g}"
