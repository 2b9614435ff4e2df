// One generation on screen: its queue position, its five stages advancing
// live over Server-Sent Events, then its statistics, downloads, the cut-out
// the model was given, and the 3D view.
//
// The events come over fetch, not EventSource, so the bearer token travels
// with them; a stream that breaks (the service restarting) resumes from the
// last event it delivered, with Last-Event-ID.

import { fetchFile, generations, streamEvents } from "./api.js";
import { bytes, count, seconds, stageLabel } from "./format.js";

const STAGES = ["image_loading", "image_preprocessing", "shape_generation", "texture_synthesis", "mesh_export"];
const TERMINAL = ["succeeded", "failed", "cancelled"];
const FORMATS = [
  ["glb", "GLB"],
  ["obj", "OBJ (zip)"],
  ["stl", "STL"],
  ["ply", "PLY"],
];
// The stream sends one `queued` event at submission; the position after that
// comes from polling the job while it waits.
const QUEUE_POLL_MS = 1500;
// Pauses before reconnecting a broken stream: doubling, at most this.
const RECONNECT_MAX_MS = 10000;

export class RunPanel {
  constructor(root, { viewer, onFinished }) {
    this.viewer = viewer;
    this.onFinished = onFinished;
    this.jobId = null;
    this.source = null;
    this.queueTimer = null;
    this.timings = {};
    this.el = {
      id: root.querySelector("#job-id"),
      status: root.querySelector("#run-status"),
      progress: root.querySelector("#run-progress"),
      cancel: root.querySelector("#cancel"),
      stages: new Map(STAGES.map((s) => [s, root.querySelector(`#stages [data-stage="${s}"]`)])),
      error: root.querySelector("#run-error"),
      result: root.querySelector("#result"),
      downloads: root.querySelector("#downloads"),
      vertices: root.querySelector("#stat-vertices"),
      faces: root.querySelector("#stat-faces"),
      watertight: root.querySelector("#stat-watertight"),
      extents: root.querySelector("#stat-extents"),
      cutout: root.querySelector("#cutout"),
      cutoutFigure: root.querySelector("#cutout-figure"),
    };
    this.el.cancel.addEventListener("click", () => this.cancel());
  }

  // A job from the submit answer, the history, or the address bar.
  open(job) {
    this.stop();
    this.jobId = job.id;
    this.job = job;
    this.el.id.textContent = job.id;
    this.el.error.hidden = true;
    this.el.result.hidden = true;
    this.viewer.clear();
    this.timings = {};
    for (const stage of STAGES) this.setStage(stage, "pending");
    for (const [stage, elapsed] of Object.entries(job.stage_timings || {})) this.setStage(stage, "completed", 1, elapsed);
    this.el.progress.value = job.progress || 0;
    if (TERMINAL.includes(job.status)) {
      this.showOutcome(job.status, job.result, job.error);
      return;
    }
    this.showStatus(job.status, job.queue_position);
    this.el.cancel.hidden = false;
    this.watch(job.id);
  }

  stop() {
    if (this.source) this.source.abort();
    this.source = null;
    clearTimeout(this.queueTimer);
    this.queueTimer = null;
    this.el.cancel.hidden = true;
  }

  async watch(id) {
    const stream = new AbortController();
    this.source = stream;
    const mine = () => this.source === stream;
    let lastEventId = null;
    let pause = 500;
    while (mine()) {
      try {
        for await (const message of streamEvents(generations.eventsUrl(id), { lastEventId, signal: stream.signal })) {
          if (!mine()) return;
          if (message.id) lastEventId = message.id;
          pause = 500;
          const outcome = this.onEvent(id, message.event, JSON.parse(message.data));
          if (outcome === "end") return;
          if (outcome === "reconnect") break;
        }
      } catch (err) {
        if (!mine() || err.name === "AbortError") return;
        if (err.status && err.status < 500) {
          // The request itself is refused (an unknown job, no token): reconnecting will not help.
          this.stop();
          this.showError(err.message);
          return;
        }
      }
      // The stream ended without the job's end (the service restarting, the network): resume.
      if (!mine()) return;
      this.el.status.textContent = "Connection lost; reconnecting…";
      await new Promise((resolve) => setTimeout(resolve, pause));
      pause = Math.min(pause * 2, RECONNECT_MAX_MS);
    }
  }

  // One event; "end" when the stream is done with (a terminal event, or an error that is final).
  onEvent(id, name, data) {
    if (name === "queued") {
      this.showStatus("queued", data.queue_position);
      this.pollQueue(id);
    } else if (name === "stage") {
      this.el.progress.value = data.progress;
      this.setStage(data.stage, data.state, data.stage_progress, data.elapsed_seconds);
      // image_loading runs at submission, before the job waits in the queue.
      if (data.stage !== "image_loading") {
        clearTimeout(this.queueTimer);
        this.queueTimer = null;
        if (data.state !== "completed") {
          this.showStatus("running", 0, data.stage, data.stage_progress, data.detail);
        }
      }
    } else if (TERMINAL.includes(name)) {
      this.stop();
      if (name === "succeeded") this.el.progress.value = 1;
      this.showOutcome(name, data.result, data.error);
      this.onFinished(id);
      return "end";
    } else if (name === "error") {
      // The gateway's own error event. UNAVAILABLE: the service is restarting, so resume; else final.
      const error = data.error || {};
      if (error.code === "UNAVAILABLE") return "reconnect";
      this.stop();
      this.showError(error.message || "the progress stream failed");
      return "end";
    }
    return null;
  }

  async refresh(id) {
    try {
      const job = await generations.get(id);
      if (this.jobId === id) this.open(job);
    } catch (err) {
      if (this.jobId === id) this.showError(err.message);
    }
  }

  pollQueue(id) {
    clearTimeout(this.queueTimer);
    this.queueTimer = setTimeout(async () => {
      try {
        const job = await generations.get(id);
        if (this.jobId !== id || this.queueTimer === null) return;
        if (job.status === "queued") {
          this.showStatus("queued", job.queue_position);
          this.pollQueue(id);
        }
      } catch {
        if (this.jobId === id && this.queueTimer !== null) this.pollQueue(id);
      }
    }, QUEUE_POLL_MS);
  }

  async cancel() {
    const id = this.jobId;
    this.el.cancel.disabled = true;
    try {
      await generations.cancel(id);
    } catch (err) {
      this.showError(`Could not cancel: ${err.message}`);
    } finally {
      this.el.cancel.disabled = false;
    }
  }

  setStage(stage, state, stageProgress = 0, elapsed = null) {
    const li = this.el.stages.get(stage);
    if (!li) return;
    const shown = state === "progress" || state === "started" ? "running" : state;
    li.dataset.state = shown;
    const fraction = shown === "completed" ? 1 : Math.max(0, Math.min(1, stageProgress || 0));
    li.querySelector(".stage-bar > span").style.width = `${(fraction * 100).toFixed(1)}%`;
    const time = li.querySelector(".stage-time");
    if (shown === "completed") {
      this.timings[stage] = elapsed;
      time.textContent = seconds(elapsed);
    }
    else if (shown === "running") time.textContent = `${Math.round(fraction * 100)}%`;
    else if (shown === "failed") time.textContent = "failed";
    else time.textContent = "—";
  }

  // `detail`: what the stage is doing, when the backend says ("denoising step 3 of 30").
  showStatus(status, queuePosition = 0, stage = null, stageProgress = 0, detail = "") {
    const running = stage ? `Running: ${stageLabel(stage)} (${Math.round((stageProgress || 0) * 100)}%)` : "Running";
    const text = {
      queued: queuePosition > 0 ? `Waiting in the queue: position ${queuePosition}.` : "Waiting in the queue.",
      running: detail ? `${running}: ${detail}.` : `${running}.`,
    }[status];
    this.el.status.textContent = text || `Status: ${status}.`;
    this.el.status.dataset.status = status;
  }

  showError(message) {
    this.el.error.textContent = message;
    this.el.error.hidden = false;
  }

  showOutcome(status, result, error) {
    this.el.cancel.hidden = true;
    this.el.status.dataset.status = status;
    if (status === "succeeded") {
      const total = Object.values(this.timings).reduce((sum, s) => sum + s, 0);
      this.el.status.textContent = `Done in ${seconds(total)}.`;
      this.showResult(result);
      return;
    }
    for (const li of this.el.stages.values()) {
      if (li.dataset.state === "running") this.setStage(li.dataset.stage, status === "failed" ? "failed" : "pending");
    }
    this.el.status.textContent = status === "failed" ? "The generation failed." : "The generation was cancelled.";
    if (error) this.showError(`${error.code}: ${error.message}`);
  }

  showResult(result) {
    if (!result) return;
    const id = this.jobId;
    this.el.vertices.textContent = count(result.vertices);
    this.el.faces.textContent = count(result.faces);
    this.el.watertight.textContent = result.watertight ? "yes" : "no";
    const extents = result.extents || [];
    this.el.extents.textContent = extents.length === 3 ? extents.map((v) => v.toFixed(3)).join(" × ") : "—";
    this.el.downloads.replaceChildren(
      ...FORMATS.map(([format, label]) => {
        const link = document.createElement("a");
        link.className = "button";
        link.href = generations.resultUrl(id, format);
        link.dataset.format = format;
        // Formats other than the job's own are written on their first download: no size yet.
        const size = result.bytes && result.bytes[format];
        link.textContent = size ? `${label} · ${bytes(size)}` : label;
        link.setAttribute("aria-label", `Download ${label}${size ? `, ${bytes(size)}` : ""}`);
        // Through fetch, so the token goes with it; the file is saved from a blob.
        link.addEventListener("click", (e) => {
          e.preventDefault();
          this.download(link.href);
        });
        return link;
      }),
    );
    this.el.result.hidden = false;
    this.showCutout(id);
    this.viewer.load(generations.resultUrl(id, "glb"), id);
  }

  async download(url) {
    try {
      const { blob, filename } = await fetchFile(url);
      const href = URL.createObjectURL(blob);
      const save = document.createElement("a");
      save.href = href;
      save.download = filename;
      document.body.append(save);
      save.click();
      save.remove();
      setTimeout(() => URL.revokeObjectURL(href), 60000);
    } catch (err) {
      this.showError(`Could not download: ${err.message}`);
    }
  }

  // What the model was given: the picture with the mask the preprocessing chose, so a bad
  // cut-out can be told from a bad shape.
  async showCutout(id) {
    const { cutout, cutoutFigure } = this.el;
    if (cutout.src) URL.revokeObjectURL(cutout.src);
    cutout.removeAttribute("src");
    cutoutFigure.hidden = true;
    try {
      const { blob } = await fetchFile(generations.cutoutUrl(id));
      if (this.jobId !== id) return;
      cutout.src = URL.createObjectURL(blob);
      cutoutFigure.hidden = false;
    } catch {
      // Jobs from before cut-outs were kept have none: the figure stays hidden.
    }
  }
}
