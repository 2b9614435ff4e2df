// Past generations, newest first, each reopenable in the run panel.

import { generations } from "./api.js";
import { count, seconds, when } from "./format.js";

export class History {
  constructor(root, { onOpen }) {
    this.rows = root.querySelector("#history-rows");
    this.status = root.querySelector("#history-status");
    this.more = root.querySelector("#history-more");
    this.onOpen = onOpen;
    this.nextToken = null;
    root.querySelector("#history-refresh").addEventListener("click", () => this.load());
    this.more.addEventListener("click", () => this.load(this.nextToken));
  }

  async load(pageToken = "") {
    let page;
    try {
      page = await generations.list(pageToken);
    } catch (err) {
      this.status.textContent = `Could not load the history: ${err.message}`;
      return;
    }
    const rows = page.generations.map((job) => this.row(job));
    if (pageToken) this.rows.append(...rows);
    else this.rows.replaceChildren(...rows);
    this.nextToken = page.next_page_token;
    this.more.hidden = !this.nextToken;
    const shown = this.rows.children.length;
    this.status.textContent = shown ? "" : "No generations yet.";
  }

  row(job) {
    const tr = document.createElement("tr");
    tr.dataset.id = job.id;
    tr.dataset.status = job.status;
    const p = job.parameters || {};
    const started = job.started_at || job.created_at;
    const duration = job.finished_at && job.started_at
      ? (new Date(job.finished_at) - new Date(job.started_at)) / 1000
      : NaN;
    const settings = `${p.resolution}³ · ${count(p.face_count)} faces · ${p.texture ? `${p.texture_size}px texture` : "no texture"} · ${String(p.format).toUpperCase()}`;
    const cells = [
      when(started),
      null,
      settings,
      Number.isFinite(duration) ? seconds(duration) : job.status === "queued" && job.queue_position ? `queue #${job.queue_position}` : "—",
    ];
    for (const text of cells) {
      const td = document.createElement("td");
      if (text === null) {
        const badge = document.createElement("span");
        badge.className = `badge status-${job.status}`;
        badge.textContent = job.status;
        td.append(badge);
        if (job.error) td.title = job.error.message;
      } else {
        td.textContent = text;
      }
      tr.append(td);
    }
    const action = document.createElement("td");
    const button = document.createElement("button");
    button.type = "button";
    const finished = job.status === "succeeded";
    const live = job.status === "queued" || job.status === "running";
    button.textContent = finished ? "Open" : live ? "Watch" : "Details";
    button.setAttribute("aria-label", `${button.textContent} generation started ${when(started)} (${job.status})`);
    button.addEventListener("click", () => this.onOpen(job.id));
    action.append(button);
    tr.append(action);
    return tr;
  }
}
