"""In-process measurements: durable task throughput and enqueue→finish latency, with baselines.

Run by ``bench.py`` as ``python -m benchmarks.inproc SCENARIO ...``, one fresh
process per scenario, so each figure gets its own peak RSS and no scenario
inherits another's heap. Prints one ``BENCH-RESULT {json}`` line.

Scenarios:

``throughput``
    ``TaskServer`` with an ``async`` no-op ``task`` callback: ``--producers``
    coroutines each loop on ``await server.task(data)`` until ``--tasks`` are
    issued; the clock stops when the ``finish`` callback has run for all of them.
    So a task counts once it was committed (queued), run, and finished.
``baseline-throughput``
    The same number of rows written by a bare aiosqlite loop: ``executemany`` of
    ``--batch`` rows, one ``BEGIN IMMEDIATE … COMMIT`` per batch, WAL,
    ``synchronous=NORMAL``. It does no work besides inserting one row per task,
    so it bounds what SQLite-through-aiosqlite can take on this machine.
``latency``
    At low load, the time from calling ``server.task(data)`` to its ``finish``
    callback running, per task; first with one task in flight at a time, then
    open-loop at ``--rate`` tasks/s (measured from each task's scheduled start, so
    a stall is not hidden). Baseline: one aiosqlite ``INSERT`` plus ``commit()``
    round trip in the same process and conditions, the least a durable enqueue
    can cost.
``mixed``
    Like ``throughput`` but a mixed workload: queues of different priorities
    (one with a concurrency limit), per-task priorities, delays, retries and
    serial groups. See ``benchmarks/mixed.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any, NoReturn

import aiosqlite
import orjson

from .common import cpu_seconds_self, emit, now, peak_rss_self, run
from .harness import STOP_LIMIT, BenchFailed, Finishes, serving, summary
from .mixed import mixed_throughput

#: A schema like the product's ``tasks`` table (same columns and state index).
BASELINE_SCHEMA = (
    """CREATE TABLE tasks (
        id INTEGER PRIMARY KEY, state TEXT NOT NULL, data TEXT NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0, max_attempts INTEGER NOT NULL, timeout REAL,
        progress REAL, message TEXT, result TEXT, error TEXT, traceback TEXT,
        finish_error TEXT, created_at REAL NOT NULL, started_at REAL, finished_at REAL,
        updated_at REAL NOT NULL)""",
    "CREATE INDEX tasks_by_state ON tasks (state, id)",
)
BASELINE_INSERT = (
    "INSERT INTO tasks (id, state, data, attempts, max_attempts, timeout, created_at, updated_at)"
    " VALUES (?, 'queued', ?, 0, 1, NULL, ?, ?)"
)


async def taskserver_throughput(
    db: str, *, tasks: int, producers: int, workers: int, warmup: int, time_limit: float
) -> dict[str, Any]:
    """Durable no-op tasks per second, ``await server.task()`` to ``finish`` for all."""
    finishes = Finishes()
    warnings: list[str] = []
    async with serving(db, workers, finishes, warnings) as server:
        issued = 0

        async def produce(limit: int) -> None:
            nonlocal issued
            while issued < limit:
                issued += 1
                await server.task({"n": issued})

        async def drive(count: int) -> tuple[float, float, bool]:
            """Issue ``count`` more tasks; seconds to all acked, to all finished, finished?"""
            target = issued + count
            start = now()
            jobs = [asyncio.create_task(produce(target)) for _ in range(producers)]
            try:
                async with asyncio.timeout(time_limit):
                    await asyncio.gather(*jobs)
            except TimeoutError:
                for job in jobs:
                    job.cancel()
                await asyncio.gather(*jobs, return_exceptions=True)
                return now() - start, now() - start, False
            acked = now() - start
            left = max(0.1, time_limit - acked)
            ok = await finishes.until(target, left)
            return acked, now() - start, ok

        if warmup and not (await drive(warmup))[2]:
            raise BenchFailed(f"the {warmup} warm-up tasks did not finish within {time_limit:g}s")
        commits_before = server.stats()["commits"]
        cpu_before, loop_cpu_before = cpu_seconds_self(), time.thread_time()
        acked, elapsed, ok = await drive(tasks)
        cpu = cpu_seconds_self() - cpu_before
        loop_cpu = time.thread_time() - loop_cpu_before
        commits = server.stats()["commits"] - commits_before
    return {
        "tasks": tasks,
        "finished": finishes.count - warmup,
        "completed": ok,
        "seconds": elapsed,
        "per_second": tasks / elapsed if ok else (finishes.count - warmup) / elapsed,
        "acked_per_second": tasks / acked if ok else None,
        "commits": commits,
        "cpu_percent": 100 * cpu / elapsed,
        "loop_cpu_us_per_task": 1e6 * loop_cpu / tasks,
        "peak_rss": peak_rss_self(),
        "warnings": warnings,
    }


async def baseline_throughput(
    db: str, *, tasks: int, batch: int, time_limit: float
) -> dict[str, Any]:
    """Rows per second of a bare aiosqlite executemany loop, one commit per ``batch`` rows."""
    conn = await aiosqlite.connect(db, isolation_level=None)
    try:
        for pragma in ("PRAGMA journal_mode = WAL", "PRAGMA synchronous = NORMAL"):
            await conn.execute(pragma)
        for statement in BASELINE_SCHEMA:
            await conn.execute(statement)
        next_id = 1
        written = 0
        cpu_before = cpu_seconds_self()
        start = now()
        deadline = start + time_limit
        while written < tasks and now() < deadline:
            size = min(batch, tasks - written)
            at = now()
            rows = [
                (next_id + i, orjson.dumps({"n": next_id + i}).decode(), at, at)
                for i in range(size)
            ]
            await conn.execute("BEGIN IMMEDIATE")
            await conn.executemany(BASELINE_INSERT, rows)
            await conn.execute("COMMIT")
            next_id += size
            written += size
        elapsed = now() - start
        cpu = cpu_seconds_self() - cpu_before
    finally:
        await conn.close()
    return {
        "tasks": tasks,
        "finished": written,
        "completed": written == tasks,
        "seconds": elapsed,
        "per_second": written / elapsed,
        "commits": -(-written // batch),
        "cpu_percent": 100 * cpu / elapsed,
        "peak_rss": peak_rss_self(),
    }


async def _sample(
    count: int, time_limit: float, once: Callable[[int], Any], *, warmup: int
) -> list[float]:
    """Call ``await once(i)`` (which returns a latency in seconds) ``count`` times, in turn."""
    samples: list[float] = []
    deadline = now() + time_limit
    for i in range(warmup + count):
        if now() > deadline:
            break
        latency = await once(i)
        if i >= warmup:
            samples.append(latency)
    return samples


async def latency(
    db: str, *, samples: int, rate: float, workers: int, time_limit: float
) -> dict[str, Any]:
    """Enqueue→finish latency at low load, and the aiosqlite insert+commit round trip."""
    loop = asyncio.get_running_loop()
    warmup = max(10, samples // 20)
    base_db = db + ".baseline"  # beside the server's, in the caller's temporary directory
    conn = await aiosqlite.connect(base_db)
    try:
        for pragma in ("PRAGMA journal_mode = WAL", "PRAGMA synchronous = NORMAL"):
            await conn.execute(pragma)
        for statement in BASELINE_SCHEMA:
            await conn.execute(statement)
        await conn.commit()

        async def insert_commit(i: int) -> float:
            start = now()
            text = orjson.dumps({"seq": i}).decode()
            await conn.execute(BASELINE_INSERT, (i + 1, text, start, start))
            await conn.commit()
            return now() - start

        base = await _sample(samples, time_limit / 3, insert_commit, warmup=warmup)
    finally:
        await conn.close()

    finishes = Finishes()
    warnings: list[str] = []
    acks: list[float] = []
    async with serving(db, workers, finishes, warnings) as server:

        async def one(i: int) -> float:
            future: asyncio.Future[float] = loop.create_future()
            finishes.waiting[i] = future
            start = now()
            await server.task({"seq": i})
            acks.append(now() - start)
            async with asyncio.timeout(10):
                return await future - start

        serial = await _sample(samples, time_limit / 3, one, warmup=warmup)
        acks = acks[warmup:]

        # Open loop: task i is due at start + i / rate, whatever happened to the others.
        paced: list[float] = []
        seq = warmup + samples + 1_000_000
        count = samples
        start = now() + 0.01
        jobs: list[asyncio.Task[None]] = []

        async def due(i: int, at: float) -> None:
            future: asyncio.Future[float] = loop.create_future()
            finishes.waiting[i] = future
            await server.task({"seq": i})
            paced.append(await future - at)

        for i in range(count):
            at = start + i / rate
            wait = at - now()
            if wait > 0:
                await asyncio.sleep(wait)
            if now() - start > time_limit / 3:
                break
            jobs.append(asyncio.create_task(due(seq + i, at)))
        async with asyncio.timeout(10):
            await asyncio.gather(*jobs)
    return {
        "serial": summary(serial),
        "ack": summary(acks),
        "paced": {**summary(paced), "rate": rate},
        "baseline": summary(base),
        "peak_rss": peak_rss_self(),
        "warnings": warnings,
    }


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.inproc")
    parser.add_argument(
        "scenario",
        choices=("throughput", "baseline-throughput", "latency", "mixed"),
        help="what to measure",
    )
    parser.add_argument("--tasks", type=int, default=50_000)
    parser.add_argument("--producers", type=int, default=512)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--warmup", type=int, default=2000)
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--rate", type=float, default=2000.0)
    parser.add_argument("--time-limit", type=float, default=30.0)
    parser.add_argument(
        "--dir", help="directory for the database files (default: a temporary one, removed)"
    )
    args = parser.parse_args()
    directory = str(args.dir) if args.dir else tempfile.mkdtemp(prefix="ts-bench-")
    own = None if args.dir else directory  # ours to remove

    def leave(code: int) -> NoReturn:
        # os._exit, not sys.exit: a stuck server's threads would keep the process alive.
        sys.stderr.flush()
        sys.stdout.flush()
        if own is not None:
            shutil.rmtree(own, ignore_errors=True)
        os._exit(code)

    _watchdog(2 * args.time_limit + STOP_LIMIT + 5, args.scenario, leave)
    db = os.path.join(directory, "bench.db")
    try:
        result = _run_scenario(args, db)
    except (BenchFailed, TimeoutError) as exc:
        sys.stderr.write(f"benchmarks.inproc {args.scenario}: {exc or 'timed out'}\n")
        leave(2)
    emit(result)
    leave(0)


def _watchdog(seconds: float, scenario: str, leave: Callable[[int], object]) -> None:
    """End this process after ``seconds`` even if the event loop is stuck (a hung server).

    The limits inside the scenarios rely on cancellation, which code that
    swallows ``CancelledError`` can defeat; this does not.
    """

    def expire() -> None:
        sys.stderr.write(f"benchmarks.inproc {scenario}: no result after {seconds:g}s, gave up\n")
        leave(3)

    timer = threading.Timer(seconds, expire)
    timer.daemon = True
    timer.start()


def _run_scenario(args: argparse.Namespace, db: str) -> dict[str, Any]:
    if args.scenario == "throughput":
        return run(
            taskserver_throughput(
                db,
                tasks=args.tasks,
                producers=args.producers,
                workers=args.workers,
                warmup=args.warmup,
                time_limit=args.time_limit,
            )
        )
    if args.scenario == "baseline-throughput":
        return run(
            baseline_throughput(db, tasks=args.tasks, batch=args.batch, time_limit=args.time_limit)
        )
    if args.scenario == "mixed":
        return run(
            mixed_throughput(
                db,
                tasks=args.tasks,
                producers=args.producers,
                workers=args.workers,
                warmup=args.warmup,
                time_limit=args.time_limit,
            )
        )
    return run(
        latency(
            db,
            samples=args.samples,
            rate=args.rate,
            workers=args.workers,
            time_limit=args.time_limit,
        )
    )


if __name__ == "__main__":
    main()
