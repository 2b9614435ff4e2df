// The settings form: the picture (picker or drop), the settings, and the
// API's errors shown beside the control they name.

import { backends, generations } from "./api.js";
import { bytes, count } from "./format.js";

const FIELDS = ["backend", "resolution", "steps", "guidance_scale", "face_count", "remove_background",
  "foreground_ratio", "texture", "texture_size", "format", "seed"];
// What resolution and steps mean for each backend (the ranges come from the API).
const MEANING = {
  resolution: { inflate: "Grid cells per side", hunyuan3d: "Octree resolution of the decoded volume" },
  steps: { inflate: "Refinement steps", hunyuan3d: "Denoising steps" },
};
// Errors about the upload itself, whatever the API calls the part.
const IMAGE_FIELDS = new Set(["image", "image_base64", "body"]);

export class GenerateForm {
  constructor(root, { onSubmitted }) {
    this.form = root;
    this.input = root.querySelector("#image");
    this.dropZone = root.querySelector("#drop-zone");
    this.thumbnail = root.querySelector("#thumbnail");
    this.fileName = root.querySelector("#image-name");
    this.submitButton = root.querySelector("#submit");
    this.formError = root.querySelector("#form-error");
    this.onSubmitted = onSubmitted;
    this.thumbnailUrl = null;

    this.input.addEventListener("change", () => this.showPicture());
    // A file the browser cannot decode gets no broken-image icon; the API still
    // judges it (it reads more formats than a browser shows).
    this.thumbnail.addEventListener("error", () => {
      if (!this.thumbnail.hidden && this.input.files[0]) {
        this.thumbnail.hidden = true;
        this.fileName.textContent += " · no preview";
      }
    });
    for (const type of ["dragenter", "dragover"]) {
      this.dropZone.addEventListener(type, (e) => {
        e.preventDefault();
        this.dropZone.classList.add("dragging");
      });
    }
    for (const type of ["dragleave", "drop"]) {
      this.dropZone.addEventListener(type, () => this.dropZone.classList.remove("dragging"));
    }
    this.dropZone.addEventListener("drop", (e) => {
      e.preventDefault();
      const file = e.dataTransfer && e.dataTransfer.files[0];
      if (!file) return;
      // Through the input, so the picker and the drop leave the same state.
      const transfer = new DataTransfer();
      transfer.items.add(file);
      this.input.files = transfer.files;
      this.showPicture();
    });
    const texture = root.querySelector("#texture");
    const textureSize = root.querySelector("#texture_size");
    texture.addEventListener("change", () => { textureSize.disabled = !texture.checked; });
    this.backend = root.querySelector("#backend");
    this.backendHint = root.querySelector("#backend-hint");
    this.backends = new Map();
    this.backend.addEventListener("change", () => this.applyBackend(true));
    this.loadBackends();
    root.addEventListener("input", (e) => this.clearError(e.target.id));
    root.addEventListener("reset", () => {
      this.clearErrors();
      // The picture stays: reset is for the settings.
      const kept = this.input.files;
      // The reset event fires before the form resets; restore after it.
      setTimeout(() => {
        this.input.files = kept;
        textureSize.disabled = false;
        this.applyBackend(false);
      });
    });
    root.addEventListener("submit", (e) => {
      e.preventDefault();
      this.submit();
    });
  }

  showPicture() {
    this.clearError("image");
    const file = this.input.files[0];
    if (this.thumbnailUrl) URL.revokeObjectURL(this.thumbnailUrl);
    this.thumbnailUrl = null;
    if (!file) {
      this.thumbnail.hidden = true;
      this.fileName.textContent = "";
      return;
    }
    this.thumbnailUrl = URL.createObjectURL(file);
    this.thumbnail.src = this.thumbnailUrl;
    this.thumbnail.alt = `Thumbnail of ${file.name}`;
    this.thumbnail.hidden = false;
    this.fileName.textContent = `${file.name} · ${bytes(file.size)}`;
  }

  // The backend list from the API: each option says whether it is ready, and why not.
  async loadBackends() {
    let listed;
    try {
      listed = (await backends.list()).backends;
    } catch {
      return; // inflate stays, with its ranges from the page
    }
    const chosen = this.backend.value;
    this.backends = new Map(listed.map((b) => [b.name, b]));
    this.backend.replaceChildren(
      ...listed.map((b) => {
        const option = document.createElement("option");
        option.value = b.name;
        option.textContent = b.ready ? b.name : `${b.name} (${b.state === "loading" ? "loading" : "not ready"})`;
        option.selected = b.name === chosen;
        option.dataset.state = b.state;
        return option;
      }),
    );
    this.applyBackend(false);
  }

  // Ranges, defaults and hints of the settings that depend on the backend; `useDefaults` also sets
  // the backend's default values (when the person picks another backend).
  applyBackend(useDefaults) {
    const backend = this.backends.get(this.backend.value);
    if (!backend) return;
    this.clearError("backend");
    this.backendHint.textContent = backend.ready
      ? backend.description
      : `Not ready: ${backend.reason}`;
    for (const name of ["resolution", "steps", "guidance_scale"]) {
      const control = this.form.elements[name];
      const range = backend.parameters[name];
      control.disabled = !range;
      if (!range) continue;
      control.min = range.minimum;
      control.max = range.maximum;
      if (useDefaults) control.value = range.default;
      const hint = this.form.querySelector(`#${name}-hint`);
      const meaning = (MEANING[name] && MEANING[name][backend.name]) || range.meaning;
      hint.textContent = `${meaning[0].toUpperCase()}${meaning.slice(1)}, ${count(range.minimum)}–${count(range.maximum)}`;
    }
  }

  formData() {
    const data = new FormData();
    data.append("image", this.input.files[0]);
    for (const name of FIELDS) {
      const control = this.form.elements[name];
      if (control.disabled) continue; // a setting the chosen backend does not have
      if (control.type === "checkbox") data.append(name, control.checked ? "true" : "false");
      else if (control.value.trim() !== "") data.append(name, control.value.trim());
    }
    return data;
  }

  async submit() {
    this.clearErrors();
    if (!this.input.files[0]) {
      this.showError("image", "image: choose a picture first");
      this.input.focus();
      return;
    }
    this.submitButton.disabled = true;
    this.submitButton.textContent = "Sending…";
    try {
      const job = await generations.submit(this.formData());
      this.onSubmitted(job);
    } catch (err) {
      this.showApiError(err);
    } finally {
      this.submitButton.disabled = false;
      this.submitButton.textContent = "Generate";
    }
  }

  showApiError(err) {
    const field = err.field;
    if (err.status === 429) {
      const wait = err.retryAfter ? ` Try again in ${err.retryAfter} s.` : " Try again shortly.";
      this.showError("form", `The queue is full: ${err.message}.${wait}`);
      this.submitButton.focus();
    } else if (field && IMAGE_FIELDS.has(field)) {
      this.showError("image", err.message);
      this.input.focus();
    } else if (field && FIELDS.includes(field)) {
      this.showError(field, err.message);
      this.form.elements[field].focus();
    } else {
      this.showError("form", err.status ? err.message : `Could not send: ${err.message}`);
    }
  }

  errorElement(name) {
    return this.form.querySelector(`#${name}-error`);
  }

  showError(name, message) {
    const element = this.errorElement(name);
    element.textContent = message;
    element.hidden = false;
    const control = name === "form" ? null : this.form.querySelector(`#${name}`);
    if (control) control.setAttribute("aria-invalid", "true");
  }

  clearError(name) {
    const element = name && this.errorElement(name);
    if (!element) return;
    element.hidden = true;
    element.textContent = "";
    const control = this.form.querySelector(`#${name}`);
    if (control) control.removeAttribute("aria-invalid");
  }

  clearErrors() {
    for (const name of ["image", "form", ...FIELDS]) this.clearError(name);
  }
}
