// The dashboard's client of the public REST API (/v1/...): the same calls, the same
// Bearer key and the same answers as any other client. Nothing here is private to the UI.

const KEY_STORAGE = "qpa.apiKey";

export class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

// The key lives in sessionStorage: this tab only, gone when the tab or browser closes.
export const session = {
  get key() {
    return sessionStorage.getItem(KEY_STORAGE);
  },
  signIn(key) {
    sessionStorage.setItem(KEY_STORAGE, key);
  },
  signOut() {
    sessionStorage.removeItem(KEY_STORAGE);
  },
};

// Relative to the page (…/ui/), so the dashboard also works behind a path prefix.
function apiUrl(path, query) {
  const url = new URL(`..${path}`, document.baseURI);
  for (const [name, value] of Object.entries(query ?? {})) {
    if (value !== undefined && value !== null && value !== "") url.searchParams.set(name, value);
  }
  return url;
}

async function errorMessage(response) {
  let body = null;
  try {
    body = await response.json();
  } catch {
    // not JSON: fall through to the status line
  }
  // The API answers {"detail": "<what is wrong>"}; other shapes are read as well as can be.
  const detail = body?.detail ?? body?.error?.message ?? body?.error ?? body?.message;
  if (typeof detail === "string") return detail;
  if (Array.isArray(detail)) return detail.map((item) => item?.msg ?? JSON.stringify(item)).join("; ");
  if (detail && typeof detail === "object") return detail.message ?? detail.msg ?? JSON.stringify(detail);
  return `HTTP ${response.status} ${response.statusText}`.trim();
}

export async function request(path, { method = "GET", query, json, body, accept, signal, key } = {}) {
  const headers = {};
  const token = key ?? session.key;
  if (token) headers.Authorization = `Bearer ${token}`;
  if (json !== undefined) {
    headers["Content-Type"] = "application/json";
    body = JSON.stringify(json);
  }
  if (accept) headers.Accept = accept;
  let response;
  try {
    response = await fetch(apiUrl(path, query), { method, headers, body, signal, cache: "no-store" });
  } catch (error) {
    if (error.name === "AbortError") throw error;
    throw new ApiError(0, `cannot reach the API (${error.message})`);
  }
  if (!response.ok) throw new ApiError(response.status, await errorMessage(response));
  return response;
}

const getJson = async (path, options) => (await request(path, options)).json();

export const listJobs = ({ limit = 20, after, status, signal } = {}) =>
  getJson("/v1/jobs", { query: { limit, after, status }, signal });

export const getJob = (jobId, signal) => getJson(`/v1/jobs/${encodeURIComponent(jobId)}`, { signal });

export const cancelJob = (jobId) =>
  getJson(`/v1/jobs/${encodeURIComponent(jobId)}/cancel`, { method: "POST" });

export const createJob = (config) => getJson("/v1/jobs", { method: "POST", json: config });

export const listBackends = (signal) => getJson("/v1/backends", { signal });

// The adapter methods the server accepts: the job config schema's `method` enum, so a method
// added to the library shows up here without a dashboard change.
export const listMethods = async (signal) =>
  (await getJson("/openapi.json", { signal })).components.schemas.JobConfig.properties.method.enum;

export function uploadFile(file) {
  const form = new FormData();
  form.append("file", file, file.name);
  return getJson("/v1/files", { method: "POST", body: form });
}

// Checks a key before it is kept: any authenticated call answers 401 for a bad key.
export const checkKey = (key) => request("/v1/jobs", { query: { limit: 1 }, key });

// An export of a finished job, as a Blob with the file name the server suggests.
export async function downloadExport(jobId, format) {
  const response = await request(`/v1/jobs/${encodeURIComponent(jobId)}/adapter`, {
    query: { format },
  });
  const disposition = response.headers.get("Content-Disposition") ?? "";
  const match = /filename\*?=(?:UTF-8'')?"?([^";]+)"?/i.exec(disposition);
  const filename = match ? decodeURIComponent(match[1]) : `${jobId}-${format}`;
  return { blob: await response.blob(), filename };
}

// Server-sent events of one job, read with fetch: EventSource cannot send the
// Authorization header. Calls onEvent(event object) for each event with an id; returns
// true once the server said `end` (the job is over), false if the stream just closed.
export async function streamEvents(jobId, { after = 0, signal, onEvent }) {
  const response = await request(`/v1/jobs/${encodeURIComponent(jobId)}/events`, {
    query: { after, stream: "true" },
    accept: "text/event-stream",
    signal,
  });
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return false;
      buffer += value.replace(/\r\n?/g, "\n");
      let boundary;
      while ((boundary = buffer.indexOf("\n\n")) >= 0) {
        const message = parseMessage(buffer.slice(0, boundary));
        buffer = buffer.slice(boundary + 2);
        if (message.event === "end") return true;
        if (message.data) onEvent(JSON.parse(message.data));
      }
    }
  } finally {
    reader.cancel().catch(() => {});
  }
}

function parseMessage(block) {
  const message = { event: "message", data: "" };
  const data = [];
  for (const line of block.split("\n")) {
    if (!line || line.startsWith(":")) continue; // comments are keep-alives
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? "" : line.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (field === "data") data.push(value);
    else if (field === "event") message.event = value;
    else if (field === "id") message.id = value;
  }
  message.data = data.join("\n");
  return message;
}
