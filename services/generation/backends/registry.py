"""The shape backends a service has, per device: which are ready, and why the others are not.

`inflate` needs nothing and is always ready (and the default). `hunyuan3d`
loads its weights once per device (BackendSet.load, or start_loading, which
loads on a thread while the service already serves inflate); until then, or
when its folder is missing or broken, it is "loading" or "unavailable" with
a reason that names the path, and asking for it is FAILED_PRECONDITION.
Loading never stops the service.

A backend with weights also says which model they are (its `variant`, read
from the folder's config as soon as loading starts: hunyuan3d's "standard",
"turbo", "mini", ...), and its parameters carry that variant's defaults
(pipeline/params.py: 5 steps for turbo). Telemetry learns its costs under a
name that includes the variant and the decoder ("hunyuan3d.turbo.flashvdm"),
so a turbo batch is sized from turbo's own peaks.
"""
from __future__ import annotations

import importlib
import logging
import threading
from dataclasses import dataclass

import torch

from services.common.config import HunyuanConfig
from services.common.errors import FailedPrecondition, InvalidArgument
from services.generation.backends.base import ShapeBackend
from services.generation.backends.hunyuan3d_variant import folder_variant, telemetry_name
from services.generation.pipeline.params import (
    BACKEND_PARAMETERS,
    DEFAULT_BACKEND,
    BackendParameters,
    backend_names,
    register_backend_parameters,
    variant_parameters,
)

log = logging.getLogger(__name__)

READY, LOADING, UNAVAILABLE = "ready", "loading", "unavailable"


def _inflate() -> ShapeBackend:
    from services.generation.backends import inflate

    return inflate.instance()


# Backends that need no loading: one shared instance each.
_STATELESS = {"inflate": _inflate}


def load_plugins(modules: str) -> list[str]:
    """Import each module of a comma-separated list; each defines BACKEND (a ShapeBackend that
    needs no loading) and PARAMETERS (its BackendParameters). Returns the names registered.

    This is how a site adds a backend of its own, and how the tests add slow or hanging ones
    without anything test-only in the service itself.
    """
    names = []
    for module_name in filter(None, (m.strip() for m in modules.split(","))):
        module = importlib.import_module(module_name)
        backend: ShapeBackend = module.BACKEND
        parameters: BackendParameters = module.PARAMETERS
        if backend.name != parameters.name:
            raise ValueError(f"{module_name}: BACKEND is {backend.name!r} but PARAMETERS is for {parameters.name!r}")
        register_backend_parameters(parameters)
        _STATELESS[backend.name] = lambda backend=backend: backend
        names.append(backend.name)
    return names


def get_backend(name: str) -> ShapeBackend:
    """A backend that needs no loading (inflate). Loaded ones come from a BackendSet."""
    factory = _STATELESS.get(name)
    if factory is None:
        if name in BACKEND_PARAMETERS:
            raise FailedPrecondition(f"backend: {name} has weights to load; use a BackendSet")
        raise InvalidArgument("backend", f"must be one of {', '.join(backend_names())}, got {name!r}")
    return factory()


@dataclass(frozen=True)
class BackendStatus:
    name: str
    state: str  # READY, LOADING or UNAVAILABLE
    reason: str  # why it is not ready; "" when it is
    is_default: bool
    device: str
    precision: str  # "fp32", "fp16"; "" when not loaded
    parameters: BackendParameters  # with the variant's defaults
    variant: str = ""  # which model its weights are ("standard", "turbo", ...); "" without weights or unavailable


class BackendSet:
    """The backends of one device. Thread-safe: loading runs on its own thread."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._lock = threading.Lock()
        self._backends: dict[str, ShapeBackend] = {name: factory() for name, factory in _STATELESS.items()}
        self._states: dict[str, tuple[str, str]] = {name: (READY, "") for name in self._backends}
        self._states.setdefault("hunyuan3d", (UNAVAILABLE, "HUNYUAN3D_MODEL_PATH is not set"))
        # name -> (variant, name telemetry learns its costs under), for a backend loading or loaded.
        self._variants: dict[str, tuple[str, str]] = {}
        self._loader: threading.Thread | None = None

    @classmethod
    def load(cls, device: torch.device, hunyuan: HunyuanConfig | None = None) -> "BackendSet":
        """Every backend loaded (or its reason recorded) before returning."""
        backends = cls(device)
        backends._load_hunyuan(hunyuan or HunyuanConfig.from_env())
        return backends

    @classmethod
    def start_loading(cls, device: torch.device, hunyuan: HunyuanConfig | None = None) -> "BackendSet":
        """inflate ready at once; the weight-bearing backends load on a thread ("loading" meanwhile)."""
        backends = cls(device)
        config = hunyuan or HunyuanConfig.from_env()
        if config.model_path:
            from services.generation.backends.hunyuan3d import import_native_dependencies_here

            import_native_dependencies_here()
            backends._set("hunyuan3d", LOADING, f"loading the weights from {config.model_path}")
            # The variant is in the config, read in a moment: jobs submitted while the weights load get its
            # defaults already.
            backends._set_variant(config, folder_variant(config.model_path))
            backends._loader = threading.Thread(
                target=backends._load_hunyuan, args=(config,), name="load-hunyuan3d", daemon=True
            )
            backends._loader.start()
        return backends

    def wait_loaded(self, timeout_s: float | None = None) -> None:
        if self._loader is not None:
            self._loader.join(timeout_s)

    def _load_hunyuan(self, config: HunyuanConfig) -> None:
        from services.generation.backends.hunyuan3d import BackendUnavailable, Hunyuan3DBackend

        if not config.model_path:
            self._set("hunyuan3d", UNAVAILABLE, "HUNYUAN3D_MODEL_PATH is not set")
            return
        self._set("hunyuan3d", LOADING, f"loading the weights from {config.model_path}")
        try:
            backend = Hunyuan3DBackend.load(config, self.device)
        except BackendUnavailable as exc:
            log.warning("hunyuan3d is not available", extra={"reason": str(exc), "device": str(self.device)})
            self._set("hunyuan3d", UNAVAILABLE, str(exc))
            return
        except Exception as exc:  # noqa: BLE001 - loading must never take the service down
            log.exception("hunyuan3d failed to load", extra={"device": str(self.device)})
            self._set("hunyuan3d", UNAVAILABLE, f"loading failed: {type(exc).__name__}: {exc}")
            return
        with self._lock:
            self._backends["hunyuan3d"] = backend
            self._states["hunyuan3d"] = (READY, "")
            self._variants["hunyuan3d"] = (backend.variant, backend.telemetry_name)

    def _set_variant(self, config: HunyuanConfig, variant: str) -> None:
        if variant:
            with self._lock:
                self._variants["hunyuan3d"] = (variant, telemetry_name("hunyuan3d", variant, config.flashvdm))

    def _set(self, name: str, state: str, reason: str) -> None:
        with self._lock:
            self._states[name] = (state, reason)
            if state == UNAVAILABLE:
                self._variants.pop(name, None)

    # ------------------------------------------------------------------------------------------

    def require_ready(self, name: str, loading_is_fine: bool = False) -> None:
        """InvalidArgument for an unknown backend, FailedPrecondition (with the reason) for one not ready.

        loading_is_fine: a backend still loading passes (a job for it can wait in the queue meanwhile).
        """
        if name not in BACKEND_PARAMETERS:
            raise InvalidArgument("backend", f"must be one of {', '.join(backend_names())}, got {name!r}")
        with self._lock:
            state, reason = self._states.get(name, (UNAVAILABLE, "not built into this service"))
        if state == READY or (state == LOADING and loading_is_fine):
            return
        what = "still loading" if state == LOADING else "not available"
        raise FailedPrecondition(f"backend: {name} is {what}: {reason}")

    def loading(self, name: str) -> bool:
        with self._lock:
            return self._states.get(name, (UNAVAILABLE, ""))[0] == LOADING

    def get(self, name: str, device: torch.device | None = None) -> ShapeBackend:
        if device is not None and device != self.device:
            raise ValueError(f"these backends are loaded on {self.device}, not on {device}")
        self.require_ready(name)
        with self._lock:
            return self._backends[name]

    def variant(self, name: str) -> str:
        """Which model a backend's weights are ("turbo", ...), known from the start of loading; "" for none."""
        with self._lock:
            return self._variants.get(name, ("", ""))[0]

    def parameters(self, name: str) -> BackendParameters:
        """A backend's ranges, with the defaults of the variant it has (turbo: 5 steps)."""
        return variant_parameters(name, self.variant(name))

    def telemetry_name(self, name: str) -> str:
        """The name telemetry learns a backend's costs under: with its variant and decoder
        ("hunyuan3d.turbo.flashvdm") when they are not the standard ones, else its own name."""
        with self._lock:
            return self._variants.get(name, ("", name))[1]

    def precision(self, name: str) -> str:
        """What a loaded backend computes in ("fp16", "fp32"); "fp32" for one not loaded."""
        with self._lock:
            backend = self._backends.get(name)
        return getattr(backend, "precision", "fp32")

    def statuses(self) -> list[BackendStatus]:
        with self._lock:
            states = dict(self._states)
            backends = dict(self._backends)
            variants = {name: variant for name, (variant, _) in self._variants.items()}
        result = []
        for name in backend_names():
            state, reason = states.get(name, (UNAVAILABLE, "not built into this service"))
            backend = backends.get(name)
            result.append(
                BackendStatus(
                    name=name,
                    state=state,
                    reason=reason,
                    is_default=name == DEFAULT_BACKEND,
                    device=str(self.device),
                    precision=getattr(backend, "precision", "fp32") if backend is not None else "",
                    parameters=variant_parameters(name, variants.get(name, "")),
                    variant=variants.get(name, ""),
                )
            )
        return result
