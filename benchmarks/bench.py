"""``scripts/bench``: taskserver's figures, each beside a baseline measured in the same run.

Every measurement runs in a fresh process (so each has its own peak RSS and
none inherits another's heap), all on this machine, loopback only. The figures:

1. **Durable tasks/s, in process.** ``TaskServer`` with an ``async`` no-op
   ``task`` callback; many producer coroutines ``await server.task(data)``; the
   clock stops when the ``finish`` callback has run for every task. Each task is
   committed to SQLite (WAL) before ``task()`` returns, then run, then its
   outcome stored. Baseline: a bare aiosqlite loop inserting the same number of
   rows, ``executemany`` per batch and one commit per batch, WAL,
   ``synchronous=NORMAL`` -- the disk path without any of the machinery. Target:
   30,000 tasks/s.
2. **HTTP ``POST /tasks`` requests/s**, keep-alive. ``taskserver run`` (no-op
   callbacks, ``--workers`` task workers, 4 by default) as a subprocess, driven
   by a load-generator process; baseline: a plain aiohttp hello-world app on
   uvloop, also a subprocess, driven the same way. Both are measured at each
   ``--concurrency`` (64 and 128 connections by default) and printed at each;
   the target compares each server at the concurrency that served it best (its
   capacity): taskserver at 50% of hello-world or better. Hello-world fills its
   event loop at 64; durable enqueue needs more requests in flight to keep the
   loop busy while the handlers wait for their group commit. Each taskserver
   measurement gets a fresh server and database (its requests/s falls as the
   database grows, and hello-world keeps no state).
   Two load generators are used: an aiohttp ``ClientSession`` (the reference,
   but on two cores it saturates before an aiohttp server does) and a raw
   asyncio keep-alive client that costs little, so the server saturates. The
   CPU use of both sides is printed so it shows who was the bottleneck.
3. **Enqueue→finish latency at low load**, p50/p99: from calling
   ``server.task()`` to the ``finish`` callback running, one task in flight at a
   time, and open-loop at a few tasks per millisecond. Baseline: one aiosqlite
   ``INSERT`` + ``commit()`` round trip, the least one durable write costs.
4. **Mixed workload, in process**: the durable tasks/s of section 1, but the
   tasks use three declared queues of different priorities (one with a
   concurrency limit), per-task priorities, short delays, a failure then a
   retry, and serial groups (``benchmarks/mixed.py``); with the p50/p99
   enqueue→finish latency of its plain tasks and the retries seen. Beside it,
   the no-op figure of section 1 measured again with the same task count, and
   the ratio mixed / no-op.
5. **Peak RSS** of every process involved.

Throughput figures are the best of ``--rounds`` (the least disturbed run on a
shared machine); every round is printed too. The exit status is 0 when every
measurement was taken, whether or not a target was met, and 1 otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import re
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import orjson

from .common import RESULT_PREFIX, peak_rss_of
from .mixed import DELAY_RANGE, DELAYED, FAILING, GROUPED, GROUPS, QUEUES, RETRY

ROOT = Path(__file__).resolve().parent.parent
LISTENING = re.compile(r"listening on (http://\S+)")
THROUGHPUT_TARGET = 30_000.0
HTTP_RATIO_TARGET = 0.5
#: How far section 4's no-op figure may be from section 1's before it is flagged.
NOOP_TOLERANCE = 0.10
#: Figures one section leaves for a later one in the same run.
same_run: dict[str, float] = {}


class BenchError(Exception):
    """A measurement could not be taken; the message says why."""


@dataclass(frozen=True)
class Options:
    """What to run, from the command line."""

    tasks: int
    producers: int
    workers: int
    batch: int
    rounds: int
    http_rounds: int
    http_seconds: float
    http_requests: int
    #: connection counts the HTTP figure is measured at; each server's best counts
    concurrency: tuple[int, ...]
    clients: tuple[str, ...]
    samples: int
    rate: float
    mixed_tasks: int
    time_limit: float
    only: frozenset[str]
    verbose: bool


def parse_args(argv: Sequence[str] | None = None) -> Options:
    """The command line as ``Options``; ``--quick`` changes only the defaults."""
    parser = argparse.ArgumentParser(
        prog="scripts/bench",
        description="Measure taskserver beside same-run baselines (see benchmarks/bench.py).",
    )
    parser.add_argument(
        "--quick", action="store_true", help="a few seconds in all: a smoke check, not a figure"
    )
    parser.add_argument("--tasks", type=int, help="tasks per throughput round [50000]")
    parser.add_argument("--producers", type=int, default=512, help="coroutines calling task()")
    parser.add_argument("--workers", type=int, default=4, help="task workers [4]")
    parser.add_argument("--batch", type=int, default=1000, help="baseline rows per commit")
    parser.add_argument("--rounds", type=int, help="throughput rounds, best kept [3]")
    parser.add_argument("--http-rounds", type=int, help="HTTP rounds per server, best kept [2]")
    parser.add_argument("--http-seconds", type=float, help="seconds per HTTP measurement [4]")
    parser.add_argument(
        "--http-requests", type=int, default=500_000, help="or at most this many requests"
    )
    parser.add_argument(
        "--concurrency",
        type=_counts,
        help="concurrent HTTP requesters, a comma-separated list [64,128; --quick: 64]",
    )
    parser.add_argument(
        "--client",
        action="append",
        choices=("aiohttp", "raw"),
        help="HTTP load generator(s) [both; --quick: aiohttp]",
    )
    parser.add_argument("--samples", type=int, help="latency samples per mode [2000]")
    parser.add_argument("--rate", type=float, default=2000.0, help="open-loop tasks/s [2000]")
    parser.add_argument("--mixed-tasks", type=int, help="tasks per mixed-workload round [20000]")
    parser.add_argument(
        "--time-limit", type=float, help="seconds any one measurement may take [30; --quick: 5]"
    )
    parser.add_argument(
        "--only",
        action="append",
        choices=("throughput", "http", "latency", "mixed"),
        help="run only these sections (repeatable)",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="print raw results too")
    args = parser.parse_args(argv)
    quick = args.quick

    def pick(value: Any, full: Any, smoke: Any) -> Any:
        return value if value is not None else (smoke if quick else full)

    options = Options(
        tasks=pick(args.tasks, 50_000, 3_000),
        producers=args.producers,
        workers=args.workers,
        batch=args.batch,
        rounds=pick(args.rounds, 3, 1),
        http_rounds=pick(args.http_rounds, 2, 1),
        http_seconds=pick(args.http_seconds, 4.0, 0.5),
        http_requests=args.http_requests,
        concurrency=pick(args.concurrency, (64, 128), (64,)),
        clients=tuple(args.client or (("aiohttp",) if quick else ("aiohttp", "raw"))),
        samples=pick(args.samples, 2000, 200),
        rate=args.rate,
        mixed_tasks=pick(args.mixed_tasks, 20_000, 2_000),
        time_limit=pick(args.time_limit, 30.0, 5.0),
        only=frozenset(args.only or ("throughput", "http", "latency", "mixed")),
        verbose=args.verbose,
    )
    for name in (
        "tasks",
        "producers",
        "workers",
        "batch",
        "rounds",
        "http_rounds",
        "http_requests",
        "samples",
        "mixed_tasks",
    ):
        if getattr(options, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    for name in ("http_seconds", "rate", "time_limit"):
        if not getattr(options, name) > 0:
            parser.error(f"--{name.replace('_', '-')} must be positive")
    return options


# --- processes -------------------------------------------------------------------


def child_env(tree: Path | None = None) -> dict[str, str]:
    """The environment of every benchmark process: this repo first, no TASKSERVER_* settings.

    ``tree``, a directory holding another commit's ``taskserver`` package (an A/B
    run, see ``benchmarks.sections --ab``), goes before this repo.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("TASKSERVER_")}
    paths = (str(tree) if tree else None, str(ROOT), env.get("PYTHONPATH"))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, paths))
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _tail(text: str, lines: int = 12) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def run_result(module: str, args: Sequence[str], *, cwd: Path, timeout: float) -> dict[str, Any]:
    """Run ``python -m module args`` and return the result it printed.

    A benchmark module given ``--dir`` keeps its files there, under ``cwd``, so
    they go with the run's temporary directory even if the process is killed.
    """
    if module == "benchmarks.inproc":
        args = [*args, "--dir", tempfile.mkdtemp(dir=cwd)]
    command = [sys.executable, "-m", module, *args]
    try:
        done = subprocess.run(
            command,
            cwd=cwd,
            env=child_env(),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise BenchError(f"{module} {' '.join(args)} took more than {timeout:g}s") from None
    for line in done.stdout.splitlines():
        if line.startswith(RESULT_PREFIX):
            result: dict[str, Any] = orjson.loads(line[len(RESULT_PREFIX) :])
            return result
    raise BenchError(
        f"{module} exited {done.returncode} without a result:\n{_tail(done.stderr + done.stdout)}"
    )


@dataclass
class Server:
    """A server subprocess listening on loopback."""

    proc: subprocess.Popen[bytes]
    url: str
    log: Path

    @property
    def peak_rss(self) -> int | None:
        return peak_rss_of(self.proc.pid)


@contextlib.contextmanager
def serve(
    command: Sequence[str],
    *,
    cwd: Path,
    log: Path,
    timeout: float,
    env: dict[str, str] | None = None,
) -> Iterator[Server]:
    """Start a server that logs ``listening on http://…``; SIGTERM it (then SIGKILL) on exit.

    ``env``: its environment (default ``child_env()``; an A/B run passes a tree's)."""
    with log.open("wb") as out:
        proc = subprocess.Popen(
            command, cwd=cwd, env=env or child_env(), stdout=out, stderr=subprocess.STDOUT
        )
    try:
        deadline = time.monotonic() + timeout
        while True:
            match = LISTENING.search(log.read_text(errors="replace"))
            if match:
                break
            if proc.poll() is not None:
                raise BenchError(f"server exited {proc.returncode}:\n{_tail(log.read_text())}")
            if time.monotonic() > deadline:
                raise BenchError(f"server did not start in {timeout:g}s:\n{_tail(log.read_text())}")
            time.sleep(0.02)
        yield Server(proc, match.group(1), log)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


def wait_idle(url: str, timeout: float) -> bool:
    """Poll taskserver's ``/stats`` until nothing is queued or running; ``False`` on timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with urllib.request.urlopen(url + "/stats", timeout=5) as response:  # loopback only
            stats = orjson.loads(response.read())
        if not stats.get("queued") and not stats.get("running"):
            return True
        time.sleep(0.05)
    return False


# --- output ------------------------------------------------------------------------


def fmt_rate(value: float | None, unit: str) -> str:
    return "n/a" if value is None else f"{value:>10,.0f} {unit}"


def fmt_us(value: float | None) -> str:
    if value is None or value != value:  # NaN: no samples
        return "n/a"
    return f"{value / 1000:.2f} ms" if value >= 1000 else f"{value:.0f} us"


def fmt_mib(value: int | None) -> str:
    return "n/a" if value is None else f"{value / 2**20:.1f} MiB"


def verdict(ok: bool) -> str:
    return "met" if ok else "NOT MET"


def print_warnings(results: Sequence[dict[str, Any]]) -> None:
    """Print what went wrong around measurements that still produced figures."""
    for warning in sorted({w for r in results for w in r.get("warnings", ())}):
        print(f"   WARNING: {warning}")


def header() -> None:
    versions = ", ".join(
        f"{name} {metadata.version(name)}" for name in ("aiohttp", "aiosqlite", "uvloop", "orjson")
    )
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    commit = subprocess.run(
        ["git", "-C", str(ROOT), "describe", "--always", "--dirty"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    print(
        f"taskserver benchmark: {os.cpu_count()} CPUs, Python {platform.python_version()}, "
        f"SQLite {sqlite3.sqlite_version}, {versions}"
    )
    print(f"tree {commit or '(not a git checkout)'}; load average at start {load}")


# --- sections ----------------------------------------------------------------------


def inproc_throughput(
    tmp: Path, *, tasks: int, producers: int, workers: int, time_limit: float
) -> dict[str, Any]:
    """One round of durable in-process no-op tasks (``benchmarks.inproc throughput``)."""
    return run_result(
        "benchmarks.inproc",
        [
            "throughput",
            "--tasks",
            str(tasks),
            "--time-limit",
            str(time_limit),
            "--producers",
            str(producers),
            "--workers",
            str(workers),
            "--warmup",
            str(_warmup_for(tasks)),
        ],
        cwd=tmp,
        timeout=time_limit * 2 + 40,
    )


def throughput(opts: Options, tmp: Path, rss: dict[str, int | None]) -> None:
    print()
    print(
        f"1. Durable in-process no-op tasks, await server.task() -> finish callback ran for all "
        f"({opts.tasks:,} tasks, {opts.producers} producers, {opts.workers} workers, "
        f"best of {opts.rounds})"
    )
    common = ["--tasks", str(opts.tasks), "--time-limit", str(opts.time_limit)]
    ours: list[dict[str, Any]] = []
    base: list[dict[str, Any]] = []
    for _ in range(opts.rounds):
        base.append(
            run_result(
                "benchmarks.inproc",
                ["baseline-throughput", *common, "--batch", str(opts.batch)],
                cwd=tmp,
                timeout=opts.time_limit * 2 + 40,
            )
        )
        ours.append(
            inproc_throughput(
                tmp,
                tasks=opts.tasks,
                producers=opts.producers,
                workers=opts.workers,
                time_limit=opts.time_limit,
            )
        )
    best = max(ours, key=lambda r: r["per_second"])
    best_base = max(base, key=lambda r: r["per_second"])
    rounds = " ".join(f"{r['per_second']:,.0f}" for r in ours)
    base_rounds = " ".join(f"{r['per_second']:,.0f}" for r in base)
    incomplete = [r for r in ours if not r["completed"]]
    print(f"   taskserver          {fmt_rate(best['per_second'], 'tasks/s')}   (rounds {rounds})")
    print(
        f"{'':27}{best['tasks'] / max(1, best['commits']):.0f} tasks/commit; process CPU "
        f"{best['cpu_percent']:.0f}% of a core; event-loop thread "
        f"{best['loop_cpu_us_per_task']:.0f} us CPU/task"
    )
    print(
        f"   baseline aiosqlite  {fmt_rate(best_base['per_second'], 'rows/s ')}   "
        f"(rounds {base_rounds})"
    )
    print(f"{'':27}{opts.batch} rows/commit; process CPU {best_base['cpu_percent']:.0f}% of a core")
    if best.get("acked_per_second"):
        print(f"   (enqueue alone, all task() calls returned: {best['acked_per_second']:,.0f}/s)")
    if incomplete:
        print(f"   WARNING: {len(incomplete)} round(s) hit the time limit before all finished")
    print_warnings(ours)
    ratio = best["per_second"] / best_base["per_second"]
    print(
        f"   taskserver / baseline = {ratio:.1%};  target >= {THROUGHPUT_TARGET:,.0f} tasks/s: "
        f"{verdict(best['per_second'] >= THROUGHPUT_TARGET and not incomplete)}"
    )
    same_run["noop_per_second"] = best["per_second"]
    same_run["noop_tasks"] = opts.tasks
    rss["in-process taskserver (throughput)"] = max(r["peak_rss"] for r in ours)
    rss["in-process aiosqlite baseline"] = max(r["peak_rss"] for r in base)
    if opts.verbose:
        print(f"   raw: {ours} {base}")


def _counts(text: str) -> tuple[int, ...]:
    """``--concurrency``: ``64`` or ``64,128``."""
    try:
        counts = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers like 64,128, got {text!r}") from None
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"expected positive numbers, got {text!r}")
    return counts


def _measure_http(
    opts: Options, server: Server, client: str, concurrency: int, rss: dict[str, int | None]
) -> dict[str, Any]:
    result = run_result(
        "benchmarks.loadgen",
        [
            "--url",
            server.url + "/tasks",
            "--client",
            client,
            "--concurrency",
            str(concurrency),
            "--requests",
            str(opts.http_requests),
            "--seconds",
            str(opts.http_seconds),
            "--warmup",
            str(max(concurrency, 200 if opts.http_seconds < 2 else 1000)),
            "--server-pid",
            str(server.proc.pid),
        ],
        cwd=server.log.parent,
        timeout=opts.http_seconds + opts.time_limit + 10,
    )
    key = f"load generator ({client} client)"
    rss[key] = max(rss.get(key) or 0, result["peak_rss"])
    return result


def http(opts: Options, tmp: Path, rss: dict[str, int | None]) -> None:
    print()
    conns = ", ".join(str(c) for c in opts.concurrency)
    print(
        f"2. HTTP POST /tasks, keep-alive, {conns} concurrent requesters, "
        f"{opts.workers} task workers, {opts.http_seconds:g}s per run, best of {opts.http_rounds}"
    )
    python = sys.executable
    hello_cmd = [python, "-m", "benchmarks.apps", "hello", "--port", "0"]
    #: (server, client, concurrency) -> one result per round
    results: dict[tuple[str, str, int], list[dict[str, Any]]] = {}
    for round_ in range(opts.http_rounds):
        with serve(hello_cmd, cwd=tmp, log=tmp / "hello.log", timeout=30) as hello:
            for client in opts.clients:
                for conc in opts.concurrency:
                    results.setdefault(("hello-world", client, conc), []).append(
                        _measure_http(opts, hello, client, conc, rss)
                    )
            rss["hello-world server"] = max(rss.get("hello-world server") or 0, hello.peak_rss or 0)
        # A fresh server and database for each measurement: a server's requests/s
        # falls as its database grows (README), and hello-world keeps no state.
        for client in opts.clients:
            for conc in opts.concurrency:
                db = tmp / f"http-{round_}-{client}-{conc}.db"
                ts_cmd = [
                    python,
                    "-m",
                    "taskserver",
                    "run",
                    "--port",
                    "0",
                    "--db",
                    str(db),
                    "--task-workers",
                    str(opts.workers),
                    "--app",
                    "benchmarks.apps:noop_setup",
                ]
                with serve(ts_cmd, cwd=tmp, log=tmp / "taskserver.log", timeout=30) as server:
                    results.setdefault(("taskserver", client, conc), []).append(
                        _measure_http(opts, server, client, conc, rss)
                    )
                    # Every acknowledged task must also have run.
                    if not wait_idle(server.url, opts.time_limit):
                        raise BenchError("taskserver still had work queued after the time limit")
                    rss["taskserver run (HTTP)"] = max(
                        rss.get("taskserver run (HTTP)") or 0, server.peak_rss or 0
                    )
    for client in opts.clients:
        peak: dict[str, dict[str, Any]] = {}
        for conc in opts.concurrency:
            best: dict[str, dict[str, Any]] = {}
            for name in ("taskserver", "hello-world"):
                runs = results[name, client, conc]
                r = best[name] = max(runs, key=lambda x: x["per_second"])
                if name not in peak or r["per_second"] > peak[name]["per_second"]:
                    peak[name] = r
                _print_http(client, conc, name, runs, r)
            note = _client_note(best["hello-world"])
            print(
                f"   {client:>7} client, {conc} connections: taskserver / hello-world = "
                f"{_ratio(best):.1%}{note}"
            )
        # Requests/s is a capacity: each server counts at the concurrency that served
        # it best. Durable enqueue needs more requests in flight to fill its group
        # commits than hello-world does to fill its event loop.
        ratio = _ratio(peak)
        what = "each at its best concurrency" if len(opts.concurrency) > 1 else "as above"
        # The target is judged on the raw client: the aiohttp client saturates first.
        judged = (
            f"target >= {HTTP_RATIO_TARGET:.0%}: {verdict(ratio >= HTTP_RATIO_TARGET)}"
            if client == "raw"
            else "the target is judged on the raw client"
        )
        print(
            f"   {client:>7} client, {what}: taskserver / hello-world = {ratio:.1%} "
            f"({peak['taskserver']['concurrency']} vs {peak['hello-world']['concurrency']} "
            f"connections); {judged}{_client_note(peak['hello-world'])}"
        )
    if opts.verbose:
        print(f"   raw: {results}")


def _print_http(
    client: str, conc: int, name: str, runs: list[dict[str, Any]], r: dict[str, Any]
) -> None:
    failed = r["errors"] + sum(v for k, v in r["statuses"].items() if not k.startswith("2"))
    bad = f", {failed} failed" if failed else ""
    rounds = " ".join(f"{x['per_second']:,.0f}" for x in runs)
    server_us = r["server_cpu_percent"] / 100 * r["seconds"] / max(1, r["ok"]) * 1e6
    print(
        f"   {client:>7} client {conc:>4} conns  {name:<11} {fmt_rate(r['per_second'], 'req/s')}   "
        f"p50 {fmt_us(r['p50_us'])}, p99 {fmt_us(r['p99_us'])}   (rounds {rounds}){bad}"
    )
    print(
        f"{'':30}server CPU {r['server_cpu_percent']:.0f}% of a core ({server_us:.0f} us"
        f"/req), client CPU {r['cpu_percent']:.0f}%"
    )


def _ratio(best: dict[str, dict[str, Any]]) -> float:
    base = best["hello-world"]["per_second"]
    return float(best["taskserver"]["per_second"] / base) if base else 0.0


def _client_note(hello: dict[str, Any]) -> str:
    if hello["cpu_percent"] > 85 and hello["server_cpu_percent"] < 85:
        return " (the client, not hello-world, saturated: the ratio flatters taskserver)"
    return ""


def latency(opts: Options, tmp: Path, rss: dict[str, int | None]) -> None:
    print()
    print(
        "3. Enqueue -> finish latency at low load, in process "
        f"(no-op callbacks, {opts.workers} workers, {opts.samples:,} samples per mode)"
    )
    r = run_result(
        "benchmarks.inproc",
        [
            "latency",
            "--samples",
            str(opts.samples),
            "--rate",
            str(opts.rate),
            "--workers",
            str(opts.workers),
            "--time-limit",
            str(opts.time_limit),
        ],
        cwd=tmp,
        timeout=opts.time_limit * 2 + 40,
    )
    rows = (
        ("taskserver, 1 in flight: task() -> finish ran", r["serial"]),
        ("taskserver, 1 in flight: task() returned (ack)", r["ack"]),
        (f"taskserver, open loop {opts.rate:,.0f}/s: due -> finish", r["paced"]),
        ("baseline: aiosqlite INSERT + commit()", r["baseline"]),
    )
    for label, s in rows:
        print(
            f"   {label:<50} p50 {fmt_us(s['p50_us']):>9}   p99 {fmt_us(s['p99_us']):>9}   "
            f"max {fmt_us(s['max_us']):>9}   (n={s['samples']})"
        )
    print(
        "   (task() returns when the commit's future resolves; that same commit already woke a"
        " worker, so finish can run first)"
    )
    base = r["baseline"]["p50_us"]
    if base:
        print(f"   taskserver p50 / baseline p50 = {r['serial']['p50_us'] / base:.1f}x")
    print_warnings([r])
    rss["in-process taskserver (latency)"] = r["peak_rss"]


def _warmup_for(tasks: int) -> int:
    return min(2000, max(100, tasks // 10))


def mixed(opts: Options, tmp: Path, rss: dict[str, int | None]) -> None:
    n = opts.mixed_tasks
    queues = ", ".join(
        f"{name} p{priority}" + (f" max {limit} running" if limit else "")
        for name, (priority, limit, _) in QUEUES.items()
    )
    print()
    print(
        f"4. Mixed workload, in process, await server.task() -> finish ran for all ({n:,} tasks, "
        f"{opts.producers} producers, {opts.workers} workers, best of {opts.rounds}): "
        f"queues {queues}; task priorities 0-9; {DELAYED:.0%} delayed "
        f"{DELAY_RANGE[0] * 1000:g}-{DELAY_RANGE[1] * 1000:g} ms; {FAILING:.0%} failing once, "
        f"retried after {RETRY.base * 1000:g} ms; {GROUPED:.0%} in {GROUPS} serial groups"
    )
    common = [
        "--tasks",
        str(n),
        "--time-limit",
        str(opts.time_limit),
        "--producers",
        str(opts.producers),
        "--workers",
        str(opts.workers),
        "--warmup",
        str(_warmup_for(n)),
    ]
    ours: list[dict[str, Any]] = []
    noop: list[dict[str, Any]] = []
    for _ in range(opts.rounds):
        for scenario, into in (("throughput", noop), ("mixed", ours)):
            into.append(
                run_result(
                    "benchmarks.inproc",
                    [scenario, *common],
                    cwd=tmp,
                    timeout=opts.time_limit * 2 + 40,
                )
            )
    best = max(ours, key=lambda r: r["per_second"])
    best_noop = max(noop, key=lambda r: r["per_second"])
    rounds = " ".join(f"{r['per_second']:,.0f}" for r in ours)
    noop_rounds = " ".join(f"{r['per_second']:,.0f}" for r in noop)
    lat = best["latency"]
    print(f"   mixed               {fmt_rate(best['per_second'], 'tasks/s')}   (rounds {rounds})")
    print(
        f"{'':27}{best['tasks'] / max(1, best['commits']):.0f} tasks/commit; process CPU "
        f"{best['cpu_percent']:.0f}% of a core; retries seen {best['retries']:,} "
        f"({best['planned']['failing']:,} tasks planned to fail once)"
    )
    print(
        f"{'':27}enqueue -> finish under this load, tasks neither delayed nor failing: "
        f"p50 {fmt_us(lat['p50_us'])}, p99 {fmt_us(lat['p99_us'])} (n={lat['samples']:,})"
    )
    print(
        f"   no-op, as section 1 {fmt_rate(best_noop['per_second'], 'tasks/s')}   "
        f"(rounds {noop_rounds})"
    )
    incomplete = [r for r in ours + noop if not r["completed"]]
    if incomplete:
        print(f"   WARNING: {len(incomplete)} run(s) hit the time limit before all finished")
    print_warnings(ours + noop)
    print(f"   mixed / no-op = {best['per_second'] / best_noop['per_second']:.1%}")
    first = same_run.get("noop_per_second")
    if first:
        change = best_noop["per_second"] / first - 1
        within = "within" if abs(change) <= NOOP_TOLERANCE else "NOT within"
        print(
            f"   no-op here vs section 1 ({first:,.0f} tasks/s, {same_run['noop_tasks']:,.0f} "
            f"tasks): {change:+.1%}, {within} {NOOP_TOLERANCE:.0%}"
        )
        print(
            "   (both no-op figures are the same code in the same run, so their gap is this"
            " machine's noise; whether the no-op figure fell is a comparison with an earlier run)"
        )
    else:
        print(
            "   (section 1 did not run, so there is no second no-op figure to check this one"
            " against; whether it fell is a comparison with an earlier run's section 1)"
        )
    rss["in-process taskserver (mixed)"] = max(r["peak_rss"] for r in ours)
    if opts.verbose:
        print(f"   raw: {ours} {noop}")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the selected sections, print every figure; 1 if a measurement failed, else 0."""
    opts = parse_args(argv)
    header()
    rss: dict[str, int | None] = {}
    failures = 0
    started = time.monotonic()
    sections = (
        ("throughput", throughput),
        ("http", http),
        ("latency", latency),
        ("mixed", mixed),
    )
    with tempfile.TemporaryDirectory(prefix="taskserver-bench-") as tmp_dir:
        tmp = Path(tmp_dir)
        for name, section in sections:
            if name not in opts.only:
                continue
            try:
                section(opts, tmp, rss)
            except BenchError as exc:
                failures += 1
                print(f"   FAILED: {exc}")
            sys.stdout.flush()
    print()
    print("5. Peak RSS (VmHWM of each server before it stopped; ru_maxrss of the others)")
    for name, value in rss.items():
        print(f"   {name:<40} {fmt_mib(value):>10}")
    print()
    failed = f"; {failures} section(s) FAILED" if failures else ""
    print(f"done in {time.monotonic() - started:.0f}s{failed}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
