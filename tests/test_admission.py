"""Admission once the service is stopping: a clean UNAVAILABLE, never an internal error."""
from __future__ import annotations

import grpc
import pytest

from services.common.errors import Unavailable
from services.generation.admission import Admission
from tests.images import disk_png


async def test_a_submission_after_admission_closed_is_unavailable_not_internal() -> None:
    admission = Admission(threads=1)
    loaded, _ = await admission.load(disk_png())
    assert loaded.rgba.shape[2] == 4
    admission.close()
    with pytest.raises(Unavailable, match="shutting down") as refusal:
        await admission.load(disk_png())
    assert refusal.value.code == grpc.StatusCode.UNAVAILABLE
