// Webhooks: endpoints (create, edit, delete, secret shown once, rotate, test, enable),
// each endpoint's delivery log, a delivery's attempts, retry one, recover since a time.
import { api, query } from "./api.js";
import { h, mount, time, badge, field, table, kv, say, sayNext, act, fail } from "./dom.js";

// What an endpoint subscribes to (webhook.test is not: "Send test" sends it to any endpoint).
const EVENT_TYPES = ["contact.deleted", "deletion_job.completed"];
const DELIVERY_STATUSES = ["pending", "failing", "succeeded", "failed"];
const URL_INPUT = { type: "text", inputmode: "url", autocomplete: "url", spellcheck: "false", required: true };
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

// What holds deliveries back at the endpoint's pace (GET …/endpoints/{id} gives both;
// null max_in_flight is the service's WEBHOOK_MAX_IN_FLIGHT_PER_ENDPOINT, 4 unless set).
function inFlightLimit(endpoint) {
  return endpoint.max_in_flight === null
    ? "the service default (WEBHOOK_MAX_IN_FLIGHT_PER_ENDPOINT, 4 unless the operator set it)"
    : String(endpoint.max_in_flight);
}

function rateLimit(endpoint) {
  return endpoint.rate_limit_per_s === null ? "none" : `${endpoint.rate_limit_per_s} requests per second`;
}

function paceNote(endpoint) {
  const rate = endpoint.rate_limit_per_s === null ? "" : ` and ${endpoint.rate_limit_per_s} per second`;
  const limit = endpoint.max_in_flight === null ? "the service's default number of" : String(endpoint.max_in_flight);
  return `This endpoint is sent at most ${limit} requests at a time${rate}: a delivery whose next attempt has come waits for its turn, and stays pending meanwhile.`;
}

function reason(endpoint) {
  if (endpoint.status !== "disabled") return "—";
  const r = endpoint.disabled_reason;
  return h("span", {}, REASONS[r] || r || "disabled",
    endpoint.disabled_at ? [" (since ", time(endpoint.disabled_at), ")"] : null);
}

async function listPage(view, ctx) {
  // Text, not type=url: the browser's own check ("Please enter a URL") would stop
  // 127.0.0.1:9001/x before the API could say what it lacks ("missing scheme: use http://…").
  const url = h("input", { id: "ep-url", ...URL_INPUT, placeholder: "https://crm.example.com/hooks/deletions" });
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
  const editUrl = h("input", { id: "edit-url", ...URL_INPUT });
  const editDescription = h("input", { id: "edit-description", type: "text", maxlength: 500 });
  const editForm = h("form", { id: "edit-form" });
  const statusSelect = h("select", { id: "delivery-status" },
    h("option", { value: "" }, "any status"), DELIVERY_STATUSES.map((s) => h("option", { value: s }, s)));
  const since = h("input", { id: "recover-since", type: "datetime-local", required: true });
  const recoverForm = h("form", { id: "recover-form" },
    field("recover-since", "Resend every failed or failing delivery since", since, "Your local time. Use it after an outage of your receiver."),
    h("button", { type: "submit" }, "Recover"));
  const recoverNote = h("p", { class: "hint", id: "recover-disabled", hidden: true },
    "The endpoint is disabled: enable it first (above), then recover what failed meanwhile.");
  const pace = h("p", { class: "hint", id: "endpoint-pace" });
  const log = h("div");
  const more = h("button", { type: "button", class: "secondary", hidden: true }, "Older deliveries");
  let confirming = false; // a confirmation (delete, rotate) is open: a re-read leaves it alone
  let editTouched = false; // the user is editing: a re-read does not overwrite their input
  editForm.addEventListener("input", () => { editTouched = true; });

  const drawDetails = () => mount(details, kv([
    ["URL", h("code", {}, endpoint.url)],
    ["Status", h("span", { id: "endpoint-status" }, badge(endpoint.status))],
    ["Why disabled", reason(endpoint)],
    ["Description", endpoint.description || "—"],
    ["Event types", endpoint.event_types.length ? endpoint.event_types.join(", ") : "all"],
    ["Requests in flight at most", h("span", { id: "endpoint-max-in-flight" }, inFlightLimit(endpoint))],
    ["Rate limit", h("span", { id: "endpoint-rate-limit" }, rateLimit(endpoint))],
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
  // Actions the API would refuse for the endpoint as it is are not offered: a disabled
  // endpoint gets no Send test and no Recover (409 endpoint_disabled), only Enable.
  const drawActions = () => {
    confirming = false;
    const disabled = endpoint.status === "disabled";
    const buttons = [
      disabled ? null : action("Send test event", "send-test", async () => {
        await api("POST", `${base}/test`);
        say("Test event queued: it appears in the delivery log below.", "good");
      }, { after: settle }),
      disabled ? action("Enable", "enable", async () => {
        await api("POST", `${base}/enable`);
        say("Endpoint enabled.", "good");
      }, { after: settle }) : null,
      askFirst("Rotate secret", "rotate", "secondary",
        "Rotate the signing secret? A new secret signs every delivery from now on; the current one keeps signing alongside it for an overlap window (24 hours by default), so update your receiver within that window and nothing fails verification.",
        "Yes, rotate it", "Keep the current secret", async () => {
          const rotated = (await api("POST", `${base}/rotate-secret`)).data;
          mount(notice, secretBox(rotated.secret,
            "The previous secret keeps signing alongside this one for the overlap window (24 hours by default): each delivery carries both signatures."));
          say("Secret rotated: copy the new one now.", "good");
        }, { stale: [notice] }),
      askFirst("Delete endpoint", "delete-endpoint", "danger",
        "Delete this endpoint? Its deliveries still waiting to be sent (pending or failing) become failed and are not sent; every delivery keeps its record and attempts.",
        "Yes, delete it", "Keep it", async () => {
          await api("DELETE", base);
          // Said on the page the deletion leads to (this one goes away).
          sayNext("Endpoint deleted: its pending and failing deliveries are now failed and will not be sent.", "good");
          location.hash = "#/webhooks";
        }, { leaves: true }),
    ];
    mount(actions, buttons, disabled
      ? h("p", { class: "hint", id: "disabled-hint" }, "While it is disabled nothing is sent to it: enable it to send a test event, retry deliveries or recover what failed meanwhile.")
      : null);
    drawState();
  };
  // What follows the endpoint's state outside its action buttons: Recover (refused while
  // it is disabled) and the note on its pace.
  const drawState = () => {
    const disabled = endpoint.status === "disabled";
    recoverForm.hidden = disabled;
    recoverNote.hidden = !disabled;
    mount(pace, paceNote(endpoint));
  };
  // A button that asks before it acts: the question with a button that does it
  // (`really-<id>`) and one that keeps things as they are (`keep-<id>`). Once it acted,
  // the page re-reads the endpoint (unless the action `leaves` the page).
  const askFirst = (label, id, kind, question, yes, no, fn, { stale = [], leaves = false } = {}) => {
    const button = h("button", { type: "button", class: kind, id }, label);
    button.addEventListener("click", () => {
      const really = h("button", { type: "button", class: kind === "danger" ? "danger" : "", id: `really-${id}` }, yes);
      const keep = h("button", { type: "button", class: "secondary", id: `keep-${id}` }, no);
      keep.addEventListener("click", drawActions);
      really.addEventListener("click", async () => {
        really.disabled = true;
        const done = await act(fn, ...stale);
        if (done && leaves) return;
        if (done) drawActions();
        else really.disabled = false;
        await settle();
      });
      mount(actions, h("p", { class: kind === "danger" ? "error" : "", id: "confirm-question" }, question), really, keep);
      confirming = true;
      really.focus();
    });
    return button;
  };
  // The endpoint as it is now (a 410 from the receiver, another tab, the API): redrawn
  // when it changed.
  const reread = async () => {
    const fresh = (await api("GET", base)).data;
    if (!ctx.alive || sameEndpoint(fresh, endpoint)) return;
    endpoint = fresh;
    drawDetails();
    if (!confirming) drawActions();
    else drawState();
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
      pace, log, more, h("h3", {}, "Recover after an outage"), recoverForm, recoverNote));
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

// What can be done with a delivery, by its endpoint's state and its own: nothing while
// the endpoint is deleted or disabled (retry answers 409 endpoint_deleted or
// endpoint_disabled; the page says why instead), "Send again" for one that succeeded (the
// receiver gets it twice, with the same webhook-id), "Retry now" otherwise.
function retryOffer(d, endpoint) {
  if (endpoint === null) {
    return { note: "Its endpoint was deleted: this delivery failed with it and is not sent again." };
  }
  if (endpoint.status === "disabled") {
    return { note: ["Its endpoint is disabled (", reason(endpoint), "): nothing is sent to it. Enable it on ",
      h("a", { href: `#/endpoints/${endpoint.id}` }, "the endpoint's page"), ", then retry or recover."] };
  }
  if (d.status === "succeeded") {
    return { label: "Send again", note: "It was delivered: sent again, your receiver gets it a second time, with the same webhook-id." };
  }
  if (d.status === "pending") {
    return { label: "Retry now", note: "Queued to be sent: Retry now makes it due at once (if it is being sent right now, it is sent again once that attempt ends)." };
  }
  return { label: "Retry now", note: null };
}

async function deliveryPage(view, id, ctx) {
  const base = `/v1/webhooks/deliveries/${encodeURIComponent(id)}`;
  // The endpoint as it is now; null once it was deleted (its deliveries stay readable).
  const endpointOf = async (delivery) => {
    try {
      return (await api("GET", `/v1/webhooks/endpoints/${encodeURIComponent(delivery.endpoint_id)}`)).data;
    } catch (err) {
      if (err && err.status === 404) return null;
      throw err;
    }
  };
  let d = (await api("GET", base)).data;
  let endpoint = await endpointOf(d);
  const details = h("div");
  const attempts = h("div");
  const offer = h("div");
  const back = h("p");
  let offered = null;
  const retry = action("Retry now", "retry-delivery", async () => {
    await api("POST", `${base}/retry`);
    say("Retry queued.", "good");
  }, { after: () => load().catch(() => {}) }); // the refresh reports lasting failures
  retry.className = "";
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
    mount(back, endpoint === null
      ? h("a", { href: "#/webhooks" }, "← All endpoints")
      : h("a", { href: `#/endpoints/${d.endpoint_id}` }, "← Endpoint"));
    // Redrawn only when the offer changed: a refresh must not take the focus from it.
    const now = retryOffer(d, endpoint);
    const key = JSON.stringify([now.label, endpoint && endpoint.status, d.status]);
    if (key === offered) return;
    offered = key;
    if (now.label) retry.textContent = now.label;
    mount(offer, now.label ? retry : null, now.note ? h("p", { class: "hint", id: "retry-note" }, now.note) : null);
  };
  const load = async () => {
    const fresh = (await api("GET", base)).data;
    const now = await endpointOf(fresh);
    if (!ctx.alive) return;
    d = fresh;
    endpoint = now;
    draw();
  };
  draw();
  mount(view, back, h("h2", {}, "Delivery"),
    h("section", { class: "card" }, details, offer),
    h("section", { class: "card" }, h("h3", {}, "Attempts"), attempts));
  ctx.every(1500, load);
}
