// Number and time formats shared by the page; en-US grouping so the figures
// read the same whatever the browser's locale (the tests compare them).

const grouped = new Intl.NumberFormat("en-US");

export function count(n) {
  return Number.isFinite(n) ? grouped.format(n) : "—";
}

export function seconds(s) {
  if (!Number.isFinite(s)) return "—";
  if (s < 1) return `${Math.round(s * 1000)} ms`;
  if (s < 100) return `${s.toFixed(2)} s`;
  return `${Math.round(s)} s`;
}

export function percent(share, digits = 1) {
  return Number.isFinite(share) ? `${(share * 100).toFixed(digits)}%` : "—";
}

export function bytes(n) {
  if (!Number.isFinite(n)) return "—";
  if (n < 1024) return `${n} B`;
  if (n < 1024 * 1024) return `${(n / 1024).toFixed(1)} KB`;
  return `${(n / 1024 / 1024).toFixed(1)} MB`;
}

export function megabytes(mb) {
  if (!Number.isFinite(mb)) return "—";
  return mb >= 10240 ? `${(mb / 1024).toFixed(1)} GB` : `${grouped.format(Math.round(mb))} MB`;
}

export function clock(date) {
  return date.toLocaleTimeString("en-GB", { hour: "2-digit", minute: "2-digit", second: "2-digit" });
}

export function when(iso) {
  if (!iso) return "—";
  const date = new Date(iso);
  if (Number.isNaN(date.getTime())) return "—";
  const sameDay = date.toDateString() === new Date().toDateString();
  return sameDay ? clock(date) : date.toLocaleString("en-GB", { dateStyle: "short", timeStyle: "short" });
}

export const STAGE_LABELS = {
  image_loading: "Image loading",
  image_preprocessing: "Preprocessing",
  shape_generation: "Shape generation",
  texture_synthesis: "Texture synthesis",
  mesh_export: "Mesh export",
};

export function stageLabel(name) {
  return STAGE_LABELS[name] || String(name).replace(/_/g, " ");
}
