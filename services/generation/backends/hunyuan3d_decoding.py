"""Volume decoding for the hunyuan3d backend: from the VAE's shape latents to one logit volume per object.

Two decoders, both hy3dgen's own, chosen at start-up (HUNYUAN3D_FLASHVDM):

- dense (VanillaVolumeDecoder): every point of the (R+1)^3 grid, the whole
  batch at once, in chunks of HUNYUAN3D_DECODE_CHUNK_POINTS queries.
- lightning (FlashVDMVolumeDecoding): a grid of about 64^3 first, then grids
  twice as fine, each only near the surface the coarser one found, every
  query attending to the latents that matter most to its region (adaptive
  KV selection). It decodes one object at a time (its code handles a batch
  of one), and the points it skipped come back NaN; `fill_unevaluated` gives
  them their side before surface extraction.

Both call the VAE's geometry decoder once per chunk of queries. They get it
wrapped in a CountingDecoder, which is where progress is reported and a stop
takes effect (raising there ends the decode; nothing of hy3dgen is patched,
and FlashVDM sets its attention processor through the wrapper). A dense
decode knows its chunks in advance ("decoding chunk 12 of 80"); a lightning
decode learns how many points its finer grids need only as it goes, so it
reports the chunks done ("lightning decoding, object 1 of 2: chunk 7").
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from services.generation.backends.base import StopCheck, check_stop

# report(fraction of the decoding done 0..1, detail)
DecodeReport = Callable[[float, str], None]

# At most this many progress reports per dense call (chunks can number thousands at 512).
DENSE_REPORTS = 50
# A lightning decode reports at most this often (it cannot know its chunk count in advance).
LIGHTNING_REPORT_INTERVAL_S = 0.1
# FlashVDM's first grid: about 64 points a side, whatever the resolution asked for.
LIGHTNING_FIRST_GRID_POINTS = 64**3


class CountingDecoder:
    """vae.geo_decoder as the volume decoders use it, calling `before` and `after` around every chunk."""

    def __init__(self, decoder: Any, before: Callable[[], None], after: Callable[[], None]) -> None:
        self.decoder = decoder
        self.before = before
        self.after = after

    def __call__(self, **kwargs: Any) -> torch.Tensor:
        self.before()
        logits = self.decoder(**kwargs)
        self.after()
        return logits

    def set_cross_attention_processor(self, processor: Any) -> None:
        # FlashVDMVolumeDecoding installs its top-k attention on the decoder it is given.
        self.decoder.set_cross_attention_processor(processor)


def decode_dense(
    vae: Any,
    shape_latents: torch.Tensor,
    *,
    resolution: int,
    bound: float,
    chunk_points: int,
    report: DecodeReport,
    should_stop: StopCheck | None,
) -> list[np.ndarray | None]:
    """Each object's (R+1)^3 float32 logit volume, on the host; the whole batch in one pass."""
    chunk = max(1, chunk_points)
    chunks = math.ceil((resolution + 1) ** 3 / chunk)
    every = max(1, chunks // DENSE_REPORTS)
    decoded = 0

    def after() -> None:
        nonlocal decoded
        decoded += 1
        if decoded % every == 0 or decoded == chunks:
            report(decoded / chunks, f"decoding chunk {decoded} of {chunks}")

    grids = vae.volume_decoder(
        shape_latents,
        CountingDecoder(vae.geo_decoder, lambda: check_stop(should_stop), after),
        bounds=bound,
        num_chunks=chunk,
        octree_resolution=resolution,
        enable_pbar=False,
    )
    return [grid.float().cpu().numpy() for grid in grids]


def decode_lightning(
    vae: Any,
    shape_latents: torch.Tensor,
    *,
    resolution: int,
    bound: float,
    chunk_points: int,
    level: float,
    report: DecodeReport,
    should_stop: StopCheck | None,
) -> list[np.ndarray | None]:
    """Each object's logit volume through FlashVDM, one object after the other, skipped points filled.

    The volume has FlashVDM's own size: its finest grid is a power-of-two multiple of a first grid of
    4k - 1 cells a side (252 cells for 256, 504 for 512), spanning the same box.
    """
    chunk = max(1, chunk_points)
    count = shape_latents.shape[0]
    # Progress within an object: chunks / (chunks + the first grid's), about half once the first grid
    # is done, then closing in on the end as the finer grids go; each object's end is exact.
    first_grid_chunks = max(1, math.ceil(LIGHTNING_FIRST_GRID_POINTS / chunk))
    volumes: list[np.ndarray | None] = []
    for index in range(count):
        calls = 0
        last_report = 0.0

        def after(index: int = index) -> None:
            nonlocal calls, last_report
            calls += 1
            now = time.monotonic()
            if calls == 1 or now - last_report >= LIGHTNING_REPORT_INTERVAL_S:
                last_report = now
                within = calls / (calls + first_grid_chunks)
                report((index + within) / count, f"lightning decoding, object {index + 1} of {count}: chunk {calls}")

        grid = vae.volume_decoder(
            shape_latents[index : index + 1],
            CountingDecoder(vae.geo_decoder, lambda: check_stop(should_stop), after),
            bounds=bound,
            num_chunks=chunk,
            mc_level=level,
            octree_resolution=resolution,
            enable_pbar=False,
        )
        volumes.append(fill_unevaluated(grid[0], level).cpu().numpy())
        del grid
        report((index + 1) / count, f"lightning decoding, object {index + 1} of {count}: {calls} chunks")
    return volumes


def fill_unevaluated(grid: torch.Tensor, level: float) -> torch.Tensor:
    """An (n, n, n) logit grid (float32) whose NaN points (not evaluated) are given a side of the surface.

    FlashVDM evaluates its finest grid only near the surface its coarser grid found and leaves NaN
    elsewhere: deep inside or far outside. Each such point takes the side (inside: above `level`) of
    most evaluated points near it: those in its block of 2^3 points, else of 4^3, 8^3, ... (an octree
    vote, linear in the grid's size, run where the grid is, on the GPU there; a tie is outside). A
    region the coarse grid wrongly joined, inside to outside, is split by proximity rather than given
    one side whole. Filled points lie as far from the level as the farthest evaluated one, so marching
    cubes puts no surface inside a filled region, and where a filled point meets an evaluated point of
    the other side it puts the surface next to the evaluated one.
    """
    grid = grid.float()
    known = ~torch.isnan(grid)
    if bool(known.all()):
        return grid
    if not bool(known.any()):
        return torch.full_like(grid, level - 1.0)
    side = torch.where(known, torch.where(grid > level, 1.0, -1.0), 0.0)
    votes = _octree_votes(side[None, None], known.float()[None, None])[0, 0]
    distances = torch.nan_to_num((grid[known] - level).abs(), posinf=1e4)
    reach = float(distances.max().clamp(min=1.0))
    return torch.where(known, grid, torch.where(votes > 0, level + reach, level - reach))


def _octree_votes(side_sum: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """side_sum: per point, the sum of the sides (+1 inside, -1 outside) of the evaluated points it stands for;
    count: how many. Points standing for none get the sum of the next coarser block that has some."""
    unknown = count == 0
    size = side_sum.shape[-3:]
    if not bool(unknown.any()) or min(size) <= 1:
        return side_sum
    pad: list[int] = []
    for extent in reversed(size):
        pad += [0, extent % 2]
    # Sums over blocks of 2^3: the mean of 8 times 8 (an odd edge is padded with points standing for none).
    coarse_sum = F.avg_pool3d(F.pad(side_sum, pad), 2) * 8
    coarse_count = F.avg_pool3d(F.pad(count, pad), 2) * 8
    coarse = _octree_votes(coarse_sum, coarse_count)
    up = F.interpolate(coarse, scale_factor=2, mode="nearest")[..., : size[0], : size[1], : size[2]]
    return torch.where(unknown, up, side_sum)
