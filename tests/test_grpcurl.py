"""What an operator does with grpcurl: list, describe, call Generate. Uses the real binary."""
from __future__ import annotations

import base64
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.images import disk_png

GRPCURL = shutil.which("grpcurl") or str(Path(sys.executable).parent / "grpcurl")


def grpcurl(*args: str, stdin: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([GRPCURL, "-plaintext", *args], input=stdin, capture_output=True, text=True, timeout=120)
    if check:
        assert result.returncode == 0, result.stderr
    return result


def test_list_shows_the_service_health_and_reflection(stack):
    services = grpcurl(stack.generation_address, "list").stdout.split()
    assert "orfeas.generation.v1.GenerationService" in services
    assert "grpc.health.v1.Health" in services
    methods = grpcurl(stack.generation_address, "list", "orfeas.generation.v1.GenerationService").stdout
    for method in ("Generate", "SubmitGeneration", "GetGeneration", "ListGenerations", "CancelGeneration",
                   "WatchGeneration", "DownloadResult"):
        assert f"orfeas.generation.v1.GenerationService.{method}" in methods


def test_describe_documents_the_ranges(stack):
    described = grpcurl(stack.generation_address, "describe", "orfeas.generation.v1.GenerateRequest").stdout
    assert "resolution" in described and "face_count" in described


def test_generate_from_grpcurl(stack):
    request = json.dumps({"image": base64.b64encode(disk_png()).decode(), "resolution": 96, "faceCount": 4000,
                          "textureSize": 256, "format": "MESH_FORMAT_STL"})
    out = grpcurl("-d", "@", stack.generation_address, "orfeas.generation.v1.GenerationService/Generate",
                  stdin=request).stdout
    events = [json.loads(chunk) for chunk in _json_objects(out)]
    assert events[-1]["kind"] == "EVENT_KIND_TERMINAL"
    assert events[-1]["outcome"]["status"] == "JOB_STATUS_SUCCEEDED"
    assert events[-1]["outcome"]["result"]["watertight"] is True


def test_grpcurl_sees_invalid_argument(stack):
    request = json.dumps({"image": base64.b64encode(disk_png()).decode(), "resolution": 5})
    result = grpcurl("-d", "@", stack.generation_address, "orfeas.generation.v1.GenerationService/SubmitGeneration",
                     stdin=request, check=False)
    assert result.returncode != 0
    assert "InvalidArgument" in result.stderr and "resolution:" in result.stderr


def test_health_check_from_grpcurl(stack):
    out = grpcurl("-d", '{"service": "orfeas.generation.v1.GenerationService"}', stack.generation_address,
                  "grpc.health.v1.Health/Check").stdout
    assert json.loads(out)["status"] == "SERVING"


def _json_objects(text: str) -> list[str]:
    """grpcurl prints one pretty JSON object per message, back to back."""
    objects, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "{":
            if depth == 0:
                start = i
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                objects.append(text[start : i + 1])
    return objects


if not Path(GRPCURL).exists():  # pragma: no cover - make install always provides it
    pytest.exit("grpcurl binary missing: run make install", returncode=1)
