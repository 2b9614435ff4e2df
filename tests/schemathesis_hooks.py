"""Schemathesis hooks for tests/test_schemathesis.py (loaded through tests/schemathesis.toml).

Two rules of the submission live in its description, not in its schema,
because JSON Schema cannot state them:

- the picture must decode: PNG, JPEG, WebP, BMP, TIFF or GIF, 8 to 8192
  pixels a side, at most 40 megapixels. Schemathesis sends bytes that are
  not one, or its 1x1 sample image;
- `request_id` in the body and the Idempotency-Key header name the same key,
  so they may not differ.

So for a submission schemathesis means to be valid:

- a JSON one gets a real picture, and follows the job life-cycle from there;
- the header is made equal to request_id;
- a multipart one keeps the file schemathesis made (schemathesis re-judges a
  body a hook edits, and judges any multipart body holding a file as
  invalid), and its refusal is dropped only when the server names the
  picture (`image: ...`) and the file is indeed not a picture the document
  allows. Any other refusal of a schema-valid submission stays a failure.

Negative cases are sent as generated.
"""
from __future__ import annotations

import base64
import binascii
import io
from functools import cache
from typing import Any

import schemathesis
from PIL import Image

from tests.images import disk_png

SUBMIT = ("POST", "/api/v1/generations")
IDEMPOTENCY_KEY = "idempotency-key"
# What the document allows (GenerationFormRequest.image): formats as Pillow names them, sides, pixels.
FORMATS = {"PNG", "JPEG", "WEBP", "BMP", "TIFF", "GIF"}
MIN_SIDE, MAX_SIDE, MAX_PIXELS = 8, 8192, 40_000_000
SCHEMA_VALID_REQUEST_REJECTED = "ST202"


@cache
def _picture() -> bytes:
    return disk_png(64)


def _submission(case: Any) -> bool:
    return (case.method.upper(), case.path) == SUBMIT and isinstance(case.body, dict)


def _positive(case: Any) -> bool:
    return case.meta is not None and case.meta.generation.mode.is_positive


@schemathesis.hook
def map_case(context: Any, case: Any) -> Any:
    if _submission(case) and _positive(case) and "image_base64" in case.body:
        case.body["image_base64"] = base64.b64encode(_picture()).decode()
    return case


@schemathesis.hook
def before_call(context: Any, case: Any, kwargs: dict[str, Any]) -> None:
    # Right before sending: the stateful phase fills headers in after generation.
    if not _submission(case) or not _positive(case) or case.headers is None or "request_id" not in case.body:
        return
    key = next((name for name in case.headers if name.lower() == IDEMPOTENCY_KEY), None)
    if key is None:
        return
    request_id = case.body["request_id"]
    if isinstance(request_id, str):
        case.headers[key] = request_id
    else:
        # The stateful phase refills request_id from earlier answers, a job's null included, which a form sends
        # as the text "null": no header can be made to agree with that, so the case goes without one.
        del case.headers[key]


@schemathesis.hook
def filter_failure(context: Any, failure: Any, case: Any, response: Any) -> bool:
    """False (drop) only for a schema-valid submission refused for a file that is not an allowed picture."""
    if getattr(failure, "code", None) != SCHEMA_VALID_REQUEST_REJECTED or not _submission(case):
        return True
    if response.status_code != 400 or not _error_message(response).startswith("image:"):
        return True
    return _allowed_picture(_sent_picture(case.body))


def _error_message(response: Any) -> str:
    try:
        return str(response.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return ""


def _sent_picture(body: dict[str, Any]) -> bytes:
    image = body.get("image")
    if image is not None:
        data = getattr(image, "data", image)  # schemathesis carries a file part as a Binary wrapping the bytes
        return data if isinstance(data, bytes) else str(data).encode()
    try:
        return base64.b64decode(str(body.get("image_base64", "")), validate=True)
    except (binascii.Error, ValueError):
        return b""


def _allowed_picture(data: bytes) -> bool:
    try:
        with Image.open(io.BytesIO(data)) as picture:
            picture.load()
            width, height = picture.size
            kind = picture.format
    except Exception:  # noqa: BLE001 - whatever Pillow cannot read is not a picture
        return False
    return kind in FORMATS and MIN_SIDE <= min(width, height) and max(width, height) <= MAX_SIDE and (
        width * height <= MAX_PIXELS
    )
