// Small DOM helpers: build elements from data (text always goes in as text, never as HTML).

export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (name.startsWith("on") && typeof value === "function") {
      el.addEventListener(name.slice(2), value);
    } else if (name === "class") {
      el.className = value;
    } else if (value === true) {
      el.setAttribute(name, "");
    } else {
      el.setAttribute(name, String(value));
    }
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const child of children) {
    if (child === null || child === undefined || child === false) continue;
    if (Array.isArray(child)) append(el, child);
    else el.append(child instanceof Node ? child : String(child));
  }
}

export function mount(target, ...children) {
  target.replaceChildren();
  append(target, children);
}

export function time(value) {
  if (!value) return "—";
  const d = new Date(value);
  if (Number.isNaN(d.getTime())) return String(value);
  const p = (n) => String(n).padStart(2, "0");
  // Local time, unambiguous order; the full ISO value is in the title.
  const text = `${d.getFullYear()}-${p(d.getMonth() + 1)}-${p(d.getDate())} ${p(d.getHours())}:${p(d.getMinutes())}:${p(d.getSeconds())}`;
  return h("time", { datetime: d.toISOString(), title: d.toISOString() }, text);
}

export function badge(status) {
  const text = String(status ?? "—");
  return h("span", { class: `badge s-${text.replace(/[^a-z_]/g, "")}` }, text.replaceAll("_", " "));
}

export function field(id, label, input, hint) {
  return h("div", {}, h("label", { for: id }, label), hint ? h("p", { class: "hint", id: `${id}-hint` }, hint) : null, input);
}

export function table(caption, headers, rows, empty = "Nothing yet.") {
  if (!rows.length) return h("p", { class: "hint" }, empty);
  return h("div", { class: "table-wrap" },
    h("table", {},
      h("caption", { class: "hint" }, caption),
      h("thead", {}, h("tr", {}, headers.map((t) => h("th", { scope: "col" }, t)))),
      h("tbody", {}, rows.map((cells) => h("tr", {}, cells.map((c) => h("td", {}, c)))))));
}

export function kv(pairs) {
  return h("dl", { class: "kv" }, pairs.flatMap(([k, v]) => [h("dt", {}, k), h("dd", {}, v ?? "—")]));
}

const statusEl = () => document.getElementById("status");
let said = 0; // which message the status line holds (see unsay)

// Puts `message` on the status line, replacing whatever it said; returns a token for unsay.
export function say(message, kind = "") {
  const el = statusEl();
  el.className = `status ${kind}`;
  el.textContent = message;
  said += 1;
  return said;
}

// Clears the status line if it still holds the message `token` named (a refresh that
// failed once and then worked again takes its own error away, and nothing else).
export function unsay(token) {
  if (token && token === said) say("");
}

// A message for the page that the next navigation opens ("Endpoint deleted." said on the
// page that is being left would be wiped by the switch).
let next = null;

export function sayNext(message, kind = "") {
  next = { message, kind };
}

export function takeNext() {
  const message = next;
  next = null;
  return message;
}

export function errorText(err) {
  return err && err.message ? err.message : String(err);
}

// Says an error; returns its token, or null for a refused key (the sign-out already said
// why, and the page is gone).
export function fail(err) {
  if (err && err.signedOut) return null;
  return say(errorText(err), "bad");
}

// A user's action: its outcome replaces whatever the status line said before (an old
// error under a new success is a lie), and when it fails, the answers it would have
// replaced (`stale`: elements) are emptied, so that no old answer sits under the new error.
export async function act(fn, ...stale) {
  say("");
  try {
    await fn();
    return true;
  } catch (err) {
    for (const el of stale) if (el) el.replaceChildren();
    fail(err);
    return false;
  }
}
