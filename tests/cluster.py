"""A test-side cluster: several real ``taskserver run`` processes on one database.

``Cluster(db, directory)`` starts nodes with ``start(name, workers=...)``: each is
``python -m taskserver run --db DB --port P --task-workers W --app tests.cluster_app:...``
on its own loopback port (chosen once, so a restarted node keeps its URL), with its
stdout and stderr in files of its own, and is ready when ``GET /readyz`` answers 200.
The tests then enqueue over HTTP to any node, ``kill()`` one (SIGKILL: no cleanup, no
flush), ``restart()`` it, read its ``stderr()``, and read back what the task callbacks
recorded (``executions()``, see ``tests/cluster_app.py``). ``close()`` stops every node
that is still running (SIGTERM, then SIGKILL past a deadline) and the HTTP session.

Everything waits for a condition against a deadline; nothing sleeps and hopes.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from .cluster_app import RECORD_ENV
from .pg_server import free_port

ROOT = Path(__file__).resolve().parent.parent
#: States a task ends in.
TERMINAL = frozenset({"succeeded", "failed", "cancelled"})
START_TIMEOUT = 30.0
STOP_TIMEOUT = 20.0


@dataclass
class Node:
    """One ``taskserver run`` process of the cluster (its latest incarnation)."""

    name: str
    port: int
    workers: int
    app: str
    args: tuple[str, ...]
    proc: subprocess.Popen[bytes]
    stdout_path: Path
    stderr_path: Path
    #: Pids of earlier incarnations (before a ``restart``).
    old_pids: list[int] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def stderr(self) -> str:
        """What this incarnation wrote to stderr so far."""
        return self.stderr_path.read_text(errors="replace")

    def output(self) -> str:
        """Its stdout and stderr, for failure messages."""
        out = self.stdout_path.read_text(errors="replace")
        return f"--- {self.name} stdout ---\n{out}--- {self.name} stderr ---\n{self.stderr()}"

    def __repr__(self) -> str:
        state = "running" if self.alive else f"exited {self.proc.returncode}"
        return f"<Node {self.name} pid={self.pid} port={self.port} {state}>"


@dataclass(frozen=True)
class Execution:
    """One attempt of one task as its callback recorded it."""

    id: int
    attempt: int
    pid: int
    tag: str
    start: float
    end: float | None  # None: the node died while it ran


class Cluster:
    """Nodes sharing ``db`` (a ``postgresql://`` DSN, or a SQLite path for one node)."""

    def __init__(
        self,
        db: str,
        directory: Path,
        *,
        app: str = "tests.cluster_app:setup",
        extra_args: Sequence[str] = (),
        env: dict[str, str] | None = None,
    ) -> None:
        self.db = db
        self.directory = directory
        self.app = app
        self.extra_args = tuple(extra_args)
        self.record = directory / "executions.jsonl"
        self.record.touch()
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("TASKSERVER_")},
            "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": str(ROOT),
            RECORD_ENV: str(self.record),
            **(env or {}),
        }
        self.nodes: dict[str, Node] = {}
        #: Every process started, registered or not (one that failed to start too).
        self._launched: list[Node] = []
        self._session: aiohttp.ClientSession | None = None
        self._launches = 0

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30))
        return self._session

    def __repr__(self) -> str:
        return f"<Cluster {list(self.nodes.values())!r}>"

    # --- processes --------------------------------------------------------------------

    def _launch(self, name: str, port: int, workers: int, app: str, args: tuple[str, ...]) -> Node:
        self._launches += 1
        stem = self.directory / f"{name}-{self._launches}"
        command = [sys.executable, "-m", "taskserver", "run", "--db", self.db]
        command += ["--port", str(port), "--task-workers", str(workers), "--app", app]
        command += [*self.extra_args, *args]
        stdout_path, stderr_path = stem.with_suffix(".out"), stem.with_suffix(".err")
        with stdout_path.open("wb") as out, stderr_path.open("wb") as err:
            proc = subprocess.Popen(
                command, stdout=out, stderr=err, env=self.env, cwd=self.directory
            )
        node = Node(name, port, workers, app, args, proc, stdout_path, stderr_path)
        self._launched.append(node)
        return node

    async def _ready(self, node: Node, timeout: float) -> bool:
        """Wait for ``/readyz`` 200; ``False`` if the process exited first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not node.alive:
                return False
            try:
                async with self.session.get(
                    node.url + "/readyz", timeout=aiohttp.ClientTimeout(total=5)
                ) as response:
                    if response.status == 200:
                        return True
            except (aiohttp.ClientError, TimeoutError):
                pass
            await asyncio.sleep(0.05)
        raise AssertionError(f"{node!r} not ready after {timeout:g}s:\n{node.output()}")

    async def start(
        self,
        name: str,
        *,
        workers: int = 2,
        app: str | None = None,
        args: Sequence[str] = (),
        timeout: float = START_TIMEOUT,
    ) -> Node:
        """Start node ``name`` on a free port and wait until it is ready.

        ``app`` replaces the cluster's ``--app`` for this node; ``args`` are more options.
        """
        (node,) = await self.start_many(
            [name], workers=workers, app=app, args=args, timeout=timeout
        )
        return node

    async def start_many(
        self,
        names: Iterable[str],
        *,
        workers: int = 2,
        app: str | None = None,
        args: Sequence[str] = (),
        timeout: float = START_TIMEOUT,
    ) -> list[Node]:
        """Start several nodes at the same moment (migrations race, as in production).

        Everything runs in the caller's task, no task of its own: three interpreters
        starting on two cores starve this process, and a step of another task would then
        count as blocking the loop (the tests' ``loop_never_blocks``).
        """
        wanted = list(names)
        assert not set(wanted) & set(self.nodes), f"nodes exist: {set(wanted) & set(self.nodes)}"
        options = (workers, app or self.app, tuple(args))
        started = [self._launch(name, free_port(), *options) for name in wanted]
        for i, node in enumerate(started):
            for _ in range(3):  # a port taken between free_port() and the bind: another one
                if await self._ready(node, timeout):
                    break
                if "address already in use" not in node.output().lower():
                    raise AssertionError(f"{node!r} exited at start:\n{node.output()}")
                node = started[i] = self._launch(node.name, free_port(), *options)
            else:
                raise AssertionError(f"{node!r} found no free port:\n{node.output()}")
            self.nodes[node.name] = node
        return started

    def kill(self, name: str) -> None:
        """``kill -9`` the node: its running tasks are left as they are."""
        node = self.nodes[name]
        node.proc.send_signal(signal.SIGKILL)
        node.proc.wait(STOP_TIMEOUT)

    async def restart(self, name: str, *, timeout: float = START_TIMEOUT) -> Node:
        """Start the node again, same port and options (killed or stopped before)."""
        old = self.nodes[name]
        assert not old.alive, f"{old!r} is still running"
        node = self._launch(name, old.port, old.workers, old.app, old.args)
        node.old_pids = [*old.old_pids, old.pid]
        self.nodes[name] = node
        if not await self._ready(node, timeout):
            raise AssertionError(f"{node!r} exited at restart:\n{node.output()}")
        return node

    def terminate(self, name: str) -> int:
        """SIGTERM (a graceful stop) and wait; the exit code."""
        node = self.nodes[name]
        node.proc.send_signal(signal.SIGTERM)
        try:
            return node.proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            node.proc.kill()
            node.proc.wait(STOP_TIMEOUT)
            raise AssertionError(f"{node!r} did not stop on SIGTERM:\n{node.output()}") from None

    async def close(self) -> None:
        """Stop every node still running, then the HTTP session."""
        for node in self._launched:
            if node.alive:
                node.proc.send_signal(signal.SIGTERM)
        for node in self._launched:  # waited for in a thread: the loop must not block
            try:
                await asyncio.to_thread(node.proc.wait, STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                node.proc.kill()
                await asyncio.to_thread(node.proc.wait, STOP_TIMEOUT)
        if self._session is not None:
            await self._session.close()

    def pids(self) -> dict[int, str]:
        """Every pid any node ever had, to the node's name."""
        return {
            pid: node.name for node in self.nodes.values() for pid in (*node.old_pids, node.pid)
        }

    def output(self) -> str:
        return "\n".join(node.output() for node in self.nodes.values())

    # --- HTTP -------------------------------------------------------------------------

    async def _json(self, method: str, url: str, body: Any = None) -> tuple[int, Any]:
        kwargs: dict[str, Any] = {}
        if body is not None:
            kwargs = {"data": orjson.dumps(body), "headers": {"Content-Type": "application/json"}}
        async with self.session.request(method, url, **kwargs) as response:
            raw = await response.read()
            return response.status, orjson.loads(raw) if raw else None

    async def enqueue(self, name: str, data: Any, **options: Any) -> int:
        """``POST /tasks`` to node ``name``; the id once it answered 202."""
        status, body = await self._json(
            "POST", self.nodes[name].url + "/tasks", {"data": data, **options}
        )
        assert status == 202, (status, body)
        task_id: int = body["id"]
        return task_id

    async def enqueue_batch(self, name: str, tasks: Sequence[dict[str, Any]]) -> list[int]:
        """``POST /tasks:batch`` to node ``name`` (items ``{"data", options...}``); the ids."""
        status, body = await self._json(
            "POST", self.nodes[name].url + "/tasks:batch", {"tasks": list(tasks)}
        )
        assert status == 202, (status, body)
        return [item["id"] for item in body["tasks"]]

    async def task(self, name: str, task_id: int) -> dict[str, Any]:
        """``GET /tasks/{id}`` on node ``name``."""
        status, body = await self._json("GET", f"{self.nodes[name].url}/tasks/{task_id}")
        assert status == 200, (status, body)
        result: dict[str, Any] = body
        return result

    async def tasks(self, name: str) -> dict[int, dict[str, Any]]:
        """Every task, paged through ``GET /tasks`` on node ``name``, by id."""
        found: dict[int, dict[str, Any]] = {}
        after = 0
        while True:
            url = f"{self.nodes[name].url}/tasks?limit=1000&after={after}"
            status, body = await self._json("GET", url)
            assert status == 200, (status, body)
            for task in body["tasks"]:
                found[task["id"]] = task
            if body["next_after"] is None:
                return found
            after = body["next_after"]

    async def stats(self, name: str) -> dict[str, Any]:
        status, body = await self._json("GET", self.nodes[name].url + "/stats")
        assert status == 200, (status, body)
        result: dict[str, Any] = body
        return result

    async def wait_terminal(
        self, ids: Iterable[int], *, via: str, timeout: float = 30.0
    ) -> dict[int, dict[str, Any]]:
        """Wait until every task of ``ids`` has ended (read through node ``via``)."""
        wanted = set(ids)
        deadline = time.monotonic() + timeout
        while True:
            tasks = await self.tasks(via)
            left = {i for i in wanted if tasks.get(i, {}).get("state") not in TERMINAL}
            if not left:
                return {i: tasks[i] for i in wanted}
            if time.monotonic() > deadline:
                states = Counter(tasks.get(i, {}).get("state", "missing") for i in left)
                raise AssertionError(
                    f"{len(left)} of {len(wanted)} tasks not ended after {timeout:g}s "
                    f"(states {dict(states)}, e.g. {sorted(left)[:10]}); {self!r}"
                )
            await asyncio.sleep(0.1)

    # --- what the callbacks recorded --------------------------------------------------

    def executions(self) -> list[Execution]:
        """Each recorded attempt, in start order (see ``tests/cluster_app.py``)."""
        return read_executions(self.record)


def read_executions(path: Path) -> list[Execution]:
    """Pair the ``start`` and ``end`` lines of ``path`` by (task, attempt, pid).

    Raises ``AssertionError`` when one (task, attempt, pid) started twice or ended
    without starting: the record itself would then be wrong.
    """
    starts: dict[tuple[int, int, int], dict[str, Any]] = {}
    ends: dict[tuple[int, int, int], float] = {}
    for line in path.read_bytes().splitlines():
        row = orjson.loads(line)
        key = (row["id"], row["attempt"], row["pid"])
        table: dict[Any, Any] = starts if row["kind"] == "start" else ends
        assert key not in table, f"{row['kind']} recorded twice for {key}"
        table[key] = row if row["kind"] == "start" else row["t"]
    assert set(ends) <= set(starts), f"ends without a start: {set(ends) - set(starts)}"
    runs = [
        Execution(k[0], k[1], k[2], row["tag"], row["t"], ends.get(k)) for k, row in starts.items()
    ]
    return sorted(runs, key=lambda e: e.start)


def max_overlap(runs: Iterable[Execution]) -> int:
    """The most executions running at one moment (an end at t comes before a start at t)."""
    points = sorted(
        [(run.start, 1) for run in runs] + [(run.end or float("inf"), -1) for run in runs],
        key=lambda p: (p[0], p[1]),
    )
    running = peak = 0
    for _, step in points:
        running += step
        peak = max(peak, running)
    return peak
