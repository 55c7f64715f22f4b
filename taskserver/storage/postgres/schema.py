"""PostgreSQL schema, numbered migrations, the SQL the PostgreSQL backend runs, row mapping.

Only the PostgreSQL backend (this folder) imports it. Times are the servers'
clocks as seconds since the epoch (``double precision``), as on SQLite; leases
compare heartbeats with the database's own clock, so hosts need not agree.
"""

from __future__ import annotations

from typing import Any

from ... import lifecycle
from ...models import Event, Task
from ..payload import dumps
from ..rows import event_from_row, state_list, task_from_row

#: Numbered migrations; ``taskserver_schema.version`` records how many have run.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE SEQUENCE taskserver_task_blocks;
    CREATE SEQUENCE taskserver_task_seq;
    CREATE TABLE taskserver_tasks (
        id            bigint PRIMARY KEY,
        -- run order: ids come in blocks per node, seq in insertion order cluster-wide
        seq           bigint NOT NULL DEFAULT nextval('taskserver_task_seq'),
        state         text   NOT NULL,
        name          text,
        queue         text   NOT NULL DEFAULT 'default',
        priority      integer NOT NULL DEFAULT 0,
        serial_group  text,
        unique_key    text,
        data          text   NOT NULL,
        attempts      integer NOT NULL DEFAULT 0,
        max_attempts  integer NOT NULL,
        timeout       double precision,
        retry         text,
        progress      double precision,
        message       text,
        result        text,
        error         text,
        traceback     text,
        finish_error  text,
        hook_error    text,
        created_at    double precision NOT NULL,
        available_at  double precision NOT NULL,
        started_at    double precision,
        finished_at   double precision,
        updated_at    double precision NOT NULL,
        -- the node that claimed it; only that node writes the task's row
        node          text
    );
    CREATE INDEX taskserver_tasks_by_state ON taskserver_tasks (state, id);
    CREATE INDEX taskserver_tasks_ready ON taskserver_tasks (queue, priority DESC, seq)
        WHERE state = 'queued';
    CREATE INDEX taskserver_tasks_running ON taskserver_tasks (node, queue)
        WHERE state = 'running';
    CREATE INDEX taskserver_tasks_due ON taskserver_tasks (available_at)
        WHERE state IN ('waiting', 'retrying');
    -- a key is held by one task that has not ended, cluster-wide, without a race
    CREATE UNIQUE INDEX taskserver_tasks_unique ON taskserver_tasks (unique_key)
        WHERE unique_key IS NOT NULL AND state IN ('queued', 'waiting', 'running', 'retrying');
    CREATE INDEX taskserver_tasks_unique_done ON taskserver_tasks (unique_key, finished_at)
        WHERE unique_key IS NOT NULL AND state = 'succeeded';
    CREATE INDEX taskserver_tasks_group ON taskserver_tasks (serial_group, seq)
        WHERE serial_group IS NOT NULL
        AND state IN ('queued', 'waiting', 'running', 'retrying');
    -- one running task per serial group, whatever races the claims run into
    CREATE UNIQUE INDEX taskserver_tasks_group_running ON taskserver_tasks (serial_group)
        WHERE serial_group IS NOT NULL AND state = 'running';
    CREATE INDEX taskserver_tasks_finished ON taskserver_tasks (finished_at)
        WHERE finished_at IS NOT NULL;
    CREATE TABLE taskserver_events (
        id       bigint PRIMARY KEY,
        task_id  bigint,
        type     text,
        data     text NOT NULL,
        topics   text,
        private  boolean NOT NULL DEFAULT false,
        uid      text,
        retry    integer,
        at       double precision NOT NULL
    );
    CREATE INDEX taskserver_events_by_task ON taskserver_events (task_id, id)
        WHERE task_id IS NOT NULL;
    CREATE INDEX taskserver_events_by_uid ON taskserver_events (uid, id) WHERE uid IS NOT NULL;
    -- the last event id: its row lock, held to commit, orders commits (see backend.py)
    CREATE TABLE taskserver_event_counter (
        one   boolean PRIMARY KEY DEFAULT true CHECK (one),
        last  bigint NOT NULL
    );
    INSERT INTO taskserver_event_counter VALUES (true, 0);
    CREATE TABLE taskserver_schedules (
        name      text PRIMARY KEY,
        last_due  double precision NOT NULL
    );
    CREATE TABLE taskserver_nodes (
        id          text PRIMARY KEY,
        host        text NOT NULL,
        pid         integer NOT NULL,
        started_at  double precision NOT NULL,
        heartbeat   double precision NOT NULL,
        info        text NOT NULL DEFAULT '{}'
    );
    """,
    # Counts per queue and state the cluster shares, kept where tasks change: each
    # statement on the tasks appends its deltas (statement triggers, transition tables:
    # no row lock that concurrent commits would queue on), and the heartbeat folds them
    # into the totals now and then. Reading them costs O(queues), not O(tasks).
    """
    CREATE TABLE taskserver_counts (
        queue  text   NOT NULL,
        state  text   NOT NULL,
        n      bigint NOT NULL,
        PRIMARY KEY (queue, state)
    );
    CREATE TABLE taskserver_count_deltas (
        queue  text   NOT NULL,
        state  text   NOT NULL,
        n      bigint NOT NULL
    );
    INSERT INTO taskserver_counts
        SELECT queue, state, count(*) FROM taskserver_tasks GROUP BY queue, state;
    CREATE FUNCTION taskserver_count_inserted() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        INSERT INTO taskserver_count_deltas
            SELECT queue, state, count(*) FROM new_rows GROUP BY queue, state;
        RETURN NULL;
    END $$;
    CREATE FUNCTION taskserver_count_updated() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        INSERT INTO taskserver_count_deltas
            SELECT queue, state, sum(n) FROM (
                SELECT queue, state, count(*) AS n FROM new_rows GROUP BY queue, state
                UNION ALL
                SELECT queue, state, -count(*) FROM old_rows GROUP BY queue, state
            ) AS d GROUP BY queue, state HAVING sum(n) <> 0;
        RETURN NULL;
    END $$;
    CREATE FUNCTION taskserver_count_deleted() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        INSERT INTO taskserver_count_deltas
            SELECT queue, state, -count(*) FROM old_rows GROUP BY queue, state;
        RETURN NULL;
    END $$;
    CREATE TRIGGER taskserver_count_inserted AFTER INSERT ON taskserver_tasks
        REFERENCING NEW TABLE AS new_rows
        FOR EACH STATEMENT EXECUTE FUNCTION taskserver_count_inserted();
    CREATE TRIGGER taskserver_count_updated AFTER UPDATE ON taskserver_tasks
        REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
        FOR EACH STATEMENT EXECUTE FUNCTION taskserver_count_updated();
    CREATE TRIGGER taskserver_count_deleted AFTER DELETE ON taskserver_tasks
        REFERENCING OLD TABLE AS old_rows
        FOR EACH STATEMENT EXECUTE FUNCTION taskserver_count_deleted();
    """,
    # Paused queues start no task on any node, across restarts (QueuePause).
    """
    CREATE TABLE taskserver_paused_queues (
        name  text PRIMARY KEY
    );
    """,
    # Each node's Mercure subscribers, for the subscriptions API (``subscribers.py``).
    """
    CREATE TABLE taskserver_subscribers (
        id       text PRIMARY KEY,
        node     text  NOT NULL REFERENCES taskserver_nodes (id) ON DELETE CASCADE,
        topics   jsonb NOT NULL,
        payload  text
    );
    CREATE INDEX taskserver_subscribers_node ON taskserver_subscribers (node);
    """,
    # The nodes that take the cluster's events (someone there listens: subscribers,
    # waiters): a commit notifies only when it made work or one of them is another node.
    # On the counter row, so a commit reads it under the lock it takes its ids with.
    """
    ALTER TABLE taskserver_event_counter ADD COLUMN followers text[] NOT NULL DEFAULT '{}';
    """,
)

#: Advisory lock keys (``pg_advisory_*``): one 64-bit space per database.
LOCK_MIGRATE = 0x7461736B_00000001
LOCK_RESCUE = 0x7461736B_00000002
LOCK_PURGE = 0x7461736B_00000003
LOCK_FOLD = 0x7461736B_00000004

CREATE_VERSION_TABLE = (
    "CREATE TABLE IF NOT EXISTS taskserver_schema (one boolean PRIMARY KEY DEFAULT true"
    " CHECK (one), version integer NOT NULL)"
)
SELECT_VERSION = "SELECT version FROM taskserver_schema"
SET_VERSION = (
    "INSERT INTO taskserver_schema (one, version) VALUES (true, $1)"
    " ON CONFLICT (one) DO UPDATE SET version = excluded.version"
)


ON_DISK = state_list(lifecycle.ON_DISK)
DELAYED = state_list(lifecycle.DELAYED)
RETRYABLE = state_list(lifecycle.RETRYABLE)
ACTIVE = state_list(lifecycle.ACTIVE_ORDER)

TASK_COLUMNS = (
    "id, state, name, queue, priority, serial_group, unique_key, data, attempts, max_attempts,"
    " timeout, retry, progress, message, result, error, traceback, finish_error, hook_error,"
    " created_at, available_at, started_at, finished_at, updated_at"
)
_T = ", ".join(f"t.{c.strip()}" for c in TASK_COLUMNS.split(","))
EVENT_COLUMNS = "id, task_id, type, data, topics, private, uid, retry"

#: New rows, any number in one statement (one array per column).
INSERT_TASKS = (
    "INSERT INTO taskserver_tasks (id, state, name, queue, priority, serial_group, unique_key,"
    " data, max_attempts, timeout, retry, created_at, available_at, updated_at)"
    " SELECT * FROM unnest($1::bigint[], $2::text[], $3::text[], $4::text[], $5::int[],"
    " $6::text[], $7::text[], $8::text[], $9::int[], $10::float8[], $11::text[],"
    " $12::float8[], $13::float8[], $14::float8[])"
    " ON CONFLICT DO NOTHING RETURNING id"
)
#: The active holder of each of ``$1``'s keys (for the tasks a conflict kept out).
SELECT_KEY_HOLDERS = (
    "SELECT unique_key, id FROM taskserver_tasks WHERE unique_key = ANY($1::text[])"
    f" AND state IN {ACTIVE}"
)
#: Full-row writes by the node that holds the tasks (or of a row no node claimed):
#: a row another node claimed or rescued (``node = ''``: its lease had run out) is
#: left alone. The ids written come back.
UPDATE_TASKS = (
    "UPDATE taskserver_tasks AS t SET state = v.state, attempts = v.attempts,"
    " progress = v.progress, message = v.message, result = v.result, error = v.error,"
    " traceback = v.traceback, finish_error = v.finish_error, hook_error = v.hook_error,"
    " available_at = v.available_at, started_at = v.started_at, finished_at = v.finished_at,"
    " updated_at = v.updated_at"
    " FROM unnest($1::text[], $2::int[], $3::float8[], $4::text[], $5::text[], $6::text[],"
    " $7::text[], $8::text[], $9::text[], $10::float8[], $11::float8[], $12::float8[],"
    " $13::float8[], $14::bigint[]) AS v(state, attempts, progress, message, result, error,"
    " traceback, finish_error, hook_error, available_at, started_at, finished_at, updated_at,"
    " id) WHERE t.id = v.id AND (t.node IS NULL OR t.node = $15) RETURNING t.id"
)
#: Stores a batch's events, in one round trip: takes their ids from the counter (whose
#: row stays locked until the transaction ends), inserts them in order, and notifies
#: the other nodes of the new last id and (``$9``: `` q1 q2``) the queues with new work,
#: when there is new work or a node other than ``$10`` follows the events (the
#: counter's ``followers`` as of the lock: see ``FOLLOW``). ``$1``..``$7``: one array
#: per column, ``$8``: time.
STORE_EVENTS = (
    "WITH counter AS (UPDATE taskserver_event_counter"
    " SET last = last + cardinality($1::bigint[]) RETURNING last, followers),"
    " stored AS (INSERT INTO taskserver_events"
    " (id, task_id, type, data, topics, private, uid, retry, at)"
    " SELECT counter.last - cardinality($1::bigint[]) + e.n, e.task_id, e.type, e.data,"
    " e.topics, e.private, e.uid, e.retry, $8 FROM counter, unnest($1::bigint[], $2::text[],"
    " $3::text[], $4::text[], $5::bool[], $6::text[], $7::int[]) WITH ORDINALITY"
    " AS e(task_id, type, data, topics, private, uid, retry, n))"
    " SELECT last, CASE WHEN $9 <> '' OR NOT followers <@ ARRAY[$10::text]"
    " THEN pg_notify('{channel}', last::text || $9) END FROM counter"
)
#: Node ``$1`` follows the events from now on; the last id committed before. Under the
#: counter's row lock: a commit that took its ids before waited to commit first (its
#: events are at or below the id returned), one after sees ``$1`` and notifies.
FOLLOW = (
    "UPDATE taskserver_event_counter SET followers = array_append(array_remove(followers, $1),"
    " $1) RETURNING last"
)
#: Nodes ``$1`` no longer follow (the row is locked only when one of them did).
UNFOLLOW = (
    "UPDATE taskserver_event_counter SET followers = ARRAY(SELECT f FROM unnest(followers)"
    " AS f WHERE f <> ALL($1::text[])) WHERE followers && $1::text[]"
)
SELECT_LAST_EVENT = "SELECT last FROM taskserver_event_counter"
NOTIFY = "SELECT pg_notify($1, $2)"
UPSERT_SCHEDULE = (
    "INSERT INTO taskserver_schedules (name, last_due) VALUES ($1, $2)"
    " ON CONFLICT (name) DO UPDATE SET last_due = excluded.last_due"
    " WHERE taskserver_schedules.last_due < excluded.last_due RETURNING name"
)
SELECT_STATE_FOR_UPDATE = "SELECT state, queue FROM taskserver_tasks WHERE id = $1 FOR UPDATE"
CANCEL_PENDING = (
    "UPDATE taskserver_tasks SET state = 'cancelled', finished_at = $1, updated_at = $1"
    f" WHERE id = $2 AND state IN {ON_DISK}"
)
RETRY_ENDED = (
    "UPDATE taskserver_tasks AS t SET state = 'queued', attempts = 0, progress = NULL,"
    " message = NULL, result = NULL, error = NULL, traceback = NULL, finish_error = NULL,"
    " hook_error = NULL, started_at = NULL, finished_at = NULL, available_at = $1,"
    f" updated_at = $1, node = NULL WHERE t.id = $2 AND t.state IN {RETRYABLE}"
    " AND (t.unique_key IS NULL OR NOT EXISTS (SELECT 1 FROM taskserver_tasks AS o"
    f" WHERE o.unique_key = t.unique_key AND o.state IN {ACTIVE} AND o.id <> t.id))"
)

# --- claims: each attempt runs on exactly one node ---------------------------------
#: A task of a serial group may run only as its group's oldest task that has not
#: ended (a running one included), so one runs at a time, in insertion order.
_GROUP_TURN = (
    "(c.serial_group IS NULL OR c.seq = (SELECT min(g.seq) FROM taskserver_tasks AS g"
    f" WHERE g.serial_group = c.serial_group AND g.state IN {ACTIVE}))"
)
_CLAIM = (
    "UPDATE taskserver_tasks AS t SET state = 'running', attempts = t.attempts + 1,"
    " node = $1, started_at = $2, updated_at = $2"
    " FROM (SELECT c.id FROM taskserver_tasks AS c WHERE {where}"
    " ORDER BY c.priority DESC, c.seq LIMIT $3 FOR UPDATE SKIP LOCKED) AS pick"
    f" WHERE t.id = pick.id RETURNING {_T}, t.seq"
)
#: A paused queue's tasks are claimed by no node.
_NOT_PAUSED = "NOT EXISTS (SELECT 1 FROM taskserver_paused_queues AS p WHERE p.name = c.queue)"
CLAIM_QUEUE = _CLAIM.format(
    where=f"c.state = 'queued' AND c.queue = $4 AND {_GROUP_TURN} AND {_NOT_PAUSED}"
)
CLAIM_GROUP = _CLAIM.format(
    where=f"c.state = 'queued' AND c.serial_group = $4 AND {_GROUP_TURN} AND {_NOT_PAUSED}"
)
#: Queue concurrency over the whole cluster: claims of a limited queue take turns.
LOCK_QUEUE = "SELECT pg_advisory_xact_lock(hashtextextended('taskserver:queue:' || $1, 0))"
COUNT_RUNNING = "SELECT count(*) FROM taskserver_tasks WHERE state = 'running' AND queue = $1"
SELECT_GROUP_HEAD = (
    f"SELECT {TASK_COLUMNS} FROM taskserver_tasks WHERE serial_group = $1"
    f" AND state IN {ACTIVE} ORDER BY seq LIMIT 1"
)
#: Due tasks become queued by whichever node gets to them first.
PROMOTE_DUE = (
    "UPDATE taskserver_tasks AS t SET state = 'queued', node = NULL, updated_at = $1"
    f" FROM (SELECT c.id FROM taskserver_tasks AS c WHERE c.state IN {DELAYED}"
    " AND c.available_at <= $1 ORDER BY c.available_at, c.id LIMIT $2 FOR UPDATE SKIP LOCKED)"
    f" AS pick WHERE t.id = pick.id RETURNING {_T}"
)

# --- leases: a node that stops renewing loses its tasks ------------------------------
DB_NOW = "extract(epoch FROM clock_timestamp())"
UPSERT_NODE = (
    "INSERT INTO taskserver_nodes (id, host, pid, started_at, heartbeat, info)"
    f" VALUES ($1, $2, $3, $4, {DB_NOW}, $5) ON CONFLICT (id) DO UPDATE SET host = $2,"
    f" pid = $3, started_at = $4, heartbeat = {DB_NOW}, info = $5"
)
RENEW_NODE = f"UPDATE taskserver_nodes SET heartbeat = {DB_NOW}, info = $2 WHERE id = $1"
DELETE_NODE = "DELETE FROM taskserver_nodes WHERE id = $1"
SELECT_EXPIRED_NODES = (
    f"SELECT id FROM taskserver_nodes WHERE heartbeat < {DB_NOW} - $1 AND id <> $2"
)
SELECT_NODES = (
    f"SELECT id, host, pid, started_at, heartbeat, info, {DB_NOW} FROM taskserver_nodes ORDER BY id"
)
#: Running tasks of nodes that are gone: back to queued (the attempt was counted at
#: the claim) or failed on their last attempt, locked so no one else rescues them too.
# --- Mercure subscribers (``subscribers.py``) -------------------------------------------
#: ``$1`` node, ``$2``..``$4``: one array per column.
INSERT_SUBSCRIBERS = (
    "INSERT INTO taskserver_subscribers (node, id, topics, payload)"
    " SELECT $1, * FROM unnest($2::text[], $3::jsonb[], $4::text[])"
    " ON CONFLICT (id) DO UPDATE SET node = excluded.node, topics = excluded.topics,"
    " payload = excluded.payload"
)
DELETE_SUBSCRIBERS = "DELETE FROM taskserver_subscribers WHERE id = ANY($1::text[])"
DELETE_NODE_SUBSCRIBERS = "DELETE FROM taskserver_subscribers WHERE node = ANY($1::text[])"
#: The subscribers of the live nodes other than ``$1`` (a heartbeat within ``$2`` s).
_OTHERS = (
    "SELECT s.id, s.topics::text, s.payload FROM taskserver_subscribers AS s"
    " JOIN taskserver_nodes AS n ON n.id = s.node"
    f" WHERE s.node <> $1 AND n.heartbeat >= {DB_NOW} - $2"
)
#: ... with ``$3`` among their selectors (``NULL``: any), ``$4`` at most.
SELECT_SUBSCRIBERS = (
    f"{_OTHERS} AND ($3::text IS NULL OR s.topics ? $3::text) ORDER BY s.id LIMIT $4"
)
FIND_SUBSCRIBER = f"{_OTHERS} AND s.id = $3"
SELECT_ORPHANS = (
    f"SELECT {TASK_COLUMNS} FROM taskserver_tasks AS t WHERE state = 'running'"
    " AND (node = ANY($1::text[]) OR (node <> '' AND NOT EXISTS"
    " (SELECT 1 FROM taskserver_nodes AS n WHERE n.id = t.node)))"
    " ORDER BY id FOR UPDATE SKIP LOCKED"
)
RESCUE_QUEUED = (
    "UPDATE taskserver_tasks SET state = 'queued', node = '', progress = NULL,"
    " message = NULL, available_at = $1, updated_at = $1 WHERE id = ANY($2::bigint[])"
)
RESCUE_FAILED = (
    "UPDATE taskserver_tasks SET state = 'failed', error = $3, finished_at = $1,"
    " updated_at = $1 WHERE id = $2"
)

# --- reads ---------------------------------------------------------------------
SELECT_TASK = f"SELECT {TASK_COLUMNS} FROM taskserver_tasks WHERE id = $1"
SELECT_TASKS = f"SELECT {TASK_COLUMNS} FROM taskserver_tasks WHERE id > $1 ORDER BY id LIMIT $2"
SELECT_TASKS_DESC = (
    f"SELECT {TASK_COLUMNS} FROM taskserver_tasks WHERE id < $1 ORDER BY id DESC LIMIT $2"
)
SELECT_TASKS_BY_STATE = (
    f"SELECT {TASK_COLUMNS} FROM taskserver_tasks WHERE state = $3 AND id > $1 ORDER BY id LIMIT $2"
)
SELECT_TASKS_BY_STATE_DESC = (
    f"SELECT {TASK_COLUMNS} FROM taskserver_tasks WHERE state = $3 AND id < $1"
    " ORDER BY id DESC LIMIT $2"
)
SELECT_IDS_BY_STATE = "SELECT id FROM taskserver_tasks WHERE state = $1 ORDER BY id LIMIT $2"
#: The filters of ``list_tasks``, by keyword: each ANDed in when given.
TASK_FILTERS = ("state", "queue", "name", "unique_key")


def select_tasks(filters: tuple[str, ...], *, desc: bool) -> str:
    """A page of tasks matching ``filters`` (of ``TASK_FILTERS``): bound as $1 the
    cursor, $2 the limit, then the filters' values in that order."""
    where = [f"{f} = ${i}" for i, f in enumerate(filters, start=3)]
    where.append("id < $1" if desc else "id > $1")
    order = "id DESC" if desc else "id"
    return (
        f"SELECT {TASK_COLUMNS} FROM taskserver_tasks WHERE {' AND '.join(where)}"
        f" ORDER BY {order} LIMIT $2"
    )


SELECT_EVENTS_AFTER = (
    f"SELECT {EVENT_COLUMNS} FROM taskserver_events WHERE id > $1 ORDER BY id LIMIT $2"
)
SELECT_EVENTS_BETWEEN = (
    f"SELECT {EVENT_COLUMNS} FROM taskserver_events WHERE id > $1 AND id <= $2 ORDER BY id"
)
SELECT_ALL_TASK_EVENTS_AFTER = (
    f"SELECT {EVENT_COLUMNS} FROM taskserver_events WHERE id > $1 AND task_id IS NOT NULL"
    " ORDER BY id LIMIT $2"
)
SELECT_TASK_EVENTS_AFTER = (
    f"SELECT {EVENT_COLUMNS} FROM taskserver_events WHERE task_id = $3 AND id > $1"
    " ORDER BY id LIMIT $2"
)
SELECT_EVENT_BY_UID = "SELECT id FROM taskserver_events WHERE uid = $1 ORDER BY id LIMIT 1"
_COUNTS = (
    "SELECT queue, state, sum(n) AS n FROM (SELECT queue, state, n FROM taskserver_counts"
    " UNION ALL SELECT queue, state, n FROM taskserver_count_deltas) AS c"
)
COUNT_BY_STATE = f"SELECT state, sum(n) FROM ({_COUNTS} GROUP BY queue, state) AS q GROUP BY state"
COUNT_BY_QUEUE = f"{_COUNTS} WHERE state IN {ACTIVE} GROUP BY queue, state HAVING sum(n) <> 0"
#: Folds the deltas committed so far into the totals (one node at a time).
FOLD_COUNTS = (
    "WITH moved AS (DELETE FROM taskserver_count_deltas RETURNING queue, state, n)"
    " INSERT INTO taskserver_counts SELECT queue, state, sum(n) FROM moved"
    " GROUP BY queue, state ON CONFLICT (queue, state)"
    " DO UPDATE SET n = taskserver_counts.n + excluded.n"
)
SELECT_QUEUES_WITH_WORK = "SELECT DISTINCT queue FROM taskserver_tasks WHERE state = 'queued'"
SELECT_NEXT_DUE = f"SELECT min(available_at) FROM taskserver_tasks WHERE state IN {DELAYED}"
#: Of the new tasks ``$1`` (each with its ``since``, ``$2``), those whose key a task
#: succeeded with since then, and that task: ``(new id, holder id)``.
SELECT_RECENT_HOLDERS = (
    "SELECT v.id, max(o.id) FROM unnest($1::bigint[], $2::float8[]) AS v(id, since)"
    " JOIN taskserver_tasks n ON n.id = v.id JOIN taskserver_tasks o"
    " ON o.unique_key = n.unique_key AND o.state = 'succeeded' AND o.finished_at >= v.since"
    " AND o.id <> n.id GROUP BY v.id"
)
DELETE_TASKS = "DELETE FROM taskserver_tasks WHERE id = ANY($1::bigint[])"
SELECT_RECENT_UNIQUE = (
    "SELECT id FROM taskserver_tasks WHERE unique_key = $1 AND state = 'succeeded'"
    " AND finished_at >= $2 ORDER BY id DESC LIMIT 1"
)
SELECT_SCHEDULES = "SELECT name, last_due FROM taskserver_schedules"

# --- chores ----------------------------------------------------------------------
PURGE = (
    "WITH gone AS (DELETE FROM taskserver_tasks WHERE id IN (SELECT id FROM taskserver_tasks"
    " WHERE state = ANY($1::text[]) AND finished_at < $2 LIMIT $3) RETURNING id),"
    " events AS (DELETE FROM taskserver_events WHERE task_id IN (SELECT id FROM gone))"
    " SELECT count(*) FROM gone"
)
#: ``PURGE`` of a selection (``Purge.ids``): only tasks among ``$4``.
PURGE_AMONG = (
    "WITH gone AS (DELETE FROM taskserver_tasks WHERE id IN (SELECT id FROM taskserver_tasks"
    " WHERE state = ANY($1::text[]) AND finished_at < $2 AND id = ANY($4::bigint[]) LIMIT $3)"
    " RETURNING id), events AS (DELETE FROM taskserver_events WHERE task_id IN"
    " (SELECT id FROM gone)) SELECT count(*) FROM gone"
)
PAUSE_QUEUE = "INSERT INTO taskserver_paused_queues (name) VALUES ($1) ON CONFLICT DO NOTHING"
RESUME_QUEUE = "DELETE FROM taskserver_paused_queues WHERE name = $1"
SELECT_PAUSED = "SELECT name FROM taskserver_paused_queues ORDER BY name"
TRIM_EVENTS_BY_AGE = (
    "WITH gone AS (DELETE FROM taskserver_events WHERE id IN (SELECT id FROM taskserver_events"
    " WHERE at < $1 ORDER BY id LIMIT $2) RETURNING 1) SELECT count(*) FROM gone"
)
TRIM_EVENTS_BY_COUNT = (
    "WITH gone AS (DELETE FROM taskserver_events WHERE id IN (SELECT id FROM taskserver_events"
    " WHERE id <= $1 ORDER BY id LIMIT $2) RETURNING 1) SELECT count(*) FROM gone"
)
PROBE_WRITE = "UPDATE taskserver_schema SET version = version"


def insert_row(task: Task, data_text: str) -> tuple[Any, ...]:
    """One row of ``INSERT_TASKS`` (a column of each array)."""
    return (
        task.id,
        task.state.value,
        task.name,
        task.queue,
        task.priority,
        task.serial_group,
        task.unique_key,
        data_text,
        task.max_attempts,
        task.timeout,
        dumps(task.retry.to_json()) if task.retry else None,
        task.created_at,
        task.available_at,
        task.updated_at,
    )


def update_row(task: Task, result_text: str | None) -> tuple[Any, ...]:
    """One row of ``UPDATE_TASKS``: the task's whole mutable state, its id last."""
    return (
        task.state.value,
        task.attempts,
        task.progress,
        task.message,
        result_text,
        task.error,
        task.traceback,
        task.finish_error,
        task.hook_error,
        task.available_at,
        task.started_at,
        task.finished_at,
        task.updated_at,
        task.id,
    )


def columns(rows: list[tuple[Any, ...]], width: int) -> list[list[Any]]:
    """Rows turned into one list per column (``unnest`` takes arrays)."""
    if not rows:
        return [[] for _ in range(width)]
    return [list(column) for column in zip(*rows, strict=True)]


def event_row(e: Event) -> tuple[Any, ...]:
    """One row of ``STORE_EVENTS`` (its id comes from the counter)."""
    topics = dumps(list(e.topics)) if e.topics else None
    return (e.task_id, e.type, e.json, topics, e.private, e.uid, e.retry)


__all__ = ["event_from_row", "task_from_row"]  # re-exported: the backend maps rows with them
