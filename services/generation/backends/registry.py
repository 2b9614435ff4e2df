"""Backend lookup by name: one shared instance per backend, built on first use."""
from __future__ import annotations

from services.common.errors import InvalidArgument
from services.generation.backends.base import ShapeBackend


def _inflate() -> ShapeBackend:
    from services.generation.backends import inflate

    return inflate.instance()


_FACTORIES = {"inflate": _inflate}


def backend_names() -> tuple[str, ...]:
    return tuple(_FACTORIES)


def get_backend(name: str) -> ShapeBackend:
    factory = _FACTORIES.get(name)
    if factory is None:
        raise InvalidArgument("backend", f"must be one of {', '.join(_FACTORIES)}, got {name!r}")
    return factory()
