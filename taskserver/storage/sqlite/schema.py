"""SQLite schema, numbered migrations, the SQL the SQLite backend runs, and row mapping.

Only the SQLite backend (this folder) imports it.
"""

from __future__ import annotations

import functools
import math
import sqlite3
from itertools import chain
from typing import Any

from ... import lifecycle
from ...models import Event, EventType, Task, TaskState
from ..payload import dumps
from ..rows import event_from_row, state_list, task_from_row

#: Numbered migrations; ``PRAGMA user_version`` records how many have run.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE tasks (
        -- AUTOINCREMENT: sqlite_sequence keeps the highest id ever used, so ids are
        -- never reused after the newest rows were purged (see Store._open_sync)
        id            INTEGER PRIMARY KEY AUTOINCREMENT,
        state         TEXT    NOT NULL,
        name          TEXT,
        queue         TEXT    NOT NULL DEFAULT 'default',
        priority      INTEGER NOT NULL DEFAULT 0,
        serial_group  TEXT,
        unique_key    TEXT,
        data          TEXT    NOT NULL,
        attempts      INTEGER NOT NULL DEFAULT 0,
        max_attempts  INTEGER NOT NULL,
        timeout       REAL,
        retry         TEXT,              -- JSON RetryPolicy, resolved at enqueue
        progress      REAL,
        message       TEXT,
        result        TEXT,
        error         TEXT,
        traceback     TEXT,
        finish_error  TEXT,
        hook_error    TEXT,
        created_at    REAL    NOT NULL,
        available_at  REAL    NOT NULL,  -- when a waiting/retrying task becomes queued
        started_at    REAL,
        finished_at   REAL,
        updated_at    REAL    NOT NULL
    );
    CREATE INDEX tasks_by_state ON tasks (state, id);
    CREATE INDEX tasks_ready ON tasks (queue, priority DESC, id) WHERE state = 'queued';
    CREATE INDEX tasks_due ON tasks (available_at) WHERE state IN ('waiting', 'retrying');
    CREATE INDEX tasks_unique ON tasks (unique_key) WHERE unique_key IS NOT NULL;
    CREATE INDEX tasks_group ON tasks (serial_group, id) WHERE serial_group IS NOT NULL;
    CREATE INDEX tasks_finished ON tasks (finished_at) WHERE finished_at IS NOT NULL;
    CREATE TABLE events (
        id       INTEGER PRIMARY KEY AUTOINCREMENT,  -- never reused: Last-Event-ID relies on it
        task_id  INTEGER,          -- NULL for updates published to the Mercure hub
        type     TEXT,
        data     TEXT    NOT NULL,
        topics   TEXT,             -- JSON array, published updates only
        private  INTEGER NOT NULL DEFAULT 0,
        uid      TEXT,             -- the publisher's id of a published update
        retry    INTEGER,
        at       REAL    NOT NULL
    );
    CREATE INDEX events_by_task ON events (task_id, id) WHERE task_id IS NOT NULL;
    CREATE UNIQUE INDEX events_by_uid ON events (uid) WHERE uid IS NOT NULL;
    CREATE TABLE schedules (
        name      TEXT PRIMARY KEY,
        last_due  REAL NOT NULL    -- the latest due time already enqueued
    );
    """,
    # A publisher may reuse an update id, as the reference Mercure hub allows.
    """
    DROP INDEX events_by_uid;
    CREATE INDEX events_by_uid ON events (uid, id) WHERE uid IS NOT NULL;
    """,
    # Paused queues start no task, across restarts (QueuePause).
    """
    CREATE TABLE paused_queues (
        name  TEXT PRIMARY KEY
    );
    """,
    # Purges pick one ended state's oldest rows: (state, finished_at) finds them without
    # reading the state's newer rows; (finished_at) alone was never chosen by the planner.
    """
    DROP INDEX tasks_finished;
    CREATE INDEX tasks_ended ON tasks (state, finished_at) WHERE finished_at IS NOT NULL;
    """,
)

#: A write that changes nothing but does reach the disk: one page (the header) goes
#: to the WAL. Readiness uses it to learn whether writes commit again.
PROBE_WRITE = f"PRAGMA user_version = {len(MIGRATIONS)}"

PRAGMAS = (
    "PRAGMA journal_mode = WAL",
    "PRAGMA busy_timeout = 5000",
    "PRAGMA temp_store = MEMORY",
)
# Page cache per connection (KiB), sized for its job: the writer's working set is
# the B-tree edges where rows are appended and the queue's head where they change;
# the reader looks up single rows and recent pages; the checkpointer copies the WAL
# through its own buffer. A miss costs a read from the OS page cache, not the disk.
WRITER_CACHE = "PRAGMA cache_size = -16384"
READER_CACHE = "PRAGMA cache_size = -4096"
CHECKPOINTER_CACHE = "PRAGMA cache_size = -256"

TASK_COLUMNS = (
    "id, state, name, queue, priority, serial_group, unique_key, data, attempts, max_attempts,"
    " timeout, retry, progress, message, result, error, traceback, finish_error, hook_error,"
    " created_at, available_at, started_at, finished_at, updated_at"
)


ON_DISK = state_list(lifecycle.ON_DISK)
DELAYED = state_list(lifecycle.DELAYED)
RETRYABLE = state_list(lifecycle.RETRYABLE)
ACTIVE = state_list(lifecycle.ACTIVE_ORDER)
QUEUED, RUNNING, SUCCEEDED = (
    lifecycle.QUEUED.value,
    lifecycle.RUNNING.value,
    lifecycle.SUCCEEDED.value,
)
FAILED, CANCELLED = lifecycle.FAILED.value, lifecycle.CANCELLED.value


# Writes never bind None: the sqlite3 module binds it through its adapter lookup,
# which costs about 6x an int, and the writer thread holds the GIL while it binds.
# A missing text is bound as '' and stored as NULL by nullif(); a missing number
# is bound as NaN, which SQLite stores as NULL. (No stored text is ever '': labels
# are 1-200 characters, JSON is never empty, an empty progress message is none.)
NO_TEXT = ""
NO_NUMBER = math.nan


class _PlainText(dict[str, str]):
    """A state or event type as a plain ``str`` (any other text as itself).

    The ``sqlite3`` module binds a ``str`` subclass such as a ``StrEnum`` member through
    its adapter lookup, about 350 ns more than a plain ``str``, with the GIL held."""

    def __missing__(self, key: str) -> str:
        return key


#: ``TEXT[task.state]``, ``TEXT[event.type]``: what the writer binds.
TEXT = _PlainText({member: member.value for member in (*TaskState, *EventType)})
#: One row of ``INSERT_TASK_PREFIX … VALUES``, in ``insert_row`` order.
TASK_ROW = (
    "(?, ?, nullif(?, ''), ?, ?, nullif(?, ''), nullif(?, ''), ?, ?, ?, nullif(?, ''), ?, ?, ?)"
)
#: The columns ``update_row`` writes, as ``column = {value}`` with ``{}`` for the value's place.
_UPDATE_SET = (
    "state = {0}, attempts = {1}, progress = {2}, message = nullif({3}, ''),"
    " result = nullif({4}, ''), error = nullif({5}, ''), traceback = nullif({6}, ''),"
    " finish_error = nullif({7}, ''), hook_error = nullif({8}, ''), available_at = {9},"
    " started_at = {10}, finished_at = {11}, updated_at = {12}"
)
UPDATE_TASK = f"UPDATE tasks SET {_UPDATE_SET.format(*(['?'] * 13))} WHERE id = ?"
CANCEL_PENDING = (
    f"UPDATE tasks SET state = '{CANCELLED}', finished_at = ?, updated_at = ?"
    f" WHERE id = ? AND state IN {ON_DISK}"
)
RETRY_ENDED = (
    f"UPDATE tasks SET state = '{QUEUED}', attempts = 0, progress = NULL, message = NULL,"
    " result = NULL, error = NULL, traceback = NULL, finish_error = NULL, hook_error = NULL,"
    " started_at = NULL, finished_at = NULL, available_at = ?, updated_at = ?"
    f" WHERE id = ? AND state IN {RETRYABLE}"
)
INSERT_EVENT = (
    "INSERT INTO events (id, task_id, type, data, topics, private, uid, retry, at)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
EVENT_COLUMNS = "id, task_id, type, data, topics, private, uid, retry"
SELECT_EVENT_BY_UID = "SELECT id FROM events WHERE uid = ? ORDER BY id LIMIT 1"
SELECT_TASK = f"SELECT {TASK_COLUMNS} FROM tasks WHERE id = ?"
SELECT_STATE = "SELECT state, queue FROM tasks WHERE id = ?"
#: The highest id a table ever had: its rows, or sqlite_sequence once they are purged.
SELECT_HIGHEST_ID = (
    "SELECT max(coalesce((SELECT max(id) FROM {table}), 0),"
    " coalesce((SELECT seq FROM sqlite_sequence WHERE name = '{table}'), 0))"
)
SELECT_QUEUED_PAGE = (
    f"SELECT {TASK_COLUMNS} FROM tasks WHERE state = '{QUEUED}' AND queue = ?"
    " AND (serial_group IS NULL OR (serial_group NOT IN (SELECT value FROM json_each(?))"
    "  AND id = (SELECT min(g.id) FROM tasks AS g WHERE g.serial_group = tasks.serial_group"
    f"   AND g.state IN {ON_DISK})))"
    " ORDER BY priority DESC, id LIMIT ?"
)
SELECT_GROUP_HEAD = (
    f"SELECT {TASK_COLUMNS} FROM tasks WHERE serial_group = ?"
    f" AND state IN {ON_DISK} ORDER BY id LIMIT 1"
)
SELECT_QUEUES_WITH_WORK = f"SELECT DISTINCT queue FROM tasks WHERE state = '{QUEUED}'"
SELECT_QUEUED_SECONDS = (
    "SELECT queue, CAST(available_at AS INTEGER), count(*) FROM tasks"
    f" WHERE state = '{QUEUED}' GROUP BY 1, 2"
)
# INDEXED BY, here and below: without ANALYZE statistics the planner picks tasks_by_state,
# reading every row in those states where the partial index seeks (EXPLAIN QUERY PLAN).
SELECT_DUE = (
    f"SELECT {TASK_COLUMNS} FROM tasks INDEXED BY tasks_due WHERE state IN {DELAYED}"
    " AND available_at <= ? ORDER BY available_at, id LIMIT ?"
)
SELECT_NEXT_DUE = (
    f"SELECT min(available_at) FROM tasks INDEXED BY tasks_due WHERE state IN {DELAYED}"
)
SELECT_TASKS = f"SELECT {TASK_COLUMNS} FROM tasks WHERE id > ? ORDER BY id LIMIT ?"
#: The filters of ``list_tasks``, by keyword: each ANDed in when given.
TASK_FILTERS = {
    "state": "state = ?",
    "queue": "queue = ?",
    "name": "name = ?",
    "unique_key": "unique_key = ?",
}


def select_tasks(filters: tuple[str, ...], *, desc: bool) -> str:
    """A page of tasks matching ``filters`` (keys of ``TASK_FILTERS``), bound in that
    order, then the cursor and the limit."""
    where = " AND ".join([*(TASK_FILTERS[f] for f in filters), "id < ?" if desc else "id > ?"])
    order = "id DESC" if desc else "id"
    return f"SELECT {TASK_COLUMNS} FROM tasks WHERE {where} ORDER BY {order} LIMIT ?"


SELECT_TASKS_DESC = f"SELECT {TASK_COLUMNS} FROM tasks WHERE id < ? ORDER BY id DESC LIMIT ?"
SELECT_TASKS_BY_STATE_DESC = (
    f"SELECT {TASK_COLUMNS} FROM tasks WHERE state = ? AND id < ? ORDER BY id DESC LIMIT ?"
)
SELECT_TASKS_BY_STATE = (
    f"SELECT {TASK_COLUMNS} FROM tasks WHERE state = ? AND id > ? ORDER BY id LIMIT ?"
)
SELECT_EVENTS_AFTER = f"SELECT {EVENT_COLUMNS} FROM events WHERE id > ? ORDER BY id LIMIT ?"
SELECT_ALL_TASK_EVENTS_AFTER = (
    f"SELECT {EVENT_COLUMNS} FROM events WHERE id > ? AND task_id IS NOT NULL ORDER BY id LIMIT ?"
)
SELECT_TASK_EVENTS_AFTER = (
    f"SELECT {EVENT_COLUMNS} FROM events WHERE task_id = ? AND id > ? ORDER BY id LIMIT ?"
)
COUNT_BY_STATE = "SELECT state, count(*) FROM tasks GROUP BY state"
COUNT_BY_QUEUE = (
    f"SELECT queue, state, count(*) FROM tasks WHERE state IN {ACTIVE} GROUP BY queue, state"
)
SELECT_RUNNING = f"SELECT id, attempts, max_attempts FROM tasks WHERE state = '{RUNNING}'"
SELECT_QUEUED_BY_IDS = (
    f"SELECT id, attempts, max_attempts FROM tasks WHERE state = '{QUEUED}'"
    " AND id IN (SELECT value FROM json_each(?))"
)
SELECT_ACTIVE_UNIQUE = (
    "SELECT unique_key, id FROM tasks INDEXED BY tasks_unique"
    f" WHERE unique_key IS NOT NULL AND state IN {ACTIVE}"
)
SELECT_RECENT_UNIQUE = (
    "SELECT id FROM tasks INDEXED BY tasks_unique"
    f" WHERE unique_key = ? AND state = '{SUCCEEDED}' AND finished_at >= ?"
    " ORDER BY id DESC LIMIT 1"
)
#: Per serial group with tasks not ended on disk: its oldest such task and its state.
SELECT_GROUP_HEADS = (
    "SELECT t.serial_group, t.id, t.state FROM tasks AS t JOIN ("
    " SELECT serial_group, min(id) AS head FROM tasks INDEXED BY tasks_group"
    " WHERE serial_group IS NOT NULL"
    f" AND state IN {ON_DISK} GROUP BY serial_group"
    ") AS g ON t.id = g.head"
)
SELECT_IDS_BY_STATE = "SELECT id FROM tasks WHERE state = ? ORDER BY id LIMIT ?"
# Recovery sets the attempts: a start found only in the attempts journal counts too.
RECOVER_FAILED = (
    f"UPDATE tasks SET state = '{FAILED}', attempts = ?, error = ?, finished_at = ?,"
    " updated_at = ? WHERE id = ?"
)
RECOVER_QUEUED = (
    f"UPDATE tasks SET state = '{QUEUED}', attempts = ?, progress = NULL, message = NULL,"
    " available_at = ?, updated_at = ? WHERE id = ?"
)
# Purging works in chunks so one call never holds the writer for long.
PURGE_TASK_EVENTS = (
    "DELETE FROM events WHERE task_id IN (SELECT id FROM tasks{index}"
    " WHERE state IN ({states}) AND finished_at < ?{among} LIMIT ?)"
)
PURGE_TASKS = (
    "DELETE FROM tasks WHERE id IN (SELECT id FROM tasks{index}"
    " WHERE state IN ({states}) AND finished_at < ?{among} LIMIT ?)"
)
#: ``{index}`` of a purge by age: its oldest rows of one state (a selection goes by id).
PURGE_BY_AGE = " INDEXED BY tasks_ended"
#: A purge of a selection: ``{among}`` above, bound to a JSON array of ids.
AMONG_IDS = " AND id IN (SELECT value FROM json_each(?))"
PAUSE_QUEUE = "INSERT OR IGNORE INTO paused_queues (name) VALUES (?)"
RESUME_QUEUE = "DELETE FROM paused_queues WHERE name = ?"
SELECT_PAUSED = "SELECT name FROM paused_queues ORDER BY name"
TRIM_EVENTS_BY_AGE = (
    "DELETE FROM events WHERE id IN (SELECT id FROM events WHERE at < ? ORDER BY id LIMIT ?)"
)
TRIM_EVENTS_BY_COUNT = (
    "DELETE FROM events WHERE id IN (SELECT id FROM events WHERE id <= ? ORDER BY id LIMIT ?)"
)
SELECT_SCHEDULES = "SELECT name, last_due FROM schedules"
UPSERT_SCHEDULE = (
    "INSERT INTO schedules (name, last_due) VALUES (?, ?)"
    " ON CONFLICT (name) DO UPDATE SET last_due = excluded.last_due"
)


def insert_many(prefix: str, row: str, rows: list[tuple[Any, ...]]) -> list[tuple[str, list[Any]]]:
    """Multi-row ``INSERT`` statements for ``rows``: ``(sql, flat parameters)`` pairs.

    ``row`` is the placeholder of one row, say ``(?, ?)``.

    One statement per up to ``PARAMETERS_PER_STATEMENT`` parameters instead of one
    step per row: each statement costs the writer thread one wait for the GIL, which
    the event loop's thread holds most of the time.
    """
    return [
        (f"{prefix} VALUES {_values(row, len(chunk))}", list(chain.from_iterable(chunk)))
        for chunk in _chunks(rows)
    ]


def update_many(rows: list[tuple[Any, ...]]) -> list[tuple[str, list[Any]]]:
    """``UPDATE … FROM (VALUES …)`` statements writing ``update_row`` tuples, 585 at a time.

    One statement per chunk, joined on the primary key: about 1.5x the speed of
    ``executemany`` here, and one GIL release instead of one per row. Needs
    SQLite 3.33; older versions get one ``UPDATE_TASK`` per row.
    """
    if sqlite3.sqlite_version_info < (3, 33):
        return [(UPDATE_TASK, list(row)) for row in rows]
    return [
        (
            f"{UPDATE_FROM_PREFIX} (VALUES {_values(UPDATE_ROW, len(chunk))}) AS v"
            " WHERE tasks.id = v.column14",
            list(chain.from_iterable(chunk)),
        )
        for chunk in _chunks(rows)
    ]


def _chunks(rows: list[tuple[Any, ...]]) -> list[list[tuple[Any, ...]]]:
    if not rows:
        return []
    step = max(1, PARAMETERS_PER_STATEMENT // len(rows[0]))
    return [rows[i : i + step] for i in range(0, len(rows), step)]


@functools.lru_cache(maxsize=256)
def _values(row: str, count: int) -> str:
    """``row`` ``count`` times, comma-separated: built once per shape."""
    return ", ".join([row] * count)


def placeholders(width: int) -> str:
    """``(?, ?, …)`` with ``width`` places."""
    return "(" + ", ".join("?" * width) + ")"


UPDATE_ROW = placeholders(14)
EVENT_ROW = placeholders(9)
TASK_EVENT_ROW = placeholders(5)


UPDATE_FROM_PREFIX = (
    f"UPDATE tasks SET {_UPDATE_SET.format(*(f'v.column{i}' for i in range(1, 14)))} FROM"
)
#: Parameters per multi-row statement (rows of 14: 585; of 5, events: 1,638), well under
#: SQLite's 32,766: a cached statement's memory grows with them, and 500 rows of 14
#: (7,000) were the most before, when every table took 500 rows per statement.
PARAMETERS_PER_STATEMENT = 8192
INSERT_TASK_PREFIX = (
    "INSERT INTO tasks (id, state, name, queue, priority, serial_group, unique_key, data,"
    " max_attempts, timeout, retry, created_at, available_at, updated_at)"
)
INSERT_EVENT_PREFIX = (
    "INSERT INTO events (id, task_id, type, data, topics, private, uid, retry, at)"
)
#: Events of tasks leave topics, private, uid and retry at their defaults: fewer
#: parameters for the writer thread to bind while it holds the GIL.
INSERT_TASK_EVENT_PREFIX = "INSERT INTO events (id, task_id, type, data, at)"


def insert_row(task: Task, data_text: str) -> tuple[Any, ...]:
    """Parameters of one ``TASK_ROW`` for a new task (no None: see ``NO_TEXT``)."""
    retry = dumps(task.retry.to_json()) if task.retry else NO_TEXT
    return (
        task.id,
        TEXT[task.state],
        task.name or NO_TEXT,
        task.queue,
        task.priority,
        task.serial_group or NO_TEXT,
        task.unique_key or NO_TEXT,
        data_text,
        task.max_attempts,
        NO_NUMBER if task.timeout is None else task.timeout,
        retry,
        task.created_at,
        task.available_at,
        task.updated_at,
    )


def update_row(task: Task, result_text: str | None) -> tuple[Any, ...]:
    """Parameters of ``UPDATE_TASK``: the task's whole mutable state (no None: see ``NO_TEXT``)."""
    return (
        TEXT[task.state],
        task.attempts,
        NO_NUMBER if task.progress is None else task.progress,
        task.message or NO_TEXT,
        result_text or NO_TEXT,
        task.error or NO_TEXT,
        task.traceback or NO_TEXT,
        task.finish_error or NO_TEXT,
        task.hook_error or NO_TEXT,
        task.available_at,
        NO_NUMBER if task.started_at is None else task.started_at,
        NO_NUMBER if task.finished_at is None else task.finished_at,
        task.updated_at,
        task.id,
    )


def event_row(e: Event, at: float) -> tuple[Any, ...]:
    """Parameters of ``INSERT_EVENT``."""
    topics = dumps(list(e.topics)) if e.topics else None
    return (e.id, e.task_id, e.type, e.json, topics, int(e.private), e.uid, e.retry, at)


__all__ = ["event_from_row", "task_from_row"]  # re-exported: the backend maps rows with them
