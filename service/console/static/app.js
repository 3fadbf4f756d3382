// Entry point: sign-in, the sections the key's scopes allow, and the hash router.
import { api, getKey, setKey, signOut, onRefusedKey } from "./api.js";
import { h, mount, say, sayNext, unsay, fail, errorText, takeNext } from "./dom.js";
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

// One view's life: its timers, and whether it still owns the screen. Each refresh waits
// for the previous one (a slow answer never piles up requests); a refresh that fails
// says so once and takes its message away when a later one works; one that finds the
// page's resource gone (404) ends the view with that error (`onGone`).
class ViewContext {
  constructor(onGone) { this.timers = []; this.alive = true; this.onGone = onGone; }
  every(ms, fn) {
    let running = false;
    let shown = null;
    this.timers.push(setInterval(async () => {
      if (!this.alive || running) return;
      running = true;
      try {
        await fn();
        unsay(shown);
        shown = null;
      } catch (err) {
        if (!this.alive) return;
        if (err && err.status === 404) this.onGone(err);
        else {
          unsay(shown);
          shown = fail(err);
        }
      } finally {
        running = false;
      }
    }, ms));
  }
  stop() { this.alive = false; this.timers.forEach(clearInterval); }
}

function allowed() {
  return SECTIONS.filter((s) => s.scopes.some((scope) => me.scopes.includes(scope)));
}

function showSignIn(message = "") {
  me = null;
  if (current) current.stop();
  current = null;
  const nav = document.getElementById("nav");
  nav.hidden = true;
  mount(nav);
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

// Shows the view the hash names. The previous view goes first (its timers stop, its
// content leaves the screen, its late answers land in a detached element); the new one
// renders into its own element, and if it cannot load, only the error is shown.
function route() {
  if (!me) return;
  const sections = allowed();
  const parts = location.hash.replace(/^#\/?/, "").split("/").filter(Boolean);
  const view = document.getElementById("view");
  if (current) current.stop();
  current = null;
  let section = sections.find((s) => s.module.owns(parts[0]));
  if (!section) {
    if (!sections.length) {
      mount(view, h("p", {}, "This key has no scope the console can use."));
      return;
    }
    // A page the key may not open (a link from another key's session) says why it
    // shows another section instead; an empty hash just opens the first section.
    const refused = SECTIONS.find((s) => s.module.owns(parts[0]));
    if (refused) {
      sayNext(`${refused.label} needs a key with ${refused.scopes.join(" or ")}; this key has ${me.scopes.join(", ")}. Showing ${sections[0].label} instead.`, "bad");
    } else if (parts.length) {
      sayNext(`There is no page #/${parts.join("/")} in the console. Showing ${sections[0].label} instead.`, "bad");
    }
    location.replace(`#/${sections[0].id}`);
    return;
  }
  for (const a of document.querySelectorAll("#nav a")) {
    if (a.dataset.section === section.id) a.setAttribute("aria-current", "page");
    else a.removeAttribute("aria-current");
  }
  const page = h("div", { class: "page", "aria-busy": "true" }, h("p", { class: "hint", id: "view-loading" }, "Loading…"));
  const ctx = new ViewContext((err) => {
    if (ctx !== current) return;
    ctx.stop();
    showFailure(page, section, err);
  });
  current = ctx;
  const message = takeNext();
  say(message ? message.message : "", message ? message.kind : "");
  mount(view, page);
  const focused = document.activeElement;
  const focusHeading = () => {
    // Moving to a new view puts keyboard and screen-reader focus on its heading, unless
    // the user moved the focus while the view loaded (tabbed to a link, say): never
    // take it away from where they put it.
    const heading = page.querySelector("h2");
    const moved = document.activeElement !== focused && document.activeElement !== document.body;
    if (heading && !moved && !page.contains(document.activeElement)) {
      heading.setAttribute("tabindex", "-1");
      heading.focus({ preventScroll: true });
    }
  };
  section.module.render(page, parts, { me, ctx })
    .then(() => {
      if (ctx !== current) return;
      page.removeAttribute("aria-busy");
      focusHeading();
    })
    .catch((err) => {
      if (ctx !== current) return; // a newer view (or the sign-in) owns the screen
      ctx.stop();
      if (err && err.signedOut) return;
      showFailure(page, section, err);
      focusHeading();
    });
}

// A view that could not load (or whose subject went away): the error alone, and the way
// back to its section; nothing of the view that was there before.
function showFailure(page, section, err) {
  page.removeAttribute("aria-busy");
  mount(page,
    h("h2", {}, "This page could not be shown"),
    h("p", { class: "error", id: "view-error", role: "alert" }, errorText(err)),
    h("p", {}, h("a", { href: `#/${section.id}` }, `← ${section.label}`)));
}

// A key revoked (or expired) while signed in: the next request's 401 signs out and says
// why, wherever it came from. Requests still in flight with the old key are answered
// 401 too; they are told nothing more (true: "already said").
onRefusedKey((err, keyUsed) => {
  if (keyUsed !== getKey()) return true;
  if (!me) return false; // the sign-in itself says it
  signOut();
  showSignIn(`The service refused this key (${err.code || "HTTP 401"}): it is unknown or was revoked, so you are signed out. Sign in with a valid key.`);
  say("Signed out: the service refused the key.", "bad");
  return true;
});

document.getElementById("sign-in-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const key = document.getElementById("api-key").value.trim();
  if (!key) {
    document.getElementById("sign-in-error").textContent = "Paste an API key first: the field is empty.";
    document.getElementById("api-key").focus();
    return;
  }
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
