"""Admission: a flat picture or a fully transparent one is refused naming the image; once the service is
stopping, a clean UNAVAILABLE, never an internal error."""
from __future__ import annotations

import grpc
import numpy as np
import pytest

from services.common.errors import InvalidArgument, Unavailable
from services.generation.admission import Admission
from tests.images import disk_png, encode


async def test_a_submission_after_admission_closed_is_unavailable_not_internal() -> None:
    admission = Admission(threads=1)
    loaded, _ = await admission.load(disk_png())
    assert loaded.rgba.shape[2] == 4
    admission.close()
    with pytest.raises(Unavailable, match="shutting down") as refusal:
        await admission.load(disk_png())
    assert refusal.value.code == grpc.StatusCode.UNAVAILABLE


async def test_a_flat_picture_is_refused_and_one_small_object_on_it_is_not() -> None:
    admission = Admission(threads=1)
    try:
        flat = np.full((512, 512, 3), (40, 90, 160), np.uint8)
        with pytest.raises(InvalidArgument, match="single flat colour") as refusal:
            await admission.load(encode(flat))
        assert refusal.value.code == grpc.StatusCode.INVALID_ARGUMENT and refusal.value.field == "image"
        # JPEG-like noise of a pixel value or so is still flat...
        noisy = (flat + np.random.default_rng(0).integers(0, 2, flat.shape, dtype=np.uint8)).astype(np.uint8)
        with pytest.raises(InvalidArgument, match="single flat colour"):
            await admission.load(encode(noisy))
        # ...a small object on it is a picture.
        dotted = flat.copy()
        dotted[200:260, 220:280] = (250, 250, 250)
        loaded, _ = await admission.load(encode(dotted))
        assert loaded.rgba.shape == (512, 512, 4)
        clear = np.zeros((64, 64, 4), np.uint8)
        with pytest.raises(InvalidArgument, match="fully transparent"):
            await admission.load(encode(clear))
    finally:
        admission.close()
