"""`orfeas`: the command-line client of the REST gateway.

    orfeas generate photo.jpg -o model.glb [--format glb|obj|stl|ply] [--backend inflate|hunyuan3d] [options]
    orfeas status ID
    orfeas list
    orfeas backends

It posts the picture, follows the job's Server-Sent Events with a progress
bar across the five stages, downloads the result, and exits non-zero when the
job fails (1), the request is refused (2) or the gateway cannot be reached (3).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

EXIT_FAILED, EXIT_REFUSED, EXIT_UNREACHABLE = 1, 2, 3


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="orfeas", description="ORFEAS 2D→3D command-line client")
    parser.add_argument(
        "--url",
        default=os.environ.get("ORFEAS_URL", f"http://127.0.0.1:{os.environ.get('GATEWAY_PORT', '5000')}"),
        help="the gateway (default: $ORFEAS_URL or http://127.0.0.1:5000)",
    )
    parser.add_argument("--token", default=os.environ.get("ORFEAS_TOKEN"), help="bearer token, if the gateway has one")
    commands = parser.add_subparsers(dest="command", required=True)

    gen = commands.add_parser("generate", help="turn a picture into a 3D model")
    gen.add_argument("image", type=Path)
    gen.add_argument("-o", "--output", type=Path, required=True, help="where to write the model")
    gen.add_argument("--format", choices=("glb", "obj", "stl", "ply"), help="default: from the output's suffix, else glb")
    gen.add_argument("--backend", choices=("inflate", "hunyuan3d"), help="shape backend (default: inflate)")
    gen.add_argument("--resolution", type=int, help="inflate: grid cells a side; hunyuan3d: octree resolution")
    gen.add_argument("--steps", type=int, help="inflate: solver iterations; hunyuan3d: denoising steps")
    gen.add_argument("--guidance-scale", type=float, help="hunyuan3d: classifier-free guidance (0-20, default 5)")
    gen.add_argument("--face-count", type=int)
    gen.add_argument("--texture-size", type=int)
    gen.add_argument("--no-texture", action="store_true", help="vertex colours only")
    gen.add_argument("--remove-background", choices=("auto", "on", "off"))
    gen.add_argument("--foreground-ratio", type=float)
    gen.add_argument("--seed", type=int)
    gen.add_argument("--timeout", type=float, help="seconds the job may take")
    gen.add_argument("--quiet", action="store_true", help="no progress bar")

    status = commands.add_parser("status", help="show a job")
    status.add_argument("id")
    commands.add_parser("list", help="list recent jobs")
    commands.add_parser("backends", help="list the shape backends, whether each is ready, and their parameters")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    headers = {"Authorization": f"Bearer {args.token}"} if args.token else {}
    try:
        with httpx.Client(base_url=args.url, headers=headers, timeout=httpx.Timeout(30.0, read=None)) as client:
            if args.command == "generate":
                return _generate(client, args)
            if args.command == "status":
                return _print(client.get(f"/api/v1/generations/{args.id}"))
            if args.command == "backends":
                return _print(client.get("/api/v1/backends"))
            return _print(client.get("/api/v1/generations"))
    except httpx.TransportError as exc:
        print(f"orfeas: cannot reach {args.url}: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE


def _print(response: httpx.Response) -> int:
    print(json.dumps(response.json(), indent=2))
    return 0 if response.is_success else EXIT_REFUSED


def _generate(client: httpx.Client, args: argparse.Namespace) -> int:
    if not args.image.is_file():
        print(f"orfeas: {args.image}: no such file", file=sys.stderr)
        return EXIT_REFUSED
    fmt = args.format or _format_from_suffix(args.output) or "glb"
    fields: dict[str, Any] = {
        "format": fmt,
        "backend": args.backend,
        "guidance_scale": args.guidance_scale,
        "resolution": args.resolution,
        "steps": args.steps,
        "face_count": args.face_count,
        "texture_size": args.texture_size,
        "texture": "false" if args.no_texture else None,
        "remove_background": args.remove_background,
        "foreground_ratio": args.foreground_ratio,
        "seed": args.seed,
        "timeout_seconds": args.timeout,
    }
    data = {k: str(v) for k, v in fields.items() if v is not None}
    with args.image.open("rb") as f:
        response = client.post("/api/v1/generations", files={"image": (args.image.name, f)}, data=data)
    if response.status_code != 202:
        print(f"orfeas: refused: {_error_message(response)}", file=sys.stderr)
        return EXIT_REFUSED
    job_id = response.json()["id"]
    bar = ProgressBar(enabled=not args.quiet)
    outcome: dict[str, Any] = {}
    for name, event in _events(client, job_id):
        if name == "stage":
            bar.update(event)
        elif name == "queued":
            bar.queued(event.get("queue_position", 0))
        elif name in ("succeeded", "failed", "cancelled"):
            outcome = {"status": name, **event}
            break
    bar.close()
    if outcome.get("status") != "succeeded":
        error = outcome.get("error") or {}
        print(
            f"orfeas: generation {job_id} {outcome.get('status', 'ended')}: "
            f"{error.get('code', '')} {error.get('message', '')}".rstrip(),
            file=sys.stderr,
        )
        return EXIT_FAILED
    with client.stream("GET", f"/api/v1/generations/{job_id}/result", params={"format": fmt}) as download:
        if download.status_code != 200:
            download.read()
            print(f"orfeas: download failed: {_error_message(download)}", file=sys.stderr)
            return EXIT_FAILED
        args.output.parent.mkdir(parents=True, exist_ok=True)
        with args.output.open("wb") as out:
            for chunk in download.iter_bytes():
                out.write(chunk)
    stats = outcome.get("result") or {}
    print(
        f"{args.output}: {stats.get('vertices', '?')} vertices, {stats.get('faces', '?')} faces, "
        f"watertight={stats.get('watertight')}, job {job_id}",
        file=sys.stderr,
    )
    return 0


def _events(client: httpx.Client, job_id: str) -> Iterator[tuple[str, dict[str, Any]]]:
    with client.stream("GET", f"/api/v1/generations/{job_id}/events") as response:
        name, data = "message", []
        for line in response.iter_lines():
            if line.startswith("event:"):
                name = line[6:].strip()
            elif line.startswith("data:"):
                data.append(line[5:].strip())
            elif line == "" and data:
                yield name, json.loads("\n".join(data))
                name, data = "message", []


def _format_from_suffix(path: Path) -> str | None:
    suffix = path.suffix.lower().lstrip(".")
    return {"zip": "obj"}.get(suffix, suffix) if suffix in ("glb", "obj", "stl", "ply", "zip") else None


def _error_message(response: httpx.Response) -> str:
    try:
        error = response.json()["error"]
        return f"{response.status_code} {error['code']}: {error['message']}"
    except (ValueError, KeyError, TypeError):
        return f"{response.status_code} {response.text[:200]}"


class ProgressBar:
    """One line on stderr: the stage, a bar over the whole pipeline, and stage times as they complete."""

    WIDTH = 30

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.done: list[str] = []

    def queued(self, position: int) -> None:
        self._draw(0.0, f"queued (position {position})")

    def update(self, event: dict[str, Any]) -> None:
        stage = event.get("stage") or ""
        if event.get("state") == "completed":
            self.done.append(f"{stage} {event.get('elapsed_seconds', 0):.2f}s")
            if self.enabled:
                sys.stderr.write(f"\r\033[K  ✓ {self.done[-1]}\n")
        # The step within the stage when the backend says ("denoising step 3 of 30").
        detail = event.get("detail") if event.get("state") == "progress" else None
        self._draw(float(event.get("progress", 0.0)), f"{stage}: {detail}" if detail else stage)

    def _draw(self, progress: float, label: str) -> None:
        if not self.enabled:
            return
        filled = int(self.WIDTH * progress)
        sys.stderr.write(f"\r\033[K[{'#' * filled}{'.' * (self.WIDTH - filled)}] {progress:4.0%} {label}")
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()


if __name__ == "__main__":
    sys.exit(main())
