// Deletions: the jobs list with live progress, a job's page (items, errors), and the
// delete form, which shows the dry run's outcome and asks before the real request.
import { api, query } from "./api.js";
import { h, mount, time, badge, field, table, kv, say, sayNext, act } from "./dom.js";

const TERMINAL = new Set(["completed", "completed_with_errors", "failed"]);
const ITEM_STATUSES = ["pending", "deleted", "not_found", "failed"];

export function owns(part) {
  return part === "deletions" || part === "jobs";
}

export async function render(view, parts, { me, ctx }) {
  if (parts[0] === "jobs" && parts[1]) return jobPage(view, parts[1], me, ctx);
  const canWrite = me.scopes.includes("contacts:write");
  const canRead = me.scopes.includes("contacts:read");
  const jobs = h("section", { class: "card", "aria-labelledby": "jobs-h" });
  mount(view,
    h("h2", {}, "Deletions"),
    canWrite ? deleteForm(canRead) : h("p", { class: "hint" }, "This key cannot post deletions (it lacks contacts:write)."),
    canRead ? jobs : h("p", { class: "hint" }, "This key cannot list jobs (it lacks contacts:read)."));
  if (canRead) await jobsList(jobs, ctx);
}

// --- jobs ---------------------------------------------------------------------------


const PHASE_TEXT = { finding_contacts: "still finding contacts", deleting: "deleting", done: "done" };

export function progress(job) {
  const p = job.phase;
  // Filter/search jobs count their matches at the start; the final total is what was found.
  const total = (p === "done" ? job.total_requested : job.estimated_total ?? job.total_requested) ?? 0;
  const bar = h("progress", {
    max: Math.max(total, 1),
    value: p === "done" ? Math.max(total, 1) : job.processed_count,
    "aria-label": `Progress of job ${job.job_id}`,
  });
  if (p === "finding_contacts" && !total) bar.removeAttribute("value"); // indeterminate
  return h("span", { class: "progress" }, bar, " ",
    h("span", { class: "phase" }, `${PHASE_TEXT[p] || p} · ${job.processed_count}/${total}`));
}

export function selectorText(selector) {
  if (!selector) return "—";
  // "1 id", "3 ids", "1 email", "2 emails"
  const counted = (n, k) => `${n} ${k.replace("contact_ids", "ids").replace(/s$/, n === 1 ? "" : "s")}`;
  return Object.entries(selector).map(([k, v]) => {
    if (Array.isArray(v)) return counted(v.length, k);
    if (v && typeof v === "object" && "count" in v) return counted(v.count, k);
    if (typeof v === "number") return counted(v, k);
    if (typeof v === "string") return `${k} "${v}"`;
    return `${k} ${JSON.stringify(v)}`;
  }).join(", ");
}

function counts(job) {
  return `${job.deleted_count} deleted · ${job.not_found_count} not found · ${job.failed_count} failed`;
}

async function jobsList(section, ctx) {
  let cursor = null;
  const body = h("div");
  const more = h("button", { type: "button", class: "secondary", hidden: true }, "Older jobs");
  mount(section, h("h3", { id: "jobs-h" }, "Jobs"), body, more);
  let shown = [];
  let appended = false; // once older pages are shown, stop refreshing (it would drop them)
  const draw = () => mount(body, table("Deletion jobs, newest first",
    ["Created", "Selector", "Status", "Progress", "Counts", ""],
    shown.map((j) => [time(j.created_at), selectorText(j.selector), badge(j.status), progress(j),
      h("span", { class: "hide-narrow" }, counts(j)),
      h("a", { href: `#/jobs/${j.job_id}`, "aria-label": `Open job ${j.job_id}` }, "Open")]),
    "No deletion jobs yet."));
  let latest = 0; // answers to an overtaken request are dropped
  const load = async (append) => {
    const mine = ++latest;
    const page = await api("GET", `/v1/bulk-jobs${query({ limit: 20, cursor: append ? cursor : null })}`);
    if (mine !== latest) return;
    shown = append ? shown.concat(page.data) : page.data;
    appended = appended || append;
    cursor = page.next_cursor;
    more.hidden = !cursor;
    draw();
  };
  more.addEventListener("click", () => act(() => load(true)));
  await load(false);
  // Live progress: refresh the first page while any job on it is still running.
  ctx.every(1500, () => (!appended && shown.some((j) => !TERMINAL.has(j.status)) ? load(false) : null));
}

async function jobPage(view, jobId, me, ctx) {
  const summary = h("div");
  const errors = h("div");
  const items = h("div");
  const statusSelect = h("select", { id: "item-status" },
    h("option", { value: "" }, "any status"), ITEM_STATUSES.map((s) => h("option", { value: s }, s.replace("_", " "))));
  const more = h("button", { type: "button", class: "secondary", hidden: true }, "More items");
  mount(view,
    h("p", {}, h("a", { href: "#/deletions" }, "← All deletions")),
    h("h2", {}, "Deletion job"),
    h("section", { class: "card" }, summary),
    h("section", { class: "card" }, h("h3", {}, "Per-contact errors"), errors),
    h("section", { class: "card" }, h("h3", {}, "Items"),
      h("div", { class: "filters" }, field("item-status", "Show items with status", statusSelect)), items, more));

  let job = null;
  let cursor = null;
  let shownItems = [];
  const drawJob = () => {
    mount(summary, kv([
      ["Job", h("code", {}, job.job_id)],
      ["Status", h("span", { id: "job-status" }, badge(job.status))],
      ...(job.failure ? [["Why it failed", h("span", { id: "job-failure" }, `${job.failure.code}: ${job.failure.message}`)]] : []),
      ["Progress", progress(job)],
      ["Counts", counts(job)],
      ["Selector", selectorText(job.selector)],
      ["Delete members", job.delete_members ? "yes" : "no"],
      ["Created", time(job.created_at)],
      ["Completed", time(job.completed_at)],
      ["Not found", job.not_found.length ? job.not_found.join(", ") : "none"],
    ]));
    mount(errors, table("Contacts this job could not delete", ["Contact", "Code", "Message"],
      job.errors.map((e) => [h("code", {}, e.contact_id), e.code, e.message]), "No per-contact errors."));
  };
  let latest = 0; // answers to an overtaken request are dropped
  const loadItems = async (append) => {
    const mine = ++latest;
    const page = await api("GET", `/v1/bulk-jobs/${encodeURIComponent(jobId)}/items${query({
      status: statusSelect.value, limit: 100, cursor: append ? cursor : null })}`);
    if (mine !== latest) return;
    shownItems = append ? shownItems.concat(page.data) : page.data;
    cursor = page.next_cursor;
    more.hidden = !cursor;
    mount(items, table("Items of this job", ["Contact / reference", "Status", "Error", "Processed"],
      shownItems.map((i) => [h("code", {}, i.contact_id || i.ref), badge(i.status),
        i.error_code ? `${i.error_code}: ${i.error_message ?? ""}` : "—", time(i.processed_at)]),
      "No items with this status."));
  };
  const loadJob = async () => {
    const wasRunning = job && !TERMINAL.has(job.status);
    job = (await api("GET", `/v1/bulk-jobs/${encodeURIComponent(jobId)}`)).data;
    drawJob();
    if (wasRunning && TERMINAL.has(job.status)) await loadItems(false);
  };
  // Items that failed to load for the new filter are not shown under it.
  statusSelect.addEventListener("change", () => act(() => loadItems(false), items));
  more.addEventListener("click", () => act(() => loadItems(true)));
  await loadJob();
  await loadItems(false);
  ctx.every(1000, () => (TERMINAL.has(job.status) ? null : loadJob()));
}

// --- the delete form ------------------------------------------------------------------

function splitList(text) {
  return text.split(/[\s,;]+/).map((s) => s.trim()).filter(Boolean);
}

function deleteForm(canRead) {
  const kinds = [["contact_ids", "Contact ids"], ["emails", "Email addresses"], ["filter", "Filter or search"]];
  const radios = kinds.map(([value, label], i) => h("label", { class: "choice" },
    h("input", { type: "radio", name: "selector-kind", value, checked: i === 0 }), label));
  const list = h("textarea", { id: "del-list", "aria-describedby": "del-list-hint", spellcheck: "false" });
  const filter = h("textarea", { id: "del-filter", "aria-describedby": "del-filter-hint", spellcheck: "false",
    placeholder: '{"last_name": {"$startsWith": "Love"}}' });
  const search = h("input", { id: "del-search", type: "text", spellcheck: "false" });
  const members = h("input", { id: "del-members", type: "checkbox" });
  const redact = h("input", { id: "del-redact", type: "checkbox" });
  const listBox = field("del-list", "Ids or addresses", list, "Paste a list: one per line, or separated by commas or spaces (up to 500 ids or 1000 addresses).");
  const filterBox = h("div", { hidden: true },
    field("del-filter", "Filter (JSON)", filter, "Same language as the API: $eq $ne $in $startsWith $exists $gt $lt, $and, $or."),
    field("del-search", "Search", search, "Case-insensitive substring of name, email or phone."));
  const outcome = h("div", { id: "dry-run-outcome", "aria-live": "polite" });
  const form = h("form", { id: "delete-form", novalidate: true },
    h("fieldset", {}, h("legend", {}, "Delete contacts by"), radios),
    listBox, filterBox,
    h("label", { class: "choice" }, members, "Also delete contacts who are site members"),
    h("label", { class: "choice" }, redact, "Redact the contact's name, email and phone in the timeline it leaves behind"),
    h("div", {}, h("button", { type: "submit", id: "dry-run" }, "Preview (dry run)")));

  const kind = () => form.querySelector("input[name=selector-kind]:checked").value;
  const sync = () => {
    const k = kind();
    listBox.hidden = k === "filter";
    filterBox.hidden = k !== "filter";
  };
  const body = () => {
    const b = {};
    const k = kind();
    if (k === "filter") {
      const f = filter.value.trim();
      if (f) {
        try { b.filter = JSON.parse(f); } catch (e) { throw new Error(`The filter is not valid JSON: ${e.message}`); }
      }
      if (search.value.trim()) b.search = search.value.trim();
    } else {
      b[k] = splitList(list.value);
    }
    if (members.checked) b.delete_members = true;
    if (redact.checked) b.redact_timeline = true;
    return b;
  };
  form.addEventListener("change", sync);
  // Any edit invalidates a preview: the confirmation must match what was previewed.
  form.addEventListener("input", () => outcome.replaceChildren());
  // A refused preview leaves no earlier preview (and its Delete button) under its error.
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    act(async () => {
      const request = body();
      say("Running the dry run…");
      let result;
      try {
        result = (await api("POST", "/v1/contacts/bulk-delete", { ...request, dry_run: true })).data;
      } catch (err) {
        // The API's way out (match_all) is not offered here, on purpose: say so.
        if (!err.message || !err.message.includes("match_all")) throw err;
        throw new Error(`${err.message}. The console never sends match_all: deleting every contact is done through the API only.`);
      }
      say("");
      showOutcome(outcome, request, result, canRead);
    }, outcome);
  });
  return h("section", { class: "card", "aria-labelledby": "form-h" }, h("h3", { id: "form-h" }, "New deletion"), form, outcome);
}

// The ids a real run would delete, a page at a time (the dry run's `next_cursor`).
function idsToDelete(request, first) {
  const ids = [...first.contact_ids];
  const summary = h("summary", {});
  const list = h("pre", {});
  const more = h("button", { type: "button", class: "secondary" }, "More ids");
  const draw = (cursor) => {
    summary.textContent = `Ids it would delete (${ids.length}${cursor ? " so far" : ""})`;
    list.textContent = ids.join("\n");
    more.hidden = !cursor;
    more.dataset.cursor = cursor || "";
  };
  more.addEventListener("click", () => act(async () => {
    const page = (await api("POST", "/v1/contacts/bulk-delete",
      { ...request, dry_run: true, dry_run_cursor: more.dataset.cursor })).data;
    ids.push(...page.contact_ids);
    draw(page.next_cursor);
  }));
  draw(first.next_cursor);
  return h("details", {}, summary, list, more);
}

// The service names an address that matched nothing by its place in the request
// ("emails[3]"), so that it keeps no address it did not delete; this page still has the
// list it sent, and shows the address again.
function addressOf(ref, request) {
  const match = /^emails\[(\d+)\]$/.exec(ref);
  return match && request.emails ? request.emails[Number(match[1])] ?? ref : ref;
}

function showOutcome(outcome, request, result, canRead) {
  const wouldDelete = result.would_delete_count;
  const wouldFail = result.would_fail_count;
  const notFound = result.not_found_count;
  const orphaned = result.orphaned_timeline;
  const idempotencyKey = crypto.randomUUID(); // one per confirmation: a double click replays
  const confirm = h("button", { type: "button", class: "danger", id: "confirm-delete", disabled: wouldDelete === 0 },
    `Delete ${wouldDelete} contact${wouldDelete === 1 ? "" : "s"}`);
  const cancel = h("button", { type: "button", class: "secondary" }, "Cancel");
  cancel.addEventListener("click", () => outcome.replaceChildren());
  confirm.addEventListener("click", async () => {
    confirm.disabled = true;
    const requested = await act(async () => {
      const job = (await api("POST", "/v1/contacts/bulk-delete", request, { "Idempotency-Key": idempotencyKey })).data;
      if (canRead) {
        // Said on the job's page, which this navigation opens.
        sayNext("Deletion requested.", "good");
        location.hash = `#/jobs/${job.job_id}`;
      } else {
        outcome.replaceChildren();
        say(`Deletion requested: job ${job.job_id} (this key cannot read jobs: it lacks contacts:read).`, "good");
      }
    });
    if (!requested) confirm.disabled = false;
  });
  mount(outcome, h("div", { class: "card outcome" },
    h("h3", { tabindex: "-1", id: "outcome-h" }, "Dry run: nothing was changed"),
    kv([
      ["Would delete", h("strong", { id: "would-delete" }, String(wouldDelete))],
      ["Would refuse", String(wouldFail)],
      ["Not found", `${notFound}${result.not_found.length ? ` (${result.not_found.map((ref) => addressOf(ref, request)).join(", ")})` : ""}`],
      ["Timeline items that would be orphaned",
        `activities ${orphaned.activities} · notes ${orphaned.notes} · tasks ${orphaned.tasks}`],
      ["Selector", selectorText(result.selector)],
    ]),
    h("h3", {}, "Blockers"),
    table("Contacts a real run would refuse", ["Contact", "Code", "Message"],
      result.errors.map((e) => [h("code", {}, e.contact_id), e.code, e.message]), "None: nothing blocks this deletion."),
    result.contact_ids.length ? idsToDelete(request, result) : null,
    h("p", {}, wouldDelete ? "Deleting cannot be undone. The request is sent with an idempotency key, so a repeat does not delete twice." : "Nothing to delete."),
    confirm, cancel));
  outcome.querySelector("#outcome-h").focus();
}
