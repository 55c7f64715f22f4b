"""Where ``POST /tasks`` spends its CPU beyond hello-world's: one server variant at a time.

``python -m benchmarks.httpgap [--conns 16,64] [--seconds 4] [--rounds 2] VARIANT...``
runs each variant freshly started under ``wrk -t1 -cN`` (``post_tasks.lua``, a 1 s
warm-up first), the order flipped every round, and prints one JSON line per run: req/s,
p50, the server's CPU per request split by thread and into user/system
(``/proc/<pid>/task``; ``loop`` is the main thread), and for taskserver the commits
in the run and requests per commit (``/metrics``). Variants:

``hello``      the aiohttp hello-world POST of ``benchmarks.apps``
``stub``       taskserver with ``stub_setup``: its whole HTTP path, no enqueue
``workers0``   taskserver with no task workers: tasks committed, never run
``noop``       taskserver with 4 workers, the ``wrk`` section's server

The differences between adjacent variants decompose the gap; the fall of a part's
CPU per request with requests per commit (compare c=16 with c=64) is its per-commit
share. Needs ``wrk``; wrap it in the machine lock as every load run.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import orjson

from .bench import serve
from .wrkdrive import LUA, WRK_RESULT, hello_command, taskserver_command

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
APPS = {
    "stub": ("benchmarks.apps:stub_setup", 4),
    "workers0": ("benchmarks.apps:noop_setup", 0),
    "noop": ("benchmarks.apps:noop_setup", 4),
}
VARIANTS = ("hello", *APPS)


def thread_cpu(pid: int) -> dict[str, tuple[float, float]]:
    """User and system CPU seconds of each live thread of ``pid`` (``loop``: the main one)."""
    out: dict[str, tuple[float, float]] = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat", encoding="ascii") as stat:
                text = stat.read()
        except OSError:
            continue  # the thread ended
        fields = text[text.rindex(")") + 2 :].split()
        name = "loop" if tid == str(pid) else f"t{tid}"
        out[name] = (int(fields[11]) / CLOCK_TICKS, int(fields[12]) / CLOCK_TICKS)
    return out


def commits(url: str) -> float | None:
    """``taskserver_commits_total`` from ``/metrics`` (open on loopback), None if absent."""
    try:
        with urllib.request.urlopen(url + "/metrics", timeout=5) as response:
            text = response.read().decode()
    except OSError:
        return None
    match = re.search(r"^taskserver_commits_total ([0-9.e+]+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else None


def wrk(url: str, conns: int, seconds: int) -> dict[str, int]:
    """One ``wrk -t1`` run of ``POST url/tasks``: what ``post_tasks.lua`` reports."""
    command = ["wrk", "-t1", f"-c{conns}", f"-d{seconds}s", "-s", str(LUA), url + "/tasks"]
    done = subprocess.run(command, capture_output=True, text=True, check=False).stdout
    match = WRK_RESULT.search(done)
    if not match:
        raise SystemExit(f"wrk printed no result: {done[-400:]}")
    result: dict[str, int] = orjson.loads(match.group(1))
    return result


def measure(variant: str, conns: int, seconds: int, tmp: Path) -> dict[str, object]:
    """Start ``variant``, warm it up, load it for ``seconds`` and return the figures."""
    if variant == "hello":
        command = hello_command()
    else:
        app, workers = APPS[variant]
        db = tmp / f"gap-{time.monotonic_ns()}.db"
        command = taskserver_command(db, f"--task-workers={workers}", f"--app={app}")
    with serve(command, cwd=Path.cwd(), log=tmp / "server.log", timeout=30) as server:
        pid = server.proc.pid
        wrk(server.url, conns, 1)
        commits_before, before = commits(server.url), thread_cpu(pid)
        result = wrk(server.url, conns, seconds)
        after, commits_after = thread_cpu(pid), commits(server.url)
    requests = result["requests"]
    per_thread: dict[str, float] = {}
    for name, (user, system) in after.items():
        user0, system0 = before.get(name, (0.0, 0.0))
        per_thread[name + ".user"] = (user - user0) / requests * 1e6
        per_thread[name + ".sys"] = (system - system0) / requests * 1e6
    total = sum(per_thread.values())
    figures: dict[str, object] = {
        "variant": variant,
        "c": conns,
        "req_per_s": round(requests / (result["duration_us"] / 1e6)),
        "p50_ms": result["p50_us"] / 1000,
        "cpu_us_per_request": round(total, 1),
        "threads": {k: round(v, 1) for k, v in per_thread.items() if v > 0.01 * total},
    }
    if commits_before is not None and commits_after is not None and commits_after > commits_before:
        figures["commits"] = int(commits_after - commits_before)
        figures["requests_per_commit"] = round(requests / (commits_after - commits_before), 1)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.httpgap")
    parser.add_argument("variants", nargs="+", choices=VARIANTS)
    parser.add_argument("--conns", default="16,64", help="connection counts, comma-separated")
    parser.add_argument("--seconds", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()
    connections = [int(c) for c in args.conns.split(",")]
    with tempfile.TemporaryDirectory(prefix="httpgap-") as tmp:
        for round_ in range(args.rounds):
            order = args.variants if round_ % 2 == 0 else args.variants[::-1]
            for conns in connections:
                for variant in order:
                    figures = measure(variant, conns, args.seconds, Path(tmp))
                    print(orjson.dumps(figures).decode(), flush=True)


if __name__ == "__main__":
    main()
