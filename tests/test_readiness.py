"""Liveness (``/healthz``) and readiness (``/readyz``): a server that drains or whose
store cannot write (a full disk) is alive but not ready, and ready again once writes
commit. The write failures are real: the kernel refuses the database's writes.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import resource
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from taskserver import Settings

from .conftest import ServerProcess, wait_for
from .jobs_harness import PROBLEM, Gate, Jobs

#: Data of one task in the tests that fill the disk: a few of them fill what is left.
BIG = "x" * 32_768


@pytest.fixture
async def jobs(settings: Settings, aiohttp_client: Any) -> Any:
    async with Jobs(settings, aiohttp_client) as harness:
        yield harness


async def check_not_ready(response: aiohttp.ClientResponse, detail: str) -> None:
    """A 503 problem+json with Retry-After that says ``detail`` and nothing more."""
    assert response.status == 503, await response.text()
    assert response.content_type == PROBLEM
    assert response.headers["Retry-After"] == "5"
    body = await response.json(content_type=None)
    assert (body["status"], body["title"], body["detail"]) == (503, "Not ready", detail)


async def test_a_healthy_server_is_live_and_ready(jobs: Jobs) -> None:
    client, _ = await jobs.client(task_workers=0)
    live = await client.get("/healthz")
    assert (live.status, await live.json()) == (200, {"status": "ok"})
    ready = await client.get("/readyz")
    assert (ready.status, await ready.json()) == (200, {"status": "ready"})


async def test_a_draining_server_is_live_but_not_ready(jobs: Jobs) -> None:
    gate = Gate()

    async def hold(ctx: Any) -> None:
        await gate.wait()

    client, server = await jobs.client(hold, task_workers=1, grace_period=20.0)
    assert (await client.post("/tasks", json={"data": 1})).status == 202
    await wait_for(lambda: server.stats()["workers"]["busy"] == 1, message="the task runs")
    stopping = asyncio.create_task(server.stop())  # waits for the running task
    await wait_for(lambda: not server.accepting, message="draining")
    await check_not_ready(await client.get("/readyz"), "the server is shutting down")
    assert (await client.get("/healthz")).status == 200
    gate.open()
    await stopping


# --- real write failures ----------------------------------------------------------------


def fsize_limit(pid: int, limit: int) -> None:
    """Set the file size limit (RLIMIT_FSIZE) of process ``pid``; the hard one stays."""
    _, hard = resource.prlimit(pid, resource.RLIMIT_FSIZE)
    resource.prlimit(pid, resource.RLIMIT_FSIZE, (limit, hard))


async def test_readiness_follows_real_write_failures(
    run_server: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    # With RLIMIT_FSIZE at 0 the kernel fails every write() of the process (EFBIG), for
    # root too and with no privilege needed, so this test never has to be skipped.
    # Python ignores SIGXFSZ, so the server sees the error as SQLite sees a dead disk.
    # (test_readiness_on_a_full_filesystem fills a real filesystem where mounting works.)
    server = run_server("--task-workers", "0", "--db", str(tmp_path / "tasks.db"))
    url = server.url
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{url}/readyz") as response:
            assert response.status == 200
        fsize_limit(server.proc.pid, 0)
        try:
            async with session.post(f"{url}/tasks", json={"data": 1}) as response:
                assert response.status == 503, await response.text()
                refusal = await response.json(content_type=None)
            assert "disk I/O error" in refusal["detail"], refusal
            for _ in range(2):  # the check's own probe write fails too
                async with session.get(f"{url}/readyz") as response:
                    await check_not_ready(response, "the store cannot write")
            async with session.get(f"{url}/healthz") as response:
                assert response.status == 200  # alive: a restart would not mend the disk
        finally:
            fsize_limit(server.proc.pid, resource.RLIM_INFINITY)
        # Nothing else writes: the check's probe finds that writes commit again.
        async with session.get(f"{url}/readyz") as response:
            assert response.status == 200, await response.text()
        async with session.post(f"{url}/tasks", json={"data": "after"}) as response:
            assert response.status == 202, await response.text()
            task_id = (await response.json())["id"]
        async with session.get(f"{url}/tasks/{task_id}") as response:
            assert response.status == 200
    assert server.terminate() == 0


HELD_APP = """
import asyncio, pathlib

def setup(server):
    @server.on("task")
    async def task(ctx):
        while not pathlib.Path("release").exists():  # the test creates it
            await asyncio.sleep(0.01)
        return "done"

    @server.on("finish")
    async def finish(ctx, result):
        pass
"""


async def test_a_failing_disk_is_retried_with_backoff_and_loses_no_outcome(
    run_server: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    # A worker's outcome cannot be dropped, so a failed batch carries it to the next
    # one; that next commit was tried at once, 8,000 times a second, each logging a
    # traceback, for as long as the disk refused.
    (tmp_path / "held_app.py").write_text(HELD_APP)
    db = str(tmp_path / "tasks.db")
    server = run_server("--task-workers", "1", "--app", "held_app:setup", "--db", db)
    url = server.url
    async with aiohttp.ClientSession() as session:

        async def get(path: str) -> Any:
            async with session.get(f"{url}{path}") as response:
                assert response.status == 200, await response.text()
                return await response.json()

        async def failed_commits(at_least: int) -> bool:
            return bool((await get("/stats"))["failed_commits"] >= at_least)

        async with session.post(f"{url}/tasks", json={"data": 1}) as response:
            task_id = (await response.json())["id"]

        async def running() -> bool:
            return bool((await get(f"/tasks/{task_id}"))["state"] == "running")

        await wait_for(running, message="the task runs")
        fsize_limit(server.proc.pid, 0)
        try:
            # Timed from before the first failure, so a late look at it cannot shorten
            # the backoff measured: 0.05 + 0.1 + 0.2 s at least (it was milliseconds).
            started = asyncio.get_running_loop().time()
            (tmp_path / "release").touch()  # its outcome is written while writes fail
            await wait_for(lambda: failed_commits(1), message="a failed commit")
            await wait_for(lambda: failed_commits(4), message="three retries")
            assert asyncio.get_running_loop().time() - started >= 0.3
            async with session.get(f"{url}/readyz") as response:
                await check_not_ready(response, "the store cannot write")
        finally:
            fsize_limit(server.proc.pid, resource.RLIM_INFINITY)
        async with session.get(f"{url}/readyz") as response:  # its probe cuts the backoff
            assert response.status == 200, await response.text()
        task = await get(f"/tasks/{task_id}")
        assert (task["state"], task["result"]) == ("succeeded", "done")
    assert server.terminate() == 0


@contextlib.contextmanager
def small_filesystem(path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` mounted at ``path`` (root only); skips where mounting is refused."""
    path.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(directory: Path) -> Path:
    """Write a file in ``directory`` until the filesystem is full; return it."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    chunk = b"\0" * 65536
    try:
        with pytest.raises(OSError, match="No space left") as full:  # noqa: PT012
            while True:
                os.write(fd, chunk)
    finally:
        os.close(fd)
    assert full.value.errno == errno.ENOSPC, full.value
    return filler


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small filesystem needs root")
async def test_readiness_on_a_full_filesystem(tmp_path: Path, aiohttp_client: Any) -> None:
    with small_filesystem(tmp_path / "disk", "8m") as disk:
        settings = Settings(db=str(disk / "tasks.db"), task_workers=0, port=0)
        async with Jobs(settings, aiohttp_client) as harness:
            client, _ = await harness.client()
            assert (await client.get("/readyz")).status == 200
            filler = fill(disk)
            refused = 0
            for _ in range(300):
                response = await client.post("/tasks", json={"data": BIG})
                if response.status == 503:
                    refused += 1
                    break
                assert response.status == 202, await response.text()
            assert refused, "every write was accepted on a full filesystem"
            await check_not_ready(await client.get("/readyz"), "the store cannot write")
            assert (await client.get("/healthz")).status == 200
            filler.unlink()
            assert (await client.get("/readyz")).status == 200
            assert (await client.post("/tasks", json={"data": "after"})).status == 202
            await client.close()
