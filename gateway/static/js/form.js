// The settings form: the picture (picker or drop), the settings, and the
// API's errors shown beside the control they name.

import { generations } from "./api.js";
import { bytes } from "./format.js";

const FIELDS = ["resolution", "steps", "face_count", "remove_background", "foreground_ratio",
  "texture", "texture_size", "format", "seed"];
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
    root.addEventListener("input", (e) => this.clearError(e.target.id));
    root.addEventListener("reset", () => {
      this.clearErrors();
      // The picture stays: reset is for the settings.
      const kept = this.input.files;
      // The reset event fires before the form resets; restore after it.
      setTimeout(() => {
        this.input.files = kept;
        textureSize.disabled = false;
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

  formData() {
    const data = new FormData();
    data.append("image", this.input.files[0]);
    for (const name of FIELDS) {
      const control = this.form.elements[name];
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
