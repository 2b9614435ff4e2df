// The performance panel: four telemetry endpoints, read on a timer. Each
// block draws from its own endpoint and says so when that one is missing or
// down, so one failing service does not blank the rest. Device samples are
// kept here, in the page, to draw memory and utilisation over time.

import { request } from "./api.js";
import { clock, count, megabytes, percent, seconds, stageLabel } from "./format.js";
import { meter, percentLines, stackedBar } from "./charts.js";

const REFRESH_MS = 5000;
const MAX_SAMPLES = 240;
const MAX_DECISIONS = 8;
const STAGE_ORDER = ["image_loading", "image_preprocessing", "shape_generation", "texture_synthesis", "mesh_export"];
const STAGE_COLORS = {
  image_loading: "#7c8db5",
  image_preprocessing: "#4f9d9a",
  shape_generation: "#d9822b",
  texture_synthesis: "#a45ea8",
  mesh_export: "#5c8a3a",
};
const MIB = 1024 * 1024;

const num = (v) => (typeof v === "number" && Number.isFinite(v) ? v : typeof v === "string" && v.trim() !== "" && Number.isFinite(Number(v)) ? Number(v) : null);
// Enum names may come through as "SEVERITY_CRITICAL" or "MEMORY_TREND_RISING".
const word = (v) => (typeof v === "string" && v ? v.toLowerCase().replace(/^(severity|memory_trend)_/, "") : null);

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "text") node.textContent = value;
    // Through the CSSOM: the page's CSP refuses style attributes.
    else if (key === "style") node.style.cssText = value;
    else node.setAttribute(key, value);
  }
  node.append(...children.filter((c) => c !== null && c !== undefined));
  return node;
}

function facts(rows) {
  return el("dl", { class: "facts" }, ...rows.map(([term, value, id]) =>
    el("div", {}, el("dt", { text: term }), el("dd", id ? { text: value, id } : { text: value }))));
}

function unavailable(err) {
  const reason = err.status ? `HTTP ${err.status}: ${err.message}` : err.message;
  return el("p", { class: "unavailable" }, el("strong", { text: "Telemetry unavailable. " }), reason);
}

// The breakdown may come as {stage: stats} or as [{name|stage, ...}].
export function stageRows(breakdown) {
  const entries = Array.isArray(breakdown)
    ? breakdown.map((s) => [s.name || s.stage, s])
    : Object.entries(breakdown || {});
  const rank = (name) => (STAGE_ORDER.includes(name) ? STAGE_ORDER.indexOf(name) : STAGE_ORDER.length);
  return entries
    .filter(([name, s]) => name && s)
    .map(([name, s]) => ({
      name,
      share: num(s.share),
      avg: num(s.avg_duration),
      p50: num(s.p50),
      p95: num(s.p95),
      max: num(s.max),
    }))
    .sort((a, b) => rank(a.name) - rank(b.name));
}

export class PerformancePanel {
  constructor(root) {
    this.root = root;
    this.status = root.querySelector("#perf-status");
    this.blocks = {
      summary: root.querySelector("#perf-summary .perf-body"),
      stages: root.querySelector("#perf-stages .perf-body"),
      advice: root.querySelector("#perf-advice .perf-body"),
      device: root.querySelector("#perf-device .perf-body"),
      workers: root.querySelector("#perf-workers .perf-body"),
      batches: root.querySelector("#perf-batches .perf-body"),
    };
    this.samples = [];
    this.timer = null;
    this.running = null;
    root.querySelector("#perf-refresh").addEventListener("click", () => this.refresh());
    document.addEventListener("visibilitychange", () => {
      if (!document.hidden) this.refresh();
    });
  }

  start() {
    this.refresh();
  }

  async refresh() {
    // One refresh at a time; a click during one waits for it.
    if (this.running) return this.running;
    clearTimeout(this.timer);
    this.running = this.load().finally(() => {
      this.running = null;
      this.timer = setTimeout(() => {
        if (!document.hidden) this.refresh();
      }, REFRESH_MS);
    });
    return this.running;
  }

  async load() {
    const [summary, recommendations, gpu, optimizer] = await Promise.allSettled([
      request("/api/performance/summary"),
      request("/api/performance/recommendations"),
      request("/api/gpu/status"),
      request("/api/optimizer/state"),
    ]);
    this.root.dataset.refreshed = String(Date.now());
    this.draw("summary", summary, (d) => this.summary(d));
    this.draw("stages", summary, (d) => this.stages(d));
    this.draw("advice", summary, (d) => this.advice(d, recommendations, gpu));
    this.draw("device", gpu, (d) => this.device(d));
    this.draw("workers", summary, (d) => this.workers(d, gpu));
    this.draw("batches", optimizer, (d) => this.batches(d));
    const failed = [summary, recommendations, gpu, optimizer].filter((r) => r.status === "rejected");
    const when = clock(new Date());
    this.status.textContent = failed.length === 4
      ? `Telemetry unavailable (${failed[0].reason.message}); trying again every ${REFRESH_MS / 1000} s.`
      : `Updated ${when}; refreshes every ${REFRESH_MS / 1000} s.${failed.length ? ` ${failed.length} of 4 telemetry endpoints did not answer.` : ""}`;
  }

  draw(name, settled, render) {
    const body = this.blocks[name];
    if (settled.status === "rejected") {
      body.replaceChildren(unavailable(settled.reason));
      return;
    }
    try {
      body.replaceChildren(...[render(settled.value || {})].flat());
    } catch (err) {
      // An answer of an unexpected shape: say so rather than leave stale figures.
      body.replaceChildren(unavailable(new Error(`unexpected answer (${err.message})`)));
    }
  }

  summary(d) {
    const rows = [["Pipelines", count(num(d.total_pipelines)), "perf-total"]];
    if (num(d.succeeded_pipelines) !== null) rows.push(["Succeeded", count(num(d.succeeded_pipelines)), "perf-succeeded"]);
    if (num(d.failed_pipelines) !== null) rows.push(["Failed", count(num(d.failed_pipelines)), "perf-failed"]);
    // Durations are over succeeded pipelines; with none, 0 ms would be a made-up figure.
    const none = num(d.succeeded_pipelines) === 0 || num(d.total_pipelines) === 0;
    const duration = (key) => (none ? "—" : seconds(num(d[key])));
    rows.push(
      ["Average", duration("avg_duration"), "perf-avg"],
      ["Median (p50)", duration("p50_duration"), "perf-p50"],
      ["p95", duration("p95_duration"), "perf-p95"],
      ["Fastest", duration("min_duration"), "perf-min"],
      ["Slowest", duration("max_duration"), "perf-max"],
    );
    return facts(rows);
  }

  stages(d) {
    const rows = stageRows(d.stage_breakdown);
    if (!rows.length) return el("p", { class: "hint", text: "No finished pipeline yet: the breakdown appears after the first one." });
    const color = (name, i) => STAGE_COLORS[name] || `hsl(${(i * 67) % 360} 45% 50%)`;
    const bar = stackedBar(
      rows.map((r, i) => ({ value: r.share || 0, color: color(r.name, i), title: `${stageLabel(r.name)}: ${percent(r.share)}` })),
      `Share of pipeline time by stage: ${rows.map((r) => `${stageLabel(r.name)} ${percent(r.share)}`).join(", ")}`,
    );
    const list = el("ol", { class: "share-list" }, ...rows.map((r, i) => el("li", { "data-stage": r.name },
      el("span", { class: "swatch", style: `background:${color(r.name, i)}`, "aria-hidden": "true" }),
      el("span", { class: "share-name", text: stageLabel(r.name) }),
      meter(r.share || 0, color(r.name, i), `${stageLabel(r.name)} ${percent(r.share)}`),
      el("span", { class: "share-value", text: percent(r.share) }),
      el("span", { class: "share-times", text: `avg ${seconds(r.avg)} · p95 ${seconds(r.p95)} · max ${seconds(r.max)}` }),
    )));
    return [bar, list];
  }

  advice(d, recommendations, gpu) {
    const out = [];
    const bottlenecks = Array.isArray(d.bottlenecks) ? d.bottlenecks : [];
    out.push(el("h4", { text: "Bottlenecks" }));
    out.push(bottlenecks.length
      ? el("ul", { class: "advice-list", id: "perf-bottlenecks" }, ...bottlenecks.map((b) => el("li", { "data-severity": word(b.severity) || "info" },
        severityBadge(b.severity),
        ` ${stageLabel(b.stage)}: ${percent(num(b.share))} of the pipeline`)))
      : el("p", { class: "hint", text: "None: no stage takes 20% or more of the pipeline." }));

    out.push(el("h4", { text: "Recommendations" }));
    if (recommendations.status === "rejected") {
      out.push(unavailable(recommendations.reason));
      return out;
    }
    const recs = [...(recommendations.value.recommendations || [])];
    // The device status carries its own; add those the list does not already have.
    if (gpu.status === "fulfilled") {
      for (const r of gpu.value.recommendations || []) {
        if (!recs.some((x) => x.code === r.code && x.message === r.message)) recs.push(r);
      }
    }
    out.push(recs.length
      ? el("ul", { class: "advice-list", id: "perf-recommendations" }, ...recs.map((r) => el("li", { "data-severity": word(r.severity) || "info", "data-code": r.code || "" },
        severityBadge(r.severity),
        ` ${r.message || r.code}`,
        figures(r.figures))))
      : el("p", { class: "hint", text: "Nothing to recommend from the measurements so far." }));
    return out;
  }

  device(d) {
    const memory = d.memory || {};
    const trends = d.trends || {};
    const devices = Array.isArray(d.devices) ? d.devices.map(deviceInfo) : [];
    const compute = devices.map((x) => x.utilization).filter((v) => v !== null);
    const sample = {
      t: Date.now(),
      memory: num(memory.utilization_percent),
      compute: compute.length ? compute.reduce((a, b) => a + b, 0) / compute.length : num(trends.avg_utilization_1m),
    };
    this.samples.push(sample);
    if (this.samples.length > MAX_SAMPLES) this.samples.shift();

    const out = [facts([
      ["Memory used", `${megabytes(num(memory.used_mb))} of ${megabytes(num(memory.total_mb))}`, "perf-memory-used"],
      ["Memory in use", num(memory.utilization_percent) === null ? "—" : `${num(memory.utilization_percent).toFixed(1)}%`, "perf-memory-percent"],
      ["Free", megabytes(num(memory.free_mb)), "perf-memory-free"],
      ["Memory trend", word(trends.trend) || "unknown", "perf-trend"],
      ["Utilisation (5 min avg)", num(trends.avg_utilization) === null ? "—" : `${num(trends.avg_utilization).toFixed(1)}%`, "perf-utilization"],
    ])];
    out.push(percentLines([
      { name: "Memory in use", color: "#2f6fb0", points: this.samples.map((s) => [s.t, s.memory]) },
      { name: "Compute utilisation", color: "#d9822b", points: this.samples.map((s) => [s.t, s.compute]) },
    ], `Memory in use and compute utilisation over the last ${this.samples.length} samples`));
    out.push(el("p", { class: "legend" },
      el("span", { class: "key key-memory", text: "Memory in use" }),
      el("span", { class: "key key-compute", text: "Compute utilisation" }),
      `(${this.samples.length} sample${this.samples.length === 1 ? "" : "s"}, one per refresh)`));
    if (devices.length) {
      out.push(el("ul", { class: "device-list" }, ...devices.map((x) => el("li", {},
        el("strong", { text: x.device }),
        ` ${x.name ? `${x.name} · ` : ""}${megabytes(x.usedMb)} of ${megabytes(x.totalMb)}`,
        x.utilization !== null ? ` · ${x.utilization.toFixed(0)}% busy` : "",
        x.stale ? " · no recent sample" : ""))));
    } else {
      out.push(el("p", { class: "hint", text: "No device has reported yet." }));
    }
    return out;
  }

  // One row per worker: what it ran (telemetry's per-worker breakdown) and, from the device
  // status, workers that have reported their device but finished no job yet.
  workers(d, gpu) {
    const rows = new Map();
    for (const w of Array.isArray(d.workers) ? d.workers : []) {
      if (w && w.worker_id) rows.set(w.worker_id, w);
    }
    if (gpu.status === "fulfilled") {
      for (const x of gpu.value.devices || []) {
        const id = (x.latest || x).worker_id;
        if (id && !rows.has(id)) rows.set(id, { worker_id: id, device: (x.latest || x).device });
      }
    }
    if (!rows.size) return el("p", { class: "hint", text: "No worker has reported yet." });
    const ordered = [...rows.values()].sort((a, b) => String(a.worker_id).localeCompare(String(b.worker_id)));
    return table(
      `${ordered.length} worker${ordered.length === 1 ? "" : "s"}: what each ran`,
      ["Worker", "Device", "Succeeded", "Failed", "Share", "Average", "p95", "Avg batch"],
      ordered.map((w) => {
        const ok = num(w.succeeded_pipelines);
        return [
          w.worker_id,
          w.device || "—",
          count(ok ?? 0),
          count(num(w.failed_pipelines) ?? 0),
          ok ? percent(num(w.share)) : "—",
          ok ? seconds(num(w.avg_duration)) : "—",
          ok ? seconds(num(w.p95_duration)) : "—",
          ok ? (num(w.avg_batch_size) ?? 0).toFixed(1) : "—",
        ];
      }),
      "perf-workers-table",
    );
  }

  batches(d) {
    const decisions = Array.isArray(d.decisions) ? d.decisions.slice(0, MAX_DECISIONS) : [];
    const costs = Array.isArray(d.costs) ? d.costs : [];
    const out = [];
    const target = num(d.target_utilization);
    const headroom = num(d.headroom);
    if (target !== null || headroom !== null) {
      out.push(el("p", { class: "hint" },
        `Target memory use ${target === null ? "—" : percent(target, 0)}, headroom ×${headroom === null ? "—" : headroom.toFixed(2)} on measured peaks`,
        num(d.total_decisions) !== null ? `, ${count(num(d.total_decisions))} decisions so far.` : "."));
    }
    if (!decisions.length) {
      out.push(el("p", { class: "hint", text: "No batch decided yet." }));
    } else {
      out.push(table(
        "Recent batch sizes, newest first",
        ["Time", "Worker", "Work", "Queue", "Size", "Reasoning"],
        decisions.map((x) => {
          const at = num(x.decided_at);
          const outcome = x.outcome || x;
          const ran = num(outcome.ran_size);
          const size = num(x.size);
          return [
            at === null ? "—" : clock(new Date(at * 1000)),
            x.worker_id || x.device || "—",
            `${x.backend || ""} ${x.resolution ?? "?"}² × ${x.steps ?? "?"} steps`.trim(),
            count(num(x.queue_length)),
            ran !== null && ran !== size ? `${count(size)} (ran ${count(ran)})` : count(size),
            `${x.reasoning || "—"}${outcome.out_of_memory ? " — ran out of memory" : ""}`,
          ];
        }),
        "perf-decisions",
      ));
    }
    if (costs.length) {
      out.push(table(
        "Learned memory cost per item",
        ["Work", "Per item", "Basis", "Peaks"],
        costs.map((c) => [
          `${c.backend || ""} ${c.resolution ?? "?"}² × ${c.steps ?? "?"} steps`.trim(),
          megabytes(num(c.per_item_mb) ?? (num(c.per_item_bytes) === null ? null : num(c.per_item_bytes) / MIB)),
          c.basis || "—",
          count(num(c.observations)),
        ]),
        "perf-costs",
      ));
    }
    return out;
  }
}

function severityBadge(severity) {
  const level = word(severity) || "info";
  return el("span", { class: `badge severity-${level}`, text: level });
}

const UNITS = [["_percent", "%"], ["_s", " s"], ["_mb", " MB"]];

function figures(values) {
  if (!values || typeof values !== "object") return null;
  const entries = Object.entries(values).filter(([, v]) => num(v) !== null);
  if (!entries.length) return null;
  const text = entries.map(([key, v]) => {
    const [suffix, unit] = UNITS.find(([s]) => key.endsWith(s)) || ["", ""];
    const name = key.slice(0, key.length - suffix.length).replace(/_/g, " ");
    return `${name} ${+num(v).toFixed(3)}${unit}`;
  });
  return el("span", { class: "figures" }, text.join(" · "));
}

function deviceInfo(d) {
  // The gateway flattens a device's latest sample; older shapes nest it under `latest`.
  const latest = d.latest || d;
  const memory = d.memory || {};
  const mb = (mbKey, bytesKey) => {
    const direct = num(memory[mbKey.replace("memory_", "")] ?? d[mbKey] ?? latest[mbKey]);
    if (direct !== null) return direct;
    const b = num(d[bytesKey] ?? latest[bytesKey]);
    return b === null ? null : b / MIB;
  };
  return {
    device: [latest.worker_id, latest.device].filter(Boolean).join(" / ") || "device",
    name: latest.name || latest.device_type || "",
    totalMb: mb("memory_total_mb", "memory_total_bytes"),
    usedMb: mb("memory_used_mb", "memory_used_bytes"),
    utilization: num(latest.utilization_percent),
    stale: Boolean(d.stale),
  };
}

function table(caption, headings, rows, id) {
  return el("div", { class: "table-scroll" }, el("table", { id },
    el("caption", { text: caption }),
    el("thead", {}, el("tr", {}, ...headings.map((h) => el("th", { scope: "col", text: h })))),
    el("tbody", {}, ...rows.map((cells) => el("tr", {}, ...cells.map((c) => el("td", { text: String(c) }))))),
  ));
}
