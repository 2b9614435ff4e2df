"""GenerationService over gRPC: thin methods that delegate to the JobManager."""
from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import AsyncIterator, Iterator

import grpc
import torch

from pb.orfeas.generation.v1 import generation_pb2 as pb
from pb.orfeas.generation.v1 import generation_pb2_grpc as pb_grpc
from services.common.errors import DataLoss, InvalidArgument
from services.generation import convert
from services.generation.admission import Admission
from services.generation.artifacts import ChecksumMismatch
from services.generation.backends.registry import BackendSet
from services.generation.jobs import JobManager

CHUNK_BYTES = 1024 * 1024
MAX_TIMEOUT_S = 86_400.0


class GenerationServicer(pb_grpc.GenerationServiceServicer):
    def __init__(self, manager: JobManager, admission: Admission, backends: BackendSet | None = None) -> None:
        self.manager = manager
        self.admission = admission
        # Without a set from start-up: inflate only (it runs wherever the worker does).
        self.backends = backends if backends is not None else BackendSet(torch.device("cpu"))

    async def ListBackends(
        self, request: pb.ListBackendsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListBackendsResponse:
        return pb.ListBackendsResponse(backends=[convert.backend_message(s) for s in self.backends.statuses()])

    async def GetServiceStatus(
        self, request: pb.GetServiceStatusRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServiceStatus:
        status = pb.ServiceStatus(
            accepting=self.manager.accepting,
            queue_length=self.manager.queue_length,
            running=self.manager.running_count,
        )
        if self.manager.storage is not None:
            storage = self.manager.storage.state()
            status.storage.CopyFrom(
                pb.StorageStatus(
                    free_bytes=storage.free_bytes,
                    reserve_bytes=storage.reserve_bytes,
                    ok=storage.ok,
                    message="" if storage.ok else storage.describe(),
                )
            )
        return status

    async def SubmitGeneration(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext) -> pb.Generation:
        record = await self._submit(request, call_deadline=None)
        return convert.generation_message(record, await self.manager.position(record))

    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerationEvent]:
        remaining = context.time_remaining()
        call_deadline = time.time() + remaining if remaining is not None else None
        record = await self._submit(request, call_deadline=call_deadline)
        ended = False
        try:
            async for event in self.manager.watch(record.id):
                yield event
            ended = True
        finally:
            # The client went away (the generator is cancelled or closed). The
            # job goes on, and can be watched again, unless the request asked
            # for it to end with the call. The cancel outlives this call, so the
            # manager owns it.
            if not ended and request.cancel_on_disconnect:
                self.manager.tasks.spawn(self.manager.cancel(record.id), f"cancel-on-disconnect-{record.id}")

    async def GetGeneration(self, request: pb.GetGenerationRequest, context: grpc.aio.ServicerContext) -> pb.Generation:
        record, position = await self.manager.get(request.id)
        return convert.generation_message(record, position)

    async def ListGenerations(
        self, request: pb.ListGenerationsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListGenerationsResponse:
        if request.status and request.status not in convert.STATUS_NAME:
            raise InvalidArgument("status", f"unknown status value {request.status}")
        status = convert.STATUS_NAME.get(request.status)
        records, token = await self.manager.list(request.page_size, request.page_token, status)
        positions = await self.manager.positions(records)
        return pb.ListGenerationsResponse(
            generations=[convert.generation_message(r, p) for r, p in zip(records, positions)],
            next_page_token=token,
        )

    async def CancelGeneration(
        self, request: pb.CancelGenerationRequest, context: grpc.aio.ServicerContext
    ) -> pb.Generation:
        record = await self.manager.cancel(request.id)
        return convert.generation_message(record, await self.manager.position(record))

    async def WatchGeneration(
        self, request: pb.WatchGenerationRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerationEvent]:
        async for event in self.manager.watch(request.id, after=request.after_sequence):
            yield event

    async def DownloadResult(
        self, request: pb.DownloadResultRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ResultChunk]:
        if request.format and request.format not in convert.FORMAT_NAME:
            raise InvalidArgument("format", f"unknown format value {request.format}")
        fmt, content_type, filename, digest = await self.manager.result_file(
            request.id, convert.FORMAT_NAME.get(request.format)
        )
        try:
            data = await asyncio.to_thread(self.manager.read_result, request.id, fmt, digest)
        except ChecksumMismatch as exc:
            raise DataLoss(f"the stored result is damaged ({exc}); generate it again") from None
        for chunk in _chunks(data, content_type, filename, digest):
            yield chunk

    async def DownloadCutout(
        self, request: pb.DownloadCutoutRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ResultChunk]:
        data = await self.manager.cutout_png(request.id)
        for chunk in _chunks(data, "image/png", f"{request.id}-cutout.png", hashlib.sha256(data).hexdigest()):
            yield chunk

    async def _submit(self, request: pb.GenerateRequest, call_deadline: float | None):  # -> JobRecord
        params = convert.params_from_request(request, self.backends.statuses())
        # A backend that cannot serve (no weights, broken weights) refuses here, naming why; one still
        # loading its weights takes the job, which waits in the queue until they are in.
        self.backends.require_ready(params.backend, loading_is_fine=True)
        timeout = request.timeout_seconds
        if timeout != timeout or not 0 <= timeout <= MAX_TIMEOUT_S:
            raise InvalidArgument("timeout_seconds", f"must be between 0 and {MAX_TIMEOUT_S:,.0f}, got {timeout}")
        deadlines = [d for d in (call_deadline, time.time() + timeout if timeout else None) if d is not None]
        loaded, loading_s = await self.admission.load(request.image)
        return await self.manager.submit(
            params,
            request.image,
            payload_sha256=_payload_sha256(request),
            loaded=loaded,
            loading_s=loading_s,
            request_id=request.request_id,
            deadline=min(deadlines) if deadlines else None,
            cancel_on_disconnect=request.cancel_on_disconnect,
        )


def _payload_sha256(request: pb.GenerateRequest) -> str:
    """What makes two requests the same request, for idempotency: everything but how it is followed."""
    content = pb.GenerateRequest()
    content.CopyFrom(request)
    content.ClearField("cancel_on_disconnect")
    content.ClearField("timeout_seconds")
    return hashlib.sha256(content.SerializeToString(deterministic=True)).hexdigest()


def _chunks(data: bytes, content_type: str, filename: str, digest: str) -> Iterator[pb.ResultChunk]:
    """A file in chunks of at most CHUNK_BYTES; the first one says what it is."""
    for offset in range(0, max(1, len(data)), CHUNK_BYTES):
        chunk = pb.ResultChunk(data=data[offset : offset + CHUNK_BYTES])
        if offset == 0:
            chunk.content_type = content_type
            chunk.filename = filename
            chunk.total_bytes = len(data)
            chunk.sha256 = digest
        yield chunk
