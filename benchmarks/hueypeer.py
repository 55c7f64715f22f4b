"""The peer of the ``huey`` section: huey's ``SqliteHuey``, the same durable no-op tasks.

``python -m benchmarks.hueypeer run --dir DIR --tasks N --workers W`` measures one
round and prints a ``BENCH-RESULT`` line. It makes ``DIR/huey.db`` (WAL,
``synchronous=NORMAL``: see ``NormalSqliteStorage``), starts huey's consumer in a
process of its own (``python -m benchmarks.hueypeer consumer``: ``W`` thread
workers, as ``huey_consumer -w W -k thread``), warms it up with ``warmup`` tasks
(enqueued, then every result read), then, from this process, enqueues ``N`` no-op
tasks one ``noop()`` call after another (each one committed transaction, as huey
does) and polls the result count every ``POLL`` seconds until all ``N`` results are
stored: tasks/s is ``N`` over first enqueue to last result. CPU per task: this
producer's user + system time over the run plus the consumer's (``/proc``), each
÷ ``N``.

huey's own defaults where they are its best for this: WAL (its default), an 8 MB
page cache (its default) and results on. Changed, each to huey's advantage:
``synchronous=NORMAL`` (huey offers only FULL and OFF, so a storage subclass sets it
on every connection it opens, as taskserver's benchmark runs; ``--synchronous FULL``
measures huey as it comes, SQLite's default), ``store_none`` so
that a task returning nothing still leaves the result this run counts, periodic
tasks off, and the workers' idle polling shortened from 0.1 s (growing to 10 s) to
``--delay`` growing to ``--max-delay``, so that a worker finding the queue empty
for a moment does not sleep through the load. The consumer runs in a process of
its own, as huey is deployed, so huey has a second interpreter (and GIL) where
taskserver's run has one.

huey is a bench-only extra (``pip install -e '.[bench]'``, which ``scripts/bench
--only huey`` runs when it is missing), so it is imported when used and typed as
``Any``: the type check runs where it is not installed.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from .common import cpu_seconds_of, cpu_seconds_self, emit

#: Seconds between two result counts while the last tasks finish.
POLL = 0.01
#: The consumer workers' first idle sleep and its ceiling (huey's: 0.1 and 10 s).
DELAY = 0.001
MAX_DELAY = 0.01
#: The ``synchronous`` levels a run may ask for: NORMAL (the figure), FULL (SQLite's default).
LEVELS = {"NORMAL": 1, "FULL": 2}
#: Longest a round may take before it is declared broken.
TIME_LIMIT = 300.0


def available() -> str | None:
    """huey's version, or ``None`` when it is not installed."""
    try:
        from importlib import metadata

        return metadata.version("huey")
    except Exception:
        return None


def make_huey(db: str, synchronous: str = "NORMAL") -> tuple[Any, Any]:
    """A ``SqliteHuey`` on ``db`` (WAL, ``synchronous`` as given) and its ``noop`` task."""
    huey: Any = importlib.import_module("huey")
    storage: Any = importlib.import_module("huey.storage")

    class NormalSqliteStorage(storage.SqliteStorage):  # type: ignore[misc]
        """huey's SQLite storage with ``synchronous`` set on each connection it opens."""

        def _create_connection(self) -> Any:
            conn = super()._create_connection()
            conn.execute(f"pragma synchronous={synchronous}")
            return conn

    queue = huey.SqliteHuey(
        "bench",
        filename=db,
        journal_mode="wal",
        store_none=True,
        storage_class=NormalSqliteStorage,
    )

    def noop(n: int) -> None:
        """The peer's task: does nothing, as taskserver's benchmark task."""

    return queue, queue.task(name="noop")(noop)


def _pragmas(queue: Any) -> tuple[str, int]:
    """The journal mode and ``synchronous`` level of ``queue``'s connection (checked)."""
    with queue.storage.db() as cursor:
        mode = cursor.execute("pragma journal_mode").fetchone()[0]
        level = cursor.execute("pragma synchronous").fetchone()[0]
    return str(mode), int(level)


@contextlib.contextmanager
def consumer(
    db: str, workers: int, delay: float, max_delay: float, synchronous: str, log: Path
) -> Iterator[int]:
    """huey's consumer in a process of its own; its pid. Stopped (SIGINT, then kill) on exit."""
    command = [sys.executable, "-m", "benchmarks.hueypeer", "consumer", "--db", db]
    command += ["--synchronous", synchronous]
    command += ["--workers", str(workers), "--delay", str(delay), "--max-delay", str(max_delay)]
    with log.open("wb") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    try:
        yield proc.pid
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # huey's graceful stop
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


def _wait_results(queue: Any, count: int, deadline: float) -> bool:
    while queue.result_count() < count:
        if time.monotonic() > deadline:
            return False
        time.sleep(POLL)
    return True


def measure(
    directory: Path,
    *,
    tasks: int,
    workers: int,
    warmup: int,
    delay: float,
    max_delay: float,
    synchronous: str = "NORMAL",
) -> dict[str, Any]:
    """One round (see the module docstring)."""
    db = str(directory / "huey.db")
    queue, noop = make_huey(db, synchronous)
    mode, level = _pragmas(queue)
    if (mode, level) != ("wal", LEVELS[synchronous]):
        raise RuntimeError(f"huey's database is journal_mode={mode}, synchronous={level}")
    deadline = time.monotonic() + TIME_LIMIT
    log = directory / "huey-consumer.log"
    with consumer(db, workers, delay, max_delay, synchronous, log) as pid:
        warm = [noop(-i) for i in range(warmup)]
        if not _wait_results(queue, warmup, deadline):
            raise RuntimeError(f"the {warmup} warm-up tasks did not finish")
        for result in warm:
            result.get()  # reads and removes it: the count starts at 0
        consumer_before, producer_before = cpu_seconds_of(pid), cpu_seconds_self()
        started = time.perf_counter()
        for i in range(tasks):
            noop(i)
        enqueued = time.perf_counter() - started
        done = _wait_results(queue, tasks, deadline)
        elapsed = time.perf_counter() - started
        producer_cpu = cpu_seconds_self() - producer_before
        consumer_after = cpu_seconds_of(pid)
    consumer_cpu = (
        consumer_after - consumer_before
        if consumer_after is not None and consumer_before is not None
        else None
    )
    return {
        "tasks": tasks,
        "completed": done,
        "seconds": elapsed,
        "per_second": tasks / elapsed,
        "enqueued_per_second": tasks / enqueued,
        "producer_cpu": producer_cpu,
        "consumer_cpu": consumer_cpu,
        "journal_mode": mode,
        "synchronous": level,
    }


def run_consumer(db: str, workers: int, delay: float, max_delay: float, synchronous: str) -> None:
    """huey's consumer with ``workers`` threads, until SIGINT or SIGTERM."""
    queue, _ = make_huey(db, synchronous)
    queue.create_consumer(
        workers=workers,
        worker_type="thread",
        initial_delay=delay,
        max_delay=max_delay,
        periodic=False,
    ).run()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.hueypeer")
    parser.add_argument("command", choices=("run", "consumer"))
    parser.add_argument("--dir", type=Path, help="run: where the database goes")
    parser.add_argument("--db", help="consumer: the database")
    parser.add_argument("--tasks", type=int, default=20_000)
    parser.add_argument("--warmup", type=int, default=500)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--delay", type=float, default=DELAY)
    parser.add_argument("--max-delay", type=float, default=MAX_DELAY)
    parser.add_argument(
        "--synchronous", choices=tuple(LEVELS), default="NORMAL", help="FULL: SQLite's default"
    )
    args = parser.parse_args(argv)
    if args.command == "consumer":
        run_consumer(args.db, args.workers, args.delay, args.max_delay, args.synchronous)
        return
    directory = args.dir or Path(os.getcwd())
    result = measure(
        directory,
        tasks=args.tasks,
        workers=args.workers,
        warmup=args.warmup,
        delay=args.delay,
        max_delay=args.max_delay,
        synchronous=args.synchronous,
    )
    emit(result)


if __name__ == "__main__":
    main()
