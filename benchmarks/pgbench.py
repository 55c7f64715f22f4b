"""Section ``pg``: durable no-op tasks/s with 1, 2 and 3 taskserver nodes on one PostgreSQL,
beside procrastinate (PostgreSQL, psycopg 3) with as many worker processes, alternated.

Each measurement gets a fresh database on one server (``benchmarks/pgdb.py``: a private
one, or ``--db``). taskserver: ``N`` ``taskserver run --db DSN --task-workers W --app
benchmarks.apps:noop_setup`` nodes; the tasks are enqueued over HTTP, ``POST
/tasks:batch`` of ``batch`` tasks, spread round-robin over the nodes, two requests in
flight per node, while the workers run them; with ``--prefetch 0`` (a node claims only
for its idle workers) and ``--prefetch 64``, the default (tasks claimed ahead while they
are short).
procrastinate: ``N`` worker processes of concurrency ``W`` (``benchmarks/pgpeer.py``);
the jobs are deferred by this process with ``batch_defer_async`` (one multi-row insert
per batch of the same size, two in flight per worker process; fewer jobs than
taskserver's tasks, as it runs them far slower, so that each run lasts seconds). The
figure is completed tasks/s from the first to the last finish, read back from what each
stored (taskserver: ``finished_at`` through ``GET /tasks``; procrastinate: its
``succeeded`` events).

CPU time per task: each node's (or worker process's) user + system time over the load,
until nothing is queued or running (``/proc/PID/stat``; taskserver's read-back of the
finish times, which the first node alone serves, comes after), divided by all tasks,
their sum, and the PostgreSQL server's (the postmaster and every backend, exited ones
included); with each run's tasks per group commit over all nodes
(``taskserver_commits_total``). The enqueuing client's CPU is not counted on either side.

On a 2-core machine N nodes and their PostgreSQL backends share the cores, which alone
makes every process's CPU per unit of work grow (more switches, colder caches). So the
section also runs N nodes *apart*: each a one-node server on a database of its own, all
at once on the same PostgreSQL, loaded alike. They share the machine as the cluster does
but nothing of a cluster (no shared rows, claims or notifications); the cluster's CPU
per task over theirs is what the cluster itself costs. The same taskserver workload on
SQLite, one node, is the single-machine baseline. Should ``taskserver run`` not take a
``postgresql://`` URL (the backend is not there), the section says so and measures the
rest.

The load above offers tasks as fast as the nodes take them, so 3 nodes keep the two
cores busier than 1 does (their throughput is higher), and every process's CPU per
task grows with that alone. So each number of nodes is also measured (with the
default prefetch) with the same tasks offered at one rate in all (``pg_pace``, below
what one node sustains here), one batch after another round-robin over the nodes:
the machine does the same work per second whatever the number of nodes, and what
grows per task from 1 to 3 nodes is then what more nodes cost, not a busier machine.
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import aiohttp
import asyncpg
import orjson

from . import pgpeer
from .bench import BenchError, Server, child_env, serve
from .common import cpu_seconds_of
from .pgdb import Postgres, postgres
from .wrkdrive import spread

#: Requests (or inserts) in flight per node (or worker process) while loading.
IN_FLIGHT = 2
#: Longest one measurement may take before it is declared broken.
RUN_TIMEOUT = 600.0
START_TIMEOUT = 30.0
APP = "benchmarks.apps:noop_setup"


class PgOptions(Protocol):
    rounds: int
    db: str | None
    pg_tasks: int
    pg_peer_tasks: int
    pg_nodes: tuple[int, ...]
    pg_workers: int
    pg_batch: int
    pg_prefetch: tuple[int, ...]
    pg_pace: float


@dataclass
class Measured:
    """One measurement: tasks/s and CPU seconds per process over the load."""

    tasks: int
    seconds: float
    node_cpu: list[float | None]
    pg_cpu: float | None
    #: Group commits of every node over the load (taskserver only, from ``/metrics``).
    commits: float | None = None

    @property
    def rate(self) -> float:
        return (self.tasks - 1) / self.seconds if self.seconds > 0 else 0.0

    @property
    def per_commit(self) -> float | None:
        """Tasks per group commit, over every node (a task is written by several)."""
        return self.tasks / self.commits if self.commits else None

    def us_per_task(self, cpu: float | None) -> float | None:
        return None if cpu is None else cpu / self.tasks * 1e6

    @property
    def nodes_us(self) -> float | None:
        if any(c is None for c in self.node_cpu):
            return None
        return sum(c or 0.0 for c in self.node_cpu) / self.tasks * 1e6


@dataclass
class Config:
    """One thing measured each round."""

    label: str
    #: "pg", "paced" (the same, offered at ``pace`` tasks/s), "apart" (one node per
    #: database, all at once), "peer" or "sqlite"
    kind: str
    nodes: int
    prefetch: int = 0  # taskserver's --prefetch on PostgreSQL
    pace: float | None = None
    runs: list[Measured] = field(default_factory=list)


# --- taskserver ------------------------------------------------------------------------


async def _post(session: aiohttp.ClientSession, url: str, size: int) -> None:
    """One ``POST /tasks:batch`` of ``size`` no-op tasks (503: retried)."""
    body = orjson.dumps({"tasks": [{"data": None}] * size})
    while True:
        headers = {"Content-Type": "application/json"}
        async with session.post(url + "/tasks:batch", data=body, headers=headers) as r:
            if r.status == 202:
                return
            if r.status != 503:
                raise BenchError(f"POST /tasks:batch: {r.status} {await r.text()}")
        await asyncio.sleep(float(r.headers.get("Retry-After", "0.05")) / 10)


async def _post_all(urls: Sequence[str], total: int, batch: int, pace: float | None = None) -> None:
    """Enqueue ``total`` no-op tasks over HTTP, round-robin over ``urls`` (503: retry):
    as fast as they are taken (``IN_FLIGHT`` requests per node), or, with ``pace``, one
    batch after another at ``pace`` tasks/s in all, whatever the number of nodes."""
    sizes = [min(batch, total - start) for start in range(0, total, batch)]
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        if pace is not None:
            loop = asyncio.get_running_loop()
            start, sent, posts = loop.time(), 0, []
            for i, size in enumerate(sizes):
                await asyncio.sleep(max(0.0, start + sent / pace - loop.time()))
                posts.append(asyncio.create_task(_post(session, urls[i % len(urls)], size)))
                sent += size
            await asyncio.gather(*posts)
            return
        queues: list[asyncio.Queue[int]] = [asyncio.Queue() for _ in urls]
        for i, size in enumerate(sizes):
            queues[i % len(urls)].put_nowait(size)

        async def poster(url: str, queue: asyncio.Queue[int]) -> None:
            while not queue.empty():
                await _post(session, url, queue.get_nowait())

        await asyncio.gather(
            *(poster(u, q) for u, q in zip(urls, queues, strict=True) for _ in range(IN_FLIGHT))
        )


async def _page(session: aiohttp.ClientSession, url: str, query: str) -> dict[str, Any]:
    async with session.get(f"{url}/tasks?{query}") as response:
        if response.status != 200:
            raise BenchError(f"GET /tasks?{query}: {response.status}")
        result: dict[str, Any] = orjson.loads(await response.read())
        return result


async def _idle(session: aiohttp.ClientSession, url: str, timeout: float) -> None:
    """Return once nothing is queued or running."""
    deadline = time.monotonic() + timeout
    while True:
        states = ("queued", "running")
        if not any([(await _page(session, url, f"state={s}&limit=1"))["tasks"] for s in states]):
            return
        if time.monotonic() > deadline:
            raise BenchError(f"tasks still queued or running after {timeout:g}s")
        await asyncio.sleep(0.05)


async def _finish_times(session: aiohttp.ClientSession, url: str) -> list[float]:
    """Every succeeded task's ``finished_at``, read back from the stored tasks."""
    finished: list[float] = []
    after = 0
    while True:
        body = await _page(session, url, f"state=succeeded&limit=1000&after={after}")
        finished += [t["finished_at"] for t in body["tasks"]]
        if body["next_after"] is None:
            return finished
        after = body["next_after"]


async def _commits(session: aiohttp.ClientSession, url: str) -> float | None:
    """The node's ``taskserver_commits_total`` (``None`` when ``/metrics`` is not open)."""
    async with session.get(f"{url}/metrics") as response:
        if response.status != 200:
            return None
        for line in (await response.text()).splitlines():
            if line.startswith("taskserver_commits_total "):
                return float(line.split()[1])
    return None


@contextlib.contextmanager
def _nodes(
    db: str, count: int, workers: int, tmp: Path, tag: str, extra: Sequence[str] = ()
) -> Iterator[list[Server]]:
    with contextlib.ExitStack() as stack:
        servers = []
        for i in range(count):
            command = [sys.executable, "-m", "taskserver", "run", "--host=127.0.0.1"]
            command += ["--port=0", f"--db={db}", "--grace-period=1"]
            command += [f"--task-workers={workers}", f"--app={APP}", *extra]
            log = tmp / f"{tag}-node{i}.log"
            servers.append(
                stack.enter_context(serve(command, cwd=tmp, log=log, timeout=START_TIMEOUT))
            )
        yield servers


def measure_taskserver(
    dbs: Sequence[str],
    nodes: int,
    opts: PgOptions,
    tmp: Path,
    tag: str,
    pg: Postgres | None,
    extra: Sequence[str] = (),
    pace: float | None = None,
) -> Measured:
    """Start ``nodes`` nodes on each of ``dbs`` (``extra``: more options), load them all at
    once (the tasks spread evenly over every node; ``pace``: offered at that many tasks/s
    in all), read back."""
    with contextlib.ExitStack() as stack:
        clusters = [
            stack.enter_context(_nodes(db, nodes, opts.pg_workers, tmp, f"{tag}-{i}", extra))
            for i, db in enumerate(dbs)
        ]
        servers = [s for cluster in clusters for s in cluster]
        pids = [s.proc.pid for s in servers]
        urls = [s.url for s in servers]
        firsts = [cluster[0].url for cluster in clusters]

        async def load() -> Measured:
            timeout = aiohttp.ClientTimeout(total=60)
            async with aiohttp.ClientSession(timeout=timeout) as session:
                commits_before = [await _commits(session, u) for u in urls]
                cpu_before = [cpu_seconds_of(p) for p in pids]
                pg_before = pg.cpu() if pg else None
                await _post_all(urls, opts.pg_tasks, opts.pg_batch, pace)
                for url in firsts:
                    await _idle(session, url, RUN_TIMEOUT)
                # Before the read-back, which the first node alone serves.
                cpu_after = [cpu_seconds_of(p) for p in pids]
                pg_after = pg.cpu() if pg else None
                commits_after = [await _commits(session, u) for u in urls]
                finished = [t for url in firsts for t in await _finish_times(session, url)]
            if len(finished) != opts.pg_tasks:
                raise BenchError(f"{len(finished)} of {opts.pg_tasks} tasks succeeded")
            commits = [
                None if b is None or a is None else a - b
                for b, a in zip(commits_before, commits_after, strict=True)
            ]
            return Measured(
                len(finished),
                max(finished) - min(finished),
                _deltas(cpu_before, cpu_after),
                _delta(pg_before, pg_after),
                None if None in commits else sum(c or 0.0 for c in commits),
            )

        return asyncio.run(load())


def _delta(before: float | None, after: float | None) -> float | None:
    return None if before is None or after is None else after - before


def _deltas(before: list[float | None], after: list[float | None]) -> list[float | None]:
    return [_delta(b, a) for b, a in zip(before, after, strict=True)]


def pg_unavailable(db: str, tmp: Path) -> str | None:
    """Why ``taskserver run --db postgresql://...`` does not start, or ``None`` if it does."""
    try:
        with _nodes(db, 1, 1, tmp, "probe"):
            return None
    except BenchError as exc:
        lines = [line for line in str(exc).splitlines() if line.strip()]
        return lines[-1] if lines else str(exc)


# --- the peer --------------------------------------------------------------------------


@contextlib.contextmanager
def _peer_workers(dsn: str, count: int, workers: int, tmp: Path, tag: str) -> Iterator[list[int]]:
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for i in range(count):
            command = [sys.executable, "-m", "benchmarks.pgpeer", "worker", "--dsn", dsn]
            command += ["--concurrency", str(workers)]
            with (tmp / f"{tag}-peer{i}.log").open("wb") as out:
                procs.append(
                    subprocess.Popen(
                        command, cwd=tmp, env=child_env(), stdout=out, stderr=subprocess.STDOUT
                    )
                )

        async def registered() -> None:
            connection = await asyncpg.connect(dsn)
            try:
                deadline = time.monotonic() + START_TIMEOUT
                while await connection.fetchval(pgpeer.WORKERS) < count:
                    if any(p.poll() is not None for p in procs) or time.monotonic() > deadline:
                        log = (tmp / f"{tag}-peer0.log").read_text(errors="replace")
                        raise BenchError(f"procrastinate workers did not start:\n{log[-2000:]}")
                    await asyncio.sleep(0.05)
            finally:
                await connection.close()

        asyncio.run(registered())
        yield [p.pid for p in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


async def _peer_finishes(dsn: str, total: int, timeout: float) -> tuple[int, float]:
    connection = await asyncpg.connect(dsn)
    try:
        deadline = time.monotonic() + timeout
        while True:
            row = await connection.fetchrow(pgpeer.FINISHED)
            assert row is not None  # an aggregate always returns its row
            succeeded, count, first, last = row
            if succeeded >= total:
                return int(succeeded), float(last) - float(first)
            if time.monotonic() > deadline:
                raise BenchError(f"procrastinate: {succeeded} of {count} jobs succeeded")
            await asyncio.sleep(0.05)
    finally:
        await connection.close()


def measure_peer(
    dsn: str, nodes: int, opts: PgOptions, tmp: Path, tag: str, pg: Postgres
) -> Measured:
    """``nodes`` procrastinate worker processes on ``dsn``; defer, run, read back."""
    asyncio.run(pgpeer.apply_schema(dsn))
    with _peer_workers(dsn, nodes, opts.pg_workers, tmp, tag) as pids:
        cpu_before = [cpu_seconds_of(p) for p in pids]
        pg_before = pg.cpu()

        async def load() -> tuple[int, float]:
            await pgpeer.defer(dsn, opts.pg_peer_tasks, opts.pg_batch, IN_FLIGHT * nodes)
            return await _peer_finishes(dsn, opts.pg_peer_tasks, RUN_TIMEOUT)

        done, seconds = asyncio.run(load())
        cpu_after = [cpu_seconds_of(p) for p in pids]
        pg_after = pg.cpu()
    return Measured(done, seconds, _deltas(cpu_before, cpu_after), _delta(pg_before, pg_after))


# --- the section -----------------------------------------------------------------------


def _us(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0f}"


def _print(config: Config) -> None:
    runs = config.runs
    if not runs:
        return
    rates = spread([r.rate for r in runs])
    nodes_us = [r.nodes_us for r in runs]
    pg_us = [r.us_per_task(r.pg_cpu) for r in runs]
    per_node = [
        _us(statistics.median(r.us_per_task(r.node_cpu[i]) or 0.0 for r in runs))
        for i in range(config.nodes)
    ]
    total = spread([x for x in nodes_us if x is not None]) if None not in nodes_us else "n/a"
    pgs = spread([x for x in pg_us if x is not None]) if None not in pg_us else "n/a"
    per_commit = [r.per_commit for r in runs if r.per_commit is not None]
    commits = f"; {spread(per_commit)} tasks per commit" if per_commit else ""
    print(f"   {config.label:<36} {rates:>32} tasks/s")
    print(
        f"{'':39}CPU us/task: per process {' + '.join(per_node)} = {total}; PostgreSQL {pgs}"
        f"{commits}"
    )


def _median_rate(config: Config | None) -> float | None:
    return statistics.median(r.rate for r in config.runs) if config and config.runs else None


def section(opts: PgOptions, tmp: Path) -> None:
    """Run and print the section (see the module docstring)."""
    peer_version = pgpeer.available()
    with postgres(opts.db) as pg:
        print()
        print(
            f"P. PostgreSQL cluster: durable no-op tasks ({opts.pg_tasks:,} per taskserver "
            f"run, {opts.pg_peer_tasks:,} per procrastinate run), {opts.pg_workers} workers "
            f"per node or process, enqueued in batches of {opts.pg_batch}; {opts.rounds} "
            f"rotated rounds; {pg.label}"
        )
        with pg.database() as probe_db:
            missing = pg_unavailable(probe_db, tmp)
        if missing:
            print(f"   taskserver on PostgreSQL: not available ({missing})")
        if peer_version is None:
            print("   procrastinate: not installed (pip install -e '.[bench]')")
        configs: list[Config] = [Config("taskserver SQLite, 1 node", "sqlite", 1)]
        for n in opts.pg_nodes:
            for p in opts.pg_prefetch if not missing else ():
                label = f"taskserver PG, {n} node{'s' * (n > 1)}, prefetch {p}"
                configs.append(Config(label, "pg", n, p))
                if n > 1:
                    label = f"taskserver PG, {n} apart, prefetch {p}"
                    configs.append(Config(label, "apart", n, p))
            if not missing and opts.pg_prefetch:
                p = max(opts.pg_prefetch)
                label = f"taskserver PG, {n} node{'s' * (n > 1)} at {opts.pg_pace:,.0f}/s"
                configs.append(Config(label, "paced", n, p, opts.pg_pace))
            if peer_version is not None:
                configs.append(Config(f"procrastinate {peer_version}, {n} proc", "peer", n))
        for round_ in range(opts.rounds):
            shift = round_ % len(configs)
            for index, config in enumerate(configs[shift:] + configs[:shift]):
                tag = f"pg-{round_}-{index}"
                run = _measure_one(config, opts, tmp, tag, pg)
                config.runs.append(run)
                print(
                    f"   round {round_ + 1}: {config.label:<36} {run.rate:>10,.0f} tasks/s "
                    f"({run.tasks:,} in {run.seconds:.2f}s), CPU us/task "
                    f"{_us(run.nodes_us)} + PostgreSQL {_us(run.us_per_task(run.pg_cpu))}"
                    + (f", {run.per_commit:.1f} tasks per commit" if run.per_commit else ""),
                    flush=True,
                )
        print("   medians (range, rounds):")
        for config in configs:
            _print(config)
        _print_ratios(configs, opts)


def _measure_one(config: Config, opts: PgOptions, tmp: Path, tag: str, pg: Postgres) -> Measured:
    if config.kind == "sqlite":
        return measure_taskserver([str(tmp / f"{tag}.db")], 1, opts, tmp, tag, None)
    extra = [f"--prefetch={config.prefetch}"]
    with contextlib.ExitStack() as stack:
        if config.kind == "apart":
            dbs = [stack.enter_context(pg.database()) for _ in range(config.nodes)]
            return measure_taskserver(dbs, 1, opts, tmp, tag, pg, extra)
        dsn = stack.enter_context(pg.database())
        if config.kind in ("pg", "paced"):
            return measure_taskserver(
                [dsn], config.nodes, opts, tmp, tag, pg, extra, pace=config.pace
            )
        return measure_peer(dsn, config.nodes, opts, tmp, tag, pg)


def _print_ratios(configs: list[Config], opts: PgOptions) -> None:
    by = {(c.kind, c.nodes, c.prefetch): c for c in configs}
    for p in opts.pg_prefetch:
        name = f"taskserver (prefetch {p})"
        ratios = []
        for n in opts.pg_nodes:
            ours, peer = _median_rate(by.get(("pg", n, p))), _median_rate(by.get(("peer", n, 0)))
            if ours is not None and peer:
                ratios.append(f"{n}: {ours / peer:.2f}")
        if ratios:
            print(f"   {name} / procrastinate tasks/s: {', '.join(ratios)} (goal >= 3)")
        ours_cpu = [
            statistics.median(r.nodes_us or 0.0 for r in by[("pg", n, p)].runs)
            for n in opts.pg_nodes
            if ("pg", n, p) in by and by[("pg", n, p)].runs
        ]
        if len(ours_cpu) > 1 and ours_cpu[0]:
            steps = ", ".join(f"{c / ours_cpu[0]:.2f}" for c in ours_cpu)
            print(
                f"   {name} CPU per task in the nodes, {'/'.join(map(str, opts.pg_nodes))} "
                f"nodes relative to 1: {steps} (goal: flat)"
            )
        paced = [by.get(("paced", n, p)) for n in opts.pg_nodes]
        if len(paced) > 1 and all(c is not None and c.runs for c in paced):
            nodes_us = [statistics.median(r.nodes_us or 0.0 for r in c.runs) for c in paced if c]
            pg_us = [
                statistics.median(r.us_per_task(r.pg_cpu) or 0.0 for r in c.runs)
                for c in paced
                if c
            ]
            if nodes_us[0] and pg_us[0]:
                paced_nodes = ", ".join(f"{c / nodes_us[0]:.2f}" for c in nodes_us)
                paced_pg = ", ".join(f"{c / pg_us[0]:.2f}" for c in pg_us)
                print(
                    f"   {name} CPU per task at the same offered rate ({opts.pg_pace:,.0f} tasks/s"
                    f" in all: the machine loaded alike), {'/'.join(map(str, opts.pg_nodes))}"
                    f" nodes relative to 1: nodes {paced_nodes}; PostgreSQL {paced_pg}"
                )
        shares = []
        for n in opts.pg_nodes:
            cluster, apart = by.get(("pg", n, p)), by.get(("apart", n, p))
            if cluster and apart and cluster.runs and apart.runs:
                ours = statistics.median(r.nodes_us or 0.0 for r in cluster.runs)
                alone = statistics.median(r.nodes_us or 0.0 for r in apart.runs)
                if alone:
                    shares.append(f"{n}: {ours / alone:.2f}")
        if shares:
            print(
                f"   {name} CPU per task, the cluster / as many nodes apart at once (each on"
                f" its own database: the machine's sharing alike, no cluster): {', '.join(shares)}"
            )
