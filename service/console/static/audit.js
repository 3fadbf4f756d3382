// Audit: events browser (filters, cursor pages), "was this address deleted?" (the address
// goes in a POST body, never in a URL), a deleted contact's preserved timeline, chain
// verification and the NDJSON export.
import { api, query, download } from "./api.js";
import { h, mount, time, badge, field, table, kv, say, act } from "./dom.js";

// Every action the service writes (service/audit/models.py AuditAction; a test keeps them equal).
const ACTIONS = ["deletion.requested", "deletion.dry_run", "contact.deleted", "contact.deletion_failed",
  "deletion.completed", "webhook.endpoint.created", "webhook.endpoint.updated", "webhook.endpoint.deleted",
  "webhook.endpoint.secret_rotated", "webhook.endpoint.enabled", "webhook.endpoint.disabled",
  "webhook.delivery.exhausted", "api_key.created", "api_key.revoked", "timeline.redacted"];

export function owns(part) {
  return part === "audit";
}

export async function render(view, parts) {
  if (parts[1] === "contacts" && parts[2]) return timelinePage(view, parts[2]);
  return auditPage(view);
}

function target(e) {
  if (!e.target) return "—";
  const text = `${e.target.type} ${e.target.id}`;
  return e.target.type === "contact"
    ? h("a", { href: `#/audit/contacts/${e.target.id}`, "aria-label": `Timeline of contact ${e.target.id}` }, h("code", {}, text))
    : h("code", {}, text);
}

function eventRows(events) {
  return events.map((e) => [String(e.seq), time(e.occurred_at), e.action, target(e),
    e.job_id ? h("code", {}, e.job_id) : "—", e.actor ? h("code", {}, `${e.actor.type} ${e.actor.id}`) : "—"]);
}

const HEADERS = ["Seq", "Time", "Action", "Target", "Job", "Actor"];

function iso(input) {
  if (!input.value) return null;
  const d = new Date(input.value);
  return Number.isNaN(d.getTime()) ? null : d.toISOString();
}

async function auditPage(view) {
  // Verify
  const verdict = h("div", { id: "verify-result", "aria-live": "polite" });
  const verifyButton = h("button", { type: "button", id: "verify" }, "Verify the chain");
  verifyButton.addEventListener("click", () => act(async () => {
      const r = (await api("GET", "/v1/audit/verify")).data;
      mount(verdict, r.ok
        ? h("div", {}, h("p", {}, badge("ok"), ` The chain holds: ${r.events_checked} events checked.`),
          kv([["Head seq", String(r.head_seq)], ["Head hash", h("code", { id: "head-hash" }, r.head_hash)]]))
        : h("div", {}, h("p", { class: "error" }, badge("broken"), ` Broken at seq ${r.broken_seq ?? "?"} (${r.reason}).`),
          kv([["Detail", r.detail], ["Last good seq", String(r.head_seq)], ["Last good hash", h("code", {}, r.head_hash)]])));
  }, verdict));

  // Export
  const sinceSeq = h("input", { id: "export-since", type: "text", inputmode: "numeric", value: "1" });
  const exportButton = h("button", { type: "button", id: "export" }, "Download NDJSON");
  exportButton.addEventListener("click", () => act(async () => {
    const n = sinceSeq.value.trim() || "1";
    await download(`/v1/audit/export${query({ since_seq: n })}`, `audit-from-${n}.ndjson`);
    say("Export downloaded.", "good");
  }));

  // Lookup by address (POST body only)
  const email = h("input", { id: "lookup-email", type: "text", inputmode: "email", autocomplete: "off", spellcheck: "false" });
  const lookupResult = h("div", { id: "lookup-result", "aria-live": "polite" });
  const lookup = h("form", { id: "lookup-form" },
    field("lookup-email", "Email address", email, "Matched by its keyed hash; the address is sent in a request body, never in a URL."),
    h("button", { type: "submit" }, "Look up"));
  lookup.addEventListener("submit", (event) => {
    event.preventDefault();
    act(async () => {
      const page = await api("POST", "/v1/audit/events/query", { email: email.value.trim(), limit: 100 });
      const deleted = page.data.filter((e) => e.action === "contact.deleted");
      mount(lookupResult,
        h("p", {}, deleted.length ? h("strong", {}, `Yes: deleted (${deleted.length} contact${deleted.length === 1 ? "" : "s"}).`)
          : page.data.length ? "Events mention this address, but no deletion." : "No event mentions this address."),
        table("Events about this address", HEADERS, eventRows(page.data), ""));
    }, lookupResult);
  });

  // Browser
  const action = h("select", { id: "f-action" }, h("option", { value: "" }, "any action"), ACTIONS.map((a) => h("option", { value: a }, a)));
  const targetId = h("input", { id: "f-target", type: "text", spellcheck: "false" });
  const jobId = h("input", { id: "f-job", type: "text", spellcheck: "false" });
  const actor = h("input", { id: "f-actor", type: "text", spellcheck: "false" });
  const since = h("input", { id: "f-since", type: "datetime-local" });
  const until = h("input", { id: "f-until", type: "datetime-local" });
  const results = h("div");
  const more = h("button", { type: "button", class: "secondary", hidden: true, id: "events-more" }, "Next page");
  const browse = h("form", { id: "events-form" },
    h("div", { class: "filters" },
      field("f-action", "Action", action), field("f-target", "Target id", targetId), field("f-job", "Job id", jobId),
      field("f-actor", "Actor id", actor), field("f-since", "Since (local time)", since), field("f-until", "Until (local time)", until)),
    h("button", { type: "submit" }, "Search"));
  let cursor = null;
  let shown = [];
  let latest = 0; // answers to an overtaken request are dropped
  const load = async (append) => {
    const mine = ++latest;
    const params = { action: action.value, target_id: targetId.value.trim(), job_id: jobId.value.trim(),
      since: iso(since), until: iso(until), limit: 50, cursor: append ? cursor : null };
    const page = await api("GET", `/v1/audit/events${query({ ...params, actor_id: actor.value.trim() })}`);
    if (mine !== latest) return;
    shown = append ? shown.concat(page.data) : page.data;
    cursor = page.next_cursor;
    more.hidden = !cursor;
    mount(results, table("Audit events, oldest first", HEADERS, eventRows(shown), "No events match."));
  };
  // Results of the old filters are not left under the new filters' error.
  browse.addEventListener("submit", async (event) => {
    event.preventDefault();
    if (!(await act(() => load(false), results))) more.hidden = true;
  });
  more.addEventListener("click", () => act(() => load(true)));

  mount(view, h("h2", {}, "Audit trail"),
    h("div", { class: "grid" },
      h("section", { class: "card" }, h("h3", {}, "Was this address deleted?"), lookup, lookupResult),
      h("section", { class: "card" }, h("h3", {}, "Chain verification"),
        h("p", { class: "hint" }, "Walks this workspace's hash chain from seq 1."), verifyButton, verdict,
        h("h3", {}, "Export"), field("export-since", "From seq", sinceSeq), exportButton)),
    h("section", { class: "card" }, h("h3", {}, "Events"),
      // The API lists events in the order they were written, and offers no other order.
      h("p", { class: "hint", id: "events-order" }, "Oldest first, in the order they were written (by seq); narrow by Since and Until to reach recent events."),
      browse, results, more));
  await load(false);
}

async function timelinePage(view, contactId) {
  const t = (await api("GET", `/v1/audit/contacts/${encodeURIComponent(contactId)}/timeline`)).data;
  const back = h("p", {}, h("a", { href: "#/audit" }, "← Audit trail"));
  if (!t.deleted) {
    // A contact the workspace still has, or one whose deletion failed: the trail has no
    // deletion, and no preserved timeline (its live timeline belongs to the contacts API).
    const events = (await api("GET", `/v1/audit/events${query({ target_id: t.contact_id, limit: 50 })}`)).data;
    mount(view, back,
      h("h2", {}, "Contact not deleted"),
      h("section", { class: "card" }, kv([
        ["Contact", h("code", {}, t.contact_id)],
        ["Deleted", h("span", { id: "timeline-not-deleted" }, "no: the audit trail records no deletion of this contact")],
      ]),
      h("p", {}, "If it still exists, its timeline is live data, read through the API: ",
        h("code", {}, `GET /v1/contacts/${t.contact_id}/timeline`), " (scope contacts:read). This page shows only what a deletion preserved.")),
      h("section", { class: "card" }, h("h3", {}, "Events about this contact"),
        table("Audit events about this contact, oldest first", HEADERS, eventRows(events), "No audit event names this contact.")));
    return;
  }
  const by = t.requested_by;
  // The API gives the preserved timeline a page at a time (the event only on the first).
  const items = h("div");
  const more = h("button", { type: "button", class: "secondary", hidden: true, id: "timeline-more" }, "Older items");
  let shown = [];
  let cursor = null;
  const draw = (page) => {
    shown = shown.concat(page.timeline);
    cursor = page.next_cursor;
    more.hidden = !cursor;
    mount(items, table("Timeline items, newest first", ["Kind", "Created", "What", "Back-reference"],
      shown.map((i) => [i.kind, time(i.created_at),
        [i.subject || i.title, i.body].filter(Boolean).join(" — ") || "—", i.contact_id ? h("code", {}, i.contact_id) : "none"]),
      "No timeline items."));
  };
  const path = `/v1/audit/contacts/${encodeURIComponent(contactId)}/timeline`;
  more.addEventListener("click", () => act(async () => draw((await api("GET", `${path}${query({ limit: 50, cursor })}`)).data)));
  mount(view, back,
    h("h2", {}, "Deleted contact"),
    h("section", { class: "card" }, kv([
      ["Contact", h("code", {}, t.contact_id)],
      ["Deleted", h("span", { id: "timeline-deleted" }, badge("deleted"), " ", time(t.deletion?.occurred_at))],
      ["Requested by key", by?.api_key_id ? h("code", {}, by.api_key_id) : "—"],
      ["Job", by?.job_id ? h("a", { href: `#/jobs/${by.job_id}` }, h("code", {}, by.job_id)) : "—"],
      ["Request id", by?.request_id ? h("code", {}, by.request_id) : "—"],
      ["Audit event", t.deletion ? `seq ${t.deletion.seq}` : "—"],
    ])),
    h("section", { class: "card" }, h("h3", {}, "Preserved timeline"),
      h("p", { class: "hint" }, "Activities, notes and tasks that outlived the contact; their back-reference is gone."),
      items, more));
  draw(t);
}
