"""Faults of the machine, not of the job: the job is run again.

A bad picture fails at once: running it again gives the same answer. An
export process killed by the OOM killer, a disk that was full for a moment,
an out-of-memory that splitting the batch could not avoid, a stage that
stalled: these say nothing about the job, so it goes back to the queue (with
the attempt counted) and fails, with the fault's own code, only when
GENERATION_MAX_ATTEMPTS runs out.
"""
from __future__ import annotations

import errno

import grpc

from services.generation.job_store import StoreUnavailable


class InfrastructureFault(Exception):
    """Raise one of the subclasses; `code` is the job's error code once attempts run out."""

    code = "infrastructure"
    status = grpc.StatusCode.UNAVAILABLE

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ExportProcessDied(InfrastructureFault):
    code = "export_process_died"


class StorageFull(InfrastructureFault):
    code = "storage_full"
    status = grpc.StatusCode.RESOURCE_EXHAUSTED


class OutOfMemory(InfrastructureFault):
    code = "out_of_memory"
    status = grpc.StatusCode.RESOURCE_EXHAUSTED


class Stalled(InfrastructureFault):
    code = "stalled"
    status = grpc.StatusCode.DEADLINE_EXCEEDED


def as_fault(exc: BaseException) -> InfrastructureFault | None:
    """The infrastructure fault an exception stands for, or None when it is the job's own."""
    if isinstance(exc, InfrastructureFault):
        return exc
    if isinstance(exc, StoreUnavailable) and exc.disk_full:
        return StorageFull(exc.message)
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return StorageFull("storage: the disk under DATA_DIR filled up while the job wrote its files")
    return None
