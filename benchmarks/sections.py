"""The issue-14 sections of ``scripts/bench`` (wrk HTTP, fan-out, backlog, cpu_bound dispatch)
and issue 12's ``pg`` (taskserver nodes on one PostgreSQL beside procrastinate).

``python -m benchmarks.sections [--quick] [--only wrk|fanout|backlog|cpu|pg ...] [--db DSN]
[--ab REF]``

Each section starts its own servers (``taskserver run`` subprocesses on
127.0.0.1, fresh databases under one temporary directory) and prints its
figures beside a baseline measured in the same run, alternated, with the
median and range of the rounds. Every load is bounded in count and time.

``--ab REF`` (the ``fanout`` section) measures the servers of two trees in the
same run, alternated: ``A`` is commit ``REF``'s ``taskserver`` package (``git
archive`` into the temporary directory, put first on the server's
``PYTHONPATH``), ``B`` the working tree.
"""

from __future__ import annotations

import argparse
import io
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from . import backlog, cpubench, fanload, httpwrk, pgbench
from .bench import ROOT, BenchError, header

SECTIONS: dict[str, Callable[[Any, Path], None]] = {
    "wrk": httpwrk.section,
    "fanout": fanload.section,
    "backlog": backlog.section,
    "cpu": cpubench.section,
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
    db: str | None = None
    pg_tasks: int = 5_000
    pg_peer_tasks: int = 2_000
    pg_nodes: tuple[int, ...] = (1, 2, 3)
    pg_workers: int = 4
    pg_batch: int = 500
    pg_prefetch: tuple[int, ...] = (0, 64)
    #: Commit to measure against (``--ab``), and where its package went (set by ``main``).
    ab: str | None = None
    trees: tuple[tuple[str, Path | None], ...] = (("", None),)


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
        "--ab", metavar="REF", help="also run commit REF's server, alternated (A=REF, B=tree)"
    )
    args = parser.parse_args(argv)
    pg = {"db": args.db, **({"pg_tasks": args.pg_tasks} if args.pg_tasks else {})}
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


def _extract(ref: str, tmp: Path) -> Path:
    """Commit ``ref``'s ``taskserver`` package under ``tmp``; the directory to put on the path."""
    where = tmp / "ab-tree"
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", "--format=tar", ref, "taskserver"],
        capture_output=True,
        check=True,
    ).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        if hasattr(tarfile, "data_filter"):  # Python >= 3.11.4
            tar.extractall(where, filter="data")
        else:
            tar.extractall(where)  # our own repository's archive
    commit = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", ref], capture_output=True, text=True
    ).stdout.strip()
    print(f"A/B: A = {ref} ({commit}) in {where}, B = the working tree")
    return where


def main(argv: Sequence[str] | None = None) -> int:
    """Run the chosen sections; 1 if one failed to measure, else 0."""
    opts = parse_args(argv)
    header()
    failures = 0
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="taskserver-bench14-") as tmp:
        if opts.ab:
            opts = replace(opts, trees=(("A", _extract(opts.ab, Path(tmp))), ("B", None)))
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
