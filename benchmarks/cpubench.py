"""Section ``cpu``: dispatch overhead of a 19 ms pure-Python task, process and threads.

``spin`` (``benchmarks.cpuapp``) is calibrated at the start to take
``TASK_MS`` in this process. Three servers, alternated, the order rotated
every round, each fresh: ``cpu_bound`` with ``--task-workers 1
--process-workers 1``, and a plain (thread) callback with ``--task-workers 1``
and ``2``. Each gets one warm-up task, then a batch of ``cpu_tasks``
(``POST /tasks:batch``); per task = (last ``finished_at`` - the warm-up's
``finished_at``) ÷ the batch, from the server's own timestamps. Each task's
result is how long its ``spin`` took where it ran: with one worker, dispatch =
per task - the mean of those (and per task - 19 ms, the nominal figure); with
two threads sharing the GIL, the figure is per task against one thread's.
``cpu_bound no-op`` runs ``NOOP_TASKS`` tasks of no work on the cpu_bound
server: per task is the dispatch alone, the figure least disturbed by other
load on the machine. Then ``SERIAL`` tasks one in flight (``POST /tasks``, ``GET /tasks/{id}?wait``,
the next): the client's time per task minus its spin, HTTP and commits included.
With ``--ab`` every configuration runs once per tree each round, the trees'
order flipped every round (``abtrees.py``); figures are printed per tree.
"""

from __future__ import annotations

import statistics
import time
import urllib.request
from pathlib import Path
from typing import Any, Protocol

import orjson

from .abtrees import Tree, alternated
from .bench import BenchError, serve
from .cpuapp import spin
from .wrkdrive import spread, taskserver_command

TASK_MS = 19.0
#: Tasks run one in flight after the batch: POST, wait for it, then the next.
SERIAL = 10
#: The same cpu_bound server with tasks that do nothing: per task is the dispatch alone.
NOOP = "cpu_bound no-op"
NOOP_TASKS = 400
CONFIGS = {
    "cpu_bound, 1 process": ("process_setup", "--task-workers=1", "--process-workers=1"),
    NOOP: ("process_setup", "--task-workers=1", "--process-workers=1"),
    "thread, 1 worker": ("thread_setup", "--task-workers=1"),
    "thread, 2 workers": ("thread_setup", "--task-workers=2"),
}


class CpuOptions(Protocol):
    rounds: int
    cpu_tasks: int
    trees: tuple[Tree, ...]


def _time_spin(n: int, repeat: int = 5) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        spin(n)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def calibrate() -> int:
    """Iterations of ``spin`` that take ``TASK_MS`` here and now."""
    probe = 100_000
    # The least of several: the run another process did not interrupt.
    took = min(_time_spin(probe, 1) for _ in range(9))
    return max(1, round(probe * TASK_MS / 1000 / took))


def _get(url: str, timeout: float = 60) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as response:  # loopback only
        return orjson.loads(response.read())


def _post(url: str, body: object) -> Any:
    request = urllib.request.Request(
        url, data=orjson.dumps(body), headers={"Content-Type": "application/json"}, method="POST"
    )
    with urllib.request.urlopen(request, timeout=60) as response:  # loopback only
        return orjson.loads(response.read())


def _finished(url: str, task_id: int) -> tuple[float, float]:
    """When the task finished (server clock) and its spin's own ms."""
    task = _get(f"{url}/tasks/{task_id}?wait=60", timeout=90)
    if task["state"] != "succeeded":
        raise BenchError(f"task {task_id} ended {task['state']}: {task.get('error')}")
    return float(task["finished_at"]), float(task["result"]["ms"])


def _measure(
    name: str, n: int, count: int, db: Path, tmp: Path, tree: Tree
) -> tuple[float, float, list[float]]:
    """Per task ms over the batch, the mean ms its spins took, and one-in-flight overheads."""
    app, *flags = CONFIGS[name]
    command = taskserver_command(db, f"--app=benchmarks.cpuapp:{app}", *flags)
    with serve(command, cwd=tmp, log=tmp / "cpu.log", timeout=30, env=tree.env()) as server:
        warm = _post(server.url + "/tasks", {"data": {"n": n}})["id"]
        start, _ = _finished(server.url, warm)
        batch = {"tasks": [{"data": {"n": n}}] * count}
        ids = [t["id"] for t in _post(server.url + "/tasks:batch", batch)["tasks"]]
        _finished(server.url, ids[-1])
        done = [_finished(server.url, i) for i in ids]
        end = max(f for f, _ in done)
        # One in flight: each task enqueued once the one before has finished.
        serial = []
        for _ in range(SERIAL):
            began = time.perf_counter()
            one = _post(server.url + "/tasks", {"data": {"n": n}})["id"]
            _, ms = _finished(server.url, one)
            serial.append((time.perf_counter() - began) * 1000 - ms)
    return (end - start) / count * 1000, statistics.fmean(ms for _, ms in done), serial


def section(opts: CpuOptions, tmp: Path) -> None:
    """Run and print the section (see the module docstring)."""
    n = calibrate()
    print()
    print(
        f"C. A {TASK_MS:g} ms pure-Python task ({n:,} iterations of spin, calibrated here), "
        f"{opts.cpu_tasks} tasks per server after one warm-up, {opts.rounds} rotated rounds"
    )
    names = list(CONFIGS)
    keys = [(tree.label, name) for tree in opts.trees for name in names]
    per_task: dict[tuple[str, str], list[float]] = {k: [] for k in keys}
    spins: dict[tuple[str, str], list[float]] = {k: [] for k in keys}
    alone: dict[tuple[str, str], list[float]] = {k: [] for k in keys}
    for round_ in range(opts.rounds):
        shift = round_ % len(names)
        for index, name in enumerate(names[shift:] + names[:shift]):
            for tree in alternated(opts.trees, round_):
                db = tmp / f"cpu-{round_}-{index}-{opts.trees.index(tree)}.db"
                noop = name == NOOP
                count = max(opts.cpu_tasks, NOOP_TASKS if noop else 0)
                took, spun, serial = _measure(name, 0 if noop else n, count, db, tmp, tree)
                per_task[tree.label, name].append(took)
                spins[tree.label, name].append(spun)
                alone[tree.label, name] += serial
    for tree in opts.trees:
        if len(opts.trees) > 1:
            print(f"   [{tree.label}]")
        _print_tree(tree.label, names, per_task, spins, alone)


def _print_tree(
    label: str,
    names: list[str],
    per_task: dict[tuple[str, str], list[float]],
    spins: dict[tuple[str, str], list[float]],
    alone: dict[tuple[str, str], list[float]],
) -> None:
    for name in names:
        key = (label, name)
        print(
            f"   {name:<22} {spread(per_task[key], '.2f'):>28} ms per task; its spin took "
            f"{spread(spins[key], '.2f')} ms where it ran"
        )
        if name.endswith("workers"):
            continue
        if name == NOOP:
            print(f"{'':26}(dispatch alone: {NOOP_TASKS} tasks that return at once)")
            continue
        over = [p - d for p, d in zip(per_task[key], spins[key], strict=True)]
        print(
            f"{'':26}dispatch: per task - its spin {spread(over, '.2f')} ms; "
            f"per task - {TASK_MS:g} ms {spread([p - TASK_MS for p in per_task[key]], '.2f')} ms"
        )
        print(
            f"{'':26}one in flight (POST, GET ?wait, next), client time - its spin: "
            f"{spread(alone[key], '.2f')} ms"
        )
    two = per_task[label, "thread, 2 workers"]
    one = per_task[label, "thread, 1 worker"]
    ratios = [a / b for a, b in zip(two, one, strict=True)]
    print(f"   thread 2 workers / 1 worker, per task: {spread(ratios, '.2f')} (≤ 1.00: no slower)")
