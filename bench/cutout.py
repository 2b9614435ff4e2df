"""The automatic cut-out (`remove_background=auto`) on the labelled set: IoU and time, old against new.

    .venv/bin/python -m bench.cutout                 # prints the table, updates its section of bench/RESULTS.md
    .venv/bin/python -m bench.cutout --no-write      # prints only
    .venv/bin/python -m bench.cutout --reference REV # compare with image_preprocessing.py at another commit

"old" is services/generation/pipeline/image_preprocessing.py as it was at REFERENCE_COMMIT (the last one
with the border-colour heuristic alone), loaded from git into a temporary module; "new" is the working
tree's. Both run in this one process, case by case, alternately, on the same pictures. The IoU is
measured at the picture's size against the set's true mask; a refusal ("no foreground found") counts
as 0. The time is prepare_image's whole call at defaults (foreground_ratio 0.85, resolution 256) on
the set's 512-pixel pictures: the median of `repeats` runs per case, then the median over cases.
"""
from __future__ import annotations

import argparse
import functools
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from bench.common import BENCH_DIR, PHOTO, ROOT, fmt_s, machine_line, write_section
from bench.cutout_set import CutoutCase, cases, iou
from services.common.errors import InvalidArgument
from services.generation.pipeline import image_preprocessing
from services.generation.pipeline.records import LoadedImage, PreparedImage

# The last commit whose cut-out was the border-colour heuristic alone: the "before" of issue 13.
REFERENCE_COMMIT = "8c7be45"
MODULE_PATH = "services/generation/pipeline/image_preprocessing.py"
TARGETS = {"mean_iou": 0.90, "median_iou": 0.95, "min_iou": 0.60, "median_ms": 60.0}
SECTION_TITLE = "## Cut-outs on the labelled set"


def load_reference(commit: str) -> ModuleType:
    source = subprocess.run(
        ["git", "show", f"{commit}:{MODULE_PATH}"], cwd=ROOT, check=True, capture_output=True, text=True
    ).stdout
    with tempfile.TemporaryDirectory(prefix="cutout-reference-") as folder:
        path = Path(folder) / "image_preprocessing_reference.py"
        path.write_text(source)
        spec = importlib.util.spec_from_file_location("image_preprocessing_reference", path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    # The reference predates PreparedImage.source_mask: give its records an empty one (the bench reads the
    # reference's mask from its _segment instead).
    module.PreparedImage = functools.partial(PreparedImage, source_mask=np.zeros((0, 0), bool))
    return module


def latency_photo() -> np.ndarray:
    """The latency benchmark's picture (bench.common.PHOTO: the 512-pixel astronaut)."""
    from tests.images import photo

    return photo(*PHOTO)


def loaded(rgb: np.ndarray) -> LoadedImage:
    rgba = np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)])
    return LoadedImage(rgba=rgba, has_alpha=False, source_format="PNG", size=(rgb.shape[1], rgb.shape[0]))


def source_mask_new(module: ModuleType, image: LoadedImage) -> np.ndarray:
    return module.prepare_image(image, remove_background="auto", foreground_ratio=0.85, resolution=256).source_mask


def source_mask_reference(module: ModuleType, image: LoadedImage) -> np.ndarray:
    # The reference's PreparedImage has no source mask; its segmentation score is the same mask at the source's size.
    return module._segment(image.rgba[..., :3]) >= 128


def timed_prepare(module: ModuleType, image: LoadedImage) -> float:
    started = time.perf_counter()
    try:
        module.prepare_image(image, remove_background="auto", foreground_ratio=0.85, resolution=256)
    except InvalidArgument:
        pass
    return time.perf_counter() - started


def measure_case(case: CutoutCase, sides: dict[str, tuple[ModuleType, Callable]], repeats: int) -> dict[str, Any]:
    image = loaded(case.rgb)
    row: dict[str, Any] = {"name": case.name, "touches_edge": case.touches_edge,
                           "size": f"{case.rgb.shape[1]}×{case.rgb.shape[0]}"}
    for label, (module, source_mask) in sides.items():
        try:
            row[f"{label}_iou"] = iou(source_mask(module, image), case.mask)
        except InvalidArgument as refusal:
            row[f"{label}_iou"], row[f"{label}_error"] = 0.0, str(refusal)
    times: dict[str, list[float]] = {label: [] for label in sides}
    for _ in range(repeats):
        for label, (module, _) in sides.items():  # alternately, so that a busy moment hits both
            times[label].append(timed_prepare(module, image))
    for label in sides:
        row[f"{label}_s"] = statistics.median(times[label])
    return row


def summarise(rows: list[dict[str, Any]], label: str) -> dict[str, float]:
    ious = [row[f"{label}_iou"] for row in rows]
    return {
        "mean_iou": float(np.mean(ious)),
        "median_iou": float(np.median(ious)),
        "min_iou": float(np.min(ious)),
        "below_0_8": sum(v < 0.8 for v in ious),
        "median_ms": statistics.median(row[f"{label}_s"] for row in rows) * 1000,
        "max_ms": max(row[f"{label}_s"] for row in rows) * 1000,
    }


def run(repeats: int = 5, reference: str = REFERENCE_COMMIT) -> dict[str, Any]:
    sides = {
        "old": (load_reference(reference), source_mask_reference),
        "new": (image_preprocessing, source_mask_new),
    }
    labelled = cases()
    for module, _ in sides.values():  # warm up: imports, OpenCV's first call
        timed_prepare(module, loaded(labelled[0].rgb))
    rows = [measure_case(case, sides, repeats) for case in labelled]
    photo = loaded(latency_photo()[..., :3])
    photo_times: dict[str, list[float]] = {label: [] for label in sides}
    for _ in range(max(repeats, 5)):
        for label, (module, _) in sides.items():
            photo_times[label].append(timed_prepare(module, photo))
    return {
        "latency_photo_ms": {label: statistics.median(times) * 1000 for label, times in photo_times.items()},
        "reference": reference,
        "repeats": repeats,
        "cases": len(rows),
        "rows": rows,
        "old": summarise(rows, "old"),
        "new": summarise(rows, "new"),
        "targets": TARGETS,
    }


def _table(rows: list[tuple[str, ...]], header: tuple[str, ...]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def _met(ok: bool) -> str:
    return "yes" if ok else "**no**"


def summary_rows(result: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """(measure, figure, target, met) rows for `make bench`'s table of medians."""
    old, new, targets = result["old"], result["new"], result["targets"]
    iou_met = (new["mean_iou"] >= targets["mean_iou"] and new["median_iou"] >= targets["median_iou"]
               and new["min_iou"] >= targets["min_iou"])
    return [
        (f"cut-out IoU on the labelled set, mean / median / lowest (before: {old['mean_iou']:.3f} / "
         f"{old['median_iou']:.3f} / {old['min_iou']:.3f})",
         f"{new['mean_iou']:.3f} / {new['median_iou']:.3f} / {new['min_iou']:.3f}",
         f"≥ {targets['mean_iou']:.2f} / {targets['median_iou']:.2f} / {targets['min_iou']:.2f}", _met(iou_met)),
        (f"image_preprocessing with the cut-out at 512 px, median over the set (before: {old['median_ms']:.1f} ms)",
         f"{new['median_ms']:.1f} ms", f"≤ {targets['median_ms']:.0f} ms",
         _met(new["median_ms"] <= targets["median_ms"])),
        (f"image_preprocessing on the latency photo (before: {result['latency_photo_ms']['old']:.1f} ms)",
         f"{result['latency_photo_ms']['new']:.1f} ms", f"≤ {targets['median_ms']:.0f} ms",
         _met(result["latency_photo_ms"]["new"] <= targets["median_ms"])),
    ]


def markdown(result: dict[str, Any], command: str | None = None, machine_line: str | None = None) -> list[str]:
    """This benchmark's section of RESULTS.md, as lines; command and machine when run on its own."""
    old, new, targets = result["old"], result["new"], result["targets"]

    def met(key: str, higher: bool = True) -> str:
        value, target = new[key], targets[key]
        return _met(value >= target if higher else value <= target)

    summary = _table(
        [
            ("mean IoU", f"{old['mean_iou']:.3f}", f"{new['mean_iou']:.3f}", f"≥ {targets['mean_iou']:.2f}",
             met("mean_iou")),
            ("median IoU", f"{old['median_iou']:.3f}", f"{new['median_iou']:.3f}",
             f"≥ {targets['median_iou']:.2f}", met("median_iou")),
            ("lowest IoU", f"{old['min_iou']:.3f}", f"{new['min_iou']:.3f}", f"≥ {targets['min_iou']:.2f}",
             met("min_iou")),
            ("cases below 0.8", str(old["below_0_8"]), str(new["below_0_8"]), "", ""),
            ("prepare_image, median over cases", f"{old['median_ms']:.1f} ms", f"{new['median_ms']:.1f} ms",
             f"≤ {targets['median_ms']:.0f} ms", met("median_ms", higher=False)),
            ("prepare_image, slowest case", f"{old['max_ms']:.1f} ms", f"{new['max_ms']:.1f} ms", "", ""),
            (f"prepare_image on the latency photo ({PHOTO[0]}, {PHOTO[1]} px)",
             f"{result['latency_photo_ms']['old']:.1f} ms", f"{result['latency_photo_ms']['new']:.1f} ms",
             f"≤ {targets['median_ms']:.0f} ms", _met(result["latency_photo_ms"]["new"] <= targets["median_ms"])),
        ],
        ("measure", f"old ({result['reference']})", "new", "target", "met"),
    )
    per_case = _table(
        [
            (row["name"], row["size"], "yes" if row["touches_edge"] else "",
             f"{row['old_iou']:.3f}" + (" (refused)" if "old_error" in row else ""),
             f"{row['new_iou']:.3f}" + (" (refused)" if "new_error" in row else ""),
             fmt_s(row["old_s"]), fmt_s(row["new_s"]))
            for row in result["rows"]
        ],
        ("case", "size", "off the frame", "old IoU", "new IoU", "old time", "new time"),
    )
    lines = [SECTION_TITLE, ""]
    if command:
        lines.append(f"Command: `{command}`  ")
    if machine_line:
        lines.append(f"Machine: {machine_line}  ")
    lines += [
        (f"{result['cases']} cases from bench/cutout_set.py (objects with known masks composited on scikit-image's "
         f"photos, 512 px on the long side); `remove_background=auto`; IoU at the picture's size against the true "
         f"mask (a refusal counts 0); time: prepare_image at defaults, median of {result['repeats']} runs per "
         f"case, old and new alternately in one process, then the median over cases. old: "
         f"image_preprocessing.py at {result['reference']} (the border-colour heuristic alone); new: GrabCut "
         f"seeded from it (services/generation/pipeline/background_removal.py)."),
        "",
        summary,
        "",
        per_case,
        "",
    ]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.cutout", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--reference", default=REFERENCE_COMMIT)
    parser.add_argument("--markdown", type=Path, default=BENCH_DIR / "RESULTS.md")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    line = machine_line()
    result = run(args.repeats, args.reference)
    command = ".venv/bin/python -m bench.cutout" + (" " + " ".join(argv) if argv else "")
    section = "\n".join(markdown(result, command, line))
    print(section)
    if not args.no_write:
        write_section(args.markdown, SECTION_TITLE, section)
        print(f"written: {args.markdown}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
