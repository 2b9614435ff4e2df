"""Shape backends: silhouettes in, closed meshes out."""
from services.generation.backends.base import ShapeBackend
from services.generation.backends.registry import backend_names, get_backend

__all__ = ["ShapeBackend", "backend_names", "get_backend"]
