"""bench/RESULTS.md from the suite's results: one table of medians first
(with the targets of issues 2 and 4), then each suite's detail."""
from __future__ import annotations

from typing import Any

from bench.common import STAGES, fmt_bytes, fmt_s
from bench.latency import PHASES

E2E_TARGET_S = 1.0
OVERHEAD_TARGET_S = 0.020
SPEEDUP_TARGET_CPU = 1.5
SPEEDUP_TARGET_GPU = 3.0


def _met(ok: bool | None) -> str:
    return "n/a" if ok is None else ("yes" if ok else "**no**")


def summary_rows(results: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """(measure, median, target, met) rows: the one table `make bench` and bench/gpu.sh print."""
    rows: list[tuple[str, str, str, str]] = []
    cuda = bool(results["machine"].get("cuda")) and results.get("device", "auto") != "cpu"
    lat = results.get("latency")
    if lat:
        e2e, inproc = lat["e2e"]["median"], lat["inprocess"]["median"]
        rows += [
            ("end-to-end through the gateway (POST + SSE + GLB)", fmt_s(e2e), f"≤ {E2E_TARGET_S:.1f} s", _met(e2e <= E2E_TARGET_S)),
            ("in-process pipeline (run_pipeline)", fmt_s(inproc), "", ""),
            ("serving overhead, e2e − in-process", fmt_s(lat["overhead_s"]), f"≤ {OVERHEAD_TARGET_S * 1000:.0f} ms",
             _met(lat["overhead_s"] <= OVERHEAD_TARGET_S)),
            ("serving overhead, e2e / in-process", f"{lat['overhead_ratio']:.3f}×", "", ""),
            ("time outside the service's stage timers", fmt_s(lat["serving_outside_stages_s"]), "", ""),
        ]
    bat = results.get("batching")
    if bat:
        modes = {m["mode"]: m for m in bat["modes"]}
        single = modes.get("strictly one at a time") or modes["overlapped, max_batch_size=1"]
        dynamic = modes["dynamic batching"]
        target = SPEEDUP_TARGET_GPU if cuda else SPEEDUP_TARGET_CPU
        rows += [
            (f"throughput, {single['jobs']} jobs, strictly one at a time", f"{single['throughput_jobs_per_s']:.2f} jobs/s", "", ""),
            (f"throughput, {dynamic['jobs']} jobs, dynamic batching", f"{dynamic['throughput_jobs_per_s']:.2f} jobs/s", "", ""),
            ("batching speed-up (throughput ratio)", f"{bat['speedup_throughput']:.3f}×", f"≥ {target:.1f}×",
             _met(bat["speedup_throughput"] >= target)),
            ("of which batched shape_generation (vs overlapped, max_batch_size=1)",
             f"{bat['speedup_vs_unbatched']:.2f}×", "", ""),
            ("p50 / p95 latency, strictly one at a time", f"{fmt_s(single['p50_s'])} / {fmt_s(single['p95_s'])}", "", ""),
            ("p50 / p95 latency, dynamic batching", f"{fmt_s(dynamic['p50_s'])} / {fmt_s(dynamic['p95_s'])}", "", ""),
            ("peak memory vs budget, dynamic (generation RSS; above idle)",
             f"{fmt_bytes(dynamic['peak_rss_bytes'])}; {fmt_bytes(dynamic['peak_above_start_bytes'])} / {fmt_bytes(dynamic['budget_bytes'])}",
             "≤ budget", _met(dynamic["peak_above_start_bytes"] <= dynamic["budget_bytes"])),
        ]
    if results.get("devices"):
        from bench import devices

        rows += devices.summary_rows(results["devices"])
    res = results.get("resolution")
    if res:
        for row in res["rows"]:
            mem = row.get("memory") or {}
            peak = mem.get("device_peak_bytes", mem.get("host_peak_bytes"))
            peak_text = f"; peak {fmt_bytes(peak)} per item" if peak is not None else ""
            rows.append((f"in-process at {row['resolution']}²", fmt_s(row["total_s"]) + peak_text, "", ""))
    if results.get("hunyuan3d"):
        from bench import hunyuan3d

        rows += hunyuan3d.summary_rows(results["hunyuan3d"])
    if results.get("cutout"):
        from bench import cutout

        rows += cutout.summary_rows(results["cutout"])
    if results.get("exporters"):
        from bench import exporters

        rows += exporters.summary_rows(results["exporters"])
    if results.get("postgres"):
        from bench import postgres

        rows += postgres.summary_rows(results["postgres"])
    leak = results.get("leak")
    if leak:
        growth = leak["growth_bytes"].get("generation", 0)
        first, last = next(iter(leak["rss_by_jobs"])), list(leak["rss_by_jobs"])[-1]
        rows.append(
            (f"generation RSS after {last} jobs − after {first}", fmt_bytes(growth), "", "")
        )
    return rows


def table(rows: list[tuple[str, ...]], header: tuple[str, ...]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def summary_table(results: dict[str, Any]) -> str:
    return table(summary_rows(results), ("measure", "median", "target", "met"))


def markdown(results: dict[str, Any]) -> str:
    m = results["machine"]
    gpu = f", GPU {m['gpu']}" if m.get("gpu") else ", no GPU"
    parts = [
        "# ORFEAS benchmark results",
        "",
        f"Command: `{results['command']}`  ",
        (f"Machine: {m['nproc']} CPUs ({m['cpu']}), {m['ram_gib']} GiB RAM{gpu}; torch {m['torch']} "
        f"({m['torch_threads']} threads), Python {m['python']}, Linux {m['kernel']}  "),
        (f"Date: {m['date']}; suite wall time {results['wall_s']:.0f} s; load average at the start "
        f"{m.get('load_average', ['?'])[0]}; CPU-seconds used by other processes during the run "
        f"{results.get('cpu_seconds_of_other_processes', float('nan')):.0f}"),
        "",
        "Medians unless said otherwise. Every comparison is a ratio of figures taken in this one run.",
        "",
        summary_table(results),
        "",
    ]
    parts += _latency(results.get("latency"))
    parts += _batching(results.get("batching"))
    if results.get("devices"):
        from bench import devices

        parts += devices.markdown(results["devices"])
    parts += _resolution(results.get("resolution"))
    parts += _leak(results.get("leak"))
    if results.get("hunyuan3d"):
        from bench import hunyuan3d

        parts += hunyuan3d.markdown(results["hunyuan3d"])
    if results.get("cutout"):
        from bench import cutout

        parts += cutout.markdown(results["cutout"])
    if results.get("exporters"):
        from bench import exporters

        parts += exporters.markdown(results["exporters"])
    if results.get("postgres"):
        from bench import postgres

        parts += postgres.markdown(results["postgres"])
    parts += [_notes(results)]
    return "\n".join(parts) + "\n"


def _latency(lat: dict[str, Any] | None) -> list[str]:
    if not lat:
        return []
    rows = [
        (s, fmt_s(lat["inprocess_stages"][s]), fmt_s(lat["service_stages"][s])) for s in STAGES
    ]
    rows.append(("**total**", fmt_s(lat["inprocess"]["median"]), fmt_s(lat["e2e"]["median"]) + " (e2e)"))
    return [
        f"## End-to-end latency vs the in-process pipeline ({lat['runs']} runs each, interleaved, default settings, 512-px astronaut, {lat['device']})",
        "",
        table(rows, ("stage", "in-process", "in the service")),
        "",
        f"e2e p95 {fmt_s(lat['e2e']['p95'])}, in-process p95 {fmt_s(lat['inprocess']['p95'])}; "
        f"paired median difference {fmt_s(lat['overhead_paired_median_s'])}; "
        f"sum of the service's stage timers {fmt_s(lat['service_stage_sum']['median'])}."
        + (f" Failures: {lat['failures']}" if lat["failures"] else ""),
        "",
        "Where an end-to-end run's time goes (medians):",
        "",
        table([(k, fmt_s(v), PHASES.get(k, "")) for k, v in lat.get("phases", {}).items()], ("phase", "median", "what")),
        "",
    ]


def _batching(bat: dict[str, Any] | None) -> list[str]:
    if not bat:
        return []
    rows = []
    for m in bat["modes"]:
        rows.append(
            (
                m["mode"],
                f"{m['succeeded']}/{m['jobs']}",
                f"{m['wall_s']:.2f} s",
                f"{m['throughput_jobs_per_s']:.2f}",
                fmt_s(m["p50_s"]),
                fmt_s(m["p95_s"]),
                ", ".join(f"{n}×{size}" for size, n in sorted(m["batches"].items(), reverse=True)) or "n/a",
                fmt_bytes(m["peak_rss_bytes"]),
                fmt_bytes(m["peak_above_start_bytes"]),
                fmt_bytes(m["budget_bytes"]),
            )
        )
    stage_rows = [(s, *(fmt_s(m["stage_medians_s"][s]) for m in bat["modes"])) for s in STAGES]
    return [
        f"## Batching: {bat['modes'][0]['jobs']} jobs submitted at once (params: {bat['params']})",
        "",
        table(rows, ("mode", "ok", "wall", "jobs/s", "p50", "p95", "batches (count×size)", "peak RSS", "peak above idle", "budget")),
        "",
        (f"Throughput ratio dynamic / strictly one at a time: **{bat['speedup_throughput']:.3f}×**; "
        f"dynamic / overlapped with max_batch_size=1: {bat['speedup_vs_unbatched']:.2f}×. "
        "(p50/p95 are per-job latencies from submission; with 32 submitted at once they include the wait in the queue.)"),
        "",
        "The ceiling: CPU-seconds the services spent per job, and the throughput the cores allow at that cost "
        "(nproc / CPU-seconds per job): "
        + "; ".join(
            f"{m['mode']}: {m['cpu_s_per_job']:.3f} CPU-s/job → at most {m['throughput_ceiling_jobs_per_s']:.2f} jobs/s"
            for m in bat["modes"] if "cpu_s_per_job" in m
        )
        + ".",
        "",
        (f"Batching only speeds up shape_generation, {bat.get('shape_generation_share', float('nan')):.0%} of a job's "
        f"stage time when jobs run alone; were it free, throughput could grow at most "
        f"{bat.get('amdahl_bound', float('nan')):.2f}× (Amdahl)."),
        "",
        "Where the time goes (median per job, as the service's stage timers see it; shape_generation is the whole batch's time):",
        "",
        table(stage_rows, ("stage", *(m["mode"] for m in bat["modes"]))),
        "",
    ]


def _resolution(res: dict[str, Any] | None) -> list[str]:
    if not res:
        return []
    rows = []
    for r in res["rows"]:
        mem = r.get("memory") or {}
        peak = mem.get("device_peak_bytes", mem.get("host_peak_bytes"))
        rows.append(
            (
                f"{r['resolution']}²",
                *(fmt_s(r["stages_s"][s]) for s in STAGES),
                fmt_s(r["total_s"]),
                fmt_bytes(peak) if peak is not None else mem.get("error", "n/a")[:60],
                fmt_bytes(mem["modelled_item_bytes"]) if "modelled_item_bytes" in mem else "",
            )
        )
    growth = res["growth_exponent"]
    rows.append(("growth k (cost ∝ pixels^k)", *(f"{growth[s]:.2f}" for s in STAGES), f"{growth['total']:.2f}", "", ""))
    return [
        f"## Stage cost against resolution (in process, {res['runs']} runs each, {res['device']})",
        "",
        table(rows, ("grid", *STAGES, "total", "peak memory / item", "modelled / item")),
        "",
    ]


def _leak(leak: dict[str, Any] | None) -> list[str]:
    if not leak:
        return []
    names = list(next(iter(leak["rss_by_jobs"].values())))
    rows = [(jobs, *(fmt_bytes(rss.get(n, 0)) for n in names)) for jobs, rss in leak["rss_by_jobs"].items()]
    rows.append(("growth per 1,000 jobs", *(fmt_bytes(leak["growth_per_1000_jobs_bytes"].get(n, 0)) for n in names)))
    return [
        (f"## Memory after many jobs ({leak['jobs_done']} of {leak['jobs_requested']} jobs, {leak['concurrency']} in flight, "
        f"params {leak['params']}, {leak['elapsed_s']:.0f} s)"),
        "",
        table(rows, ("jobs done", *(f"{n} RSS" for n in names))),
        "",
        f"Outcomes: {leak['outcomes']}." + (" Stopped by the time bound." if leak["stopped_by_time_bound"] else ""),
        "",
    ]


def _notes(results: dict[str, Any]) -> str:
    notes = results.get("notes") or []
    if not notes:
        return ""
    return "## Notes\n\n" + "\n".join(f"- {n}" for n in notes) + "\n"
