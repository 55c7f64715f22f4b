// taskserver dashboard: a snapshot from the JSON API, then live updates over SSE.
//
// Data flow: GET /stats (counts and the last event id) → GET /tasks (the newest
// rows, running tasks, recent failures) → EventSource('/events') resuming after
// that event id, so nothing that happens between the snapshot and the stream is
// missed. Every event updates the in-memory model; the DOM is redrawn at most
// once per animation frame, and /stats is re-fetched (throttled) only when an
// event could have changed a count. There is no polling timer.

/** How many of the newest tasks the "Recent tasks" table shows. */
const RECENT_LIMIT = 50;
/** How many failures the "Recent failures" list shows. */
const FAILURE_LIMIT = 10;
/** The API's largest page (MAX_PAGE in api.py). */
const PAGE = 1000;
/** At most one /stats request per this many ms, however fast events come. */
const STATS_THROTTLE_MS = 250;
/** Back-off before re-opening a stream the browser gave up on (it retries by itself otherwise). */
const RECONNECT_MS = [1000, 2000, 5000, 10000];

const ACTIVE = new Set(["queued", "waiting", "running", "retrying"]);
const RETRYABLE = new Set(["failed", "cancelled"]);
const EVENT_TYPES = [
  "queued", "started", "progress", "retrying", "waiting", "finished", "failed", "cancelled",
];

/** id → task record: the JSON of GET /tasks/{id}, kept current by events. Bounded by prune(). */
const tasks = new Map();
/** The last SSE event id applied; a re-opened stream resumes after it. */
let lastEventId = 0;

const $ = (id) => document.getElementById(id);

// --- HTTP ----------------------------------------------------------------------------

/** fetch + JSON; resolves to {ok, status, body}. Network errors become status 0. */
async function request(method, url, payload) {
  const init = { method, headers: { Accept: "application/json" } };
  if (payload !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(payload);
  }
  let response;
  try {
    response = await fetch(url, init);
  } catch (error) {
    return { ok: false, status: 0, body: { detail: `network error: ${error.message}` } };
  }
  // The session cookie is missing or no longer valid (e.g. a JWT expired): ask again.
  if (response.status === 401 && url !== "/session") showLogin("Please sign in again.");
  let body = null;
  try {
    body = await response.json();
  } catch {
    // Not JSON (a proxy's error page, an empty body): fall back to the status line.
    body = { detail: `${response.status} ${response.statusText}` };
  }
  return { ok: response.ok, status: response.status, body };
}

async function getJSON(url) {
  const answer = await request("GET", url);
  if (!answer.ok) throw new Error(answer.body?.detail || `GET ${url}: HTTP ${answer.status}`);
  return answer.body;
}

function tasksUrl(state, after, limit) {
  const query = new URLSearchParams({ after: String(after), limit: String(limit) });
  if (state) query.set("state", state);
  return `/tasks?${query}`;
}

/** The `want` newest tasks (optionally in one state), oldest first: one request. */
async function newest(state, want) {
  const query = new URLSearchParams({ order: "desc", limit: String(want) });
  if (state) query.set("state", state);
  const page = await getJSON(`/tasks?${query}`);
  return page.tasks.reverse();
}

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
  for (const key of ["data", "queue", "max_attempts", "timeout", "created_at"]) {
    if (known[key] === undefined) known[key] = task[key];
  }
}

/** Apply one task event (the payload of an SSE message) to the model. */
function applyEvent(event) {
  const id = event.task_id;
  if (id == null) return;
  let task = tasks.get(id);
  // The stream resumes at the snapshot's event id, so it may replay changes the
  // snapshot already shows; skip those rather than step the progress bar back.
  if (task && event.at < task.updated_at) return;
  if (!task) {
    task = { id, data: undefined, progress: null, message: null, error: null };
    tasks.set(id, task);
  }
  if (task.max_attempts === undefined) hydrateSoon(id);
  task.state = event.state;
  task.updated_at = event.at;
  if (event.attempt != null) task.attempts = event.attempt;
  switch (event.type) {
    case "queued":
    case "started":
      // A new attempt (or a manual retry) starts from zero.
      task.progress = null;
      task.message = null;
      if (event.type === "started") task.started_at = event.at;
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
      task.traceback = null; // the event carries no traceback; don't show a stale one
      if (event.type === "failed") task.finished_at = event.at;
      break;
    case "cancelled":
      task.finished_at = event.at;
      break;
  }
}

const byIdDesc = (a, b) => b.id - a.id;
const finishedDesc = (a, b) =>
  (b.finished_at ?? b.updated_at ?? 0) - (a.finished_at ?? a.updated_at ?? 0) || b.id - a.id;

/** What each panel shows, derived from the model. */
function views() {
  const all = [...tasks.values()];
  return {
    recent: all.slice().sort(byIdDesc).slice(0, RECENT_LIMIT),
    running: all.filter((t) => t.state === "running").sort((a, b) => a.id - b.id),
    failures: all.filter((t) => t.state === "failed").sort(finishedDesc).slice(0, FAILURE_LIMIT),
  };
}

/** Forget tasks no panel shows, so the model stays bounded on a busy server. */
function prune(view) {
  const keep = new Set();
  for (const list of [view.recent, view.running, view.failures]) for (const t of list) keep.add(t.id);
  for (const id of tasks.keys()) if (!keep.has(id)) tasks.delete(id);
}

/** Ids of tasks known only from events: their data and max_attempts are still to read. */
const unread = new Set();
let hydrateTimer = 0;

/** Read the fields events lack for new tasks soon, for many tasks in one request. */
function hydrateSoon(id) {
  unread.add(id);
  if (!hydrateTimer) hydrateTimer = setTimeout(hydrate, STATS_THROTTLE_MS);
}

async function hydrate() {
  // Only rows the table shows are worth reading; they are the newest ids, so one
  // range read (ids above the smallest, in id order) covers them all.
  const shown = new Set(views().recent.map((t) => t.id));
  const ids = [...unread].filter((id) => shown.has(id) && tasks.get(id)?.max_attempts === undefined);
  unread.clear();
  if (ids.length) {
    const lo = Math.min(...ids);
    const limit = Math.min(PAGE, Math.max(...ids) - lo + 1);
    try {
      const page = await getJSON(tasksUrl(null, lo - 1, limit));
      for (const task of page.tasks) if (tasks.has(task.id)) upsertTask(task);
      scheduleRender();
    } catch {
      // The row keeps showing what the events said; a later event asks again.
    }
  }
  hydrateTimer = 0;
  if (unread.size) hydrateTimer = setTimeout(hydrate, STATS_THROTTLE_MS);
}

// --- rendering -----------------------------------------------------------------------

let renderQueued = false;

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
  const view = views();
  prune(view);
  syncList($("recent"), view.recent, "task-row", "task-", updateRow);
  syncList($("running"), view.running, "running-item", "running-", updateRunning);
  syncList($("failures"), view.failures, "failure-item", "failure-", updateFailure);
  showEmpty($("recent-empty"), view.recent.length === 0);
  showEmpty($("running-empty"), view.running.length === 0);
  showEmpty($("failures-empty"), view.failures.length === 0);
  $("running-count").textContent = view.running.length ? `(${view.running.length})` : "";
}

let loaded = false;

/** Until the first snapshot is in, an empty panel says "Loading…", not "none". */
function showEmpty(el, empty) {
  el.hidden = !empty;
  if (loaded && el.dataset.empty) {
    el.textContent = el.dataset.empty;
    delete el.dataset.empty;
  }
}

/**
 * Make `container`'s children show `items`, in order, reusing each task's element.
 * Elements are updated in place rather than rebuilt, so a progress event does not
 * steal keyboard focus from a button in the same row.
 */
const elementsOf = new WeakMap();
function syncList(container, items, templateId, idPrefix, update) {
  let elements = elementsOf.get(container);
  if (!elements) elementsOf.set(container, (elements = new Map()));
  const wanted = new Set(items.map((t) => t.id));
  for (const [id, el] of elements) {
    if (!wanted.has(id)) {
      el.remove();
      elements.delete(id);
    }
  }
  let previous = null;
  for (const task of items) {
    let el = elements.get(task.id);
    if (!el) {
      el = $(templateId).content.firstElementChild.cloneNode(true);
      el.id = idPrefix + task.id;
      el.dataset.taskId = task.id;
      elements.set(task.id, el);
    }
    update(el, task);
    const slot = previous ? previous.nextElementSibling : container.firstElementChild;
    if (el !== slot) container.insertBefore(el, slot);
    previous = el;
  }
}

/** Set text only when it changed: fewer mutations, and screen readers stay quiet. */
function setText(el, text) {
  const value = text ?? "";
  if (el.textContent !== value) el.textContent = value;
}

function setState(el, state) {
  if (el.dataset.state !== state) el.dataset.state = state;
}

function percent(progress) {
  return progress == null ? "" : `${Math.round(progress * 100)}%`;
}

/** A <progress> with no value attribute is indeterminate: right for a task not yet reporting. */
function setProgress(bar, task, label) {
  const value = task.state === "succeeded" ? 1 : task.progress;
  if (value == null) {
    if (task.state === "running") bar.removeAttribute("value");
    else bar.value = 0;
  } else if (bar.value !== value || !bar.hasAttribute("value")) {
    bar.value = value;
  }
  bar.setAttribute("aria-label", label);
}

function clock(seconds) {
  if (seconds == null) return "";
  return new Date(seconds * 1000).toLocaleTimeString([], { hour12: false });
}

function setTime(el, seconds) {
  if (seconds == null) return;
  const iso = new Date(seconds * 1000).toISOString();
  if (el.dateTime !== iso) el.dateTime = iso;
  setText(el, clock(seconds));
}

function shortJSON(value) {
  if (value === undefined) return "";
  const text = JSON.stringify(value);
  return text.length > 60 ? `${text.slice(0, 57)}…` : text;
}

function updateRow(tr, task) {
  setState(tr, task.state);
  setText(tr.querySelector(".id"), String(task.id));
  setText(tr.querySelector(".queue"), task.queue);
  const badge = tr.querySelector(".state");
  setState(badge, task.state);
  setText(badge, task.state);
  setProgress(tr.querySelector("progress"), task, `Progress of task ${task.id}`);
  setText(tr.querySelector(".pct"), task.state === "succeeded" ? "100%" : percent(task.progress));
  const message = tr.querySelector(".message");
  const showError = (task.state === "failed" || task.state === "retrying") && task.error;
  setText(message, showError ? task.error : task.message);
  message.classList.toggle("error", Boolean(showError));
  message.title = message.textContent;
  const data = tr.querySelector(".data code");
  setText(data, shortJSON(task.data));
  if (task.data !== undefined) data.title = JSON.stringify(task.data);
  const attempt = task.attempts != null && task.max_attempts != null
    ? `${task.attempts}/${task.max_attempts}`
    : String(task.attempts ?? "");
  setText(tr.querySelector(".attempt"), attempt);
  setTime(tr.querySelector("time"), task.updated_at);
  setButtons(tr, task);
}

function setButtons(el, task) {
  const cancel = el.querySelector('[data-action="cancel"]');
  const retry = el.querySelector('[data-action="retry"]');
  if (cancel) {
    cancel.hidden = !ACTIVE.has(task.state);
    cancel.setAttribute("aria-label", `Cancel task ${task.id}`);
  }
  if (retry) {
    retry.hidden = !RETRYABLE.has(task.state);
    retry.setAttribute("aria-label", `Retry task ${task.id}`);
  }
}

function updateRunning(li, task) {
  setText(li.querySelector(".id"), `#${task.id}`);
  setText(li.querySelector(".message"), task.message || "started");
  setText(li.querySelector(".pct"), percent(task.progress));
  setProgress(li.querySelector("progress"), task, `Progress of task ${task.id}`);
  setButtons(li, task);
}

function updateFailure(li, task) {
  setText(li.querySelector(".id"), `#${task.id}`);
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

// --- stats -----------------------------------------------------------------------------

function renderStats(stats) {
  const counts = stats.tasks ?? stats;
  for (const dd of document.querySelectorAll("[data-count]")) {
    const n = counts[dd.dataset.count];
    setText(dd, n == null ? "–" : n.toLocaleString());
  }
  if (stats.workers) {
    setText($("workers-busy"), String(stats.workers.busy));
    setText($("workers-total"), String(stats.workers.total));
  }
  renderQueues(stats);
}

/**
 * Queue table columns: [key in stats.queues[name], heading]. The server omits a
 * state count that is zero; priority and the concurrency limit show only when
 * the server reports them. Other per-queue internals are left out.
 */
const QUEUE_COLUMNS = [
  ["queued", "Queued"],
  ["waiting", "Waiting"],
  ["running", "Running"],
  ["retrying", "Retrying"],
  ["priority", "Priority"],
  ["concurrency", "Limit"],
];
const QUEUE_STATES = new Set(["queued", "waiting", "running", "retrying"]);

/**
 * Named queues, when the server reports them as stats.queues = {name: {...}}, in
 * the server's order; otherwise one "default" row of the active-state counts.
 */
function renderQueues(stats) {
  let queues = stats.queues;
  if (!queues || typeof queues !== "object" || Array.isArray(queues)) {
    const counts = stats.tasks ?? stats;
    queues = { default: Object.fromEntries([...QUEUE_STATES].map((s) => [s, counts[s] ?? 0])) };
  }
  const rows = Object.entries(queues).map(([name, q]) => [name, q && typeof q === "object" ? q : {}]);
  const columns = QUEUE_COLUMNS.filter(
    ([key]) => QUEUE_STATES.has(key) || rows.some(([, q]) => key in q),
  );
  const head = $("queues-head");
  const signature = columns.map(([key]) => key).join("|");
  if (head.dataset.columns !== signature) {
    head.dataset.columns = signature;
    const cells = [["", "Queue"], ...columns].map(([key, heading]) => {
      const th = document.createElement("th");
      th.scope = "col";
      th.textContent = heading;
      if (key) th.className = "num";
      return th;
    });
    head.replaceChildren(...cells);
  }
  $("queues").replaceChildren(...rows.map(([name, q]) => {
    const tr = document.createElement("tr");
    const th = document.createElement("th");
    th.scope = "row";
    th.textContent = name;
    tr.append(th);
    for (const [key] of columns) {
      const td = document.createElement("td");
      td.className = "num";
      const value = q[key];
      if (key === "concurrency" && value == null) td.textContent = "none";
      else td.textContent = typeof value === "number" ? value.toLocaleString() : "0";
      tr.append(td);
    }
    return tr;
  }));
}

let statsTimer = 0;
let statsInFlight = false;
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
      renderStats(await getJSON("/stats"));
    } catch {
      // Leave the last counts up; the next event tries again.
    } finally {
      statsInFlight = false;
      if (statsWanted) refreshStats();
    }
  }, STATS_THROTTLE_MS);
}

// --- live updates ----------------------------------------------------------------------

function setConnection(state, text) {
  const el = $("connection");
  setState(el, state);
  setText(el.querySelector(".text"), text);
}

/** Consecutive streams the browser gave up on; sets the back-off. */
let streamFailures = 0;

/**
 * Open the all-tasks stream, resuming after `lastEventId`. The query parameter
 * only matters for the first request: on reconnect the browser sends the
 * Last-Event-ID header, which the server prefers, so it resumes where it left off.
 */
function connect() {
  const source = new EventSource(`/events?lastEventID=${lastEventId}`);
  let opened = false;
  source.onopen = () => {
    if (opened || streamFailures) refreshStats(); // counts may have moved while we were away
    opened = true;
    streamFailures = 0;
    setConnection("live", "Live");
  };
  source.onerror = () => {
    if (source.readyState === EventSource.CLOSED) {
      // The browser gives up on a non-200 answer (e.g. 503 while the server
      // restarts); open a new stream ourselves, after a back-off.
      source.close();
      const delay = RECONNECT_MS[Math.min(streamFailures++, RECONNECT_MS.length - 1)];
      setConnection("offline", `Offline, retrying in ${delay / 1000} s`);
      setTimeout(connect, delay);
    } else {
      setConnection("connecting", "Reconnecting…");
    }
  };
  const onEvent = (message) => {
    const id = Number(message.lastEventId);
    if (Number.isSafeInteger(id) && id > lastEventId) lastEventId = id;
    applyEvent(JSON.parse(message.data));
    scheduleRender();
    // Progress changes no count; every other event may.
    if (message.type !== "progress") refreshStats();
  };
  for (const type of EVENT_TYPES) source.addEventListener(type, onEvent);
}

// --- actions -----------------------------------------------------------------------------

function notify(text, kind = "info") {
  const el = $("notice");
  el.dataset.kind = kind;
  // Clear first so that the same message twice is still announced.
  el.textContent = "";
  requestAnimationFrame(() => {
    el.textContent = text;
  });
}

function problemText(answer) {
  const detail = answer.body?.detail || answer.body?.title;
  return detail ? `${detail} (HTTP ${answer.status})` : `HTTP ${answer.status}`;
}

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
    // Show the row at once; the "queued" event, usually already here, agrees.
    if (!tasks.has(id)) {
      upsertTask({ id, state: answer.body.state, data, progress: null, updated_at: 0 });
    } else if (tasks.get(id).data === undefined) {
      tasks.get(id).data = data;
    }
    scheduleRender();
    notify(`Task ${id} queued.`);
  } finally {
    button.disabled = false;
  }
}

async function cancel(id) {
  const answer = await request("DELETE", `/tasks/${id}`);
  if (answer.ok) notify(`Task ${id} cancelled.`);
  else if (answer.status === 409) notify(`Task ${id} has already ended.`);
  else notify(`Could not cancel task ${id}: ${problemText(answer)}.`, "error");
}

async function retry(id) {
  const answer = await request("POST", `/tasks/${id}/retry`);
  if (answer.ok) {
    notify(`Task ${id} queued again (retry).`);
  } else if (answer.status === 405 || (answer.status === 404 && answer.body?.field !== "id")) {
    // A 404 that names no field is the router's: this server has no retry endpoint yet.
    notify(`Retry is not available on this server (HTTP ${answer.status}).`, "error");
  } else {
    notify(`Could not retry task ${id}: ${problemText(answer)}.`, "error");
  }
}

async function onAction(event) {
  const button = event.target.closest("button[data-action]");
  if (!button) return;
  const id = Number(button.closest("[data-task-id]")?.dataset.taskId);
  if (!Number.isSafeInteger(id)) return;
  button.disabled = true;
  try {
    if (button.dataset.action === "cancel") await cancel(id);
    else if (button.dataset.action === "retry") await retry(id);
  } finally {
    button.disabled = false;
  }
}

// --- start ---------------------------------------------------------------------------------

async function load() {
  const stats = await getJSON("/stats");
  renderStats(stats);
  lastEventId = stats.last_event_id ?? 0;
  const [recent, running, failed] = await Promise.all([
    newest(null, RECENT_LIMIT),
    // Running tasks are at most one per worker: one page holds them.
    getJSON(tasksUrl("running", 0, PAGE)),
    newest("failed", FAILURE_LIMIT),
  ]);
  for (const task of [...recent, ...running.tasks, ...failed]) upsertTask(task);
  loaded = true;
  render();
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
    start(0);
  } else {
    location.reload(); // a stream that was refused does not come back by itself
  }
}

async function logout() {
  await request("DELETE", "/session");
  location.reload();
}

function init() {
  // ?seconds= sets the default duration (tests use short tasks).
  const seconds = new URLSearchParams(location.search).get("seconds");
  if (seconds !== null && Number.isFinite(Number(seconds))) $("seconds").value = seconds;
  $("enqueue").addEventListener("submit", enqueue);
  $("login-form").addEventListener("submit", login);
  $("logout").addEventListener("click", logout);
  document.addEventListener("click", onAction);
  request("GET", "/session").then((answer) => {
    // An older server has no /session: carry on as before.
    const session = answer.ok ? answer.body : { required: false };
    if (session.required && !session.authenticated) {
      showLogin();
      return;
    }
    $("logout").hidden = !session.required;
    started = true;
    start(0);
  });
}

async function start(attempt) {
  try {
    await load();
  } catch (error) {
    const delay = RECONNECT_MS[Math.min(attempt, RECONNECT_MS.length - 1)];
    setConnection("offline", "Offline");
    notify(`Could not load the dashboard: ${error.message}. Retrying in ${delay / 1000} s.`, "error");
    setTimeout(() => start(attempt + 1), delay);
    return;
  }
  connect();
}

init();
