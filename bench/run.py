"""`make bench`: the benchmark suite, in one command.

    .venv/bin/python -m bench.run                      # everything, results in bench/RESULTS.md
    .venv/bin/python -m bench.run --suites latency     # one suite
    .venv/bin/python -m bench.run --quick              # fewer runs, for a smoke test

Every stack it needs it starts itself on free loopback ports and stops again.
It prints one table of medians at the end; bench/RESULTS.md holds the detail
and bench/results.json the raw figures.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import psutil

from bench import report
from bench.common import BENCH_DIR, machine

SUITES = ("latency", "batching", "devices", "resolution", "leak", "hunyuan3d", "cutout", "exporters", "postgres")


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench.run", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suites", default=",".join(SUITES), help=f"comma-separated, of {', '.join(SUITES)}")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (for the in-process runs; the service picks its own)")
    p.add_argument("--runs", type=int, default=10, help="latency runs per side (issue 2: at least 10)")
    p.add_argument("--batch-jobs", type=int, default=32)
    p.add_argument("--no-serial", action="store_true", help="skip the serial-client reference in the batching suite")
    p.add_argument("--device-jobs", type=int, default=32, help="devices suite: jobs per burst")
    p.add_argument("--device-repeats", type=int, default=3, help="devices suite: bursts per side")
    p.add_argument("--resolution-runs", type=int, default=3)
    p.add_argument("--resolutions", default="128,256,512,1024")
    p.add_argument("--leak-jobs", type=int, default=1000)
    p.add_argument("--leak-timeout", type=float, default=900.0, help="seconds; the leak suite stops by then")
    p.add_argument("--hunyuan-model", default=os.environ.get("HUNYUAN3D_MODEL_PATH") or "tiny",
                   help="hunyuan3d suite: tiny, published (random weights) or a model folder "
                        "(default: $HUNYUAN3D_MODEL_PATH, else tiny)")
    p.add_argument("--hunyuan-serve", action="store_true",
                   help="hunyuan3d suite: also serve mixed resolutions (peak memory, out-of-memory errors)")
    p.add_argument("--budget-s", type=float, default=0.0, help="start no suite after this many seconds (0: no limit)")
    p.add_argument("--quick", action="store_true", help="3 runs, 8 batch jobs, 100 leak jobs, resolutions to 512²")
    p.add_argument("--markdown", type=Path, default=BENCH_DIR / "RESULTS.md")
    p.add_argument("--json", type=Path, default=BENCH_DIR / "results.json")
    p.add_argument("--no-write", action="store_true", help="print the table only")
    args = p.parse_args(argv)
    if args.quick:
        args.runs, args.batch_jobs, args.leak_jobs, args.resolution_runs = 3, 8, 100, 1
        args.device_jobs, args.device_repeats = 8, 1
        args.resolutions = "128,256,512"
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse(argv)
    suites = [s.strip() for s in args.suites.split(",") if s.strip()]
    unknown = set(suites) - set(SUITES)
    if unknown:
        print(f"unknown suites: {', '.join(sorted(unknown))}", file=sys.stderr)
        return 2
    started = time.perf_counter()
    cpu_start = _cpu_now()
    results: dict[str, Any] = {
        "command": "python -m bench.run " + shlex.join(argv) if argv else "make bench",
        "machine": machine(),
        "device": args.device,
        "notes": [],
    }
    for suite in suites:
        if args.budget_s and time.perf_counter() - started > args.budget_s:
            results["notes"].append(f"{suite} skipped: the {args.budget_s:.0f} s budget was spent")
            continue
        print(f"[bench] {suite} ...", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        try:
            results[suite] = _run_suite(suite, args)
        except Exception as exc:  # noqa: BLE001 - one failed suite must not lose the others' figures
            traceback.print_exc()
            results["notes"].append(f"{suite} failed: {type(exc).__name__}: {exc}")
        print(f"[bench] {suite} done in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    results["wall_s"] = time.perf_counter() - started
    if not results["machine"].get("cuda"):
        results["notes"].append(
            "no GPU on this machine: the ≥ 3× batching target for a GPU is not measured here; "
            "bench/gpu.sh runs this same suite on a CUDA device in one call"
        )
    others = _cpu_of_others(cpu_start)
    results["cpu_seconds_of_other_processes"] = others
    share = others / (results["wall_s"] * (os.cpu_count() or 1))
    if share > 0.05:
        results["notes"].append(
            f"the machine was shared: other processes used {others:.0f} CPU-seconds during the run, "
            f"{share:.0%} of its capacity; every figure is slower and noisier for it"
        )
    print(report.summary_table(results))
    if not args.no_write:
        args.json.write_text(json.dumps(results, indent=2, default=str) + "\n")
        fresh = report.markdown(results)
        old = args.markdown.read_text() if args.markdown.exists() else ""
        args.markdown.write_text(fresh + _sections_only_in(old, fresh))
        print(f"\nwritten: {args.markdown}, {args.json}", file=sys.stderr)
    return 1 if any("failed" in n for n in results["notes"]) else 0


def _sections_only_in(old: str, fresh: str) -> str:
    """The `## ` sections of the old RESULTS.md that this run did not write (those of a script run on its
    own, such as `bench.inprocess --write`), so that a run of the suites keeps them."""
    titles = {_title_stem(line) for line in fresh.splitlines() if line.startswith("## ")}
    kept = [part for part in re.split(r"(?m)^(?=## )", old)
            if part.startswith("## ") and _title_stem(part.splitlines()[0]) not in titles]
    return "".join("\n" + part.rstrip("\n") + "\n" for part in kept)


def _title_stem(title: str) -> str:
    """A section's title without its parenthesised details, which change from run to run ("(... 147 s)")."""
    return title.split(" (", 1)[0].rstrip()


def _cpu_now() -> tuple[float, float]:
    """(busy CPU-seconds of the whole machine, CPU-seconds of this process and its reaped children)."""
    total = psutil.cpu_times()
    busy = sum(total) - total.idle - getattr(total, "iowait", 0.0)
    mine = psutil.Process().cpu_times()
    return busy, mine.user + mine.system + mine.children_user + mine.children_system


def _cpu_of_others(start: tuple[float, float]) -> float:
    """CPU-seconds that processes other than this suite (and the stacks it ran) used since `start`."""
    busy, mine = _cpu_now()
    return max(0.0, (busy - start[0]) - (mine - start[1]))


def _run_suite(suite: str, args: argparse.Namespace) -> dict[str, Any]:
    if suite == "latency":
        from bench import latency

        return latency.run(args.runs, args.device)
    if suite == "batching":
        from bench import batching

        return batching.run(args.batch_jobs, serial=not args.no_serial)
    if suite == "devices":
        from bench import devices

        return devices.run(args.device_jobs, args.device_repeats)
    if suite == "resolution":
        from bench import resolution

        sizes = tuple(int(r) for r in args.resolutions.split(","))
        return resolution.run(args.resolution_runs, args.device, sizes)
    if suite == "cutout":
        from bench import cutout

        return cutout.run(repeats=2 if args.quick else 5)
    if suite == "exporters":
        from bench import exporters

        return exporters.run(repeats=3 if args.quick else 7)
    if suite == "postgres":
        from bench import postgres

        if args.quick:
            return postgres.run(jobs=8, repeats=1, store_jobs=50, backlog=2_000, samples=80)
        return postgres.run()
    if suite == "hunyuan3d":
        from bench import hunyuan3d
        from bench.inprocess import device_of

        device = device_of(args.device)
        gpu = device.type == "cuda"
        return hunyuan3d.run(
            model=args.hunyuan_model,
            device_name=str(device),
            # Defaults on a GPU; the smallest accepted settings with the tiny model on the CPU.
            resolution=256 if gpu else 64,
            steps=30 if gpu else 5,
            batch=4,
            repeats=1 if args.quick else (2 if gpu else 3),
            serve=args.hunyuan_serve,
            mixed_resolutions=(128, 256, 384) if gpu else (64, 96),
            serve_jobs=12 if gpu else 6,
        )
    from bench import leak

    return leak.run(args.leak_jobs, timeout_s=args.leak_timeout)


if __name__ == "__main__":
    sys.exit(main())
