"""Where mesh_export runs: a thread for small meshes, worker processes for large ones.

Decimation and the file writers hold the GIL for long stretches (about a
second at a time for a 1024² grid), and fast_simplification keeps its mesh in
process-wide state, so a large export on a thread would freeze the event loop
(and with it health checks, status calls and every event stream) and
serialise all exports. In processes, large exports run truly in parallel with
the device and with each other, and the loop stays responsive; each process
writes the files itself, so only the statistics travel back.

A small mesh is cheaper at home: at the default grid (about 74,000 faces
before decimation) the loop stalls at most ~30 ms, while shipping the mesh
and texture to a process costs 20-80 ms on a loaded two-core machine.
"""
from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

import numpy as np

from services.generation.faults import ExportProcessDied
from services.generation.artifacts import ArtifactStore
from services.generation.pipeline.records import TexturedShape

log = logging.getLogger(__name__)


def export_and_store(
    textured: TexturedShape,
    face_count: int,
    formats: Sequence[str],
    artifacts_root: str,
    job_id: str,
    cutout_mask: np.ndarray | None = None,
) -> dict[str, Any]:
    """mesh_export, then its files (and the source of the other formats) written atomically;
    returns the job's result statistics."""
    from services.generation.pipeline.mesh_export import export_mesh

    exported = export_mesh(textured, face_count=face_count, formats=formats)
    store = ArtifactStore(Path(artifacts_root))
    checksums = store.write_results(job_id, exported.files)
    source_sha256 = store.write_source(job_id, exported.source)
    cutout = {"cutout_sha256": store.write_cutout_mask(job_id, cutout_mask)} if cutout_mask is not None else {}
    return {
        "vertices": exported.vertices,
        "faces": exported.faces,
        "watertight": exported.watertight,
        "volume": exported.volume,
        "extents": list(exported.extents),
        "sizes": {fmt: len(data) for fmt, data in exported.files.items()},
        "sha256": checksums,
        "source_sha256": source_sha256,
        **cutout,
    }


def _init_worker(parent_pid: int) -> None:
    # Ctrl-C reaches the whole process group; the service decides when its
    # exports stop (after the grace period), not the terminal.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # A service killed with SIGKILL cannot stop its pool: exit with it rather than linger as an orphan.
    threading.Thread(target=_exit_with_parent, args=(parent_pid,), daemon=True, name="parent-watch").start()
    import services.generation.pipeline.mesh_export  # noqa: F401 - pay the imports before the first job


def _exit_with_parent(parent_pid: int) -> None:
    while os.getppid() == parent_pid:
        time.sleep(1.0)
    os._exit(0)


class ExportPool:
    """`processes` worker processes for meshes over `inline_max_faces` faces; 0 keeps every export on a thread."""

    def __init__(self, processes: int, artifacts_root: Path, inline_max_faces: int) -> None:
        self.processes = processes
        self.inline_max_faces = inline_max_faces
        self.artifacts_root = str(artifacts_root)
        self._threads = ThreadPoolExecutor(2, thread_name_prefix="export")
        self._executor: Executor = self._new_executor()

    def _new_executor(self) -> Executor:
        if self.processes <= 0:
            return ThreadPoolExecutor(1, thread_name_prefix="export")
        # spawn, not fork: the parent runs threads (torch, gRPC) that a fork would copy mid-flight.
        context = multiprocessing.get_context("spawn")
        return ProcessPoolExecutor(
            self.processes, mp_context=context, initializer=_init_worker, initargs=(os.getpid(),)
        )

    async def export(
        self,
        job_id: str,
        textured: TexturedShape,
        face_count: int,
        formats: Sequence[str],
        cutout_mask: np.ndarray | None = None,
    ) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        executor = self._threads if len(textured.shape.faces) <= self.inline_max_faces else self._executor
        try:
            return await loop.run_in_executor(
                executor, export_and_store, textured, face_count, tuple(formats), self.artifacts_root, job_id,
                cutout_mask,
            )
        except BrokenProcessPool:
            # A worker died (the kernel's OOM killer, say): replace the pool so later jobs still run.
            log.error("an export process died; restarting the export pool", extra={"job_id": job_id})
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = self._new_executor()
            raise ExportProcessDied("the export process died while writing this mesh (killed by the system?)") from None

    def reset(self) -> None:
        """Fresh executors, leaving a stuck export behind (the stall watchdog gave up on it)."""
        self._threads.shutdown(wait=False, cancel_futures=True)
        self._threads = ThreadPoolExecutor(2, thread_name_prefix="export")
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._executor = self._new_executor()

    def shutdown(self, wait: bool) -> None:
        """wait: let the (idle) processes exit cleanly; else leave an export still running to die with us."""
        self._threads.shutdown(wait=wait, cancel_futures=True)
        self._executor.shutdown(wait=wait, cancel_futures=True)
