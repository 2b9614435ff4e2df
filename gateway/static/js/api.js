// Every call to the gateway goes through here, so every failure reaches the
// page in one shape: ApiError with the API's own code and message.

export class ApiError extends Error {
  constructor(status, code, message, retryAfter = null) {
    super(message);
    this.status = status;
    this.code = code;
    this.retryAfter = retryAfter;
  }

  // The API starts 400 messages with the field at fault: "resolution: must be …".
  get field() {
    const match = /^([a-z_][a-z0-9_]*):/.exec(this.message);
    return match ? match[1] : null;
  }
}

export async function request(path, options = {}) {
  let response;
  try {
    response = await fetch(path, { headers: { Accept: "application/json" }, ...options });
  } catch (err) {
    // fetch rejects only when no answer came at all.
    throw new ApiError(0, "NETWORK", `the gateway did not answer (${err.message})`);
  }
  if (!response.ok) {
    let body = null;
    try {
      body = await response.json();
    } catch {
      // A proxy's HTML error page, say: fall back to the status line.
    }
    const err = body && body.error;
    throw new ApiError(
      response.status,
      (err && err.code) || `HTTP_${response.status}`,
      (err && err.message) || `${response.status} ${response.statusText}`.trim(),
      response.headers.get("Retry-After"),
    );
  }
  return response.json();
}

export const generations = {
  submit: (form) => request("/api/v1/generations", { method: "POST", body: form }),
  get: (id) => request(`/api/v1/generations/${encodeURIComponent(id)}`),
  cancel: (id) => request(`/api/v1/generations/${encodeURIComponent(id)}`, { method: "DELETE" }),
  list: (pageToken = "") =>
    request(`/api/v1/generations?page_size=20${pageToken ? `&page_token=${encodeURIComponent(pageToken)}` : ""}`),
  eventsUrl: (id) => `/api/v1/generations/${encodeURIComponent(id)}/events`,
  resultUrl: (id, format) => `/api/v1/generations/${encodeURIComponent(id)}/result?format=${format}`,
};

// The shape backends: ready or not (and why), their parameter ranges and defaults.
export const backends = {
  list: () => request("/api/v1/backends"),
};
