"""A labelled set for the automatic cut-out: objects with known masks composited on real photos.

Every case is made offline and deterministically from scikit-image's bundled pictures (the
backgrounds, the horse silhouette, the logo) and from solids rendered here with simple shading (a
sphere, a box, a can, a vase, a bottle, a cone, a mug). The pictures have 512 pixels on the long side,
like the latency benchmark's photo. Edges are anti-aliased (rendered at 3x and box-filtered); the
true mask is where the object covers at least half a pixel. Some cases touch the frame's edge, some
cast a soft shadow, some are JPEG-compressed, some sit on a blurred (out of focus) background. Where the
photo has a subject of its own (the astronaut, the coffee cup), the object stands in front of it, and
the label is the object alone: the astronaut's suit or the saucer around it count as background.

    .venv/bin/python -m bench.cutout_set /tmp/cutouts   # writes every case as PNG (picture | mask) to look at
"""
from __future__ import annotations

import io
import sys
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageDraw, ImageFilter
from skimage import data as samples

# Long side of every picture in the set.
LONG_SIDE = 512
# Supersampling factor of the object renderer: the anti-aliased edge a camera records.
SUPERSAMPLE = 3
# Unit vector toward the light, shared by every rendered solid (up-left, in front).
LIGHT = (np.array([-0.45, -0.55, 0.70]) / np.linalg.norm([-0.45, -0.55, 0.70])).astype(np.float32)
# The Blinn half vector between the light and the viewer (+z).
HALF = ((LIGHT + [0, 0, 1]) / np.linalg.norm(LIGHT + [0, 0, 1])).astype(np.float32)


@dataclass(frozen=True)
class CutoutCase:
    name: str
    rgb: np.ndarray  # (H, W, 3) uint8, the composited picture
    mask: np.ndarray  # (H, W) bool, the object's true pixels
    touches_edge: bool  # the object runs off the frame


@dataclass(frozen=True)
class Layer:
    """An object rendered at SUPERSAMPLE times the picture's size."""

    colour: np.ndarray  # (h, w, 3) float32 in 0..1
    coverage: np.ndarray  # (h, w) bool


# ------------------------------------------------------------------------------------------ backgrounds
def _fit_long_side(rgb: np.ndarray, aspect: float | None = None) -> np.ndarray:
    """Resize so the long side is LONG_SIDE; with `aspect` (width / height), centre-crop to it first."""
    height, width = rgb.shape[:2]
    if aspect is not None:
        if width / height > aspect:
            keep = round(height * aspect)
            rgb = rgb[:, (width - keep) // 2 : (width - keep) // 2 + keep]
        else:
            keep = round(width / aspect)
            rgb = rgb[(height - keep) // 2 : (height - keep) // 2 + keep]
        height, width = rgb.shape[:2]
    scale = LONG_SIDE / max(height, width)
    size = (round(width * scale), round(height * scale))
    return np.asarray(Image.fromarray(rgb).resize(size, Image.Resampling.LANCZOS))


def _tinted(grey: np.ndarray, low: tuple[int, int, int], high: tuple[int, int, int]) -> np.ndarray:
    """A grey picture mapped onto a colour ramp: brick, grass and gravel are grey in scikit-image."""
    t = grey.astype(np.float32)[..., None] / 255.0
    rgb = np.array(low, np.float32) * (1 - t) + np.array(high, np.float32) * t
    return np.clip(rgb, 0, 255).astype(np.uint8)


@cache
def background(name: str) -> np.ndarray:
    """(H, W, 3) uint8 with LONG_SIDE on the long side."""
    makers: dict[str, Callable[[], np.ndarray]] = {
        "astronaut": samples.astronaut,
        "coffee": samples.coffee,
        "chelsea": samples.chelsea,
        "rocket": samples.rocket,
        "brick": lambda: _tinted(samples.brick(), (70, 30, 20), (235, 150, 120)),
        "grass": lambda: _tinted(samples.grass(), (20, 45, 10), (170, 215, 110)),
        "gravel": lambda: _tinted(samples.gravel(), (40, 36, 30), (225, 215, 195)),
        "camera": lambda: np.stack([samples.camera()] * 3, -1),
        "clock": lambda: np.stack([samples.clock()] * 3, -1),
        "moon": lambda: _tinted(samples.moon(), (10, 10, 25), (250, 245, 225)),
        "hubble": lambda: samples.hubble_deep_field()[200:712, 300:812],
        "ihc": samples.immunohistochemistry,
        "coins": lambda: _tinted(samples.coins(), (30, 25, 20), (230, 215, 180)),
        "page": lambda: _tinted(samples.page(), (60, 55, 50), (245, 240, 225)),
    }
    return _fit_long_side(makers[name]())


# ---------------------------------------------------------------------------------------------- solids
def _grid(shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (ys, xs) at the supersampled size, in picture pixels."""
    h, w = shape[0] * SUPERSAMPLE, shape[1] * SUPERSAMPLE
    ys = (np.arange(h, dtype=np.float32) + 0.5) / SUPERSAMPLE
    xs = (np.arange(w, dtype=np.float32) + 0.5) / SUPERSAMPLE
    return ys[:, None], xs[None, :]


def _shade(normal: np.ndarray, albedo: np.ndarray, shine: float = 0.35) -> np.ndarray:
    """Lambert with an ambient term, plus a Blinn highlight: (..., 3) normals -> (..., 3) colour."""
    normal = np.asarray(normal, np.float32)
    diffuse = np.clip(normal @ LIGHT, 0, 1)[..., None]
    highlight = np.clip(normal @ HALF, 0, 1)[..., None] ** 40
    return np.clip(albedo * (0.28 + 0.72 * diffuse) + shine * highlight, 0, 1).astype(np.float32)


def sphere(shape: tuple[int, int], centre: tuple[float, float], radius: float, albedo: tuple[float, ...]) -> Layer:
    ys, xs = _grid(shape)
    dx, dy = (xs - centre[0]) / radius, (ys - centre[1]) / radius
    r2 = dx * dx + dy * dy
    inside = r2 < 1.0
    normal = np.stack(np.broadcast_arrays(dx, dy, np.sqrt(np.clip(1 - r2, 0, 1))), -1)
    return Layer(_shade(normal, np.array(albedo, np.float32)), inside)


def _solid_of_revolution(
    shape: tuple[int, int], axis_x: float, top: float, bottom: float, profile: Callable[[np.ndarray], np.ndarray],
    albedo: np.ndarray | Callable[[np.ndarray, np.ndarray], np.ndarray], tilt: float = 0.12,
) -> Layer:
    """A body of revolution about a vertical axis, seen slightly from above: its half-width at each
    height is profile(t), t from 0 (top) to 1 (bottom); the top and bottom are ellipses."""
    ys, xs = _grid(shape)
    t = np.clip((ys - top) / (bottom - top), 0, 1)
    half = profile(t)
    u = (xs - axis_x) / np.maximum(half, 1e-3)
    side = (ys >= top) & (ys <= bottom) & (np.abs(u) < 1)
    top_half, bottom_half = float(profile(np.array(0.0))), float(profile(np.array(1.0)))
    top_cap = ((xs - axis_x) / top_half) ** 2 + ((ys - top) / (tilt * top_half)) ** 2 < 1
    bottom_cap = ((xs - axis_x) / bottom_half) ** 2 + ((ys - bottom) / (tilt * bottom_half)) ** 2 < 1
    inside = side | top_cap | bottom_cap
    u = np.clip(np.broadcast_to(u, inside.shape), -1, 1)
    normal = np.stack([u, np.full_like(u, -0.1), np.sqrt(1 - u * u)], -1)
    colour_albedo = albedo(np.broadcast_to(t, inside.shape), u) if callable(albedo) else albedo
    colour = _shade(normal, colour_albedo)
    lid = top_cap & ~(ys > top)
    colour[lid] = _shade(np.array([0.0, -0.95, 0.3]), np.asarray(albedo(np.array(0.0), np.array(0.0)) if callable(
        albedo) else albedo, np.float32)) * 1.1
    return Layer(np.clip(colour, 0, 1), inside)


def can(shape: tuple[int, int], axis_x: float, top: float, bottom: float, radius: float,
        body: tuple[float, ...], band: tuple[float, ...]) -> Layer:
    def albedo(t: np.ndarray, u: np.ndarray) -> np.ndarray:
        in_band = ((t > 0.3) & (t < 0.7))[..., None]
        return np.where(in_band, np.array(band, np.float32), np.array(body, np.float32))

    return _solid_of_revolution(shape, axis_x, top, bottom, lambda t: np.full_like(t, radius, dtype=np.float32), albedo)


def vase(shape: tuple[int, int], axis_x: float, top: float, bottom: float, width: float,
         albedo: tuple[float, ...]) -> Layer:
    def profile(t: np.ndarray) -> np.ndarray:
        return (width * (0.42 + 0.55 * np.sin(np.pi * (0.15 + 0.8 * t)) ** 2 - 0.12 * t)).astype(np.float32)

    return _solid_of_revolution(shape, axis_x, top, bottom, profile, np.array(albedo, np.float32))


def bottle(shape: tuple[int, int], axis_x: float, top: float, bottom: float, width: float,
           albedo: tuple[float, ...]) -> Layer:
    def profile(t: np.ndarray) -> np.ndarray:
        shoulder = np.clip((t - 0.18) / 0.17, 0, 1)
        return (width * (0.28 + 0.72 * (3 * shoulder**2 - 2 * shoulder**3))).astype(np.float32)

    return _solid_of_revolution(shape, axis_x, top, bottom, profile, np.array(albedo, np.float32), tilt=0.08)


def cone(shape: tuple[int, int], axis_x: float, top: float, bottom: float, width: float,
         albedo: tuple[float, ...]) -> Layer:
    return _solid_of_revolution(
        shape, axis_x, top, bottom, lambda t: (width * (0.02 + 0.98 * t)).astype(np.float32),
        np.array(albedo, np.float32),
    )


def box(shape: tuple[int, int], centre: tuple[float, float], size: float, albedo: tuple[float, ...],
        turn: float = 0.6, pitch: float = 0.45) -> Layer:
    """A cube of edge `size` turned about the vertical and tipped toward the viewer, projected
    orthographically: its three visible faces as polygons, each evenly lit."""
    corners = np.array([[x, y, z] for x in (-0.5, 0.5) for y in (-0.5, 0.5) for z in (-0.5, 0.5)]) * size
    c, s = np.cos(turn), np.sin(turn)
    yaw = np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])
    c, s = np.cos(pitch), np.sin(pitch)
    # Tipped so that the top face (y toward -1 in picture coordinates) turns toward the viewer (+z).
    tip = np.array([[1, 0, 0], [0, c, s], [0, -s, c]])
    rotation = tip @ yaw
    placed = corners @ rotation.T
    h, w = shape[0] * SUPERSAMPLE, shape[1] * SUPERSAMPLE
    colour = np.zeros((h, w, 3), np.float32)
    inside = np.zeros((h, w), bool)
    for axis in range(3):
        for sign in (-1, 1):
            normal = rotation[:, axis] * sign
            if normal[2] <= 1e-6:
                continue
            face = [i for i in range(8) if np.sign(corners[i, axis]) == sign]
            ring = [face[0], face[1], face[3], face[2]]  # the four corners in order around the face
            outline = [((centre[0] + placed[i, 0]) * SUPERSAMPLE, (centre[1] + placed[i, 1]) * SUPERSAMPLE)
                       for i in ring]
            drawn = Image.new("L", (w, h), 0)
            ImageDraw.Draw(drawn).polygon(outline, fill=255)
            covered = np.asarray(drawn) > 0
            colour[covered] = _shade(normal, np.array(albedo, np.float32), shine=0.05)
            inside |= covered
    return Layer(colour, inside)


def mug(shape: tuple[int, int], axis_x: float, top: float, bottom: float, radius: float,
        albedo: tuple[float, ...]) -> Layer:
    """A can with a solid handle (no see-through hole: the pipeline fills holes by design)."""
    body = can(shape, axis_x, top, bottom, radius, albedo, albedo)
    ys, xs = _grid(shape)
    cy, cx = (top + bottom) / 2, axis_x + radius
    handle = (((xs - cx) / (0.45 * radius)) ** 2 + ((ys - cy) / (0.32 * (bottom - top))) ** 2 < 1) & (xs > cx - 2)
    normal = np.stack(np.broadcast_arrays((xs - cx) / (0.45 * radius), (ys - cy) / (0.32 * (bottom - top)),
                                          np.float32(0.5)), -1)
    normal = normal / np.linalg.norm(normal, axis=-1, keepdims=True)
    colour = body.colour.copy()
    extra = handle & ~body.coverage
    colour[extra] = _shade(normal[extra], np.array(albedo, np.float32))
    return Layer(colour, body.coverage | handle)


def silhouette(shape: tuple[int, int], mask: np.ndarray, box_xywh: tuple[float, float, float, float],
               texture: np.ndarray) -> Layer:
    """A bundled binary picture (the horse) placed in box_xywh, coloured by a texture and a gentle
    left-to-right light falloff."""
    x, y, w, h = box_xywh
    H, W = shape[0] * SUPERSAMPLE, shape[1] * SUPERSAMPLE
    scaled = Image.fromarray(mask.astype(np.uint8) * 255).resize(
        (round(w * SUPERSAMPLE), round(h * SUPERSAMPLE)), Image.Resampling.BILINEAR)
    canvas = Image.new("L", (W, H), 0)
    canvas.paste(scaled, (round(x * SUPERSAMPLE), round(y * SUPERSAMPLE)))
    coverage = np.asarray(canvas) >= 128
    tex = np.asarray(Image.fromarray(texture).resize((W, H), Image.Resampling.BILINEAR), np.float32) / 255.0
    ramp = np.linspace(1.1, 0.8, W, dtype=np.float32)[None, :, None]
    return Layer(np.clip(tex * ramp, 0, 1), coverage)


def logo(shape: tuple[int, int], centre: tuple[float, float], radius: float) -> Layer:
    """scikit-image's logo: a disk of snake photographs (its alpha is all opaque; the disk is the object)."""
    picture = samples.logo()[..., :3]
    ys, xs = _grid(shape)
    inside = (xs - centre[0]) ** 2 + (ys - centre[1]) ** 2 < radius**2
    # The logo's disk spans 6..494 of its 500 pixels.
    u = np.clip(((xs - centre[0]) / radius * 244 + 250).astype(int), 0, 499)
    v = np.clip(((ys - centre[1]) / radius * 244 + 250).astype(int), 0, 499)
    colour = picture[v, u].astype(np.float32) / 255.0
    return Layer(colour, np.broadcast_to(inside, colour.shape[:2]).copy())


def textured_star(shape: tuple[int, int], centre: tuple[float, float], radius: float, texture: np.ndarray,
                  points: int = 5) -> Layer:
    angles = np.arange(2 * points) * np.pi / points - np.pi / 2
    radii = np.where(np.arange(2 * points) % 2 == 0, radius, radius * 0.5)
    corners = [((centre[0] + r * np.cos(a)) * SUPERSAMPLE, (centre[1] + r * np.sin(a)) * SUPERSAMPLE)
               for r, a in zip(radii, angles)]
    H, W = shape[0] * SUPERSAMPLE, shape[1] * SUPERSAMPLE
    canvas = Image.new("L", (W, H), 0)
    ImageDraw.Draw(canvas).polygon(corners, fill=255)
    tex = np.asarray(Image.fromarray(texture).resize((W, H), Image.Resampling.BILINEAR), np.float32) / 255.0
    return Layer(tex, np.asarray(canvas) > 0)


# ------------------------------------------------------------------------------------------- composite
def composite(
    name: str, backdrop: str, layer_of: Callable[[tuple[int, int]], Layer], *, shadow: bool = False,
    blur: float = 0.0, jpeg: int = 0, seed: int = 0,
) -> CutoutCase:
    back = background(backdrop).astype(np.float32) / 255.0
    if blur:
        back = np.asarray(
            Image.fromarray((back * 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(blur)), np.float32
        ) / 255.0
    shape = back.shape[:2]
    layer = layer_of(shape)
    alpha = _box_down(layer.coverage.astype(np.float32))
    colour = _box_down(layer.colour * layer.coverage[..., None])
    if shadow:
        back = back * (1 - 0.45 * _shadow_of(alpha))[..., None]
    rgb = colour + back * (1 - alpha[..., None])
    # Sensor noise, so that flat rendered colours are not unnaturally clean.
    rgb += np.random.default_rng(seed).normal(0, 0.008, rgb.shape).astype(np.float32)
    rgb = np.clip(rgb * 255 + 0.5, 0, 255).astype(np.uint8)
    if jpeg:
        buffer = io.BytesIO()
        Image.fromarray(rgb).save(buffer, format="JPEG", quality=jpeg)
        rgb = np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"))
    mask = alpha >= 0.5
    touches = bool(mask[0].any() or mask[-1].any() or mask[:, 0].any() or mask[:, -1].any())
    return CutoutCase(name, rgb, mask, touches)


def _box_down(values: np.ndarray) -> np.ndarray:
    """The mean of each SUPERSAMPLE x SUPERSAMPLE block (OpenCV's area resampling at an integer factor)."""
    h, w = values.shape[0] // SUPERSAMPLE, values.shape[1] // SUPERSAMPLE
    return cv2.resize(values.astype(np.float32), (w, h), interpolation=cv2.INTER_AREA)


def _shadow_of(alpha: np.ndarray) -> np.ndarray:
    """A soft contact shadow: the object's footprint squashed down and to the right, blurred."""
    rows = np.flatnonzero(alpha.max(1) > 0.5)
    bottom = rows[-1] if rows.size else alpha.shape[0] - 1
    image = Image.fromarray((alpha * 255).astype(np.uint8))
    h, w = alpha.shape
    squashed = image.resize((w, max(1, h // 5)), Image.Resampling.BILINEAR)
    canvas = Image.new("L", (w, h), 0)
    canvas.paste(squashed, (18, int(bottom - h // 10)))
    return np.asarray(canvas.filter(ImageFilter.GaussianBlur(9)), np.float32) / 255.0


def _texture(name: str) -> np.ndarray:
    return background(name)


Spec = tuple[str, str, Callable[[tuple[int, int]], Layer], dict]


@cache
def _specs() -> tuple[Spec, ...]:
    """Each case as (name, backdrop, layer maker, compositing options), in the set's fixed order."""
    horse = ~samples.horse()  # True = horse
    rows, cols = np.flatnonzero(horse.any(1)), np.flatnonzero(horse.any(0))
    horse = horse[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    brown = _tinted(samples.gravel(), (70, 40, 20), (170, 110, 60))
    red, blue, yellow = (0.8, 0.12, 0.1), (0.15, 0.3, 0.8), (0.9, 0.75, 0.15)
    white, teal, purple = (0.9, 0.9, 0.88), (0.1, 0.6, 0.55), (0.5, 0.2, 0.6)
    return (
        # Centred objects on busy photographs.
        ("sphere-on-astronaut", "astronaut", lambda s: sphere(s, (260, 250), 140, blue), {}),
        ("sphere-on-brick", "brick", lambda s: sphere(s, (240, 270), 150, teal), {"shadow": True}),
        ("box-on-grass", "grass", lambda s: box(s, (250, 260), 210, red), {}),
        ("box-on-coffee", "coffee", lambda s: box(s, (270, 190), 150, blue), {"jpeg": 85}),
        ("can-on-gravel", "gravel", lambda s: can(s, 256, 110, 410, 100, red, white), {"shadow": True}),
        ("can-on-rocket", "rocket", lambda s: can(s, 300, 60, 280, 70, blue, yellow), {}),
        ("vase-on-chelsea", "chelsea", lambda s: vase(s, 250, 40, 300, 110, teal), {}),
        ("vase-on-hubble", "hubble", lambda s: vase(s, 256, 70, 440, 150, yellow), {}),
        ("bottle-on-ihc", "ihc", lambda s: bottle(s, 260, 50, 460, 90, (0.15, 0.45, 0.2)), {}),
        ("cone-on-camera", "camera", lambda s: cone(s, 250, 80, 420, 160, red), {}),
        ("mug-on-coins", "coins", lambda s: mug(s, 170, 90, 300, 90, blue), {"shadow": True}),
        ("logo-on-clock", "clock", lambda s: logo(s, (210, 190), 150), {}),
        ("logo-on-gravel", "gravel", lambda s: logo(s, (256, 256), 190), {"jpeg": 80}),
        ("horse-on-grass", "grass", lambda s: silhouette(s, horse, (60, 100, 390, 300), brown), {}),
        ("horse-on-page", "page", lambda s: silhouette(s, horse, (90, 20, 300, 220), brown), {}),
        ("star-on-moon", "moon", lambda s: textured_star(s, (256, 256), 200, _texture("rocket")), {}),
        ("sphere-on-page", "page", lambda s: sphere(s, (250, 130), 105, white), {}),
        ("box-on-blurred-astronaut", "astronaut", lambda s: box(s, (300, 300), 200, yellow), {"blur": 4}),
        ("vase-on-blurred-rocket", "rocket", lambda s: vase(s, 330, 30, 310, 110, purple), {"blur": 3}),
        ("sphere-over-cup-on-coffee", "coffee", lambda s: sphere(s, (230, 150), 125, yellow), {}),
        # Objects running off the frame.
        ("can-off-bottom-on-brick", "brick", lambda s: can(s, 250, 140, 560, 130, blue, white), {}),
        ("bottle-off-top-on-grass", "grass", lambda s: bottle(s, 300, -60, 400, 100, purple), {}),
        ("sphere-off-left-on-chelsea", "chelsea", lambda s: sphere(s, (60, 170), 150, blue), {}),
        ("box-off-corner-on-gravel", "gravel", lambda s: box(s, (420, 430), 280, (0.85, 0.45, 0.1)), {}),
        ("horse-off-right-on-rocket", "rocket", lambda s: silhouette(s, horse, (230, 40, 380, 290), brown), {}),
        ("vase-off-bottom-on-astronaut", "astronaut", lambda s: vase(s, 240, 120, 600, 180, white), {"jpeg": 85}),
        ("logo-off-left-on-hubble", "hubble", lambda s: logo(s, (90, 260), 210), {}),
        ("cone-off-bottom-on-moon", "moon", lambda s: cone(s, 256, 100, 620, 220, teal), {"shadow": True}),
    )


def case_names() -> tuple[str, ...]:
    """The cases' names, without building their pictures (tests parametrize on them at collection)."""
    return tuple(name for name, *_ in _specs())


@cache
def cases() -> tuple[CutoutCase, ...]:
    """The labelled set, in a fixed order (a few seconds to build)."""
    return tuple(
        composite(name, backdrop, layer_of, seed=index, **options)
        for index, (name, backdrop, layer_of, options) in enumerate(_specs())
    )


def iou(found: np.ndarray, truth: np.ndarray) -> float:
    union = np.logical_or(found, truth).sum()
    return float(np.logical_and(found, truth).sum() / union) if union else 1.0


def main(argv: list[str]) -> int:
    out = Path(argv[0] if argv else "bench/out/cutout_set")
    out.mkdir(parents=True, exist_ok=True)
    for case in cases():
        mask_rgb = np.stack([case.mask.astype(np.uint8) * 255] * 3, -1)
        Image.fromarray(np.concatenate([case.rgb, mask_rgb], axis=1)).save(out / f"{case.name}.png")
    print(f"{len(cases())} cases written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
