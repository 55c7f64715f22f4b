// taskserver dashboard: a snapshot from the JSON API, then live updates over SSE.
//
// Data flow: GET /stats (counts, queues, the hour's history and the last event id)
// → GET /tasks (the page shown, running tasks, failures, delayed ones) →
// EventSource('/events') resuming after that event id, so nothing that happens
// between the snapshot and the stream is missed. Every event updates the in-memory
// model and the counts at once; the DOM is redrawn at most once per animation
// frame; /stats is re-read, throttled, only after events that can change it. The
// task page (#/tasks/ID, task-page.js) closes this stream and follows its task's.

import {
  $, ACTIVE, EVENT_TYPES, RETRYABLE, act, api, getJSON, linkTo, notify, onUnauthorized,
  percent, problemText, relative, request, setButtons, setProgress, setState, setText, setTime,
  showEmpty, syncList,
} from "./api.js";
import { renderCharts } from "./charts.js";
import { closeTask, openTask, taskIdOf } from "./task-page.js";

/** Rows per page of the tasks table. */
const PAGE_SIZE = 50;
/** How many failures the "Recent failures" list shows. */
const FAILURE_LIMIT = 10;
/** Delayed and retrying tasks shown. */
const SCHEDULED_LIMIT = 20;
/** The API's largest page (MAX_PAGE in web/http.py). */
const PAGE = 1000;
/** At most one /stats request per this many ms, however fast events come. */
const STATS_THROTTLE_MS = 500;
/** The queues table's counts are re-read at most this often, in ms. */
const QUEUES_EVERY_MS = 2000;
/** At most one re-read of the shown page per this many ms (filters events cannot decide). */
const REFETCH_MS = 1000;
/** Back-off before re-opening a stream the browser gave up on. */
const RECONNECT_MS = [1000, 2000, 5000, 10000];
const DELAYED = new Set(["waiting", "retrying"]);

/** id → task record: the JSON of GET /tasks/{id}, kept current by events. Bounded by prune(). */
const tasks = new Map();
/** The last SSE event id applied; a re-opened stream resumes after it. */
let lastEventId = 0;
/** Counts by state: /stats's, moved by each event in the meantime. */
let counts = null;
/** What the tasks table shows: filters, and the page (null `before`: the newest). */
const view = { state: "", queue: "", name: "", q: "", before: null, newer: [], ids: null };
/** Ids ticked in the tasks table (of the page shown). */
const selected = new Set();

// --- the model -----------------------------------------------------------------------

/** Merge a task read from the API into the model. */
function upsertTask(task) {
  const known = tasks.get(task.id);
  if (!known || !(known.updated_at > task.updated_at)) {
    tasks.set(task.id, { ...known, ...task });
    return;
  }
  // An event newer than this read already moved the task on: keep its state and
  // take only the fields events never carry.
  for (const key of ["data", "name", "max_attempts", "timeout", "created_at", "traceback",
    "unique_key"]) {
    if (known[key] === undefined) known[key] = task[key];
  }
}

/** Move the counts with an event, so they change in the same frame as the rows. */
function countEvent(previous, event) {
  if (!counts || previous === event.state) return;
  if (previous) counts[previous] = Math.max(0, (counts[previous] ?? 0) - 1);
  else if (event.type !== "queued" || event.manual_retry) return; // from a state we never saw
  counts[event.state] = (counts[event.state] ?? 0) + 1;
}

/** Apply one task event (the payload of an SSE message) to the model. */
function applyEvent(event) {
  const id = event.task_id;
  if (id == null) return;
  let task = tasks.get(id);
  // The stream resumes at the snapshot's event id, so it may replay changes the
  // snapshot already shows; skip those rather than step the progress bar back.
  if (task && event.at < task.updated_at) return;
  countEvent(task?.state, event);
  if (!task) {
    if (!wantsNew(event)) return;
    task = { id, data: undefined, progress: null, message: null, error: null, queue: event.queue };
    tasks.set(id, task);
  }
  if (task.max_attempts === undefined) hydrateSoon(id);
  task.state = event.state;
  task.updated_at = event.at;
  if (event.attempt != null) task.attempts = event.attempt;
  if (event.available_at != null) task.available_at = event.available_at;
  switch (event.type) {
    case "queued":
    case "started":
      task.progress = null;
      task.message = null;
      if (event.type === "started") task.started_at = event.at;
      if (event.manual_retry) task.error = task.traceback = null;
      break;
    case "progress":
      task.progress = event.progress;
      task.message = event.message;
      break;
    case "finished":
      task.progress = 1;
      task.error = null;
      task.result = event.result;
      task.finished_at = event.at;
      break;
    case "retrying":
    case "failed":
      task.error = event.error ?? task.error;
      task.traceback = undefined; // the event carries none: read it (hydrateSoon)
      hydrateSoon(id, true);
      if (event.type === "failed") task.finished_at = event.at;
      break;
    case "cancelled":
      task.finished_at = event.at;
      break;
  }
}

/** Whether a task the model does not hold is worth holding: some panel may show it. */
function wantsNew(event) {
  if (event.state === "running" || event.state === "failed" || DELAYED.has(event.state)) {
    return true;
  }
  if (view.before !== null || view.q) return false;
  if (view.name) {
    refetchSoon(); // events do not carry the name: the page is read again
    return false;
  }
  return (!view.state || view.state === event.state) && (!view.queue || view.queue === event.queue);
}

const byIdDesc = (a, b) => b.id - a.id;
const finishedDesc = (a, b) =>
  (b.finished_at ?? b.updated_at ?? 0) - (a.finished_at ?? a.updated_at ?? 0) || b.id - a.id;

function matches(task) {
  return (!view.state || task.state === view.state)
    && (!view.queue || task.queue === view.queue)
    && (!view.name || task.name === view.name);
}

/** What each panel shows, derived from the model. */
function views() {
  const all = [...tasks.values()];
  let page;
  if (view.ids) {
    page = view.ids.map((id) => tasks.get(id)).filter(Boolean);
  } else {
    page = all.filter(matches).sort(byIdDesc).slice(0, PAGE_SIZE);
  }
  return {
    page,
    running: all.filter((t) => t.state === "running").sort((a, b) => a.id - b.id),
    failures: all.filter((t) => t.state === "failed").sort(finishedDesc).slice(0, FAILURE_LIMIT),
    scheduled: all.filter((t) => DELAYED.has(t.state))
      .sort((a, b) => (a.available_at ?? 0) - (b.available_at ?? 0) || a.id - b.id)
      .slice(0, SCHEDULED_LIMIT),
  };
}

/** Forget tasks no panel shows, so the model stays bounded on a busy server. */
function prune(shown) {
  const keep = new Set();
  for (const list of Object.values(shown)) for (const t of list) keep.add(t.id);
  for (const id of tasks.keys()) if (!keep.has(id)) tasks.delete(id);
  for (const id of selected) if (!keep.has(id)) selected.delete(id);
}

/** Ids whose row lacks what events do not carry (data, name; a failure's traceback). */
const unread = new Set();
let hydrateTimer = 0;

function hydrateSoon(id, whole = false) {
  const task = tasks.get(id);
  if (whole && task) task.needsRead = true; // a failure: its traceback is in the row only
  unread.add(id);
  if (!hydrateTimer) hydrateTimer = setTimeout(hydrate, STATS_THROTTLE_MS);
}

async function hydrate() {
  const shown = views();
  // Only the table shows data and names, only failures show tracebacks: nothing
  // else is read (a busy server starts thousands of tasks a second).
  const rows = new Set(shown.page.map((t) => t.id));
  const failures = new Set(shown.failures.map((t) => t.id));
  const ids = [...unread];
  unread.clear();
  const stale = ids.filter((id) => failures.has(id) && tasks.get(id)?.needsRead);
  const fresh = ids.filter((id) => rows.has(id) && tasks.get(id)?.max_attempts === undefined);
  try {
    if (fresh.length) {
      // New tasks have the newest ids: one range read covers them.
      const lo = Math.min(...fresh);
      const limit = Math.min(PAGE, Math.max(...fresh) - lo + 1);
      const page = await getJSON(`/tasks?after=${lo - 1}&limit=${limit}`);
      for (const task of page.tasks) if (tasks.has(task.id)) upsertTask(task);
    }
    // Failures: their traceback, one read each (a few at most: the panel shows ten).
    await Promise.all(stale.slice(0, FAILURE_LIMIT).map(async (id) => {
      const task = await getJSON(`/tasks/${id}`);
      const known = tasks.get(id);
      if (!known) return;
      delete known.needsRead;
      if (known.state === task.state) upsertTask({ ...task, updated_at: known.updated_at });
    }));
    scheduleRender();
  } catch {
    // The row keeps showing what the events said; a later event asks again.
  }
  hydrateTimer = 0;
  if (unread.size) hydrateTimer = setTimeout(hydrate, STATS_THROTTLE_MS);
}

// --- rendering -----------------------------------------------------------------------

let renderQueued = false;
let loaded = false;

/** Redraw on the next frame: a burst of events costs one redraw, and none while hidden. */
function scheduleRender() {
  if (renderQueued) return;
  renderQueued = true;
  requestAnimationFrame(() => {
    renderQueued = false;
    render();
  });
}

function render() {
  if (!loaded) return;
  const shown = views();
  prune(shown);
  syncList($("recent"), shown.page, "task-row", "task-", updateRow);
  syncList($("running"), shown.running, "running-item", "running-", updateRunning);
  syncList($("failures"), shown.failures, "failure-item", "failure-", updateFailure);
  syncList($("scheduled"), shown.scheduled, "scheduled-row", "scheduled-", updateScheduled);
  showEmpty($("recent-empty"), shown.page.length === 0);
  showEmpty($("running-empty"), shown.running.length === 0);
  showEmpty($("failures-empty"), shown.failures.length === 0);
  showEmpty($("scheduled-empty"), shown.scheduled.length === 0);
  setText($("running-count"), shown.running.length ? `(${shown.running.length})` : "");
  setText($("scheduled-count"), shown.scheduled.length ? `(${shown.scheduled.length})` : "");
  renderCounts();
  renderSelection(shown.page);
  renderPager(shown.page);
}

function shortJSON(value) {
  if (value === undefined) return "";
  const text = JSON.stringify(value);
  return text.length > 60 ? `${text.slice(0, 57)}…` : text;
}

function attemptText(task) {
  return task.attempts != null && task.max_attempts != null
    ? `${task.attempts}/${task.max_attempts}`
    : String(task.attempts ?? "");
}

function updateRow(tr, task) {
  setState(tr, task.state);
  const pick = tr.querySelector(".pick");
  pick.checked = selected.has(task.id);
  pick.setAttribute("aria-label", `Select task ${task.id}`);
  linkTo(tr.querySelector(".task-link"), task.id);
  setText(tr.querySelector(".queue"), task.queue);
  setText(tr.querySelector(".name"), task.name ?? "");
  const badge = tr.querySelector(".state");
  setState(badge, task.state);
  setText(badge, task.state);
  setProgress(tr.querySelector("progress"), task, `Progress of task ${task.id}`);
  setText(tr.querySelector(".pct"), task.state === "succeeded" ? "100%" : percent(task.progress));
  const message = tr.querySelector(".message");
  const showError = (task.state === "failed" || task.state === "retrying") && task.error;
  let text = showError ? task.error : task.message;
  if (DELAYED.has(task.state) && task.available_at) text = `due ${relative(task.available_at)}${text ? ` · ${text}` : ""}`;
  setText(message, text);
  message.classList.toggle("error", Boolean(showError));
  message.title = message.textContent;
  const data = tr.querySelector(".data code");
  setText(data, shortJSON(task.data));
  if (task.data !== undefined) data.title = JSON.stringify(task.data);
  setText(tr.querySelector(".attempt"), attemptText(task));
  setTime(tr.querySelector("time"), task.updated_at);
  setButtons(tr, task);
}

function updateRunning(li, task) {
  linkTo(li.querySelector(".task-link"), task.id);
  setText(li.querySelector(".message"), task.message || "started");
  setText(li.querySelector(".pct"), percent(task.progress));
  setProgress(li.querySelector("progress"), task, `Progress of task ${task.id}`);
  setButtons(li, task);
}

function updateFailure(li, task) {
  linkTo(li.querySelector(".task-link"), task.id);
  const badge = li.querySelector(".state");
  setState(badge, task.state);
  setText(badge, task.state);
  setTime(li.querySelector("time"), task.finished_at ?? task.updated_at);
  setText(li.querySelector(".error"), task.error || "failed without an error message");
  const details = li.querySelector("details");
  details.hidden = !task.traceback;
  setText(details.querySelector("pre"), task.traceback);
  setButtons(li, task);
}

function updateScheduled(tr, task) {
  linkTo(tr.querySelector(".task-link"), task.id);
  setText(tr.querySelector(".queue"), task.queue);
  const badge = tr.querySelector(".state");
  setState(badge, task.state);
  setText(badge, task.state);
  const time = tr.querySelector("time");
  setTime(time, task.available_at);
  time.title = `${time.title} (${relative(task.available_at)})`;
  setText(tr.querySelector(".attempt"), attemptText(task));
  setText(tr.querySelector(".message"), task.state === "retrying" ? task.error : "");
}

// --- counts, queues, charts ------------------------------------------------------------------

function renderCounts() {
  if (!counts) return;
  for (const dd of document.querySelectorAll("[data-count]")) {
    const n = counts[dd.dataset.count];
    setText(dd, n == null ? "–" : n.toLocaleString());
  }
}

function renderStats(stats, withQueues = true) {
  counts = { ...(stats.tasks ?? {}) };
  renderCounts();
  if (stats.workers) {
    setText($("workers-busy"), String(stats.workers.busy));
    setText($("workers-total"), String(stats.workers.total));
  }
  if (withQueues && stats.queues) renderQueues(stats.queues);
  renderCharts(stats.history);
}

function renderQueues(queues) {
  const rows = Object.entries(queues).map(([name, q]) => ({ id: name, ...q }));
  syncList($("queues"), rows, "queue-row", "queue-", updateQueue);
  showEmpty($("queues-empty"), rows.length === 0);
}

function updateQueue(tr, q) {
  tr.dataset.queue = q.id;
  setText(tr.querySelector(".qname"), q.id);
  for (const td of tr.querySelectorAll("[data-key]")) {
    const value = q[td.dataset.key];
    if (td.dataset.key === "concurrency") setText(td, value == null ? "none" : String(value));
    else setText(td, typeof value === "number" ? value.toLocaleString() : "0");
  }
  const badge = tr.querySelector(".qstate");
  const status = q.paused ? "paused" : "active";
  setState(badge, status);
  setText(badge, status);
  const button = tr.querySelector("[data-queue-action]");
  const action = q.paused ? "resume" : "pause";
  button.dataset.queueAction = action;
  setText(button, q.paused ? "Resume" : "Pause");
  button.setAttribute("aria-label", `${q.paused ? "Resume" : "Pause"} queue ${q.id}`);
}

let statsTimer = 0;
let statsInFlight = false;
let queuesReadAt = 0;
let queuesTimer = 0;
let statsWanted = false;

/** Re-fetch /stats soon: trailing-edge throttle, one request in flight at most. */
function refreshStats() {
  statsWanted = true;
  if (statsTimer || statsInFlight) return;
  statsTimer = setTimeout(async () => {
    statsTimer = 0;
    statsWanted = false;
    statsInFlight = true;
    try {
      // The per-queue counts cost the server a count over the store: fetched less often.
      const since = Date.now() - queuesReadAt;
      const withQueues = since >= QUEUES_EVERY_MS;
      const stats = await getJSON(withQueues ? "/stats" : "/stats?queues=false");
      if (withQueues) {
        queuesReadAt = Date.now();
      } else if (!queuesTimer) {
        // The last change must reach the queues table too, if a little later.
        queuesTimer = setTimeout(() => {
          queuesTimer = 0;
          refreshStats();
        }, QUEUES_EVERY_MS - since);
      }
      renderStats(stats, withQueues);
    } catch {
      // Leave the last counts up; the next event tries again.
    } finally {
      statsInFlight = false;
      if (statsWanted) refreshStats();
    }
  }, STATS_THROTTLE_MS);
}

// --- the tasks table: filters, pages, selection -----------------------------------------------

function tasksQuery(extra = {}) {
  const query = new URLSearchParams({ order: "desc", limit: String(PAGE_SIZE), ...extra });
  for (const key of ["state", "queue", "name"]) if (view[key]) query.set(key, view[key]);
  if (view.q && !/^\d+$/.test(view.q)) query.set("unique_key", view.q);
  if (view.before !== null) query.set("before", String(view.before));
  return `/tasks?${query}`;
}

/** Read the page the table shows (the newest, or the one `view.before` names). */
async function loadPage() {
  if (/^\d+$/.test(view.q)) {
    // Search by id: that one task, if it exists.
    const answer = await request("GET", `/tasks/${view.q}`);
    view.ids = answer.ok ? [answer.body.id] : [];
    if (answer.ok) upsertTask(answer.body);
    view.more = false;
    return;
  }
  const page = await getJSON(tasksQuery());
  for (const task of page.tasks) upsertTask(task);
  view.more = page.next_before != null;
  // The newest page follows events; an older page (or a search) keeps its rows.
  view.ids = view.before === null && !view.q ? null : page.tasks.map((t) => t.id);
}

let refetchTimer = 0;
function refetchSoon() {
  if (refetchTimer) return;
  refetchTimer = setTimeout(async () => {
    try {
      await loadPage();
      scheduleRender();
    } catch {
      // The next event asks again.
    } finally {
      refetchTimer = 0;
    }
  }, REFETCH_MS);
}

async function showPage() {
  selected.clear();
  try {
    await loadPage();
  } catch (error) {
    notify(`Could not read tasks: ${error.message}.`, "error");
  }
  render();
}

function readFilters(event) {
  event?.preventDefault();
  view.state = $("filter-state").value;
  view.queue = $("filter-queue").value.trim();
  view.name = $("filter-name").value.trim();
  view.q = $("search").value.trim();
  view.before = null;
  view.newer = [];
  showPage();
}

function renderPager(page) {
  const first = view.before === null;
  $("page-newest").disabled = first;
  $("page-newer").disabled = first;
  $("page-older").disabled = !(view.more ?? page.length >= PAGE_SIZE);
  const ids = page.map((t) => t.id);
  setText($("page-info"), ids.length ? `#${Math.max(...ids)} – #${Math.min(...ids)}` : "");
}

function older() {
  const page = views().page;
  if (!page.length) return;
  view.newer.push(view.before);
  view.before = Math.min(...page.map((t) => t.id));
  showPage();
}

function newer() {
  view.before = view.newer.length ? view.newer.pop() : null;
  showPage();
}

function newest() {
  view.before = null;
  view.newer = [];
  showPage();
}

function renderSelection(page) {
  const ids = page.map((t) => t.id);
  const all = $("select-page");
  all.checked = ids.length > 0 && ids.every((id) => selected.has(id));
  all.indeterminate = !all.checked && ids.some((id) => selected.has(id));
  setText($("bulk-count"), selected.size ? `${selected.size} selected` : "No task selected");
  for (const button of document.querySelectorAll('[data-scope="selected"]')) {
    button.disabled = selected.size === 0;
  }
  for (const button of document.querySelectorAll('[data-scope="filter"]')) {
    button.disabled = Boolean(view.q);
  }
}

function onPick(event) {
  const box = event.target;
  if (box.id === "select-page") {
    for (const task of views().page) {
      if (box.checked) selected.add(task.id);
      else selected.delete(task.id);
    }
  } else if (box.classList.contains("pick")) {
    const id = Number(box.closest("[data-task-id]").dataset.taskId);
    if (box.checked) selected.add(id);
    else selected.delete(id);
  } else {
    return;
  }
  render();
}

const PAST = { retry: "retried", cancel: "cancelled", purge: "purged" };

async function bulk(action, scope) {
  const what = scope === "selected" ? `${selected.size} selected tasks` : "every matching task";
  if ((scope === "filter" || action === "purge") && !confirm(`${action} ${what}?`)) return;
  let done = 0;
  let matched = 0;
  let failed = 0;
  let body = { action };
  if (scope === "selected") {
    body.ids = [...selected];
  } else {
    body.filter = Object.fromEntries(
      ["state", "queue", "name"].filter((k) => view[k]).map((k) => [k, view[k]]),
    );
  }
  for (;;) {
    const answer = await request("POST", "/tasks:bulk", body);
    if (!answer.ok) {
      notify(`Could not ${action}: ${problemText(answer)}.`, "error");
      return;
    }
    done += answer.body.done;
    matched += answer.body.matched;
    failed += Object.keys(answer.body.errors).length;
    if (answer.body.next_after == null) break;
    notify(`${PAST[action]} ${done} of ${matched} so far…`);
    body = { ...body, after: answer.body.next_after };
  }
  selected.clear();
  const past = PAST[action];
  const why = failed ? `; ${failed} refused (see each task)` : "";
  notify(`${past[0].toUpperCase()}${past.slice(1)} ${done} of ${matched} tasks${why}.`);
  if (action === "purge") await showPage();
  else render();
  refreshStats();
}

// --- live updates ----------------------------------------------------------------------

function setConnection(state, text) {
  const el = $("connection");
  setState(el, state);
  setText(el.querySelector(".text"), text);
}

let streamFailures = 0;
let source = null;

/** Open the all-tasks stream, resuming after `lastEventId` (the header on reconnects). */
function connect() {
  const stream = new EventSource(api(`/events?lastEventID=${lastEventId}`));
  source = stream;
  let opened = false;
  stream.onopen = () => {
    if (opened || streamFailures) refreshStats(); // counts may have moved while we were away
    opened = true;
    streamFailures = 0;
    setConnection("live", "Live");
  };
  stream.onerror = () => {
    if (source !== stream) return;
    if (stream.readyState === EventSource.CLOSED) {
      stream.close();
      const delay = RECONNECT_MS[Math.min(streamFailures++, RECONNECT_MS.length - 1)];
      setConnection("offline", `Offline, retrying in ${delay / 1000} s`);
      setTimeout(() => source === stream && connect(), delay);
    } else {
      setConnection("connecting", "Reconnecting…");
    }
  };
  const onEvent = (message) => {
    const id = Number(message.lastEventId);
    if (Number.isSafeInteger(id) && id > lastEventId) lastEventId = id;
    applyEvent(JSON.parse(message.data));
    scheduleRender();
    if (message.type !== "progress") refreshStats(); // progress changes no count
  };
  for (const type of EVENT_TYPES) stream.addEventListener(type, onEvent);
}

function disconnect() {
  source?.close();
  source = null;
}

// --- actions -----------------------------------------------------------------------------

async function enqueue(event) {
  event.preventDefault();
  const button = $("request");
  const seconds = Number($("seconds").value);
  const data = { seconds: Number.isFinite(seconds) ? seconds : 3 };
  if ($("fail").checked) data.fail = true;
  button.disabled = true;
  try {
    const answer = await request("POST", "/tasks", { data });
    if (!answer.ok) {
      const wait = answer.status === 503 ? " The server is full; try again shortly." : "";
      notify(`Could not enqueue: ${problemText(answer)}.${wait}`, "error");
      return;
    }
    const id = answer.body.id;
    if (!tasks.has(id)) {
      if (counts) counts.queued = (counts.queued ?? 0) + (answer.body.existing ? 0 : 1);
      upsertTask({ id, state: answer.body.state, data, queue: "default", progress: null, updated_at: 0 });
    } else if (tasks.get(id).data === undefined) {
      tasks.get(id).data = data;
    }
    scheduleRender();
    notify(`Task ${id} queued.`);
  } finally {
    button.disabled = false;
  }
}

async function onClick(event) {
  const bulkButton = event.target.closest("button[data-bulk]");
  const queueButton = event.target.closest("button[data-queue-action]");
  const button = event.target.closest("button[data-action]");
  const target = bulkButton || queueButton || button;
  if (!target) return;
  target.disabled = true;
  try {
    if (bulkButton) {
      await bulk(bulkButton.dataset.bulk, bulkButton.dataset.scope);
    } else if (queueButton) {
      await steerQueue(queueButton.closest("[data-queue]").dataset.queue, queueButton.dataset.queueAction);
    } else {
      const holder = button.closest("[data-task-id]");
      const id = holder ? Number(holder.dataset.taskId) : taskIdOf(location.hash);
      if (Number.isSafeInteger(id)) await act(button.dataset.action, id);
    }
  } finally {
    target.disabled = false;
    if (bulkButton) render();
  }
}

async function steerQueue(name, action) {
  const answer = await request("POST", `/queues/${encodeURIComponent(name)}/${action}`);
  if (!answer.ok) {
    notify(`Could not ${action} queue ${name}: ${problemText(answer)}.`, "error");
    return;
  }
  notify(`Queue ${name} ${answer.body.paused ? "paused: its tasks wait" : "resumed"}.`);
  queuesReadAt = 0;
  refreshStats();
}

// --- views and start ------------------------------------------------------------------------

async function load() {
  const stats = await getJSON("/stats");
  renderStats(stats);
  lastEventId = stats.last_event_id ?? 0;
  const newestOf = async (state, limit) =>
    (await getJSON(`/tasks?order=desc&state=${state}&limit=${limit}`)).tasks;
  const [, running, failed, waiting, retrying] = await Promise.all([
    loadPage(),
    // Running tasks are at most one per worker: one page holds them.
    getJSON(`/tasks?state=running&limit=${PAGE}`).then((p) => p.tasks),
    newestOf("failed", FAILURE_LIMIT),
    getJSON(`/tasks?state=waiting&limit=${SCHEDULED_LIMIT}`).then((p) => p.tasks),
    getJSON(`/tasks?state=retrying&limit=${SCHEDULED_LIMIT}`).then((p) => p.tasks),
  ]);
  for (const task of [...running, ...failed, ...waiting, ...retrying]) upsertTask(task);
  loaded = true;
  render();
}

async function start(attempt = 0) {
  try {
    await load();
  } catch (error) {
    const delay = RECONNECT_MS[Math.min(attempt, RECONNECT_MS.length - 1)];
    setConnection("offline", "Offline");
    notify(`Could not load the dashboard: ${error.message}. Retrying in ${delay / 1000} s.`, "error");
    setTimeout(() => route(attempt + 1), delay);
    return;
  }
  connect();
}

/** Show the view the address names: the overview, or a task's page. */
function route(attempt = 0) {
  const id = taskIdOf(location.hash);
  $("overview").hidden = id !== null;
  $("task-view").hidden = id === null;
  if (id !== null) {
    disconnect(); // the task page follows its task's stream only
    setConnection("live", "Live");
    openTask(id);
    return;
  }
  closeTask();
  if (!source) {
    tasks.clear();
    start(attempt);
  }
}

// --- signing in ------------------------------------------------------------------------------

let started = false;

function showLogin(message = "") {
  document.body.classList.add("signed-out");
  $("login").hidden = false;
  $("logout").hidden = true;
  setText($("login-error"), message);
  $("token").focus();
}

async function login(event) {
  event.preventDefault();
  const answer = await request("POST", "/session", { token: $("token").value });
  if (!answer.ok) {
    setText($("login-error"), `Not signed in: ${problemText(answer)}.`);
    return;
  }
  $("token").value = "";
  $("login").hidden = true;
  $("logout").hidden = false;
  document.body.classList.remove("signed-out");
  if (!started) {
    started = true;
    route();
  } else {
    location.reload(); // a stream that was refused does not come back by itself
  }
}

async function logout() {
  await request("DELETE", "/session");
  location.reload();
}

function init() {
  if (document.querySelector('meta[name="taskserver-demo"]')?.content) $("enqueue").hidden = false;
  // ?seconds= sets the demo's default duration (tests use short tasks).
  const seconds = new URLSearchParams(location.search).get("seconds");
  if (seconds !== null && Number.isFinite(Number(seconds))) $("seconds").value = seconds;
  onUnauthorized(showLogin);
  $("enqueue").addEventListener("submit", enqueue);
  $("login-form").addEventListener("submit", login);
  $("logout").addEventListener("click", logout);
  $("filters").addEventListener("submit", readFilters);
  $("filters").addEventListener("reset", () => setTimeout(readFilters, 0));
  $("page-older").addEventListener("click", older);
  $("page-newer").addEventListener("click", newer);
  $("page-newest").addEventListener("click", newest);
  document.addEventListener("click", onClick);
  document.addEventListener("change", onPick);
  for (const el of document.querySelectorAll(".stat[data-state]")) {
    el.addEventListener("click", () => {
      $("filter-state").value = el.dataset.state;
      location.hash = "#/";
      readFilters();
    });
  }
  window.addEventListener("hashchange", () => started && route());
  request("GET", "/session").then((answer) => {
    const session = answer.ok ? answer.body : { required: false };
    if (session.required && !session.authenticated) {
      showLogin();
      return;
    }
    $("logout").hidden = !session.required;
    started = true;
    route();
  });
}

init();
