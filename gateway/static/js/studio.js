// The Studio page: wires the form, the run panel, the viewer, the history and
// the performance panel together. Everything it asks for is on this origin.

import { auth, generations, UNAUTHORIZED } from "./api.js";
import { GenerateForm } from "./form.js";
import { History } from "./history.js";
import { PerformancePanel } from "./performance.js";
import { RunPanel } from "./run.js";
import { Viewer } from "./viewer.js";

const $ = (selector) => document.querySelector(selector);
const HASH = /^#generation=([A-Za-z0-9._:-]+)$/;

const viewer = new Viewer($("#viewer"), $("#viewer-message"), $("#reset-view"));
const past = new History($(".history"), { onOpen: (id) => openGeneration(id, true) });
const run = new RunPanel($(".run"), { viewer, onFinished: () => past.load() });
const telemetry = new PerformancePanel($(".performance"));
new GenerateForm($("#generate-form"), {
  onSubmitted: (job) => {
    show(job);
    past.load();
  },
});

function show(job) {
  // The address names the job, so a reload or a shared link reopens it.
  window.history.replaceState(null, "", `#generation=${job.id}`);
  run.open(job);
}

async function openGeneration(id, moveFocus) {
  try {
    show(await generations.get(id));
  } catch (err) {
    run.open({ id, status: "failed", error: { code: err.code, message: err.message } });
  }
  if (moveFocus) {
    const heading = $("#run-title");
    heading.tabIndex = -1;
    heading.focus();
    heading.scrollIntoView({ block: "start" });
  }
}

// With GATEWAY_AUTH_TOKEN set, every /api/ call needs the token: asked for at the first 401, kept
// for the tab, and the page starts again with it. A token the gateway refuses is said so plainly.
const tokenDialog = $("#token-dialog");
window.addEventListener(UNAUTHORIZED, () => {
  if (tokenDialog.open) return;
  $("#token-message").textContent = auth.token
    ? "The gateway refused that token (401). Check it and enter it again."
    : "Enter the token the operator set as GATEWAY_AUTH_TOKEN.";
  tokenDialog.showModal();
  $("#token-input").focus();
});
$("#token-form").addEventListener("submit", () => {
  auth.set($("#token-input").value.trim());
  window.location.reload();
});

const linked = HASH.exec(window.location.hash);
if (linked) openGeneration(linked[1], false);
past.load();
telemetry.start();
document.body.dataset.ready = "true";
