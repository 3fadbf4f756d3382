// The public API, called with the key the user typed. The key lives in sessionStorage
// only: never in a URL, never in a cookie; signOut() forgets it.

const KEY = "contact-deletion.api-key";

export function getKey() {
  return sessionStorage.getItem(KEY);
}

export function setKey(key) {
  sessionStorage.setItem(KEY, key);
}

export function signOut() {
  sessionStorage.removeItem(KEY);
}

// Who hears of a 401 (the key was revoked while signed in): app.js signs out. It is
// given the error and the key the request carried, and returns true when the user has
// been told (or the key is already gone), so that callers say nothing more.
let refused = () => false;

export function onRefusedKey(handler) {
  refused = handler;
}

// "emails.1" (0-based, as the API names it) as a person counts: "emails #2".
function place(field) {
  return String(field).replace(/\.(\d+)(?=\.|$)/g, (_, n) => ` #${Number(n) + 1}`);
}

function valueText(value) {
  if (value === null || value === undefined) return "—";
  if (typeof value === "string") return value;
  if (Array.isArray(value) && value.every((v) => typeof v !== "object" || v === null)) return value.join(", ");
  return JSON.stringify(value);
}

function counted(list, limit, sep) {
  const shown = list.slice(0, limit).join(sep);
  return list.length > limit ? `${shown} and ${list.length - limit} more` : shown;
}

// The error envelope's `details`, whatever its shape (service/errors.py; the OpenAPI
// document says only "more about the error, or null"): a list of {field, message} for
// validation_error, an object ({required_scope}, {endpoint_id, disabled_reason},
// {allowed_methods}, {content_type}, …) for the others, or null. Each distinct detail is
// said once: one message given for four fields reads "a, b, c, d: message".
export function detailsText(details) {
  if (details === null || details === undefined || details === "") return "";
  if (Array.isArray(details)) {
    const byMessage = new Map();
    for (const d of details) {
      const isEntry = d && typeof d === "object" && !Array.isArray(d);
      const message = isEntry ? valueText(d.message ?? d.msg ?? "") : valueText(d);
      const field = isEntry && d.field !== undefined && d.field !== null ? place(d.field) : null;
      if (!byMessage.has(message)) byMessage.set(message, []);
      const fields = byMessage.get(message);
      if (field && !fields.includes(field)) fields.push(field);
    }
    const parts = [...byMessage].map(([message, fields]) => {
      const where = fields.length ? counted(fields, 5, ", ") : "";
      return where && message ? `${where}: ${message}` : where || message;
    });
    return counted(parts, 5, "; ");
  }
  if (typeof details === "object") {
    return counted(Object.entries(details).map(([k, v]) => `${k.replaceAll("_", " ")}: ${valueText(v)}`), 5, "; ");
  }
  return valueText(details);
}

const REASONS = {
  400: "the request was refused",
  401: "the key was refused",
  403: "this key may not do that",
  404: "not found",
  408: "the request timed out",
  413: "the request is too large",
  429: "too many requests: wait a moment and try again",
  500: "the service failed",
  502: "the service is not reachable behind its proxy",
  503: "the service is unavailable right now: try again in a moment",
  504: "the service did not answer in time",
};

export class ApiError extends Error {
  // `error` is the envelope's {code, message, details}, or null when the answer was not
  // one (a proxy's HTML page, an empty body).
  constructor(status, error) {
    const envelope = error && typeof error === "object" ? error : null;
    const message = envelope && typeof envelope.message === "string" && envelope.message
      ? envelope.message
      : `The service answered HTTP ${status}: ${REASONS[status] || (status >= 500 ? "the service failed" : "the request was refused")}.`;
    const code = envelope && typeof envelope.code === "string" ? envelope.code : undefined;
    const details = envelope ? detailsText(envelope.details) : "";
    super(`${message}${code ? ` (${code})` : ""}${details ? ` — ${details}` : ""}`);
    this.status = status;
    this.code = code;
    this.details = envelope ? envelope.details : undefined;
  }
}

// No answer at all: the network, or the service being down.
export class NetworkError extends Error {
  constructor() {
    super("The service could not be reached: check the network connection, or whether the service is running, and try again.");
    this.status = 0;
  }
}

async function send(path, init) {
  try {
    return await fetch(path, init);
  } catch {
    throw new NetworkError();
  }
}

function refusal(response, parsed, keyUsed) {
  const err = new ApiError(response.status, parsed && typeof parsed === "object" ? parsed.error : null);
  if (response.status === 401) err.signedOut = refused(err, keyUsed) === true;
  return err;
}

function parse(text) {
  if (!text) return null;
  try { return JSON.parse(text); } catch { return undefined; }
}

// Calls the API; returns the parsed body ({data, next_cursor} or null for 204).
export async function api(method, path, body, headers = {}) {
  const key = getKey();
  const json = body !== undefined ? { "Content-Type": "application/json" } : {};
  const all = { Authorization: `Bearer ${key}`, ...json, ...headers };
  const init = { method, headers: all, credentials: "omit", cache: "no-store" };
  if (body !== undefined) init.body = JSON.stringify(body);
  const response = await send(path, init);
  let text;
  try { text = await response.text(); } catch { throw new NetworkError(); }
  const parsed = parse(text);
  if (!response.ok) throw refusal(response, parsed, key);
  if (parsed === undefined) {
    throw new Error(`The service answered HTTP ${response.status} with something other than JSON: try again, and check that this page talks to the service.`);
  }
  return parsed;
}

export function query(params) {
  const q = new URLSearchParams();
  for (const [k, v] of Object.entries(params)) if (v !== undefined && v !== null && v !== "") q.set(k, v);
  const s = q.toString();
  return s ? `?${s}` : "";
}

// Downloads an authenticated response as a file (the key cannot go in a link).
export async function download(path, filename) {
  const key = getKey();
  const response = await send(path, { headers: { Authorization: `Bearer ${key}` }, credentials: "omit", cache: "no-store" });
  if (!response.ok) {
    const parsed = parse(await response.text().catch(() => ""));
    throw refusal(response, parsed, key);
  }
  let blob;
  try { blob = await response.blob(); } catch { throw new NetworkError(); }
  const url = URL.createObjectURL(blob);
  const a = document.createElement("a");
  a.href = url;
  a.download = filename;
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 1000);
}
