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

// "emails.1" (0-based, as the API names it) as a person counts: "emails #2".
function place(field) {
  return String(field).replace(/\.(\d+)(?=\.|$)/g, (_, n) => ` #${Number(n) + 1}`);
}

export class ApiError extends Error {
  constructor(status, error) {
    const message = error?.message || `HTTP ${status}`;
    // Each detail names its field: the one bad address among a thousand pasted ones.
    const details = (error?.details || []).slice(0, 5).map((d) => `${place(d.field)}: ${d.message}`);
    const more = (error?.details || []).length > 5 ? ` and ${error.details.length - 5} more` : "";
    super(`${message}${error?.code ? ` (${error.code})` : ""}${details.length ? ` — ${details.join("; ")}${more}` : ""}`);
    this.status = status;
    this.code = error?.code;
    this.details = error?.details;
  }
}

// Calls the API; returns the parsed body ({data, next_cursor} or null for 204).
export async function api(method, path, body, headers = {}) {
  const all = { Authorization: `Bearer ${getKey()}`, ...headers };
  const init = { method, headers: all, credentials: "omit", cache: "no-store" };
  if (body !== undefined) {
    all["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const response = await fetch(path, init);
  const text = await response.text();
  const parsed = text ? JSON.parse(text) : null;
  if (!response.ok) throw new ApiError(response.status, parsed?.error);
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
  const response = await fetch(path, { headers: { Authorization: `Bearer ${getKey()}` }, credentials: "omit" });
  if (!response.ok) {
    const parsed = await response.json().catch(() => null);
    throw new ApiError(response.status, parsed?.error);
  }
  const url = URL.createObjectURL(await response.blob());
  const a = document.createElement("a");
  a.href = url;
  a.download = filename;
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 1000);
}
