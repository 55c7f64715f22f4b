// The dashboard's view of the HTTP API: every path relative to the API's prefix (the
// server fills it into <meta name="taskserver-api">), JSON in and out, and small
// helpers that every view shares (text, times, the notice line).

const PREFIX = document.querySelector('meta[name="taskserver-api"]')?.content ?? "";

/** The URL of an API path, e.g. api("/tasks") → "/jobs/tasks" under a prefix. */
export const api = (path) => PREFIX + path;

/** Called when the API answers 401 (the session ended): the page asks to sign in. */
let unauthorized = () => {};
export function onUnauthorized(fn) {
  unauthorized = fn;
}

/** fetch + JSON; resolves to {ok, status, body}. Network errors become status 0. */
export async function request(method, path, payload) {
  const init = { method, headers: { Accept: "application/json" } };
  if (payload !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(payload);
  }
  let response;
  try {
    response = await fetch(api(path), init);
  } catch (error) {
    return { ok: false, status: 0, body: { detail: `network error: ${error.message}` } };
  }
  if (response.status === 401 && path !== "/session") unauthorized("Please sign in again.");
  let body = null;
  if (response.status !== 204) {
    try {
      body = await response.json();
    } catch {
      // Not JSON (a proxy's error page): fall back to the status line.
      body = { detail: `${response.status} ${response.statusText}` };
    }
  }
  return { ok: response.ok, status: response.status, body };
}

export async function getJSON(path) {
  const answer = await request("GET", path);
  if (!answer.ok) throw new Error(answer.body?.detail || `GET ${path}: HTTP ${answer.status}`);
  return answer.body;
}

export function problemText(answer) {
  const detail = answer.body?.detail || answer.body?.title;
  return detail ? `${detail} (HTTP ${answer.status})` : `HTTP ${answer.status}`;
}

export const $ = (id) => document.getElementById(id);

/** Set text only when it changed: fewer mutations, and screen readers stay quiet. */
export function setText(el, text) {
  const value = text ?? "";
  if (el.textContent !== value) el.textContent = value;
}

export function setState(el, state) {
  if (el.dataset.state !== state) el.dataset.state = state;
}

export function clock(seconds, withMillis = false) {
  if (seconds == null) return "";
  const options = { hour: "2-digit", minute: "2-digit", second: "2-digit", hour12: false };
  if (withMillis) options.fractionalSecondDigits = 3;
  return new Date(seconds * 1000).toLocaleTimeString([], options);
}

/** A <time> showing the clock time (the date too when it is not today). */
export function setTime(el, seconds, withMillis = false) {
  if (seconds == null) {
    setText(el, "");
    return;
  }
  const date = new Date(seconds * 1000);
  const iso = date.toISOString();
  if (el.dateTime !== iso) el.dateTime = iso;
  const today = new Date().toDateString() === date.toDateString();
  const text = today ? clock(seconds, withMillis) : `${date.toLocaleDateString()} ${clock(seconds)}`;
  setText(el, text);
  el.title = date.toLocaleString();
}

/** "in 3 min", "12 s ago": how far a time is from now. */
export function relative(seconds) {
  if (seconds == null) return "";
  const delta = seconds - Date.now() / 1000;
  const size = Math.abs(delta);
  const text = size < 60 ? `${Math.round(size)} s` : size < 3600 ? `${Math.round(size / 60)} min`
    : `${(size / 3600).toFixed(1)} h`;
  return delta >= 0 ? `in ${text}` : `${text} ago`;
}

export function percent(progress) {
  return progress == null ? "" : `${Math.round(progress * 100)}%`;
}

/** A <progress> with no value attribute is indeterminate: right for a task not yet reporting. */
export function setProgress(bar, task, label) {
  const value = task.state === "succeeded" ? 1 : task.progress;
  if (value == null) {
    if (task.state === "running") bar.removeAttribute("value");
    else bar.value = 0;
  } else if (bar.value !== value || !bar.hasAttribute("value")) {
    bar.value = value;
  }
  bar.setAttribute("aria-label", label);
}

export const ACTIVE = new Set(["queued", "waiting", "running", "retrying"]);
export const RETRYABLE = new Set(["failed", "cancelled"]);
export const ENDED = new Set(["succeeded", "failed", "cancelled"]);
export const EVENT_TYPES = [
  "queued", "started", "progress", "retrying", "waiting", "finished", "failed", "cancelled",
];

/** How long a notice stays up, in ms: long enough to read, then the line clears. */
const NOTICE_MS = 6000;
let noticeTimer = 0;

export function notify(text, kind = "info") {
  const el = $("notice");
  el.dataset.kind = kind;
  // Clear first so that the same message twice is still announced.
  el.textContent = "";
  clearTimeout(noticeTimer);
  requestAnimationFrame(() => {
    el.textContent = text;
  });
  noticeTimer = setTimeout(() => {
    el.textContent = "";
  }, NOTICE_MS);
}

/** Cancel or retry one task from any view; says what happened in the notice. */
export async function act(action, id) {
  if (action === "cancel") {
    const answer = await request("DELETE", `/tasks/${id}`);
    if (answer.ok) notify(`Task ${id} cancelled.`);
    else if (answer.status === 409) notify(`Task ${id} has already ended.`);
    else notify(`Could not cancel task ${id}: ${problemText(answer)}.`, "error");
    return answer;
  }
  const answer = await request("POST", `/tasks/${id}/retry`);
  if (answer.ok) notify(`Task ${id} queued again (retry).`);
  else notify(`Could not retry task ${id}: ${problemText(answer)}.`, "error");
  return answer;
}

export function setButtons(el, task) {
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

export function linkTo(a, id) {
  const href = `#/tasks/${id}`;
  if (a.getAttribute("href") !== href) a.setAttribute("href", href);
  setText(a, `#${id}`);
  a.setAttribute("aria-label", `Task ${id}`);
}

/**
 * Keep `container`'s children matching `items` (by task id, in order), reusing
 * elements so that focus, scroll and open <details> survive an update.
 */
export function syncList(container, items, templateId, idPrefix, update) {
  const elements = container._elements ?? (container._elements = new Map());
  const wanted = new Set(items.map((t) => t.id));
  for (const [id, el] of elements) {
    if (!wanted.has(id)) {
      el.remove();
      elements.delete(id);
    }
  }
  let previous = null;
  for (const item of items) {
    let el = elements.get(item.id);
    if (!el) {
      el = $(templateId).content.firstElementChild.cloneNode(true);
      el.id = idPrefix + item.id;
      el.dataset.taskId = item.id;
      elements.set(item.id, el);
    }
    update(el, item);
    const slot = previous ? previous.nextElementSibling : container.firstElementChild;
    if (el !== slot) container.insertBefore(el, slot);
    previous = el;
  }
}

export function showEmpty(el, empty) {
  el.hidden = !empty;
  if (empty) setText(el, el.dataset.empty);
}
