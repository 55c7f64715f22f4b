"""Load for the issue-14 sections: ``wrk`` when installed, else the raw Python client.

``drive()`` sends keep-alive ``POST /tasks`` bodies ``{"data": {"n": i}}`` to a
loopback URL from one client thread (``wrk -t1``) and returns what it measured,
with the server's CPU time over the same interval (``/proc/<pid>/stat``
utime + stime). Without ``wrk`` on ``PATH`` it runs ``benchmarks.loadgen
--client raw`` instead, which costs the client more CPU; ``backend()`` says
which one is in use so every section can print it.
"""

from __future__ import annotations

import re
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import orjson

from .bench import BenchError, child_env, run_result
from .common import cpu_seconds_of
from .loadgen import check_loopback

LUA = Path(__file__).with_name("post_tasks.lua")
WRK_RESULT = re.compile(r"^WRK-RESULT (\{.*\})$", re.MULTILINE)


@dataclass(frozen=True)
class Drive:
    """One measured load run."""

    requests: int
    seconds: float
    failed: int
    p50_us: float
    p99_us: float
    #: server CPU seconds (user + system) over the run, None if unreadable
    server_cpu: float | None

    @property
    def per_second(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    @property
    def cpu_us_per_request(self) -> float | None:
        if self.server_cpu is None or not self.requests:
            return None
        return self.server_cpu / self.requests * 1e6


def backend() -> str:
    """``"wrk"`` when wrk is installed, else ``"python"`` (the raw asyncio client)."""
    return "wrk" if shutil.which("wrk") else "python"


def drive(
    url: str,
    *,
    connections: int,
    seconds: float,
    server_pid: int | None = None,
    limit: int = 0,
    cwd: Path,
) -> Drive:
    """Load ``POST url`` for ``seconds``; ``limit`` > 0 (the Python client only) caps requests."""
    check_loopback(url)
    before = cpu_seconds_of(server_pid) if server_pid else None
    if backend() == "wrk":
        result = _wrk(url, connections, seconds)
    else:
        result = _python(url, connections, seconds, limit, cwd)
    after = cpu_seconds_of(server_pid) if server_pid else None
    cpu = after - before if before is not None and after is not None else None
    return Drive(
        requests=result.requests,
        seconds=result.seconds,
        failed=result.failed,
        p50_us=result.p50_us,
        p99_us=result.p99_us,
        server_cpu=cpu,
    )


def _wrk(url: str, connections: int, seconds: float) -> Drive:
    command = [
        "wrk",
        "-t1",
        f"-c{connections}",
        f"-d{max(1, round(seconds))}s",
        "--timeout",
        "10s",
        "-s",
        str(LUA),
        url,
    ]
    try:
        done = subprocess.run(
            command,
            env=child_env(),
            capture_output=True,
            text=True,
            timeout=seconds + 30,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise BenchError(f"wrk ran more than {seconds + 30:g}s") from None
    match = WRK_RESULT.search(done.stdout)
    if not match:
        raise BenchError(f"wrk exited {done.returncode}: {done.stderr.strip()[-400:]}")
    r = orjson.loads(match.group(1))
    failed = r["connect"] + r["read"] + r["write"] + r["status"] + r["timeout"]
    return Drive(
        requests=r["requests"] - r["status"],
        seconds=r["duration_us"] / 1e6,
        failed=failed,
        p50_us=float(r["p50_us"]),
        p99_us=float(r["p99_us"]),
        server_cpu=None,
    )


def _python(url: str, connections: int, seconds: float, limit: int, cwd: Path) -> Drive:
    r = run_result(
        "benchmarks.loadgen",
        [
            "--url",
            url,
            "--client",
            "raw",
            "--concurrency",
            str(connections),
            "--requests",
            str(limit or 10_000_000),
            "--seconds",
            str(seconds),
            "--warmup",
            str(connections),
        ],
        cwd=cwd,
        timeout=seconds + 60,
    )
    failed = r["errors"] + sum(v for k, v in r["statuses"].items() if not k.startswith("2"))
    return Drive(
        requests=r["ok"],
        seconds=r["seconds"],
        failed=failed,
        p50_us=r["p50_us"],
        p99_us=r["p99_us"],
        server_cpu=None,
    )


# --- servers and figures -----------------------------------------------------------------


def taskserver_command(db: Path, *args: str) -> list[str]:
    """``taskserver run`` on a free loopback port with this database and these flags."""
    return [
        sys.executable,
        "-m",
        "taskserver",
        "run",
        "--host=127.0.0.1",
        "--port=0",
        f"--db={db}",
        "--grace-period=1",
        *args,
    ]


def hello_command() -> list[str]:
    """The aiohttp hello-world POST server of ``benchmarks.apps``."""
    return [sys.executable, "-m", "benchmarks.apps", "hello", "--port", "0"]


def rss_of(pid: int) -> int | None:
    """Current resident set size (``VmRSS``) of a live process, in bytes."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def spread(values: Sequence[float], fmt: str = ",.0f") -> str:
    """``median (min..max, n=N)`` of some rounds."""
    if not values:
        return "n/a"
    if len(values) == 1:
        return format(values[0], fmt)
    med = statistics.median(values)
    return (
        f"{format(med, fmt)} ({format(min(values), fmt)}..{format(max(values), fmt)}, "
        f"n={len(values)})"
    )


def mib(value: int | None) -> str:
    return "n/a" if value is None else f"{value / 2**20:.0f} MiB"


def wait_for(predicate: Callable[[], bool], timeout: float) -> bool:
    """Call ``predicate()`` every 10 ms until it is true or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return False
