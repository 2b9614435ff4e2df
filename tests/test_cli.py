"""The `orfeas` command-line client, run as a user would."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import trimesh

from tests.images import disk_png

ORFEAS = str(Path(sys.executable).parent / "orfeas")


def run_cli(stack, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([ORFEAS, "--url", stack.gateway_url, *args], capture_output=True, text=True, timeout=120)


def test_generate_writes_a_mesh_and_shows_progress(stack, tmp_path):
    image = tmp_path / "disk.png"
    image.write_bytes(disk_png())
    out = tmp_path / "model.glb"
    result = run_cli(stack, "generate", str(image), "-o", str(out), "--resolution", "96", "--face-count", "4000",
                     "--texture-size", "256")
    assert result.returncode == 0, result.stderr
    assert "shape_generation" in result.stderr and "watertight=True" in result.stderr
    mesh = trimesh.load(out, force="mesh")
    assert len(mesh.faces) > 100


def test_format_follows_the_suffix(stack, tmp_path):
    image = tmp_path / "disk.png"
    image.write_bytes(disk_png())
    out = tmp_path / "model.stl"
    result = run_cli(stack, "generate", str(image), "-o", str(out), "--resolution", "96", "--quiet")
    assert result.returncode == 0, result.stderr
    assert trimesh.load(out).is_watertight


def test_exits_non_zero_on_refusal_and_failure(stack, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a picture")
    result = run_cli(stack, "generate", str(bad), "-o", str(tmp_path / "x.glb"))
    assert result.returncode == 2 and "image:" in result.stderr
    result = run_cli(stack, "generate", str(tmp_path / "missing.png"), "-o", str(tmp_path / "x.glb"))
    assert result.returncode == 2
    unreachable = subprocess.run([ORFEAS, "--url", "http://127.0.0.1:9", "list"], capture_output=True, text=True)
    assert unreachable.returncode == 3
