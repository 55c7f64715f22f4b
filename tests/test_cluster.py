"""Several ``taskserver run`` processes on one PostgreSQL database (issue 12, "Tests").

Real processes (``tests/cluster.py``), a real private PostgreSQL (``tests/pg_server.py``),
real HTTP and SSE clients. The task callback of every node records each execution in one
append-only file (``tests/cluster_app.py``), so the tests see which node ran which attempt,
and when: each attempt runs on exactly one node, serial groups and queue limits hold over
the cluster, and a node killed with ``kill -9`` loses no acknowledged task.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import statistics
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from .cluster import Cluster, Execution, max_overlap
from .cluster_app import LIMITED_CONCURRENCY, LIMITED_QUEUE, TICK_EVERY
from .conftest import SSEEvent, sse, wait_for
from .pg_server import PostgresServer

pytestmark = pytest.mark.timeout(240)

ClusterFactory = Callable[..., Awaitable[Cluster]]
#: How early a scheduled run may be enqueued before its due time (timer granularity).
EARLY = 0.25


@pytest.fixture
async def make_cluster(postgres: PostgresServer, tmp_path: Path) -> AsyncIterator[ClusterFactory]:
    """Clusters on fresh databases of the session's PostgreSQL; every node stopped after."""
    made: list[Cluster] = []

    async def factory(**options: Any) -> Cluster:
        dsn = await postgres.create_database_async()
        directory = tmp_path / f"cluster-{len(made)}"
        directory.mkdir()
        cluster = Cluster(dsn, directory, **options)
        made.append(cluster)
        return cluster

    yield factory
    for cluster in made:
        await cluster.close()


@dataclass
class Received:
    """An SSE event and when it arrived (``time.time()``, the callbacks' clock)."""

    event: SSEEvent
    at: float

    @property
    def id(self) -> int:
        return int(self.event.id or 0)

    @property
    def task_id(self) -> int:
        task_id: int = orjson.loads(self.event.data)["task_id"]
        return task_id

    def key(self) -> tuple[int, str | None, Any]:
        return (self.id, self.event.event, orjson.loads(self.event.data))


@dataclass
class Stream:
    """``GET /events`` on one node, read in the background into ``received``."""

    session: aiohttp.ClientSession
    url: str
    last_event_id: str | None = None
    received: list[Received] = field(default_factory=list)
    _reader: asyncio.Task[None] | None = None
    _connected: asyncio.Event = field(default_factory=asyncio.Event)

    async def __aenter__(self) -> Stream:
        self._reader = asyncio.create_task(self._read())
        await asyncio.wait_for(self._connected.wait(), 10)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _read(self) -> None:
        headers = {} if self.last_event_id is None else {"Last-Event-ID": self.last_event_id}
        timeout = aiohttp.ClientTimeout(total=None, sock_read=None)
        async with self.session.get(self.url + "/events", headers=headers, timeout=timeout) as r:
            reader = sse(r)
            self._connected.set()
            while (event := await reader.next(timeout=3600)) is not None:
                self.received.append(Received(event, time.time()))

    async def close(self) -> None:
        """Disconnect (what a client does when its network goes away)."""
        if self._reader is not None:
            if self._reader.done():
                self._reader.result()  # a stream that broke fails the test here
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader

    def ended(self) -> set[int]:
        """Ids of the tasks whose terminal event arrived."""
        return {r.task_id for r in self.received if r.event.event in _TERMINAL_EVENTS}


_TERMINAL_EVENTS = frozenset({"finished", "failed", "cancelled"})


def by_task(runs: Iterable[Execution]) -> dict[int, list[Execution]]:
    found: dict[int, list[Execution]] = defaultdict(list)
    for run in runs:
        found[run.id].append(run)
    return found


def assert_each_attempt_ran_once(runs: list[Execution]) -> None:
    """No (task, attempt) started on two nodes, or twice on one."""
    twice = [k for k, n in Counter((r.id, r.attempt) for r in runs).items() if n > 1]
    assert twice == [], f"attempts that ran more than once (task, attempt): {twice[:20]}"


# --- each attempt on exactly one node -------------------------------------------------


async def test_tasks_enqueued_to_all_three_nodes_run_once_each(
    make_cluster: ClusterFactory,
) -> None:
    cluster = await make_cluster()
    names = ["a", "b", "c"]
    await cluster.start_many(names, workers=2)  # at the same moment: the migration race

    async def enqueue_to(name: str) -> list[int]:
        batches = [
            cluster.enqueue_batch(name, [{"data": {"tag": f"{name}{b}-{i}"}} for i in range(50)])
            for b in range(2)
        ]
        singles = [cluster.enqueue(name, {"tag": f"{name}-{i}"}) for i in range(20)]
        batch_ids = await asyncio.gather(*batches)
        single_ids = await asyncio.gather(*singles)
        return [i for ids in batch_ids for i in ids] + list(single_ids)

    acknowledged = [i for ids in await asyncio.gather(*map(enqueue_to, names)) for i in ids]
    assert len(set(acknowledged)) == len(acknowledged) == 3 * 120

    ended = await cluster.wait_terminal(acknowledged, via="a", timeout=60)
    assert Counter(t["state"] for t in ended.values()) == {"succeeded": len(acknowledged)}
    for name in ("b", "c"):  # every node sees the same outcome
        seen = await cluster.tasks(name)
        assert {i: seen[i]["state"] for i in acknowledged} == dict.fromkeys(
            acknowledged, "succeeded"
        )

    runs = cluster.executions()
    assert_each_attempt_ran_once(runs)
    assert sorted(r.id for r in runs) == sorted(acknowledged)  # each once, nothing else
    assert {r.attempt for r in runs} == {1}
    assert all(r.end is not None for r in runs)
    pids = cluster.pids()
    assert {r.pid for r in runs} <= set(pids)
    for run in runs:  # the stored result names the node that ran it
        assert ended[run.id]["result"] == {"pid": run.pid, "attempt": 1}
        assert ended[run.id]["attempts"] == 1
    per_node = Counter(pids[r.pid] for r in runs)
    print(f"tasks run per node: {dict(per_node)}")


# --- events cross nodes ---------------------------------------------------------------


async def test_an_sse_client_on_node_b_sees_a_task_run_on_node_a(
    make_cluster: ClusterFactory,
) -> None:
    """B runs no task (0 workers), so every task its client hears of ran on A."""
    cluster = await make_cluster()
    a, b = await cluster.start_many(["a"], workers=2) + [await cluster.start("b", workers=0)]
    async with Stream(cluster.session, b.url) as on_b:
        ids = [await cluster.enqueue(name, {"tag": name, "sleep": 0.05}) for name in "abab"]
        ids += await cluster.enqueue_batch("b", [{"data": {"tag": "batch"}}] * 6)
        await wait_for(lambda: on_b.ended() >= set(ids), timeout=30, message="finished on B")
    runs = {r.id: r for r in cluster.executions()}
    assert {runs[i].pid for i in ids} == {a.pid}
    finished = {r.task_id: r for r in on_b.received if r.event.event == "finished"}
    assert set(finished) == set(ids)
    for task_id in ids:
        types = [r.event.event for r in on_b.received if r.task_id == task_id]
        assert types == ["queued", "started", "finished"], (task_id, types)
    got = [r.id for r in on_b.received]
    assert got == sorted(set(got))  # one order, no repeats
    latencies = [finished[i].at - (runs[i].end or math.inf) for i in ids]
    print(
        "finished on A -> received on B: "
        f"median {statistics.median(latencies) * 1000:.1f} ms, max {max(latencies) * 1000:.1f} ms"
    )

    # A task's own stream, opened on B after the task ran on A, replays it and ends.
    async with cluster.session.get(f"{b.url}/tasks/{ids[0]}/events") as response:
        replayed = await sse(response).collect(timeout=10)
    assert [e.event for e in replayed] == ["queued", "started", "finished"]
    assert [int(e.id or 0) for e in replayed] == [
        r.id for r in on_b.received if r.task_id == ids[0]
    ]


# --- a node that dies loses nothing -----------------------------------------------------


async def test_kill_9_of_a_node_mid_work_loses_no_acknowledged_task_and_replay_misses_nothing(
    make_cluster: ClusterFactory,
) -> None:
    cluster = await make_cluster(extra_args=["--lease", "3"])  # the survivors rescue soon
    a, b, c = await cluster.start_many(["a", "b", "c"], workers=2)
    options = {"max_attempts": 3}

    def spec(tag: str, sleep: float = 0.2) -> dict[str, Any]:
        return {"data": {"tag": tag, "sleep": sleep}, **options}

    # C's client reads every event from the start; it disconnects after the kill.
    on_c = Stream(cluster.session, c.url, last_event_id="0")
    await on_c.__aenter__()
    acknowledged: list[int] = []
    for round_ in range(3):
        for name in ("a", "b", "c"):
            # A's first tasks outlast the enqueues before the kill: A runs one at the kill
            # (short ones could all have ended by then, or gone to B and C).
            sleep = 3.0 if (round_, name) == (0, "a") else 0.2
            acknowledged += await cluster.enqueue_batch(
                name, [spec(f"{name}{round_}-{i}", sleep) for i in range(10)]
            )

    def running_on_a() -> list[Execution]:
        return [r for r in cluster.executions() if r.pid == a.pid and r.end is None]

    await wait_for(
        lambda: [r for r in running_on_a() if r.tag.startswith("a0-")],
        timeout=30,
        message="a long task running on node a",
    )

    answered: list[int] = []  # one task at a time to A while it dies: 202 = acknowledged

    async def enqueue_to_a_until_it_dies() -> None:
        with contextlib.suppress(aiohttp.ClientError):
            while True:
                answered.append(await cluster.enqueue("a", spec("dying")["data"], **options))

    enqueuer = asyncio.create_task(enqueue_to_a_until_it_dies())
    await wait_for(lambda: len(answered) >= 3, message="tasks enqueued to A as it dies")
    cluster.kill("a")  # most likely with a request in flight
    killed_at = time.time()
    interrupted = {r.id for r in running_on_a()}
    assert interrupted
    await asyncio.wait_for(enqueuer, 30)
    acknowledged += answered
    # Acknowledged by the survivors after the kill, while they take over A's work.
    for name in ("b", "c"):
        acknowledged += await cluster.enqueue_batch(
            name, [spec(f"late-{name}-{i}") for i in range(5)]
        )
    await wait_for(
        lambda: sum(r.at > killed_at for r in on_c.received) >= 5,
        timeout=30,
        message="events on C after the kill",
    )
    await on_c.close()
    live = list(on_c.received)
    last_seen = str(live[-1].id)

    ended = await cluster.wait_terminal(acknowledged, via="b", timeout=120)
    assert Counter(t["state"] for t in ended.values()) == {"succeeded": len(acknowledged)}, {
        i: t["state"] for i, t in ended.items() if t["state"] != "succeeded"
    }
    runs = cluster.executions()
    # The request in flight at the kill may have committed without its 202: it runs too.
    unanswered = {r.id for r in runs} - set(acknowledged)
    assert len(unanswered) <= 1, unanswered
    assert {r.tag for r in runs if r.id in unanswered} <= {"dying"}
    ended |= await cluster.wait_terminal(unanswered, via="b")
    runs = cluster.executions()
    assert_each_attempt_ran_once(runs)
    unfinished = [r for r in runs if r.end is None]
    assert {r.pid for r in unfinished} == {a.pid}  # only the killed node left runs behind
    assert {r.id for r in unfinished} == interrupted
    for task_id, attempts in by_task(runs).items():
        done = [r for r in attempts if r.end is not None]
        assert len(done) == 1, (task_id, attempts)  # exactly one attempt ran to its end
        assert done[0].attempt == max(r.attempt for r in attempts)
        assert ended[task_id]["attempts"] == done[0].attempt
        assert ended[task_id]["result"] == {"pid": done[0].pid, "attempt": done[0].attempt}
    for task_id in interrupted:  # the killed attempt was counted
        assert ended[task_id]["attempts"] >= 2, ended[task_id]
        assert next(r for r in by_task(runs)[task_id] if r.end is not None).pid != a.pid
    assert {r.id for r in runs} == set(acknowledged) | unanswered

    # Replay on C after the disconnect: nothing missed, nothing repeated.
    async with Stream(cluster.session, c.url, last_event_id=last_seen) as again:
        await wait_for(
            lambda: (on_c.ended() | again.ended()) >= set(acknowledged),
            timeout=30,
            message="every task's last event on C",
        )
    resumed = live + again.received
    ids = [r.id for r in resumed]
    assert ids == sorted(set(ids)), "replay repeated or reordered events"
    assert again.received
    assert again.received[0].id > int(last_seen)
    async with Stream(cluster.session, b.url, last_event_id="0") as reference:
        await wait_for(
            lambda: reference.received and reference.received[-1].id >= ids[-1],
            timeout=30,
            message="the full history on B",
        )
    history = [r.key() for r in reference.received if r.id <= ids[-1]]
    assert [r.key() for r in resumed] == history, "C's live + replayed events differ from B's"
    for task_id in acknowledged:  # and the history itself is whole
        types = [r.event.event for r in resumed if r.task_id == task_id]
        assert types[0] == "queued", (task_id, types)
        assert types[-1] == "finished", (task_id, types)
        # A start the killed node had not yet stored may be missing, never an extra one.
        assert 1 <= types.count("started") <= ended[task_id]["attempts"], (task_id, types)

    # The killed node comes back on its port and takes work again.
    restarted = await cluster.restart("a")
    assert "Traceback" not in restarted.stderr(), restarted.stderr()
    task_id = await cluster.enqueue("a", {"tag": "after-restart"})
    assert (await cluster.wait_terminal([task_id], via="a"))[task_id]["state"] == "succeeded"


async def test_a_restarted_node_rescues_its_own_running_tasks_at_once(
    make_cluster: ClusterFactory,
) -> None:
    """Its old run is over once it is back, so it need not wait for the lease to expire."""
    lease = 30.0
    cluster = await make_cluster(extra_args=["--lease", str(lease)])
    a, _ = [await cluster.start("a", workers=2), await cluster.start("b", workers=0)]
    ids = await cluster.enqueue_batch(
        # 3 s: the two seen running are still running when a is killed, even on a slow
        # machine; the four still end well within half the lease.
        "b",
        [{"data": {"tag": "long", "sleep": 3.0}, "max_attempts": 2}] * 4,
    )

    def running_on_a() -> set[int]:
        return {r.id for r in cluster.executions() if r.pid == a.pid and r.end is None}

    await wait_for(lambda: len(running_on_a()) == 2, timeout=20, message="a busy")
    interrupted = running_on_a()
    cluster.kill("a")
    killed = time.monotonic()
    await cluster.restart("a")
    ended = await cluster.wait_terminal(ids, via="b", timeout=lease)
    took = time.monotonic() - killed
    assert took < lease / 2, f"rescued after {took:.1f}s: the lease ran out, not the restart"
    assert {t["state"] for t in ended.values()} == {"succeeded"}
    assert {i for i in ids if ended[i]["attempts"] == 2} == interrupted
    runs = cluster.executions()
    assert_each_attempt_ran_once(runs)
    assert {r.pid for r in runs if r.end is not None} == {cluster.nodes["a"].pid}


async def test_a_task_that_keeps_killing_nodes_ends_failed_after_max_attempts(
    make_cluster: ClusterFactory,
) -> None:
    cluster = await make_cluster(extra_args=["--lease", "2"])
    await cluster.start_many(["a", "b", "c"], workers=1)
    task_id = await cluster.enqueue("c", {"tag": "killer", "die": True}, max_attempts=2)
    await wait_for(
        lambda: sum(not n.alive for n in cluster.nodes.values()) == 2,
        timeout=60,
        message="two nodes killed by the task",
    )
    (survivor,) = [name for name, node in cluster.nodes.items() if node.alive]
    ended = await cluster.wait_terminal([task_id], via=survivor, timeout=60)
    assert ended[task_id]["state"] == "failed", ended[task_id]
    assert ended[task_id]["attempts"] == 2
    runs = cluster.executions()
    assert [(r.attempt, r.end) for r in runs] == [(1, None), (2, None)]
    assert len({r.pid for r in runs}) == 2
    assert cluster.nodes[survivor].pid not in {r.pid for r in runs}
    assert cluster.nodes[survivor].alive


# --- cluster-wide rules ---------------------------------------------------------------


async def test_serial_groups_hold_across_nodes(make_cluster: ClusterFactory) -> None:
    """One task of a group at a time over the whole cluster, in enqueue order."""
    cluster = await make_cluster()
    names = ["a", "b", "c"]
    await cluster.start_many(names, workers=2)
    groups = ["g0", "g1", "g2"]
    order: dict[str, list[int]] = {g: [] for g in groups}
    for i in range(6):  # one at a time, so enqueue order is unambiguous; nodes rotate
        for g, group in enumerate(groups):
            data = {"tag": group, "sleep": 0.08}
            task_id = await cluster.enqueue(names[(i + g) % 3], data, serial_group=group)
            order[group].append(task_id)
    every = [i for ids in order.values() for i in ids]
    ended = await cluster.wait_terminal(every, via="c", timeout=60)
    assert {t["state"] for t in ended.values()} == {"succeeded"}
    runs = cluster.executions()
    assert_each_attempt_ran_once(runs)
    pids = cluster.pids()
    for group in groups:
        mine = [r for r in runs if r.tag == group]
        assert [r.id for r in mine] == order[group], f"{group} ran out of enqueue order"
        for before, after in itertools.pairwise(mine):
            assert before.end is not None
            assert after.start >= before.end, (
                f"{group}: task {after.id} on {pids[after.pid]} started "
                f"{before.end - after.start:.3f}s before task {before.id} on "
                f"{pids[before.pid]} ended"
            )
    print(f"groups ran on nodes {dict(Counter(pids[r.pid] for r in runs))}")


async def test_queue_concurrency_is_counted_over_all_nodes(make_cluster: ClusterFactory) -> None:
    cluster = await make_cluster()
    names = ["a", "b", "c"]
    await cluster.start_many(names, workers=3)
    ids: list[int] = []
    for name in names:
        ids += await cluster.enqueue_batch(
            name,
            [{"data": {"tag": "q", "sleep": 0.1}, "queue": LIMITED_QUEUE} for _ in range(12)],
        )
    # Other work beside it is not held back by the limit.
    free = await cluster.enqueue_batch("a", [{"data": {"tag": "free", "sleep": 0.1}}] * 6)
    ended = await cluster.wait_terminal([*ids, *free], via="b", timeout=60)
    assert {t["state"] for t in ended.values()} == {"succeeded"}
    runs = cluster.executions()
    assert_each_attempt_ran_once(runs)
    limited = [r for r in runs if r.tag == "q"]
    assert len(limited) == len(ids)
    peak = max_overlap(limited)
    assert peak <= LIMITED_CONCURRENCY, f"{peak} tasks of {LIMITED_QUEUE!r} ran at once"
    pids = cluster.pids()
    print(f"peak {peak}; limited tasks per node {dict(Counter(pids[r.pid] for r in limited))}")


async def test_a_cron_due_time_runs_once_across_the_cluster(make_cluster: ClusterFactory) -> None:
    """Three nodes with the same schedule: each due time enqueued once, none dropped."""
    cluster = await make_cluster(app="tests.cluster_app:setup_cron")
    started = time.time()
    await cluster.start_many(["a", "b", "c"], workers=2)

    def ticks() -> list[Execution]:
        return [r for r in cluster.executions() if r.tag == "tick"]

    await wait_for(lambda: len(ticks()) >= 5, timeout=30, message="five scheduled runs")
    for name in ("a", "b", "c"):  # no due time passes unseen while the tasks are read
        assert cluster.terminate(name) == 0
    stopped = time.time()

    await cluster.start("view", workers=0, app="tests.cluster_app:setup")  # no schedule
    tasks = [t for t in (await cluster.tasks("view")).values() if t["name"] == "tick"]
    # Each run is enqueued at its due time, a whole multiple of TICK_EVERY, or after it
    # (or, as a timer may fire a few milliseconds early, just before it: seen once).
    dues = Counter(math.floor((t["created_at"] + EARLY) / TICK_EVERY) * TICK_EVERY for t in tasks)
    assert max(dues.values()) == 1, f"due times enqueued more than once: {dues}"
    first, last = min(dues), max(dues)
    assert first >= math.floor(started / TICK_EVERY) * TICK_EVERY
    assert last <= stopped
    expected = {first + k * TICK_EVERY for k in range(round((last - first) / TICK_EVERY) + 1)}
    assert set(dues) == expected, f"due times dropped: {sorted(expected - set(dues))}"
    runs = ticks()
    assert_each_attempt_ran_once(runs)
    assert {r.id for r in runs} <= {t["id"] for t in tasks}
    assert len(runs) >= 5


async def test_a_node_does_not_log_the_database_password(
    make_cluster: ClusterFactory, postgres: PostgresServer
) -> None:
    """The ``--db`` URL carries a password: what a node logs must not."""
    cluster = await make_cluster()
    node = await cluster.start("a", workers=1)
    task_id = await cluster.enqueue("a", {"tag": "logged"})
    await cluster.wait_terminal([task_id], via="a")
    assert cluster.terminate("a") == 0
    assert postgres.password in cluster.db
    assert postgres.password not in node.output()
