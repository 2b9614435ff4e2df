"""Tiny random-weight Hunyuan3D-2 model folders and stacks that load them, for the hunyuan3d tests.

Each folder is written by the real hy3dgen classes (hunyuan3d_checkpoint) and
loaded by the service through hy3dgen's real loader; nothing is faked.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import grpc

from pb.orfeas.generation.v1 import generation_pb2 as pb
from pb.orfeas.generation.v1 import generation_pb2_grpc
from services.generation.backends.hunyuan3d_checkpoint import write_checkpoint, write_vae_checkpoint
from services.stack import Stack
from tests.conftest import new_stack

# The smallest settings the API accepts: a job takes about a second on this machine's CPU.
FAST = {"resolution": 64, "steps": 4, "face_count": 1000, "texture_size": 256}


# The turbo folders' volume decoders answer with trained-like logits (hunyuan3d_checkpoint: logit_scale), so
# FlashVDM refines a narrow band around the surface instead of the whole volume.
TURBO_LOGIT_SCALE = 30.0


def tiny_model(folder: Path, **options: Any) -> Path:
    return write_checkpoint(folder, "tiny", **options)


def tiny_turbo_model(folder: Path, **options: Any) -> Path:
    """A Hunyuan3D-2 Turbo folder: the consistency scheduler (100 PCM timesteps), guidance embedded."""
    return write_checkpoint(folder, "tiny-turbo", **{"logit_scale": TURBO_LOGIT_SCALE, **options})


def tiny_turbo_vae(folder: Path, **options: Any) -> Path:
    """A separate VAE folder like hunyuan3d-vae-v2-0-turbo, for HUNYUAN3D_VAE_PATH."""
    return write_vae_checkpoint(folder, "tiny-turbo", **{"logit_scale": TURBO_LOGIT_SCALE, **options})


def hunyuan_stack(tmp: Path, name: str, model_path: Path | str, *, with_telemetry: bool = True, **env: str) -> Stack:
    """A started stack whose generation service has HUNYUAN3D_MODEL_PATH set, once its backends settled."""
    stack = new_stack(tmp, name, HUNYUAN3D_MODEL_PATH=str(model_path), **env)
    if with_telemetry:
        stack.start_all()
    else:
        for part in ("generation", "gateway"):
            stack.start(part, wait=False)
        for part in ("generation", "gateway"):
            stack.wait_ready(part)
    wait_for_backends(stack)
    return stack


def list_backends(stack: Stack) -> dict[str, pb.Backend]:
    with grpc.insecure_channel(stack.generation_address) as channel:
        reply = generation_pb2_grpc.GenerationServiceStub(channel).ListBackends(pb.ListBackendsRequest(), timeout=5)
    return {b.name: b for b in reply.backends}


def wait_for_backends(stack: Stack, timeout_s: float = 60.0) -> dict[str, pb.Backend]:
    """The backends once none is loading any more (weights load on a thread after start-up)."""
    deadline = time.monotonic() + timeout_s
    while True:
        backends = list_backends(stack)
        if all(b.state != pb.BACKEND_STATE_LOADING for b in backends.values()):
            return backends
        if time.monotonic() > deadline:
            raise TimeoutError(f"backends still loading after {timeout_s:.0f}s: {backends}")
        time.sleep(0.1)
