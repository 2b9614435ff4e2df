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

// The gateway's bearer token (GATEWAY_AUTH_TOKEN), when it has one: asked for once and kept
// for this tab only (sessionStorage), sent on every call, streams and downloads included.
const TOKEN_KEY = "orfeas.token";

export const auth = {
  get token() {
    return sessionStorage.getItem(TOKEN_KEY) || "";
  },
  set(token) {
    if (token) sessionStorage.setItem(TOKEN_KEY, token);
    else sessionStorage.removeItem(TOKEN_KEY);
  },
  headers() {
    const token = this.token;
    return token ? { Authorization: `Bearer ${token}` } : {};
  },
};

// Any 401 tells the page (studio.js asks for a token).
export const UNAUTHORIZED = "orfeas:unauthorized";

async function send(path, options = {}, accept = "application/json") {
  let response;
  try {
    response = await fetch(path, {
      ...options,
      headers: { Accept: accept, ...auth.headers(), ...(options.headers || {}) },
    });
  } catch (err) {
    if (err.name === "AbortError") throw err;
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
    const error = new ApiError(
      response.status,
      (err && err.code) || `HTTP_${response.status}`,
      (err && err.message) || `${response.status} ${response.statusText}`.trim(),
      response.headers.get("Retry-After"),
    );
    if (response.status === 401) window.dispatchEvent(new CustomEvent(UNAUTHORIZED, { detail: error }));
    throw error;
  }
  return response;
}

export async function request(path, options = {}) {
  return (await send(path, options)).json();
}

// A file (a model, a cut-out) as a Blob, with the name the gateway gives it.
export async function fetchFile(path) {
  const response = await send(path, {}, "*/*");
  const disposition = response.headers.get("Content-Disposition") || "";
  const match = /filename="([^"]+)"/.exec(disposition);
  return { blob: await response.blob(), filename: match ? match[1] : path.split("/").pop() };
}

// Server-Sent Events over fetch (EventSource cannot send the Authorization header): yields
// {event, data, id} until the server ends the stream. `lastEventId` resumes after that event.
export async function* streamEvents(path, { lastEventId = null, signal } = {}) {
  const headers = lastEventId ? { "Last-Event-ID": String(lastEventId) } : {};
  const response = await send(path, { headers, signal }, "text/event-stream");
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffered = "";
  let message = { event: "message", data: [], id: null };
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffered += value;
    let newline;
    while ((newline = buffered.indexOf("\n")) >= 0) {
      const line = buffered.slice(0, newline).replace(/\r$/, "");
      buffered = buffered.slice(newline + 1);
      if (line === "") {
        if (message.data.length) yield { event: message.event, data: message.data.join("\n"), id: message.id };
        message = { event: "message", data: [], id: null };
      } else if (line.startsWith(":")) {
        // a keep-alive comment
      } else {
        const colon = line.indexOf(":");
        const field = colon < 0 ? line : line.slice(0, colon);
        const text = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
        if (field === "event") message.event = text;
        else if (field === "data") message.data.push(text);
        else if (field === "id") message.id = text;
      }
    }
  }
}

export const generations = {
  submit: (form) => request("/api/v1/generations", { method: "POST", body: form }),
  get: (id) => request(`/api/v1/generations/${encodeURIComponent(id)}`),
  cancel: (id) => request(`/api/v1/generations/${encodeURIComponent(id)}`, { method: "DELETE" }),
  list: (pageToken = "") =>
    request(`/api/v1/generations?page_size=20${pageToken ? `&page_token=${encodeURIComponent(pageToken)}` : ""}`),
  eventsUrl: (id) => `/api/v1/generations/${encodeURIComponent(id)}/events`,
  resultUrl: (id, format) => `/api/v1/generations/${encodeURIComponent(id)}/result?format=${format}`,
  cutoutUrl: (id) => `/api/v1/generations/${encodeURIComponent(id)}/cutout`,
};

// The shape backends: ready or not (and why), their parameter ranges and defaults.
export const backends = {
  list: () => request("/api/v1/backends"),
};
