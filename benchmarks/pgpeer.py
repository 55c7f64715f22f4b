"""The peer of the ``pg`` section: procrastinate (PostgreSQL, psycopg 3), the same no-op work.

``python -m benchmarks.pgpeer worker --dsn DSN --concurrency W`` runs one procrastinate
worker process (``W`` jobs at once, ``LISTEN/NOTIFY`` on, jobs kept after they end, as
taskserver keeps its tasks) whose only task, ``noop``, is an ``async`` no-op, until
SIGTERM. The orchestrator (``benchmarks/pgbench.py``) applies the schema, defers the
jobs in batches (``batch_defer_async``: one multi-row insert each) and reads the
outcome with ``finished`` below.

procrastinate is a bench-only extra (``pip install -e '.[bench]'``, which
``scripts/bench --only pg`` runs when it is missing), so it is imported when used, and
typed as ``Any``: the type check runs where it is not installed.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import logging
from collections.abc import Sequence
from typing import Any

#: The name of the peer's no-op task.
TASK = "noop"


def available() -> str | None:
    """procrastinate's version, or ``None`` when it is not installed."""
    try:
        from importlib import metadata

        return metadata.version("procrastinate")
    except Exception:
        return None


def make_app(dsn: str) -> tuple[Any, Any]:
    """A procrastinate ``App`` on ``dsn`` (psycopg 3 pool) and its ``noop`` task."""
    procrastinate: Any = importlib.import_module("procrastinate")
    app = procrastinate.App(connector=procrastinate.PsycopgConnector(conninfo=dsn))

    async def noop() -> None:
        """The peer's task: does nothing, as taskserver's benchmark task."""

    task = app.task(name=TASK)(noop)
    return app, task


async def apply_schema(dsn: str) -> None:
    """Create procrastinate's tables in a fresh database."""
    app, _ = make_app(dsn)
    async with app.open_async():
        await app.schema_manager.apply_schema_async()


async def defer(dsn: str, total: int, batch: int, parallel: int) -> None:
    """Defer ``total`` no-op jobs, ``batch`` per insert, ``parallel`` inserts at once."""
    app, task = make_app(dsn)
    sizes = [min(batch, total - start) for start in range(0, total, batch)]
    async with app.open_async():
        queue: asyncio.Queue[int] = asyncio.Queue()
        for size in sizes:
            queue.put_nowait(size)

        async def deferrer() -> None:
            while not queue.empty():
                size = queue.get_nowait()
                await task.batch_defer_async(*({} for _ in range(size)))

        await asyncio.gather(*(deferrer() for _ in range(parallel)))


#: Once every job succeeded: how many, and the first and last finish (epoch seconds).
FINISHED = """
SELECT count(*) FILTER (WHERE j.status = 'succeeded') AS succeeded,
       count(*) AS total,
       (SELECT extract(epoch FROM min(at)) FROM procrastinate_events WHERE type = 'succeeded'),
       (SELECT extract(epoch FROM max(at)) FROM procrastinate_events WHERE type = 'succeeded')
FROM procrastinate_jobs j
"""
WORKERS = "SELECT count(*) FROM procrastinate_workers"


async def run_worker(dsn: str, concurrency: int) -> None:
    app, _ = make_app(dsn)
    async with app.open_async():
        await app.run_worker_async(
            concurrency=concurrency,
            wait=True,
            listen_notify=True,
            delete_jobs="never",
            install_signal_handlers=True,
        )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.pgpeer")
    parser.add_argument("command", choices=("worker",))
    parser.add_argument("--dsn", required=True)
    parser.add_argument("--concurrency", type=int, default=4)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    asyncio.run(run_worker(args.dsn, args.concurrency))


if __name__ == "__main__":
    main()
