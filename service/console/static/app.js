// Entry point: sign-in, the sections the key's scopes allow, and the hash router.
import { api, getKey, setKey, signOut } from "./api.js";
import { h, mount, say, fail } from "./dom.js";
import * as deletions from "./deletions.js";
import * as webhooks from "./webhooks.js";
import * as audit from "./audit.js";

const SECTIONS = [
  { id: "deletions", label: "Deletions", scopes: ["contacts:read", "contacts:write"], module: deletions },
  { id: "webhooks", label: "Webhooks", scopes: ["webhooks:manage"], module: webhooks },
  { id: "audit", label: "Audit", scopes: ["audit:read"], module: audit },
];

let me = null;
let current = null; // the running view's context (its timers stop on navigation)

class ViewContext {
  constructor() { this.timers = []; this.alive = true; }
  every(ms, fn) { this.timers.push(setInterval(() => { if (this.alive) fn(); }, ms)); }
  stop() { this.alive = false; this.timers.forEach(clearInterval); }
}

function allowed() {
  return SECTIONS.filter((s) => s.scopes.some((scope) => me.scopes.includes(scope)));
}

function showSignIn(message = "") {
  me = null;
  if (current) current.stop();
  document.getElementById("nav").hidden = true;
  document.getElementById("who").hidden = true;
  document.getElementById("sign-in").hidden = false;
  document.getElementById("sign-in-error").textContent = message;
  mount(document.getElementById("view"));
  document.getElementById("api-key").focus();
}

async function start() {
  try {
    me = (await api("GET", "/v1/me")).data;
  } catch (err) {
    signOut();
    showSignIn(err.status === 401 ? "That key is unknown or revoked." : err.message);
    return;
  }
  document.getElementById("sign-in").hidden = true;
  document.getElementById("api-key").value = "";
  const who = document.getElementById("who");
  who.hidden = false;
  document.getElementById("who-name").textContent = `Workspace ${me.workspace_name}`;
  document.getElementById("who-scopes").textContent = me.scopes.join(" · ");
  const nav = document.getElementById("nav");
  mount(nav, allowed().map((s) => h("a", { href: `#/${s.id}`, "data-section": s.id }, s.label)));
  nav.hidden = false;
  route();
}

function route() {
  if (!me) return;
  const sections = allowed();
  const parts = location.hash.replace(/^#\/?/, "").split("/").filter(Boolean);
  let section = sections.find((s) => s.module.owns(parts[0]));
  if (!section) {
    if (!sections.length) {
      mount(document.getElementById("view"), h("p", {}, "This key has no scope the console can use."));
      return;
    }
    location.replace(`#/${sections[0].id}`);
    return;
  }
  for (const a of document.querySelectorAll("#nav a")) {
    if (a.dataset.section === section.id) a.setAttribute("aria-current", "page");
    else a.removeAttribute("aria-current");
  }
  if (current) current.stop();
  current = new ViewContext();
  say("");
  const view = document.getElementById("view");
  const focused = document.activeElement;
  section.module.render(view, parts, { me, ctx: current })
    .then(() => {
      // Moving to a new view puts keyboard and screen-reader focus on its heading, unless
      // the user moved the focus while the view loaded (tabbed to a link, say): never
      // take it away from where they put it.
      const heading = view.querySelector("h2");
      const moved = document.activeElement !== focused && document.activeElement !== document.body;
      if (heading && !moved && !view.contains(document.activeElement)) {
        heading.setAttribute("tabindex", "-1");
        heading.focus({ preventScroll: true });
      }
    })
    .catch(fail);
}

document.getElementById("sign-in-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const key = document.getElementById("api-key").value.trim();
  if (!key) return;
  setKey(key);
  start();
});

document.getElementById("sign-out").addEventListener("click", () => {
  signOut();
  history.replaceState(null, "", "/console");
  showSignIn();
  say("Signed out: the key is forgotten.", "good");
});

window.addEventListener("hashchange", route);

if (getKey()) start();
else showSignIn();
