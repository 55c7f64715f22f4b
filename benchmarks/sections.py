"""The issue-14 sections of ``scripts/bench`` (wrk HTTP, fan-out, backlog, cpu_bound dispatch,
huey as the in-process peer) and issue 12's ``pg`` (taskserver nodes on one PostgreSQL beside
procrastinate).

``python -m benchmarks.sections [--quick] [--only wrk|fanout|backlog|cpu|huey|pg ...] [--db DSN]
[--ab REV] [--wrk-conns 16,64] [--rounds N]``

Each section starts its own servers (``taskserver run`` subprocesses on
127.0.0.1, fresh databases under one temporary directory) and prints its
figures beside a baseline measured in the same run, alternated, with the
median and range of the rounds. Every load is bounded in count and time.
``--ab REV``: the ``wrk``, ``fanout``, ``backlog`` and ``cpu`` sections also run
``taskserver/`` as at ``REV``, alternated with ``HEAD`` in the same run (``abtrees.py``).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import abtrees, backlog, cpubench, fanload, httpwrk, hueybench, pgbench
from .bench import BenchError, header

SECTIONS: dict[str, Callable[[Any, Path], None]] = {
    "wrk": httpwrk.section,
    "fanout": fanload.section,
    "backlog": backlog.section,
    "cpu": cpubench.section,
    "huey": hueybench.section,
    "pg": pgbench.section,
}


@dataclass(frozen=True)
class Options:
    """What every section reads (each takes the fields it needs)."""

    rounds: int
    seconds: float
    connections: tuple[int, ...]
    subscribers: tuple[int, ...]
    mercure_subscribers: int
    latency_subscribers: int
    events: int
    backlog: int
    chunk: int
    cpu_tasks: int
    only: tuple[str, ...]
    huey_tasks: int = 20_000
    db: str | None = None
    pg_tasks: int = 20_000
    pg_peer_tasks: int = 2_000
    pg_nodes: tuple[int, ...] = (1, 2, 3)
    pg_workers: int = 4
    pg_batch: int = 500
    pg_prefetch: tuple[int, ...] = (0, 64)
    #: tasks/s offered in all (any number of nodes) for the figures at the same rate
    pg_pace: float = 3_000.0
    #: an older commit to run beside this checkout (``--ab``), alternated
    ab: str | None = None
    #: filled in by ``main``: the trees the A/B sections run
    trees: tuple[abtrees.Tree, ...] = (abtrees.Tree("this tree"),)


def parse_args(argv: Sequence[str] | None = None) -> Options:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.sections", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a smoke run, not figures")
    parser.add_argument(
        "--only", action="append", choices=tuple(SECTIONS), help="run only these (repeatable)"
    )
    parser.add_argument(
        "--db", help="section pg: an existing PostgreSQL (postgresql://...; default: a private one)"
    )
    parser.add_argument("--pg-tasks", type=int, help="section pg: tasks per measurement")
    parser.add_argument(
        "--ab",
        metavar="REV",
        help="also run taskserver/ as at REV, alternated (wrk, fanout, backlog, cpu)",
    )
    parser.add_argument(
        "--wrk-conns", metavar="N,N", help="section wrk: connection counts (default 16,64,128)"
    )
    parser.add_argument("--rounds", type=int, help="alternated rounds (default 3; --quick 1)")
    args = parser.parse_args(argv)
    pg: dict[str, Any] = {"db": args.db, **({"pg_tasks": args.pg_tasks} if args.pg_tasks else {})}
    chosen: dict[str, Any] = {}
    if args.wrk_conns:
        chosen["connections"] = tuple(int(c) for c in args.wrk_conns.split(","))
    if args.rounds:
        chosen["rounds"] = args.rounds
    return dataclasses.replace(_defaults(args, pg), **chosen)


def _defaults(args: argparse.Namespace, pg: dict[str, Any]) -> Options:
    if args.quick:
        return Options(
            rounds=1,
            seconds=1.0,
            connections=(16, 64),
            subscribers=(0, 50),
            mercure_subscribers=50,
            latency_subscribers=500,
            events=5,
            backlog=20_000,
            chunk=10_000,
            cpu_tasks=5,
            huey_tasks=2_000,
            only=tuple(args.only or SECTIONS),
            **{"pg_tasks": 1_000, "pg_peer_tasks": 300, **pg},
            ab=args.ab,
        )
    return Options(
        rounds=3,
        seconds=5.0,
        connections=(16, 64, 128),
        subscribers=(0, 100, 1000),
        mercure_subscribers=1000,
        latency_subscribers=10_000,
        events=20,
        backlog=1_000_000,
        chunk=100_000,
        cpu_tasks=40,
        only=tuple(args.only or SECTIONS),
        **pg,
        ab=args.ab,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the chosen sections; 1 if one failed to measure, else 0."""
    opts = parse_args(argv)
    header()
    failures = 0
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="taskserver-bench14-") as tmp:
        try:
            opts = dataclasses.replace(opts, trees=abtrees.trees(opts.ab, Path(tmp)))
        except BenchError as exc:
            print(f"   FAILED: --ab {opts.ab}: {exc}")
            return 1
        if opts.ab:
            print("A/B, alternated: " + " vs ".join(t.label for t in opts.trees) + " (HEAD)")
            if abtrees.dirty():
                print("   NOTE: taskserver/ has uncommitted changes; they are not measured")
        for name in opts.only:
            t0 = time.monotonic()
            try:
                SECTIONS[name](opts, Path(tmp))
            except BenchError as exc:
                failures += 1
                print(f"   FAILED: {exc}")
            print(f"   ({name}: {time.monotonic() - t0:.0f}s)")
            sys.stdout.flush()
    failed = f"; {failures} section(s) FAILED" if failures else ""
    print(f"\nsections done in {time.monotonic() - started:.0f}s{failed}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
