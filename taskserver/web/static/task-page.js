// The task page (#/tasks/ID): the whole task, every attempt, and its event timeline.
//
// It subscribes to that task's stream only (GET /tasks/{id}/events: the stored
// events, then live ones until the last); the overview's all-tasks stream is closed
// meanwhile. The full row (result, error, traceback) is re-read, throttled, after
// events that change it.

import {
  $, ENDED, EVENT_TYPES, api, getJSON, percent, relative, setButtons, setProgress, setState,
  setText, setTime,
} from "./api.js";

/** Most events the timeline shows; later progress updates replace the last one. */
const TIMELINE_LIMIT = 1000;
/** At most one re-read of the task per this many ms. */
const REREAD_MS = 250;

let current = null; // {id, source, task, events, timer}

export function taskIdOf(hash) {
  const match = /^#\/tasks\/(\d{1,18})$/.exec(hash);
  return match ? Number(match[1]) : null;
}

export function closeTask() {
  if (!current) return;
  current.source?.close();
  clearTimeout(current.timer);
  current = null;
}

export async function openTask(id) {
  closeTask();
  const state = { id, source: null, task: null, events: [], timer: 0 };
  current = state;
  setText($("task-id"), `#${id}`);
  $("task-h").focus();
  for (const list of ["timeline", "attempts"]) $(list).replaceChildren();
  $("task-fields").replaceChildren();
  for (const empty of ["timeline-empty", "attempts-empty"]) {
    $(empty).hidden = false;
    setText($(empty), "Loading…");
  }
  try {
    state.task = await getJSON(`/tasks/${id}`);
  } catch (error) {
    if (current !== state) return;
    setText($("task-message"), `Could not load task ${id}: ${error.message}`);
    return;
  }
  if (current !== state) return;
  renderTask(state.task);
  const source = new EventSource(api(`/tasks/${id}/events?lastEventID=0`));
  state.source = source;
  const onEvent = (message) => {
    if (current !== state) return;
    const event = JSON.parse(message.data);
    event.id = Number(message.lastEventId);
    addEvent(state, event);
    applyToTask(state.task, event);
    renderTask(state.task);
    if (event.type !== "progress") reread(state);
  };
  for (const type of EVENT_TYPES) source.addEventListener(type, onEvent);
  source.onerror = () => {
    // The stream of an ended task ends; the browser asks again, gets 204 and stops.
    if (source.readyState === EventSource.CLOSED) renderTimeline(state);
  };
}

function reread(state) {
  if (state.timer) return;
  state.timer = setTimeout(async () => {
    state.timer = 0;
    try {
      const task = await getJSON(`/tasks/${state.id}`);
      if (current === state && !(state.task.updated_at > task.updated_at)) {
        state.task = task;
        renderTask(task);
      }
    } catch {
      // The events keep the page current; the next one asks again.
    }
  }, REREAD_MS);
}

function applyToTask(task, event) {
  if (event.at < task.updated_at) return; // replayed: the row read is newer
  task.state = event.state;
  task.updated_at = event.at;
  if (event.attempt != null) task.attempts = event.attempt;
  if (event.type === "progress") {
    task.progress = event.progress;
    task.message = event.message;
  } else if (event.type === "started") {
    task.progress = null;
    task.message = null;
    task.started_at = event.at;
  } else if (event.type === "finished") {
    task.progress = 1;
    task.result = event.result;
  } else if (event.error) {
    task.error = event.error;
  }
  if (event.available_at != null) task.available_at = event.available_at;
}

function addEvent(state, event) {
  const events = state.events;
  if (events.some((e) => e.id === event.id)) return;
  const last = events[events.length - 1];
  if (events.length >= TIMELINE_LIMIT && event.type === "progress" && last?.type === "progress") {
    events[events.length - 1] = event;
  } else {
    events.push(event);
  }
  renderTimeline(state);
}

const FIELDS = [
  ["Queue", (t) => t.queue],
  ["Name", (t) => t.name],
  ["Priority", (t) => String(t.priority)],
  ["Attempts", (t) => `${t.attempts} of ${t.max_attempts}`],
  ["Unique key", (t) => t.unique_key],
  ["Serial group", (t) => t.serial_group],
  ["Timeout", (t) => (t.timeout == null ? null : `${t.timeout} s`)],
  ["Created", (t) => t.created_at, true],
  ["Due", (t) => (ENDED.has(t.state) ? null : t.available_at), true],
  ["Started", (t) => t.started_at, true],
  ["Finished", (t) => t.finished_at, true],
  ["Finish error", (t) => t.finish_error],
  ["Hook error", (t) => t.hook_error],
];

function renderTask(task) {
  setText($("task-id"), `#${task.id}`);
  const badge = $("task-state");
  setState(badge, task.state);
  setState($("task-view"), task.state); // colours the progress bar
  setText(badge, task.state);
  setProgress($("task-progress"), task, `Progress of task ${task.id}`);
  const message = [percent(task.progress), task.message].filter(Boolean).join(" · ");
  setText($("task-message"), message);
  setButtons($("task-view"), task);
  const rows = [];
  for (const [label, get, isTime] of FIELDS) {
    const value = get(task);
    if (value == null || value === "") continue;
    const dt = document.createElement("dt");
    dt.textContent = label;
    const dd = document.createElement("dd");
    if (isTime) {
      const time = document.createElement("time");
      setTime(time, value, true);
      dd.append(time);
      if (label === "Due") dd.append(` (${relative(value)})`);
    } else {
      dd.textContent = value;
    }
    rows.push(dt, dd);
  }
  $("task-fields").replaceChildren(...rows);
  setText($("task-data"), JSON.stringify(task.data, null, 2));
  $("task-result-block").hidden = task.state !== "succeeded";
  setText($("task-result"), task.result === undefined ? "" : JSON.stringify(task.result, null, 2));
  const failed = Boolean(task.error);
  $("task-error-block").hidden = !failed;
  setText($("task-error"), task.error);
  $("task-traceback-block").hidden = !task.traceback;
  setText($("task-traceback"), task.traceback);
}

function detail(event) {
  const parts = [];
  if (event.type === "progress") parts.push(percent(event.progress));
  if (event.message) parts.push(event.message);
  if (event.error) parts.push(event.error);
  if (event.available_at != null && event.type !== "queued") {
    parts.push(`due ${new Date(event.available_at * 1000).toLocaleTimeString([], { hour12: false })}`);
  }
  if (event.worker != null) parts.push(`worker ${event.worker}`);
  if (event.manual_retry) parts.push("retried by hand");
  if (event.interrupted) parts.push("interrupted by a stop");
  return parts.join(" · ");
}

function renderTimeline(state) {
  const items = state.events.map((event) => {
    const li = document.createElement("li");
    li.className = "event";
    li.dataset.type = event.type;
    const time = document.createElement("time");
    setTime(time, event.at, true);
    const badge = document.createElement("span");
    badge.className = "badge state";
    badge.dataset.state = event.state;
    badge.textContent = event.type;
    const attempt = document.createElement("span");
    attempt.className = "attempt";
    attempt.textContent = event.attempt ? `attempt ${event.attempt}` : "";
    const text = document.createElement("span");
    text.className = "detail";
    text.textContent = detail(event);
    li.append(time, badge, attempt, text);
    return li;
  });
  $("timeline").replaceChildren(...items);
  $("timeline-empty").hidden = items.length > 0;
  setText($("timeline-empty"), $("timeline-empty").dataset.empty);
  renderAttempts(state);
}

const OUTCOME = { retrying: "failed, retrying", failed: "failed", finished: "succeeded",
  cancelled: "cancelled", waiting: "postponed", queued: "interrupted" };

function renderAttempts(state) {
  const attempts = [];
  let open = null;
  for (const event of state.events) {
    if (event.type === "started") {
      open = { n: event.attempt, started: event.at, ended: null, outcome: "running", error: "" };
      attempts.push(open);
    } else if (open && event.type !== "progress" && OUTCOME[event.type]) {
      open.ended = event.at;
      open.outcome = OUTCOME[event.type];
      open.error = event.error ?? "";
      open = null;
    }
  }
  const rows = attempts.map((a) => {
    const tr = document.createElement("tr");
    const cells = [
      ["#", String(a.n ?? ""), "num"], ["Started", a.started], ["Ended", a.ended],
      ["Outcome", a.outcome], ["Error", a.error, "error"],
    ];
    for (const [label, value, cls] of cells) {
      const td = document.createElement("td");
      td.dataset.label = label;
      if (cls) td.className = cls;
      if (label === "Started" || label === "Ended") {
        const time = document.createElement("time");
        setTime(time, value, true);
        td.append(time);
      } else {
        td.textContent = value;
      }
      tr.append(td);
    }
    return tr;
  });
  $("attempts").replaceChildren(...rows);
  $("attempts-empty").hidden = rows.length > 0;
  setText($("attempts-empty"), $("attempts-empty").dataset.empty);
}
