"""Section ``fanout``: task throughput while subscribers read, and 10,000-subscriber latency.

Throughput: ``taskserver run --task-workers 4`` (no-op app, fresh database) is
loaded by 8 keep-alive enqueuers (``wrk -t1 -c8``, ``post_tasks.lua``) while
one ``benchmarks.subscribers`` process holds N streams that read: ``/events``
(every task event) with N = 0 (the baseline), 100 and 1,000, and the Mercure
hub with 1,000 streams subscribed with a subscriber JWT to the task topics'
URI template ``{url}/tasks/{id}``. The figure is tasks *finished* per second
(``succeeded`` in ``/stats``) over the load's middle ``seconds``; the
enqueue rate, the server's CPU and RSS, events read per stream (of those
stored by the end), streams the server dropped and the reader's CPU per event
are printed beside it. A pass needs no stream dropped: a dropped stream stops
costing the server, which flatters the ratio (the reader process,
``subscribers.py``, is made cheap so that it keeps up). The configurations are
alternated, the order rotated every round.

Latency: 10,000 Mercure streams (one client process, subscriber JWT) on one
topic; ``events`` updates are published 0.25 s apart, each carrying its
``time.monotonic()``; p50/p99 over every (event, stream) delivery, and the
server's RSS. Before and after, the floor: the same reader against
``sendfloor.py``, a bare process that writes each event to every stream with
one blocking ``send`` each (no HTTP, store or hub): what this machine's kernel
charges for that many loopback writes, which bounds the hub's figure.

With ``--ab REF`` every configuration and the latency run are measured for
both servers (``A``: commit REF, ``B``: the working tree), alternated in the
same rotation; each tree's ratios are against its own no-subscriber runs.
"""

from __future__ import annotations

import selectors
import statistics
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Protocol

import jwt
import orjson

from . import sendfloor
from .abtrees import Tree
from .bench import BenchError, Server, child_env, serve
from .common import RESULT_PREFIX, peak_rss_of, percentile
from .wrkdrive import Drive, backend, drive, mib, rss_of, spread, taskserver_command

KEY = "!ChangeThisMercureHubJWTSecretKey!"
HUB = "/.well-known/mercure"
LATENCY_TOPIC = "https://example.com/fanout"
ENQUEUERS = 8
PUBLISH_INTERVAL = 0.25


class FanoutOptions(Protocol):
    rounds: int
    seconds: float
    subscribers: tuple[int, ...]
    mercure_subscribers: int
    latency_subscribers: int
    events: int
    trees: tuple[Tree, ...]


@dataclass(frozen=True)
class Config:
    kind: str  # "events" or "mercure"
    count: int
    tree: str = ""  # "" (no A/B), "A" or "B"
    path: Path | None = None  # the A tree's package directory

    @property
    def label(self) -> str:
        where = "/events" if self.kind == "events" else "Mercure task topics"
        return f"{self.tree + ' ' if self.tree else ''}{self.count:>5,} {where}"


@dataclass(frozen=True)
class Throughput:
    tasks_per_second: float
    load: Drive
    rss: int | None
    events_per_stream: float
    dropped: int
    connected: int
    stored_events: int
    client_cpu: float
    #: the client's CPU while reading, per event read, in ns
    client_ns_per_event: float
    #: the witness stream's data: lines counted minus its last id (0: nothing lost)
    witness_gap: int


def section(opts: FanoutOptions, tmp: Path) -> None:
    """Run and print the section (see the module docstring)."""
    print()
    print(
        f"F. Fan-out: tasks finished/s under {ENQUEUERS} enqueuers ({backend()} -t1 "
        f"-c{ENQUEUERS}), --task-workers 4, no-op app, while subscribers read; "
        f"{opts.seconds:g}s measured per run, {opts.rounds} rotated rounds"
    )
    configs: list[Config] = []
    for kind, count in [("events", n) for n in opts.subscribers] + [
        ("mercure", opts.mercure_subscribers)
    ]:
        configs += [Config(kind, count, name, path) for name, path in _labels(opts)]
    results: dict[Config, list[Throughput]] = {c: [] for c in configs}
    for round_ in range(opts.rounds):
        shift = round_ % len(configs)
        for index, config in enumerate(configs[shift:] + configs[:shift]):
            db = tmp / f"fan-{round_}-{index}.db"
            results[config].append(_throughput(config, opts.seconds, db, tmp))
    for config in configs:
        runs = results[config]
        base_config = next(c for c in configs if c.tree == config.tree)
        base = results[base_config]
        ratios = [r.tasks_per_second / b.tasks_per_second for r, b in zip(runs, base, strict=True)]
        dropped = sum(r.dropped for r in runs)
        print(
            f"   {config.label:<26} {spread([r.tasks_per_second for r in runs]):>28} tasks/s"
            f"  vs {base_config.label.strip()}: {spread(ratios, '.0%')}"
        )
        print(
            f"{'':30}enqueue {spread([r.load.per_second for r in runs])} req/s; server CPU "
            f"{spread([_cpu_percent(r) for r in runs])}% of a core; RSS "
            f"{spread([(r.rss or 0) / 2**20 for r in runs])} MiB"
        )
        if config.count:
            connected = min(r.connected for r in runs)
            print(
                f"{'':30}events read per stream {spread([r.events_per_stream for r in runs])} "
                f"of {spread([float(r.stored_events) for r in runs])} stored by the end; "
                f"{dropped} streams dropped by the server; {connected:,} connected (fewest); "
                f"subscriber process CPU {spread([r.client_cpu for r in runs], '.1f')} s, "
                f"{spread([r.client_ns_per_event for r in runs])} ns per event read"
            )
            if any(r.witness_gap for r in runs):
                gaps = [r.witness_gap for r in runs]
                print(f"{'':30}WARNING: the witness's data: lines and last id differ by {gaps}")
    _floor(opts, tmp)
    for name, path in _labels(opts):
        _latency(opts, tmp, name, path)
    _floor(opts, tmp)


def _labels(opts: FanoutOptions) -> list[tuple[str, Path | None]]:
    """Each tree's label (none when there is one tree) and where its package is."""
    one = len(opts.trees) == 1
    return [("" if one else tree.label, tree.path) for tree in opts.trees]


def _cpu_percent(r: Throughput) -> float:
    return 100 * (r.load.server_cpu or 0) / r.load.seconds if r.load.seconds else 0.0


def _server(db: Path, streams: int, tmp: Path, *extra: str) -> list[str]:
    return taskserver_command(
        db,
        f"--max-subscribers={streams + 100}",
        f"--max-connections={streams + 200}",
        "--heartbeat=60",
        f"--mercure-publisher-jwt-key={KEY}",
        *extra,
    )


def _stats(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url + "/stats", timeout=30) as response:  # loopback only
        stats: dict[str, Any] = orjson.loads(response.read())
    return stats


def _start_subscribers(
    server: Server, path: str, count: int, token: str, expect: int = 0
) -> subprocess.Popen[bytes]:
    """Start a ``benchmarks.subscribers`` process; return once its streams are open."""
    command = [sys.executable, "-m", "benchmarks.subscribers", server.url, path, str(count)]
    if token:
        command += ["--token", token]
    if expect:
        command += ["--expect", str(expect)]
    with (server.log.parent / "subscribers.log").open("ab") as log:
        proc = subprocess.Popen(
            command, env=child_env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log
        )
    assert proc.stdout is not None
    line = _readline(proc.stdout, 120)
    if not line.startswith(b"READY "):
        proc.kill()
        raise BenchError(f"the subscriber process did not get ready: {line!r}")
    if int(line.split()[1]) < count:
        print(f"   WARNING: only {line.split()[1].decode()} of {count} streams connected")
    return proc


def _readline(stream: IO[bytes], timeout: float) -> bytes:
    with selectors.DefaultSelector() as sel:
        sel.register(stream, selectors.EVENT_READ)
        if not sel.select(timeout):
            return b"(timed out)"
    return stream.readline()


def _finish_subscribers(proc: subprocess.Popen[bytes], timeout: float) -> dict[str, Any]:
    """Close its stdin (it then reports what it read and ends) and take its result,
    waiting up to ``timeout`` (with ``--expect`` it may end by itself first)."""
    assert proc.stdin is not None
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.stdin.close()
        try:
            out, _ = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise BenchError("the subscriber process did not report in time") from None
    for line in out.decode().splitlines():
        if line.startswith(RESULT_PREFIX):
            result: dict[str, Any] = orjson.loads(line[len(RESULT_PREFIX) :])
            return result
    raise BenchError(f"the subscriber process exited {proc.returncode} without a result")


def _throughput(config: Config, seconds: float, db: Path, tmp: Path) -> Throughput:
    extra = ["--task-workers=4", "--app=benchmarks.apps:noop_setup"]
    command = _server(db, config.count, tmp, *extra)
    with serve(
        command, cwd=tmp, log=tmp / "fan.log", timeout=30, env=child_env(config.path)
    ) as server:
        subs = None
        if config.count:
            if config.kind == "events":
                path, token = "/events", ""
            else:
                template = urllib.parse.quote(f"{server.url}/tasks/{{id}}", safe="")
                path = f"{HUB}?topic={template}"
                token = jwt.encode({"mercure": {"subscribe": ["*"]}}, KEY, algorithm="HS256")
            subs = _start_subscribers(server, path, config.count, token)
        try:
            loaded: list[Drive] = []
            load = threading.Thread(
                target=lambda: loaded.append(
                    drive(
                        server.url + "/tasks",
                        connections=ENQUEUERS,
                        seconds=seconds + 2,
                        server_pid=server.proc.pid,
                        cwd=tmp,
                    )
                )
            )
            load.start()
            time.sleep(1)
            t0, s0 = time.monotonic(), _stats(server.url)["succeeded"]
            time.sleep(seconds)
            t1, s1 = time.monotonic(), _stats(server.url)["succeeded"]
            rss = rss_of(server.proc.pid)
            load.join(seconds + 60)
            if not loaded:
                raise BenchError("the enqueuers did not finish")
            stored = int(_stats(server.url).get("last_event_id") or 0)
        finally:
            got = _finish_subscribers(subs, 0) if subs else None
    return Throughput(
        tasks_per_second=(s1 - s0) / (t1 - t0),
        load=loaded[0],
        rss=rss,
        events_per_stream=got["events"] / max(1, got["connected"]) if got else 0.0,
        dropped=got["closed_by_server"] if got else 0,
        connected=got["connected"] if got else 0,
        stored_events=stored,
        client_cpu=got["cpu_seconds"] if got else 0.0,
        client_ns_per_event=got["cpu_reading"] / max(1, got["events"]) * 1e9 if got else 0.0,
        witness_gap=got["witness_events"] - got["witness_last_id"] if got else 0,
    )


def _publish(url: str, events: int) -> None:
    token = jwt.encode({"mercure": {"publish": [LATENCY_TOPIC]}}, KEY, algorithm="HS256")
    for _ in range(events):
        body = urllib.parse.urlencode({"topic": LATENCY_TOPIC, "data": repr(time.monotonic())})
        request = urllib.request.Request(
            url + HUB,
            data=body.encode(),
            headers={"Authorization": f"Bearer {token}"},
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=30) as response:  # loopback only
            if response.status != 200:
                raise BenchError(f"publish answered {response.status}")
        time.sleep(PUBLISH_INTERVAL)


def _latency(opts: FanoutOptions, tmp: Path, tree: str, tree_path: Path | None) -> None:
    n = opts.latency_subscribers
    command = _server(tmp / f"latency{tree}.db", n, tmp, "--task-workers=0")
    log = tmp / "latency.log"
    with serve(command, cwd=tmp, log=log, timeout=30, env=child_env(tree_path)) as server:
        idle_rss = rss_of(server.proc.pid)
        token = jwt.encode({"mercure": {"subscribe": [LATENCY_TOPIC]}}, KEY, algorithm="HS256")
        path = f"{HUB}?topic={urllib.parse.quote(LATENCY_TOPIC, safe='')}"
        started = time.monotonic()
        subs = _start_subscribers(server, path, n, token, expect=opts.events)
        connect = time.monotonic() - started
        connected_rss = rss_of(server.proc.pid)
        _publish(server.url, opts.events)
        got = _finish_subscribers(subs, 10 + opts.events * PUBLISH_INTERVAL)
        peak = peak_rss_of(server.proc.pid)
    label = f"{tree + ' ' if tree else ''}{n:,} Mercure subscribers (subscriber JWT, one client)"
    _print_latency(label, got, opts.events)
    print(
        f"{'':30}connected in {connect:.1f}s; server RSS {mib(idle_rss)} idle, "
        f"{mib(connected_rss)} with the streams, peak {mib(peak)}; client CPU "
        f"{got['cpu_seconds']:.1f}s"
    )


def _floor(opts: FanoutOptions, tmp: Path) -> None:
    """The same reader against ``sendfloor.py``: one blocking ``send`` per stream, no hub."""
    n = opts.latency_subscribers
    command = [sys.executable, "-m", "benchmarks.sendfloor", str(n), str(opts.events)]
    command.append(repr(PUBLISH_INTERVAL))
    with serve(command, cwd=tmp, log=tmp / "floor.log", timeout=30) as server:
        subs = _start_subscribers(server, "/", n, "", expect=opts.events)
        with urllib.request.urlopen(server.url + "/go", timeout=30):  # loopback only
            pass  # the go-ahead: the floor starts sending once this head has arrived
        _until_logged(server, f"{sendfloor.SENT} ", 60 + opts.events * PUBLISH_INTERVAL)
        got = _finish_subscribers(subs, 30)
    _print_latency(f"floor: {n:,} streams, a bare send loop (sendfloor.py)", got, opts.events)


def _until_logged(server: Server, text: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while text not in server.log.read_text(errors="replace"):
        if server.proc.poll() is not None or time.monotonic() > deadline:
            raise BenchError(f"{server.log.name}: no {text!r} within {timeout:g}s")
        time.sleep(0.05)  # polling a log file: there is nothing to wait on


def _print_latency(label: str, got: dict[str, Any], events: int) -> None:
    lat = got["latencies"]
    expected = got["connected"] * events
    per_event = [statistics.median(lat[i::events]) * 1000 for i in range(min(events, len(lat)))]
    print(
        f"   {label}, {events} events {PUBLISH_INTERVAL:g}s apart: delivery p50 "
        f"{percentile(lat, 50) * 1000:.0f} ms, p99 {percentile(lat, 99) * 1000:.0f} ms, max "
        f"{max(lat, default=0) * 1000:.0f} ms ({len(lat):,} of {expected:,} deliveries; "
        f"{got['closed_by_server']} dropped); per-event median {spread(per_event)} ms"
    )
