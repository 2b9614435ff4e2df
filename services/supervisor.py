"""`make run` keeps the stack up: a part that dies is started again, the others keep serving.

The launcher (services/stack.py `main`) starts the three parts as child processes and
calls `Supervisor.poll()` a few times a second:

- a part that exits without being asked to is started again after a back-off
  (SupervisorConfig: 0.5 s doubling to 30 s, back to 0.5 s once it has stayed up a minute);
- more than `max_restarts` exits within `restart_window_s` is a crash loop: the launcher
  says so plainly and gives up on that part only;
- `stop()` (Ctrl-C, SIGTERM) stops them in order: the gateway first, so no new work
  arrives, then generation with its grace period (several instances side by side),
  then telemetry, which generation reports to until the end, then a private PostgreSQL.

Nothing here knows what a part does: they are started by module name (services.stack.MODULES)
and checked through their health endpoints.
"""
from __future__ import annotations

import logging
import signal
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Protocol

from services.common.config import SupervisorConfig

log = logging.getLogger("services.supervisor")

# The order the parts stop in: the gateway first, telemetry (which generation reports to) after the
# services, the database they all write to last. `generation-2` stops with `generation`.
STOP_ORDER: tuple[str, ...] = ("gateway", "generation", "telemetry", "postgres")


def stop_stage(name: str) -> int:
    """When a part stops: its kind's place in STOP_ORDER (parts of no known kind after them all)."""
    kind = name.split("-", 1)[0]
    return STOP_ORDER.index(kind) if kind in STOP_ORDER else len(STOP_ORDER)


class State(str, Enum):
    STARTING = "starting"  # running, not yet healthy
    UP = "up"  # has passed its health check
    WAITING = "waiting"  # exited; started again at `restart_at`
    GAVE_UP = "gave_up"  # crashed in a loop; left down
    STOPPED = "stopped"  # stopped on purpose


@dataclass
class Backoff:
    """The delay before each restart: doubles from initial_s to max_s, resets after reset_after_s up."""

    initial_s: float
    max_s: float
    reset_after_s: float
    next_s: float = field(init=False)

    def __post_init__(self) -> None:
        self.next_s = self.initial_s

    def delay(self, up_for_s: float) -> float:
        if up_for_s >= self.reset_after_s:
            self.next_s = self.initial_s
        delay = self.next_s
        self.next_s = min(self.next_s * 2, self.max_s)
        return delay


@dataclass
class CrashWindow:
    """Exit times within the last window_s; more than max_restarts of them is a crash loop."""

    max_restarts: int
    window_s: float
    exits: deque[float] = field(default_factory=deque)

    def record(self, now: float) -> bool:
        """Count an exit at `now`; True when this one makes it a crash loop."""
        self.exits.append(now)
        while self.exits and self.exits[0] < now - self.window_s:
            self.exits.popleft()
        return len(self.exits) > self.max_restarts


@dataclass
class Part:
    """One supervised part and what the supervisor knows of it."""

    name: str
    backoff: Backoff
    crashes: CrashWindow
    state: State = State.STARTING
    pid: int | None = None
    started_at: float = 0.0
    restart_at: float = 0.0
    restarts: int = 0


class Children(Protocol):
    """What the supervisor needs of the processes (services.stack.Stack provides it)."""

    def spawn(self, name: str) -> int:
        """Start the part; its pid."""

    def exit_code(self, name: str) -> int | None:
        """None while it runs; negative: the signal that ended it."""

    def healthy(self, name: str) -> bool:
        """It passes its health check now."""

    def terminate(self, name: str, timeout_s: float, urgent: Callable[[], bool]) -> int | None:
        """SIGTERM, then SIGKILL after timeout_s or as soon as urgent(); its exit code."""


# A service exits with this code when its configuration is wrong (services/generation/devices.py, say).
CONFIGURATION_ERROR = 2


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"ended by {signal.Signals(-code).name}"
        except ValueError:
            return f"ended by signal {-code}"
    return f"exit code {code}"


class Supervisor:
    def __init__(
        self,
        children: Children,
        names: tuple[str, ...],
        config: SupervisorConfig,
        stop_timeouts_s: dict[str, float] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.children = children
        self.config = config
        self.clock = clock
        self.stop_timeouts_s = stop_timeouts_s or {}
        self.parts: dict[str, Part] = {
            name: Part(
                name,
                Backoff(config.backoff_initial_s, config.backoff_max_s, config.reset_after_s),
                CrashWindow(config.max_restarts, config.restart_window_s),
            )
            for name in names
        }
        self.stopping = False

    # ------------------------------------------------------------ running

    def start(self) -> None:
        for part in self.parts.values():
            self._spawn(part)

    def poll(self) -> None:
        """One look at every part: notice exits, schedule and make restarts, notice health."""
        now = self.clock()
        for part in self.parts.values():
            if part.state in (State.STARTING, State.UP):
                code = self.children.exit_code(part.name)
                if code is not None:
                    self._exited(part, code, now)
                elif part.state == State.STARTING and self.children.healthy(part.name):
                    part.state = State.UP
                    if part.restarts:
                        log.info(
                            "%s is back after restart %d", part.name, part.restarts,
                            extra={"event": "part_back", "part": part.name, "pid": part.pid,
                                   "restarts": part.restarts},
                        )
            elif part.state == State.WAITING and now >= part.restart_at:
                part.restarts += 1
                self._spawn(part)

    @property
    def settled(self) -> bool:
        """No part is on its way up: each is up, or given up on."""
        return all(p.state in (State.UP, State.GAVE_UP) for p in self.parts.values())

    @property
    def all_given_up(self) -> bool:
        return all(p.state == State.GAVE_UP for p in self.parts.values())

    def _spawn(self, part: Part) -> None:
        part.pid = self.children.spawn(part.name)
        part.started_at = self.clock()
        part.state = State.STARTING
        log.info(
            "%s started (pid %d)", part.name, part.pid,
            extra={"event": "part_started", "part": part.name, "pid": part.pid, "restarts": part.restarts},
        )

    def _exited(self, part: Part, code: int, now: float) -> None:
        up_for = now - part.started_at
        how = describe_exit(code)
        if code == CONFIGURATION_ERROR:
            # Its settings are wrong (it said why in its log): starting it again cannot help.
            part.state = State.GAVE_UP
            log.error(
                "%s cannot start with its configuration (%s); not restarting it. Its log says what is wrong; "
                "the other parts keep running.", part.name, how,
                extra={"event": "part_given_up", "part": part.name, "pid": part.pid, "exit": how,
                       "exits_in_window": 1},
            )
            return
        if part.crashes.record(now):
            part.state = State.GAVE_UP
            log.error(
                "%s is crashing in a loop: %d exits within %.0f s, the last %s after %.1f s; giving up on it. "
                "The other parts keep running; fix the cause and restart `make run`.",
                part.name, len(part.crashes.exits), self.config.restart_window_s, how, up_for,
                extra={"event": "part_given_up", "part": part.name, "pid": part.pid, "exit": how,
                       "exits_in_window": len(part.crashes.exits)},
            )
            return
        delay = part.backoff.delay(up_for)
        part.state = State.WAITING
        part.restart_at = now + delay
        log.warning(
            "%s exited unexpectedly (%s) after %.1f s; restarting it in %.1f s", part.name, how, up_for, delay,
            extra={"event": "part_exited", "part": part.name, "pid": part.pid, "exit": how,
                   "up_for_s": round(up_for, 3), "restart_in_s": delay},
        )

    # ----------------------------------------------------------- stopping

    def stop(self, urgent: Callable[[], bool] = lambda: False) -> None:
        """Stop every part in STOP_ORDER, each given its time; `urgent()` turning true kills what is left.

        Parts of one kind (the generation instances) stop side by side: each drains within its own
        grace period, not one after the other."""
        self.stopping = True
        for stage in sorted({stop_stage(name) for name in self.parts}):
            names = [name for name in self.parts if stop_stage(name) == stage]
            if len(names) == 1:
                self._stop_part(self.parts[names[0]], urgent)
                continue
            threads = [threading.Thread(target=self._stop_part, args=(self.parts[n], urgent)) for n in names]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()

    def _stop_part(self, part: Part, urgent: Callable[[], bool]) -> None:
        name = part.name
        if part.state in (State.STARTING, State.UP):
            timeout_s = self.stop_timeouts_s.get(name, self.config.stop_timeout_s)
            log.info("stopping %s (up to %.0f s)", name, timeout_s,
                     extra={"event": "part_stopping", "part": name, "pid": part.pid})
            code = self.children.terminate(name, timeout_s, urgent)
            log.info("%s stopped (%s)", name, describe_exit(code) if code is not None else "gone",
                     extra={"event": "part_stopped", "part": name, "pid": part.pid})
        part.state = State.STOPPED
