"""Reading a service's structured log in tests."""
from __future__ import annotations

from services.common.logging_setup import read_log as entries

__all__ = ["entries"]
