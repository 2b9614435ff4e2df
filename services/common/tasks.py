"""Background tasks with an owner.

A task made with a bare `create_task` can be garbage-collected while it runs,
and its exception ends up as "Task exception was never retrieved" at some
later, random moment. Every background task here is kept until it ends, its
error is logged exactly once with its name, and `close()` cancels and awaits
whatever is still running.
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any

log = logging.getLogger(__name__)


class TaskSupervisor:
    def __init__(self, name: str) -> None:
        self.name = name
        self._tasks: set[asyncio.Task[Any]] = set()
        self.failures = 0

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro, name=f"{self.name}:{name}")
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def spawn_threadsafe(self, loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, Any], name: str) -> None:
        """From another thread (the device thread's progress callback, say)."""
        loop.call_soon_threadsafe(self.spawn, coro, name)

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            self.failures += 1
            log.error("background task failed", extra={"task": task.get_name()}, exc_info=exc)

    def __len__(self) -> int:
        return len(self._tasks)

    async def wait(self, timeout_s: float | None = None) -> bool:
        """Wait for the running tasks to end by themselves; True if they all did."""
        if not self._tasks:
            return True
        _, pending = await asyncio.wait(set(self._tasks), timeout=timeout_s)
        return not pending

    async def close(self) -> None:
        tasks = set(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
