"""What the model saw: the cut-out of a succeeded job, as a PNG the size of the input picture whose alpha is
the mask image_preprocessing chose (gRPC DownloadCutout and REST GET .../cutout)."""
from __future__ import annotations

import io

import grpc
import numpy as np
import pytest
from PIL import Image

from pb.orfeas.generation.v1 import generation_pb2 as pb
from tests.images import encode, photo, photo_png

FAST = dict(resolution=96, steps=20, face_count=2000, texture_size=256)


def generate(stub, image: bytes) -> str:
    end = list(stub.Generate(pb.GenerateRequest(image=image, **FAST), timeout=120))[-1]
    assert end.outcome.status == pb.JOB_STATUS_SUCCEEDED, end.outcome.error
    return end.generation_id


def cutout(stub, job_id: str) -> Image.Image:
    chunks = list(stub.DownloadCutout(pb.DownloadCutoutRequest(id=job_id), timeout=60))
    assert chunks[0].content_type == "image/png" and chunks[0].filename == f"{job_id}-cutout.png"
    data = b"".join(c.data for c in chunks)
    assert len(data) == chunks[0].total_bytes
    return Image.open(io.BytesIO(data))


def test_an_rgba_picture_gives_back_its_own_alpha(generation_stub) -> None:
    # A photo with an alpha channel that keeps an ellipse of it: the mask comes from the alpha.
    ys, xs = np.mgrid[:300, :300]
    inside = ((xs - 150) / 110) ** 2 + ((ys - 160) / 90) ** 2 < 1
    logo = np.dstack([photo("astronaut", 300)[..., :3], np.where(inside, 255, 0).astype(np.uint8)])
    image = cutout(generation_stub, generate(generation_stub, encode(logo, "PNG")))
    assert image.mode == "RGBA" and image.size == (300, 300)
    alpha = np.asarray(image)[..., 3] > 127
    assert alpha.mean() == pytest.approx((logo[..., 3] > 127).mean(), abs=0.02)
    # The colours are the picture's own where the object is.
    rgb = np.asarray(image)[..., :3].astype(int)
    assert np.abs(rgb[alpha] - logo[..., :3][alpha]).mean() < 2


def test_a_photo_shows_the_mask_the_model_was_given(generation_stub) -> None:
    image = cutout(generation_stub, generate(generation_stub, photo_png("astronaut", 320)))
    assert image.size == (320, 320)
    alpha = np.asarray(image)[..., 3]
    assert set(np.unique(alpha)) <= {0, 255}
    assert 0.1 < (alpha > 0).mean() < 0.9  # the astronaut, not the whole frame nor nothing


def test_no_cutout_before_a_job_succeeds_and_none_for_an_unknown_job(generation_stub) -> None:
    queued = generation_stub.SubmitGeneration(
        pb.GenerateRequest(image=photo_png("astronaut", 256), resolution=1024, steps=500, texture=False)
    )
    with pytest.raises(grpc.RpcError) as err:
        list(generation_stub.DownloadCutout(pb.DownloadCutoutRequest(id=queued.id), timeout=30))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    generation_stub.CancelGeneration(pb.CancelGenerationRequest(id=queued.id))
    with pytest.raises(grpc.RpcError) as err:
        list(generation_stub.DownloadCutout(pb.DownloadCutoutRequest(id="0123456789abcdef"), timeout=30))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_rest_serves_the_cutout_as_a_png(generation_stub, http) -> None:
    job_id = generate(generation_stub, photo_png("coffee", 256))
    response = http.get(f"/api/v1/generations/{job_id}/cutout")
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    assert f"{job_id}-cutout.png" in response.headers["content-disposition"]
    image = Image.open(io.BytesIO(response.content))
    assert image.mode == "RGBA" and image.size == (256, 256)
    missing = http.get("/api/v1/generations/0123456789abcdef/cutout")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "NOT_FOUND"
