"""Section ``huey``: durable in-process no-op tasks, taskserver against huey's ``SqliteHuey``.

Alternated in rounds, the order flipped every round, each run a fresh process and
database, the same ``huey_tasks`` no-op tasks and 4 (thread) workers on each side:

* taskserver: ``benchmarks.inproc throughput``, the measurement of ``bench.py``'s
  section 1 (512 producer coroutines on ``await server.task()``, an ``async`` no-op
  callback, SQLite WAL with ``synchronous=NORMAL``), from the first enqueue until
  the ``finish`` callback ran for all; CPU is the process's user + system time.
* huey: ``benchmarks.hueypeer run`` (its docstring says how huey is configured):
  one producer enqueuing, huey's consumer with 4 thread workers in a process of its
  own, from the first enqueue until all results are stored; CPU is the producer's
  plus the consumer's. Also with 1 thread worker, huey's fastest on this 2-core
  machine (its threads share one SQLite connection behind one lock, so more threads
  only contend): the figure is against 4, the same as taskserver's, and the line
  against 1 shows huey at its best.

The three runs of a round are rotated from round to round. Printed: tasks/s of each
(median and range of the rounds), CPU µs per task, and taskserver ÷ huey per round.
Without huey installed (the ``bench`` extra, which ``scripts/bench --only huey``
installs), taskserver is measured alone and the section says so.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Protocol

from . import hueypeer
from .bench import BenchError, inproc_throughput, run_result
from .wrkdrive import spread

WORKERS = 4
#: huey's consumer threads: as many as taskserver's workers (the figure), and one, huey's
#: fastest on this 2-core machine (its threads share one connection and its lock).
HUEY_WORKERS = (WORKERS, 1)
PRODUCERS = 512
TIME_LIMIT = 120.0


class HueyOptions(Protocol):
    rounds: int
    huey_tasks: int


def _taskserver(tmp: Path, tasks: int) -> tuple[float, float]:
    """tasks/s and CPU µs per task of one taskserver round."""
    result = inproc_throughput(
        tmp, tasks=tasks, producers=PRODUCERS, workers=WORKERS, time_limit=TIME_LIMIT
    )
    if not result["completed"]:
        raise BenchError(f"taskserver finished {result['finished']} of {tasks} tasks")
    cpu = result["cpu_percent"] / 100 * result["seconds"]
    return float(result["per_second"]), 1e6 * cpu / tasks


def _huey(tmp: Path, tasks: int, workers: int) -> dict[str, Any]:
    args = ["run", "--tasks", str(tasks), "--workers", str(workers)]
    args += ["--warmup", str(min(500, max(50, tasks // 20)))]
    directory = tempfile.mkdtemp(dir=tmp, prefix="huey-")
    result = run_result(
        "benchmarks.hueypeer",
        [*args, "--dir", directory],
        cwd=tmp,
        timeout=hueypeer.TIME_LIMIT + 30,
    )
    if not result["completed"]:
        raise BenchError(f"huey did not store all {tasks} results in {hueypeer.TIME_LIMIT:g}s")
    result["cpu_us"] = 1e6 * (result["producer_cpu"] + (result["consumer_cpu"] or 0.0)) / tasks
    return result


def section(opts: HueyOptions, tmp: Path) -> None:
    """Run and print the section (see the module docstring)."""
    version = hueypeer.available()
    tasks = opts.huey_tasks
    print()
    print(
        f"H. Durable no-op tasks, first enqueue to last done: taskserver in process vs huey "
        f"{version or '(not installed)'} SqliteHuey (WAL, synchronous=NORMAL); {tasks:,} tasks, "
        f"{WORKERS} workers, {opts.rounds} rotated rounds"
    )
    names = ["taskserver", *(f"huey {w}" for w in HUEY_WORKERS)] if version else ["taskserver"]
    ours: list[tuple[float, float]] = []
    theirs: dict[int, list[dict[str, Any]]] = {w: [] for w in HUEY_WORKERS}
    for round_ in range(opts.rounds):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            if name == "taskserver":
                ours.append(_taskserver(tmp, tasks))
            else:
                workers = int(name.split()[1])
                theirs[workers].append(_huey(tmp, tasks, workers))
    print(
        f"   taskserver, {WORKERS} workers {spread([r for r, _ in ours]):>28} tasks/s; "
        f"CPU {spread([c for _, c in ours])} µs per task"
    )
    if not version:
        print("   NOTE: huey is not installed (pip install -e '.[bench]'); taskserver alone")
        return
    for workers, runs in theirs.items():
        ratios = [o / t["per_second"] for (o, _), t in zip(ours, runs, strict=True)]
        cpu = [t["cpu_us"] / o for (_, o), t in zip(ours, runs, strict=True)]
        print(
            f"   huey, {workers} thread{'s' if workers > 1 else ''}"
            f"{'':{11 - len(str(workers)) - (workers > 1)}}"
            f"{spread([r['per_second'] for r in runs]):>28} tasks/s; "
            f"CPU {spread([r['cpu_us'] for r in runs])} µs per task (producer "
            f"{spread([1e6 * r['producer_cpu'] / tasks for r in runs])} + consumer "
            f"{spread([1e6 * (r['consumer_cpu'] or 0.0) / tasks for r in runs])}); "
            f"enqueue alone {spread([r['enqueued_per_second'] for r in runs])}/s"
        )
        print(
            f"{'':22}taskserver / huey {spread(ratios, '.1f')}x tasks/s"
            + (" (goal >= 10x)" if workers == WORKERS else " (huey at its best here)")
            + f"; huey's CPU per task / taskserver's {spread(cpu, '.1f')}x"
        )
    first = next(iter(theirs.values()))[0]
    print(
        f"   huey's database: journal_mode={first['journal_mode']}, "
        f"synchronous={first['synchronous']} (1: NORMAL)"
    )
