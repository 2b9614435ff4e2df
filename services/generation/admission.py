"""Admission: what a picture must pass before a job is accepted.

image_loading runs here, synchronously with the submit call, so that a
picture that is not a picture, is too big, or has nothing in it is answered
with INVALID_ARGUMENT at once instead of becoming a failed job later. The
decoded picture is handed to the queue, so it is never decoded twice.
"""
from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np

from services.common.errors import InvalidArgument, Unavailable
from services.generation.pipeline.image_loading import load_image
from services.generation.pipeline.params import MAX_IMAGE_BYTES
from services.generation.pipeline.records import LoadedImage

# Below this spread of colour values (0-255) a picture is one flat colour.
FLAT_COLOUR_STD = 1.0


class Admission:
    def __init__(self, threads: int = 2) -> None:
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="admission")
        self._closed = False

    async def load(self, data: bytes) -> tuple[LoadedImage, float]:
        """Decode and check the picture; return it with the seconds image_loading took."""
        if not data:
            raise InvalidArgument("image", "is required (the encoded picture's bytes)")
        if len(data) > MAX_IMAGE_BYTES:
            raise InvalidArgument(
                "image", f"is {len(data):,} bytes, over the limit of {MAX_IMAGE_BYTES:,} bytes (20 MiB)"
            )
        started = time.perf_counter()
        if self._closed:
            # The server still answers calls for its grace period after this closed; a submission then is
            # refused like one reaching a stopped manager, and the client retries on the next instance.
            raise Unavailable("the generation service is shutting down; retry shortly")
        loaded = await asyncio.get_running_loop().run_in_executor(self._pool, _load_and_check, data)
        return loaded, time.perf_counter() - started

    def close(self) -> None:
        self._closed = True
        self._pool.shutdown(wait=False, cancel_futures=True)


def _load_and_check(data: bytes) -> LoadedImage:
    loaded = load_image(data)
    rgba = loaded.rgba
    step = max(1, max(rgba.shape[:2]) // 256)
    thumb = rgba[::step, ::step]
    if loaded.has_alpha and int(thumb[..., 3].max()) == 0:
        raise InvalidArgument("image", "is fully transparent: there is nothing to reconstruct")
    if not loaded.has_alpha:
        # OpenCV's one pass in C: numpy's float copy and std of the thumbnail cost several ms here.
        _mean, spread = cv2.meanStdDev(np.ascontiguousarray(thumb[..., :3]))
        if float(spread.max()) < FLAT_COLOUR_STD:
            raise InvalidArgument("image", "is a single flat colour: no foreground found to reconstruct")
    return loaded
