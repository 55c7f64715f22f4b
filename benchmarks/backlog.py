"""Section ``backlog``: a million tasks queued with no workers, rate per 100k and RSS.

``taskserver run --task-workers 0`` (nothing consumes the queue; every task
stays ``queued``), fresh database, ``--max-queued`` above the total. Keep-alive
``POST /tasks``: one ``wrk -t1 -c64`` run with ``post_marks.lua``, which marks
every ``chunk`` responses (without wrk, one raw-client run per chunk). After
each chunk: that chunk's enqueue rate and the server's RSS (``VmRSS``). Run
twice: without anyone calling ``/stats`` (the baseline), then with a client
calling ``GET /stats`` every 0.5 s (its call times are printed too). The
figure is last / first chunk's rate; at the end, three ``GET /stats`` calls
are timed one after another. With ``--ab`` each of the two runs is made once per
tree, the order flipped between them (``abtrees.py``).
"""

from __future__ import annotations

import itertools
import selectors
import signal
import subprocess
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import orjson

from .abtrees import Tree, alternated
from .bench import BenchError, child_env, serve
from .common import peak_rss_of
from .wrkdrive import backend, drive, mib, rss_of, spread, taskserver_command

MARKS = Path(__file__).with_name("post_marks.lua")
CONNECTIONS = 64
POLL_INTERVAL = 0.5
#: A chunk that takes longer than this ends early (and says so).
CHUNK_SECONDS = 120


class BacklogOptions(Protocol):
    backlog: int
    chunk: int
    trees: tuple[Tree, ...]


@dataclass
class Run:
    polled: bool
    tree: str = ""
    rates: list[float] = field(default_factory=list)
    rss: list[int | None] = field(default_factory=list)
    failed: int = 0
    queued: int = 0
    polls: list[float] = field(default_factory=list)
    final_stats_ms: list[float] = field(default_factory=list)
    #: before the three GET /stats at the end, and the RSS after them
    peak: int | None = None
    rss_after_stats: int | None = None


def section(opts: BacklogOptions, tmp: Path) -> None:
    """Run and print the section (see the module docstring)."""
    print()
    print(
        f"B. Backlog: {opts.backlog:,} POST /tasks with --task-workers 0 ({backend()} -t1 "
        f"-c{CONNECTIONS}), in chunks of {opts.chunk:,}; without, then with GET /stats "
        f"every {POLL_INTERVAL:g}s"
    )
    runs = [
        _run(opts, tmp / f"backlog-{polled}-{i}.db", tmp, polled, tree)
        for polled in (False, True)
        for i, tree in enumerate(alternated(opts.trees, int(polled)))
    ]
    for run in runs:
        label = "/stats polled" if run.polled else "nobody polls"
        if len(opts.trees) > 1:
            print(f"   [{run.tree}]")
        rates = " ".join(f"{r:,.0f}" for r in run.rates)
        rss = " ".join(f"{(x or 0) / 2**20:.0f}" for x in run.rss)
        print(f"   {label:<14} enqueue/s per chunk: {rates}")
        print(f"{'':18}RSS MiB after each: {rss}; peak {mib(run.peak)} (before the calls below)")
        ratio = run.rates[-1] / run.rates[0] if run.rates and run.rates[0] else 0.0
        print(
            f"{'':18}last / first chunk = {ratio:.2f}; {run.queued:,} queued at the end"
            + (f"; {run.failed} requests failed" if run.failed else "")
        )
        if run.polls:
            tail = run.polls[-max(1, len(run.polls) // 10) :]
            print(
                f"{'':18}{len(run.polls)} polls: GET /stats took {spread(run.polls, '.1f')} ms; "
                f"the last tenth {spread(tail, '.1f')} ms"
            )
        print(
            f"{'':18}GET /stats at the end, three calls: "
            + ", ".join(f"{x:.1f} ms" for x in run.final_stats_ms)
            + f"; RSS after them {mib(run.rss_after_stats)}"
        )


def _stats(url: str) -> tuple[float, dict[str, object]]:
    started = time.perf_counter()
    with urllib.request.urlopen(url + "/stats", timeout=60) as response:  # loopback only
        body = response.read()
    return (time.perf_counter() - started) * 1000, orjson.loads(body)


def _run(opts: BacklogOptions, db: Path, tmp: Path, polled: bool, tree: Tree) -> Run:
    run = Run(polled, tree.label)
    command = taskserver_command(db, "--task-workers=0", f"--max-queued={opts.backlog * 2}")
    log = tmp / "backlog.log"
    with serve(command, cwd=tmp, log=log, timeout=30, env=tree.env()) as server:
        stop = threading.Event()

        def poll() -> None:
            while not stop.wait(POLL_INTERVAL):
                run.polls.append(_stats(server.url)[0])

        poller = threading.Thread(target=poll, daemon=True)
        if polled:
            poller.start()
        try:
            if backend() == "wrk":
                _wrk_marks(opts, server.url + "/tasks", server.proc.pid, run)
            else:
                _python_chunks(opts, server.url + "/tasks", server.proc.pid, run, tmp)
        finally:
            stop.set()
            if polled:
                poller.join(60)
        run.peak = peak_rss_of(server.proc.pid)
        for _ in range(3):
            ms, stats = _stats(server.url)
            run.final_stats_ms.append(ms)
        run.rss_after_stats = rss_of(server.proc.pid)
        queued = stats.get("queued")
        run.queued = queued if isinstance(queued, int) else 0
    for path in db.parent.glob(f"{db.name}*"):  # a million rows: free the disk for the next
        path.unlink()
    return run


def _wrk_marks(opts: BacklogOptions, url: str, pid: int, run: Run) -> None:
    """One wrk run that prints a mark every chunk; the RSS is sampled at each mark."""
    env = child_env()
    env["WRK_LIMIT"] = str(opts.backlog)
    env["WRK_MARK"] = str(opts.chunk)
    bound = CHUNK_SECONDS * (-(-opts.backlog // opts.chunk))
    command = ["wrk", "-t1", f"-c{CONNECTIONS}", f"-d{bound}s", "-s", str(MARKS), url]
    # Unbuffered: select() must see every line wrk wrote, none held in a Python buffer.
    proc = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, bufsize=0
    )
    assert proc.stdout is not None
    marks: list[tuple[int, float]] = []
    try:
        with selectors.DefaultSelector() as sel:
            sel.register(proc.stdout, selectors.EVENT_READ)
            deadline = time.monotonic() + bound + 10
            while time.monotonic() < deadline:
                if not sel.select(CHUNK_SECONDS):
                    raise BenchError(f"no backlog progress in {CHUNK_SECONDS}s")
                line = proc.stdout.readline()
                if not line or line.startswith(b"WRK-LIMIT"):
                    break
                if line.startswith(b"WRK-MARK "):
                    _, n, t, failed = line.split()
                    marks.append((int(n), float(t)))
                    run.failed = int(failed)
                    if len(marks) > 1:
                        run.rss.append(rss_of(pid))
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    run.rates = [(n1 - n0) / (t1 - t0) for (n0, t0), (n1, t1) in itertools.pairwise(marks)]
    if not run.rates:
        raise BenchError("wrk reported no backlog progress")


def _python_chunks(opts: BacklogOptions, url: str, pid: int, run: Run, tmp: Path) -> None:
    """Without wrk: one raw-client run per chunk, each exactly ``chunk`` requests."""
    sent = 0
    while sent < opts.backlog:
        d = drive(
            url,
            connections=CONNECTIONS,
            seconds=CHUNK_SECONDS,
            limit=min(opts.chunk, opts.backlog - sent),
            cwd=tmp,
        )
        if not d.requests:
            raise BenchError("a backlog chunk enqueued nothing")
        sent += d.requests
        run.failed += d.failed
        run.rates.append(d.per_second)
        run.rss.append(rss_of(pid))
