"""Streams stay open through any wait: a minute in the queue, then a long quiet stage.

The slow stage comes from a test-only backend the test registers with the service
(GENERATION_BACKEND_PLUGINS=tests.slow_backend); the gateway keeps its default keep-alive.
"""
from __future__ import annotations

import json
import threading
import time

import grpc
import httpx
import websockets.sync.client

from pb.orfeas.generation.v1 import generation_pb2 as pb
from pb.orfeas.generation.v1 import generation_pb2_grpc
from tests.conftest import new_stack
from tests.images import disk_png

QUEUE_WAIT_S = 60
STAGE_S = 20


def test_sse_websocket_and_watch_outlast_a_minute_in_the_queue_and_a_long_quiet_stage(tmp_path):
    stack = new_stack(tmp_path, "long-streams", GENERATION_BACKEND_PLUGINS="tests.slow_backend")
    stack.start_all()
    channel = grpc.insecure_channel(stack.generation_address)
    stub = generation_pb2_grpc.GenerationServiceStub(channel)
    try:
        slow = dict(backend="slow", resolution=96, face_count=2000, texture=False)
        stub.SubmitGeneration(pb.GenerateRequest(image=disk_png(), steps=QUEUE_WAIT_S, **slow))
        stub.SubmitGeneration(pb.GenerateRequest(image=disk_png(), steps=1, **slow))  # takes the prepared slot
        job = stub.SubmitGeneration(pb.GenerateRequest(image=disk_png(), steps=STAGE_S, **slow))
        began = time.monotonic()
        results: dict[str, object] = {}

        def sse() -> None:
            names, keepalives = [], 0
            with httpx.Client(base_url=stack.gateway_url, timeout=None) as http:
                with http.stream("GET", f"/api/v1/generations/{job.id}/events") as response:
                    for line in response.iter_lines():
                        if line.startswith(": keep-alive"):
                            keepalives += 1
                        elif line.startswith("event:"):
                            names.append(line[6:].strip())
            results["sse"] = (names, keepalives)

        def websocket() -> None:
            url = stack.gateway_url.replace("http", "ws") + f"/api/v1/generations/{job.id}/ws"
            names = []
            with websockets.sync.client.connect(url, open_timeout=30) as ws:
                for message in ws:
                    names.append(json.loads(message)["event"])
            results["websocket"] = names

        def watch() -> None:
            events = list(stub.WatchGeneration(pb.WatchGenerationRequest(id=job.id)))
            results["watch"] = events

        threads = [threading.Thread(target=f) for f in (sse, websocket, watch)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(QUEUE_WAIT_S + STAGE_S + 120)
        took = time.monotonic() - began
        assert took >= QUEUE_WAIT_S + STAGE_S - 5, f"the job was meant to wait and run for minutes, took {took:.0f}s"

        names, keepalives = results["sse"]
        assert names[-1] == "succeeded", names
        assert keepalives >= (QUEUE_WAIT_S + STAGE_S) // 15 - 1, keepalives
        assert results["websocket"][-1] == "succeeded", results["websocket"]
        events = results["watch"]
        assert events[-1].kind == pb.EVENT_KIND_TERMINAL and events[-1].outcome.status == pb.JOB_STATUS_SUCCEEDED
        # The wait really was in the queue, then in one long quiet stage.
        shape = [e for e in events if e.stage == pb.STAGE_SHAPE_GENERATION and e.state == pb.STAGE_STATE_COMPLETED]
        assert shape and shape[0].elapsed_seconds >= STAGE_S
    finally:
        channel.close()
        stack.stop_all()
