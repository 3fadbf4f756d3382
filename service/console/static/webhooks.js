// Webhooks: endpoints (create, edit, delete, secret shown once, rotate, test, enable),
// each endpoint's delivery log, a delivery's attempts, retry one, recover since a time.
import { api, query } from "./api.js";
import { h, mount, time, badge, field, table, kv, say, sayNext, act, fail } from "./dom.js";

// What an endpoint subscribes to (webhook.test is not: "Send test" sends it to any endpoint).
const EVENT_TYPES = ["contact.deleted", "deletion_job.completed"];
const DELIVERY_STATUSES = ["pending", "failing", "succeeded", "failed"];
const REASONS = {
  gone: "the receiver answered 410 Gone",
  failing: "every attempt failed for the configured number of days",
};

export function owns(part) {
  return ["webhooks", "endpoints", "deliveries"].includes(part);
}

export async function render(view, parts, { ctx }) {
  if (parts[0] === "endpoints" && parts[1]) return endpointPage(view, parts[1], ctx);
  if (parts[0] === "deliveries" && parts[1]) return deliveryPage(view, parts[1], ctx);
  return listPage(view, ctx);
}

function eventTypeBoxes(prefix, selected = []) {
  return h("fieldset", {}, h("legend", {}, "Event types (none ticked: all of them)"),
    EVENT_TYPES.map((t) => h("label", { class: "choice" },
      h("input", { type: "checkbox", name: `${prefix}-event`, value: t, checked: selected.includes(t) }), t)));
}

function ticked(form, prefix) {
  return [...form.querySelectorAll(`input[name=${prefix}-event]:checked`)].map((i) => i.value);
}

function secretBox(secret, why) {
  return h("div", { class: "secret", role: "alert" },
    h("p", {}, h("strong", {}, "Copy this signing secret now: it is not shown again. "), why),
    h("code", { id: "endpoint-secret" }, secret));
}

function reason(endpoint) {
  if (endpoint.status !== "disabled") return "—";
  const r = endpoint.disabled_reason;
  return h("span", {}, REASONS[r] || r || "disabled",
    endpoint.disabled_at ? [" (since ", time(endpoint.disabled_at), ")"] : null);
}

async function listPage(view, ctx) {
  const url = h("input", { id: "ep-url", type: "url", required: true, placeholder: "https://crm.example.com/hooks/deletions" });
  const description = h("input", { id: "ep-description", type: "text", maxlength: 500 });
  const created = h("div", { "aria-live": "polite" });
  const list = h("div");
  const more = h("button", { type: "button", class: "secondary", hidden: true, id: "endpoints-more" }, "Older endpoints");
  const form = h("form", { id: "endpoint-form" },
    field("ep-url", "Receiver URL", url, "Signed per Standard Webhooks; verify with any Standard Webhooks library."),
    field("ep-description", "Description (optional)", description),
    eventTypeBoxes("new"),
    h("button", { type: "submit" }, "Add endpoint"));
  mount(view, h("h2", {}, "Webhooks"),
    h("div", { class: "grid" },
      h("section", { class: "card" }, h("h3", {}, "Subscribe a receiver"), form, created),
      h("section", { class: "card wide" }, h("h3", {}, "Endpoints"), list, more)));
  let cursor = null;
  let shown = [];
  let drawn = null;
  let appended = false; // once older pages are shown, stop refreshing (it would drop them)
  let latest = 0; // answers to an overtaken request are dropped
  // The first page again (after a change, or to refresh it), or the next page appended.
  const load = async (append) => {
    const mine = ++latest;
    const page = await api("GET", `/v1/webhooks/endpoints${query({ limit: 50, cursor: append ? cursor : null })}`);
    if (mine !== latest || !ctx.alive) return;
    shown = append ? shown.concat(page.data) : page.data;
    appended = appended || append;
    cursor = page.next_cursor;
    more.hidden = !cursor;
    // Redrawn only when something changed: a refresh must not take the focus from a link.
    const now = JSON.stringify(shown);
    if (now === drawn) return;
    drawn = now;
    mount(list, table("Webhook endpoints, newest first", ["URL", "Status", "Events", ""],
      shown.map((e) => [h("code", {}, e.url), h("span", {}, badge(e.status), e.status === "disabled" ? h("span", { class: "hint" }, " ", reason(e)) : null),
        e.event_types.length ? h("span", {}, e.event_types.map((t) => h("div", { class: "nowrap" }, t))) : "all",
        h("a", { href: `#/endpoints/${e.id}`, "aria-label": `Open endpoint ${e.url}` }, "Open")]),
      "No endpoints yet."));
  };
  more.addEventListener("click", () => act(() => load(true)));
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const added = await act(async () => {
      const body = { url: url.value.trim() };
      if (description.value.trim()) body.description = description.value.trim();
      const types = ticked(form, "new");
      if (types.length) body.event_types = types;
      const endpoint = (await api("POST", "/v1/webhooks/endpoints", body)).data;
      form.reset();
      mount(created, secretBox(endpoint.secret, "Your receiver verifies each delivery's signature with it."),
        h("p", {}, h("a", { href: `#/endpoints/${endpoint.id}` }, "Open the new endpoint")));
      say("Endpoint added.", "good");
    }, created);
    // The new secret stays on screen even if the list then fails to load.
    if (added) await load(false).catch(fail);
  });
  await load(false);
  // An endpoint's status changes without the user (a 410 disables it): keep the list true.
  ctx.every(3000, () => (appended ? null : load(false)));
}

// The endpoint as shown: the rotate answer carries the new secret, which a re-read does not.
function sameEndpoint(a, b) {
  return JSON.stringify({ ...a, secret: undefined }) === JSON.stringify({ ...b, secret: undefined });
}

async function endpointPage(view, id, ctx) {
  const base = `/v1/webhooks/endpoints/${encodeURIComponent(id)}`;
  let endpoint = (await api("GET", base)).data;
  const details = h("div");
  const notice = h("div", { "aria-live": "polite" });
  const actions = h("div");
  const editUrl = h("input", { id: "edit-url", type: "url", required: true });
  const editDescription = h("input", { id: "edit-description", type: "text", maxlength: 500 });
  const editForm = h("form", { id: "edit-form" });
  const statusSelect = h("select", { id: "delivery-status" },
    h("option", { value: "" }, "any status"), DELIVERY_STATUSES.map((s) => h("option", { value: s }, s)));
  const since = h("input", { id: "recover-since", type: "datetime-local", required: true });
  const recoverForm = h("form", { id: "recover-form" },
    field("recover-since", "Resend every failed or failing delivery since", since, "Your local time. Use it after an outage of your receiver."),
    h("button", { type: "submit" }, "Recover"));
  const log = h("div");
  const more = h("button", { type: "button", class: "secondary", hidden: true }, "Older deliveries");
  let confirming = false; // the delete confirmation is open: a re-read leaves it alone
  let editTouched = false; // the user is editing: a re-read does not overwrite their input
  editForm.addEventListener("input", () => { editTouched = true; });

  const drawDetails = () => mount(details, kv([
    ["URL", h("code", {}, endpoint.url)],
    ["Status", h("span", { id: "endpoint-status" }, badge(endpoint.status))],
    ["Why disabled", reason(endpoint)],
    ["Description", endpoint.description || "—"],
    ["Event types", endpoint.event_types.length ? endpoint.event_types.join(", ") : "all"],
    ["Created", time(endpoint.created_at)],
  ]));
  const drawEdit = () => {
    editTouched = false;
    editUrl.value = endpoint.url;
    editDescription.value = endpoint.description || "";
    mount(editForm, field("edit-url", "Receiver URL", editUrl), field("edit-description", "Description", editDescription),
      eventTypeBoxes("edit", endpoint.event_types), h("button", { type: "submit" }, "Save changes"));
  };
  // Every action ends by re-reading the endpoint and its log, whether it worked or not: a
  // 409 endpoint_disabled is news that the endpoint was disabled meanwhile.
  const settle = () => Promise.all([reread(), loadLog(false)]).catch(() => {}); // the refresh reports lasting failures
  const drawActions = () => {
    confirming = false;
    const buttons = [
      action("Send test event", "send-test", async () => {
        await api("POST", `${base}/test`);
        say("Test event queued: it appears in the delivery log below.", "good");
      }, { after: settle }),
      action("Rotate secret", "rotate", async () => {
        const rotated = (await api("POST", `${base}/rotate-secret`)).data;
        mount(notice, secretBox(rotated.secret,
          "The previous secret keeps signing alongside this one for an overlap window (24 hours by default): each delivery carries both signatures, so update your receiver within that window and nothing fails verification."));
        say("Secret rotated: copy the new one now.", "good");
      }, { after: settle, stale: [notice] }),
    ];
    if (endpoint.status === "disabled") {
      buttons.push(action("Enable", "enable", async () => {
        await api("POST", `${base}/enable`);
        say("Endpoint enabled.", "good");
      }, { after: settle }));
    }
    const del = h("button", { type: "button", class: "danger", id: "delete-endpoint" }, "Delete endpoint");
    del.addEventListener("click", () => {
      const really = h("button", { type: "button", class: "danger", id: "really-delete" }, "Yes, delete it");
      const keep = h("button", { type: "button", class: "secondary" }, "Keep it");
      keep.addEventListener("click", drawActions);
      really.addEventListener("click", () => act(async () => {
        await api("DELETE", base);
        // Said on the page the deletion leads to (this one goes away).
        sayNext("Endpoint deleted: its pending deliveries will not be sent.", "good");
        location.hash = "#/webhooks";
      }));
      mount(actions, buttons, h("p", { class: "error" }, "Delete this endpoint? Pending deliveries to it are dropped."), really, keep);
      confirming = true;
      really.focus();
    });
    mount(actions, buttons, del);
  };
  // The endpoint as it is now (a 410 from the receiver, another tab, the API): redrawn
  // when it changed.
  const reread = async () => {
    const fresh = (await api("GET", base)).data;
    if (!ctx.alive || sameEndpoint(fresh, endpoint)) return;
    endpoint = fresh;
    drawDetails();
    if (!confirming) drawActions();
    if (!editTouched) drawEdit();
  };

  let cursor = null;
  let shown = [];
  let appended = false;
  let latest = 0; // answers to an overtaken request are dropped
  const loadLog = async (append) => {
    const mine = ++latest;
    const page = await api("GET", `${base}/deliveries${query({ status: statusSelect.value, limit: 50, cursor: append ? cursor : null })}`);
    if (mine !== latest) return;
    shown = append ? shown.concat(page.data) : page.data;
    appended = appended || append;
    cursor = page.next_cursor;
    more.hidden = !cursor;
    mount(log, table("Deliveries to this endpoint, newest first", ["Created", "Event", "Status", "Attempts", "Next attempt", ""],
      shown.map((d) => [time(d.created_at), d.event_type, badge(d.status), String(d.attempt_count),
        ["succeeded", "failed"].includes(d.status) ? "—" : time(d.next_attempt_at), h("a", { href: `#/deliveries/${d.id}`, "aria-label": `Open delivery of ${d.event_type}` }, "Attempts")]),
      "No deliveries with this status."));
  };

  editForm.addEventListener("submit", async (event) => {
    event.preventDefault();
    const saved = await act(async () => {
      endpoint = (await api("PATCH", base, {
        url: editUrl.value.trim(), description: editDescription.value.trim() || null,
        event_types: ticked(editForm, "edit"),
      })).data;
      say("Saved.", "good");
      drawDetails();
      if (!confirming) drawActions();
      drawEdit();
    });
    if (!saved) await settle();
  });
  recoverForm.addEventListener("submit", async (event) => {
    event.preventDefault();
    await act(async () => {
      const when = new Date(since.value);
      if (Number.isNaN(when.getTime())) throw new Error("Pick a date and time.");
      const n = (await api("POST", `${base}/recover`, { since: when.toISOString() })).data.requeued;
      say(n ? `${n} ${n === 1 ? "delivery" : "deliveries"} queued again.` : "No failed or failing delivery since then: nothing was queued again.", "good");
    });
    await settle();
  });
  // A log that failed to load for the new filter is not shown under it.
  statusSelect.addEventListener("change", () => { appended = false; act(() => loadLog(false), log); });
  more.addEventListener("click", () => act(() => loadLog(true)));

  mount(view,
    h("p", {}, h("a", { href: "#/webhooks" }, "← All endpoints")),
    h("h2", {}, "Webhook endpoint"),
    h("div", { class: "grid" },
      h("section", { class: "card" }, details, actions, notice),
      h("section", { class: "card" }, h("h3", {}, "Edit"), editForm)),
    h("section", { class: "card" }, h("h3", {}, "Delivery log"),
      h("div", { class: "filters" }, field("delivery-status", "Show deliveries with status", statusSelect)),
      log, more, h("h3", {}, "Recover after an outage"), recoverForm));
  drawDetails();
  drawActions();
  drawEdit();
  await loadLog(false);
  // The endpoint itself is re-read with its log: the dispatcher disables it on a 410 or
  // after days of failures, and the page must say so (and offer Enable).
  ctx.every(2000, () => Promise.all([reread(), appended ? null : loadLog(false)]));
}

// A button whose click is a user's action (see dom.act); `after` runs once it is over,
// whatever its outcome (re-reading what it may have changed).
function action(label, id, fn, { after = null, stale = [] } = {}) {
  const button = h("button", { type: "button", class: "secondary", id }, label);
  button.addEventListener("click", async () => {
    button.disabled = true;
    try {
      await act(fn, ...stale);
      if (after) await after();
    } finally { button.disabled = false; }
  });
  return button;
}

function excerpt(text) {
  if (!text) return "—";
  return text.length > 200 ? `${text.slice(0, 200)}…` : text;
}

async function deliveryPage(view, id, ctx) {
  const base = `/v1/webhooks/deliveries/${encodeURIComponent(id)}`;
  let d = (await api("GET", base)).data;
  const details = h("div");
  const attempts = h("div");
  const draw = () => {
    mount(details, kv([
      ["Event", `${d.event_type} (${d.event_id})`],
      ["Status", h("span", { id: "delivery-status-now" }, badge(d.status))],
      ["Attempts", String(d.attempt_count)],
      ["Created", time(d.created_at)],
      ["Next attempt", ["succeeded", "failed"].includes(d.status) ? "—" : time(d.next_attempt_at)],
      ["Completed", time(d.completed_at)],
    ]));
    mount(attempts, table("Attempts, oldest first", ["Time", "HTTP status", "Latency", "Error", "Response excerpt"],
      d.attempts.map((a) => [time(a.attempted_at), a.status_code === null ? "—" : String(a.status_code),
        `${Math.round(a.latency_ms)} ms`, a.error || "—", h("code", {}, excerpt(a.response_body))]),
      "Not tried yet."));
  };
  const load = async () => {
    const fresh = (await api("GET", base)).data;
    if (!ctx.alive) return;
    d = fresh;
    draw();
  };
  const retry = action("Retry now", "retry-delivery", async () => {
    await api("POST", `${base}/retry`);
    say("Retry queued.", "good");
  }, { after: () => load().catch(() => {}) }); // the refresh reports lasting failures
  retry.className = "";
  draw();
  mount(view, h("p", {}, h("a", { href: `#/endpoints/${d.endpoint_id}` }, "← Endpoint")), h("h2", {}, "Delivery"),
    h("section", { class: "card" }, details, retry),
    h("section", { class: "card" }, h("h3", {}, "Attempts"), attempts));
  ctx.every(1500, load);
}
