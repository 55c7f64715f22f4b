"""Section ``wrk``: ``POST /tasks`` against an aiohttp hello-world POST, alternated.

Each round measures, at every connection count (16, 64, 128 by default), the
hello-world server of ``benchmarks.apps`` and ``taskserver run --task-workers 4``
with the no-op app, each freshly started (taskserver on a fresh database), one
after the other; the order flips every round. A load run is ``wrk -t1 -cN``
with ``post_tasks.lua`` (the raw Python client without wrk), after a one-second
unmeasured warm-up. Printed per server: req/s, p50/p99 latency and the
server's CPU per request, as the median of the rounds with their range; and
taskserver / hello-world, the ratio of each round's adjacent pair.

``--ab REV``: taskserver runs as at ``REV`` and at ``HEAD`` (``abtrees.py``), each
beside the same round's hello-world, the order of the three flipped every round;
each tree's ratio is against that round's hello-world, and the B/A ratio of
req/s per round is printed too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from .abtrees import Tree
from .bench import BenchError, serve, wait_idle
from .wrkdrive import Drive, backend, drive, hello_command, spread, taskserver_command


class HttpOptions(Protocol):
    rounds: int
    seconds: float
    connections: tuple[int, ...]
    trees: tuple[Tree, ...]


HELLO = "hello-world"


def section(opts: HttpOptions, tmp: Path) -> None:
    """Run and print the section (see the module docstring)."""
    print()
    print(
        f"W. HTTP POST /tasks vs aiohttp hello-world POST, {backend()} -t1, "
        f"{opts.seconds:g}s per run after a 1s warm-up, {opts.rounds} alternated rounds, "
        "a fresh server (and database) per run; taskserver --task-workers 4, no-op app"
    )
    if backend() != "wrk":
        print("   NOTE: wrk is not installed; the raw Python client drives the load instead")
    if len(opts.trees) == 1:
        trees = {"taskserver": opts.trees[0]}
    else:  # A and B apart even when both are one commit (a smoke run: --ab HEAD)
        trees = {f"{ab} {t.label}": t for ab, t in zip("AB", opts.trees, strict=False)}
    servers = (HELLO, *trees)
    results: dict[tuple[str, int], list[Drive]] = {}
    for round_ in range(opts.rounds):
        order = servers if round_ % 2 == 0 else servers[::-1]
        for conns in opts.connections:
            for name in order:
                db = tmp / f"wrk-{round_}-{conns}-{len(results)}.db"
                results.setdefault((name, conns), []).append(
                    _measure(trees.get(name), conns, opts.seconds, db, tmp)
                )
    for conns in opts.connections:
        for name in servers:
            runs = results[name, conns]
            cpu = [r.cpu_us_per_request for r in runs if r.cpu_us_per_request is not None]
            failed = sum(r.failed for r in runs)
            print(
                f"   c={conns:<4} {name:<11} {spread([r.per_second for r in runs]):>30} req/s"
                f"   p50 {spread([r.p50_us / 1000 for r in runs], '.2f')} ms"
                f"   p99 {spread([r.p99_us / 1000 for r in runs], '.2f')} ms"
            )
            print(
                f"{'':20}server CPU {spread(cpu)} us/request"
                + (f"; {failed} requests failed" if failed else "")
            )
        for name in trees:
            ratios = _ratios(results[name, conns], results[HELLO, conns])
            print(f"   c={conns:<4} {name} / hello-world = {spread(ratios, '.2f')}")
        if len(trees) == 2:
            a, b = trees
            ratios = _ratios(results[b, conns], results[a, conns])
            print(f"   c={conns:<4} {b} / {a} req/s per round = {spread(ratios, '.2f')}")


def _ratios(tops: list[Drive], bottoms: list[Drive]) -> list[float]:
    return [t.per_second / h.per_second for t, h in zip(tops, bottoms, strict=True) if h.per_second]


def _measure(tree: Tree | None, conns: int, seconds: float, db: Path, tmp: Path) -> Drive:
    """One run of hello-world (``tree`` None) or of taskserver as in ``tree``."""
    if tree is None:
        command, env, log = hello_command(), None, tmp / "hello-world.log"
    else:
        command = taskserver_command(db, "--task-workers=4", "--app=benchmarks.apps:noop_setup")
        env, log = tree.env(), tmp / "taskserver.log"
    with serve(command, cwd=tmp, log=log, timeout=30, env=env) as server:
        url = server.url + "/tasks"
        drive(url, connections=conns, seconds=1, cwd=tmp)
        result = drive(url, connections=conns, seconds=seconds, server_pid=server.proc.pid, cwd=tmp)
        # Every acknowledged task must also have run.
        if tree is not None and not wait_idle(server.url, 60):
            raise BenchError("taskserver still had tasks queued 60 s after the load")
    return result
