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

export function say(message, kind = "") {
  const el = statusEl();
  el.className = `status ${kind}`;
  el.textContent = message;
}

export function fail(err) {
  say(err && err.message ? err.message : String(err), "bad");
}
