// One generation on screen: its queue position, its five stages advancing
// live over Server-Sent Events, then its statistics, downloads and 3D view.

import { generations } from "./api.js";
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
    if (this.source) this.source.close();
    this.source = null;
    clearTimeout(this.queueTimer);
    this.queueTimer = null;
    this.el.cancel.hidden = true;
  }

  watch(id) {
    const source = new EventSource(generations.eventsUrl(id));
    this.source = source;
    const mine = () => this.source === source;
    source.addEventListener("queued", (e) => {
      if (!mine()) return;
      const data = JSON.parse(e.data);
      this.showStatus("queued", data.queue_position);
      this.pollQueue(id);
    });
    source.addEventListener("stage", (e) => {
      if (!mine()) return;
      const data = JSON.parse(e.data);
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
    });
    for (const status of TERMINAL) {
      source.addEventListener(status, (e) => {
        if (!mine()) return;
        this.stop();
        const data = JSON.parse(e.data);
        if (status === "succeeded") this.el.progress.value = 1;
        this.showOutcome(status, data.result, data.error);
        this.onFinished(id);
      });
    }
    source.addEventListener("error", (e) => {
      if (!mine()) return;
      if (e.data) {
        // The gateway's own `error` event: the stream cannot go on.
        const body = JSON.parse(e.data);
        this.stop();
        this.showError(body.error ? body.error.message : "the progress stream failed");
        return;
      }
      if (source.readyState === EventSource.CONNECTING) {
        this.el.status.textContent = "Connection lost; reconnecting…";
      } else {
        // The browser gave up (the gateway answered with an error): ask the job
        // itself, after a pause so a stream that keeps failing is not hammered.
        this.stop();
        this.el.status.textContent = "Lost the progress stream; checking the job…";
        setTimeout(() => {
          if (this.jobId === id && !this.source) this.refresh(id);
        }, 2000);
      }
    });
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
        link.download = "";
        link.dataset.format = format;
        const size = result.bytes && result.bytes[format];
        link.textContent = size ? `${label} · ${bytes(size)}` : label;
        link.setAttribute("aria-label", `Download ${label}${size ? `, ${bytes(size)}` : ""}`);
        return link;
      }),
    );
    this.el.result.hidden = false;
    this.viewer.load(generations.resultUrl(id, "glb"), id);
  }
}
