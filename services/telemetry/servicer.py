"""TelemetryService over gRPC: check the request, ask the model, convert."""
from __future__ import annotations

import grpc

from pb.orfeas.telemetry.v1 import telemetry_pb2 as tpb
from pb.orfeas.telemetry.v1 import telemetry_pb2_grpc
from services.common.errors import InvalidArgument
from services.telemetry import convert, validation
from services.telemetry.model import Telemetry
from services.telemetry.optimizer import HEADROOM

SERVICE_NAME = tpb.DESCRIPTOR.services_by_name["TelemetryService"].full_name


class TelemetryServicer(telemetry_pb2_grpc.TelemetryServiceServicer):
    def __init__(self, telemetry: Telemetry) -> None:
        self.telemetry = telemetry

    async def ReportProfile(
        self, request: tpb.ReportProfileRequest, context: grpc.aio.ServicerContext
    ) -> tpb.ReportProfileResponse:
        accepted, duplicates = self.telemetry.report_profiles(validation.profiles(request))
        return tpb.ReportProfileResponse(accepted=accepted, duplicates=duplicates)

    async def ReportDeviceSamples(
        self, request: tpb.ReportDeviceSamplesRequest, context: grpc.aio.ServicerContext
    ) -> tpb.ReportDeviceSamplesResponse:
        accepted, duplicates = self.telemetry.report_samples(validation.device_samples(request))
        return tpb.ReportDeviceSamplesResponse(accepted=accepted, duplicates=duplicates)

    async def GetPerformanceSummary(
        self, request: tpb.GetPerformanceSummaryRequest, context: grpc.aio.ServicerContext
    ) -> tpb.PerformanceSummary:
        backend = validation.backend("backend", request.backend, required=False)
        if request.window not in (tpb.WINDOW_UNSPECIFIED, tpb.WINDOW_ALL, tpb.WINDOW_RECENT):
            raise InvalidArgument("window", f"unknown window {request.window}")
        window_s = validation.window_seconds(request.window_seconds, self.telemetry.window_s)
        worker_id = validation.worker_id("worker_id", request.worker_id, required=False)
        backends = self.telemetry.backends()
        if request.window == tpb.WINDOW_RECENT:
            summary = self.telemetry.summary(backend, window_s, worker_id)
            return convert.summary(summary, backend, tpb.WINDOW_RECENT, window_s, backends, worker_id)
        summary = self.telemetry.summary(backend, None, worker_id)
        return convert.summary(summary, backend, tpb.WINDOW_ALL, 0.0, backends, worker_id)

    async def GetRecommendations(
        self, request: tpb.GetRecommendationsRequest, context: grpc.aio.ServicerContext
    ) -> tpb.GetRecommendationsResponse:
        backend = validation.backend("backend", request.backend, required=False)
        recs = self.telemetry.recommendations(backend)
        return tpb.GetRecommendationsResponse(recommendations=[convert.recommendation(r) for r in recs])

    async def GetDeviceStatus(
        self, request: tpb.GetDeviceStatusRequest, context: grpc.aio.ServicerContext
    ) -> tpb.DeviceStatus:
        worker_id = validation.worker_id("worker_id", request.worker_id, required=False)
        return convert.device_status(self.telemetry.device_status(worker_id))

    async def RecommendBatchSize(
        self, request: tpb.RecommendBatchSizeRequest, context: grpc.aio.ServicerContext
    ) -> tpb.BatchSizeDecision:
        optimizer = self.telemetry.optimizer
        decision = optimizer.recommend(validation.batch_request(request))
        return convert.decision(decision, optimizer.target_utilization)

    async def RecordBatchOutcome(
        self, request: tpb.RecordBatchOutcomeRequest, context: grpc.aio.ServicerContext
    ) -> tpb.RecordBatchOutcomeResponse:
        estimate = self.telemetry.optimizer.record_outcome(validation.batch_outcome(request))
        return tpb.RecordBatchOutcomeResponse(cost=convert.cost(estimate))

    async def GetOptimizerState(
        self, request: tpb.GetOptimizerStateRequest, context: grpc.aio.ServicerContext
    ) -> tpb.OptimizerState:
        backend = validation.backend("backend", request.backend, required=False)
        limit = validation.decisions_limit(request.decisions_limit)
        optimizer = self.telemetry.optimizer
        return tpb.OptimizerState(
            target_utilization=optimizer.target_utilization,
            headroom=HEADROOM,
            costs=[convert.cost(c) for c in optimizer.costs(backend)],
            decisions=[convert.decision_record(d) for d in optimizer.decisions(limit, backend)],
            total_decisions=optimizer.store.decision_count(backend),
        )
