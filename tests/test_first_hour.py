"""A new user's first hour: the ``taskserver`` command as installed, run as a person would.

Each test runs the console script ``.venv/bin/taskserver`` (not ``python -m``, which
puts the current directory on the import path by itself) in a real subprocess,
with no ``PYTHONPATH`` and no ``TASKSERVER_*`` variables but the ones it sets.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from importlib.metadata import version
from pathlib import Path

import pytest

from .conftest import LISTENING, ROOT

#: The command a user runs, installed beside this interpreter.
TASKSERVER = str(Path(sys.executable).with_name("taskserver"))

APP = """
from taskserver import TaskContext, TaskServer


async def handle(ctx: TaskContext) -> object:
    return {"sent": ctx.data}


async def finished(ctx: TaskContext, result: object) -> None:
    return None


def setup(server: TaskServer) -> None:
    server.on("task", handle)
    server.on("finish", finished)
"""


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without PYTHONPATH and TASKSERVER_* (they hid defects), plus ``extra``."""
    env = {
        k: v for k, v in os.environ.items() if k != "PYTHONPATH" and not k.startswith("TASKSERVER_")
    }
    return {**env, "PYTHONUNBUFFERED": "1", **extra}


class Started:
    """A ``taskserver run`` subprocess that printed its listening address."""

    def __init__(self, proc: subprocess.Popen[bytes], log: Path, url: str) -> None:
        self.proc, self.log, self.url = proc, log, url

    def terminate(self) -> tuple[int, str]:
        """SIGTERM; the exit code and everything the server logged."""
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(30)
        return code, self.log.read_text()


@pytest.fixture
def start(tmp_path: Path) -> Iterator[Callable[..., Started]]:
    procs: list[subprocess.Popen[bytes]] = []

    def factory(*args: str, cwd: Path, env: dict[str, str] | None = None) -> Started:
        log = tmp_path / f"run-{len(procs)}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [TASKSERVER, "run", "--port", "0", "--db", str(tmp_path / "t.db"), *args],
                cwd=cwd,
                env=env if env is not None else clean_env(),
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        procs.append(proc)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            text = log.read_text()
            if match := LISTENING.search(text):
                return Started(proc, log, match.group(1))
            if proc.poll() is not None:
                raise AssertionError(f"taskserver run exited {proc.returncode}:\n{text}")
            time.sleep(0.02)
        raise AssertionError(f"taskserver run did not start:\n{log.read_text()}")

    yield factory
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_app_is_imported_from_the_current_directory(
    start: Callable[..., Started], tmp_path: Path
) -> None:
    package = tmp_path / "mypkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "tasks.py").write_text(APP)
    server = start("--app", "mypkg.tasks:setup", cwd=tmp_path)
    code, log = server.terminate()
    assert code == 0, log


def test_the_readme_example_app_starts_from_the_repository_root(
    start: Callable[..., Started],
) -> None:
    server = start("--app", "examples.mail:setup", cwd=ROOT)
    code, log = server.terminate()
    assert code == 0, log


def test_the_admin_commands_variable_is_no_server_setting(
    start: Callable[..., Started], tmp_path: Path
) -> None:
    env = clean_env(TASKSERVER_URL="http://127.0.0.1:9", TASKSERVER_TASK_WORKERS="1")
    server = start(cwd=tmp_path, env=env)
    code, log = server.terminate()
    assert code == 0, log
    # A misspelt setting is still refused, in one line.
    bad = subprocess.run(
        [TASKSERVER, "run", "--port", "0"],
        cwd=tmp_path,
        env=clean_env(TASKSERVER_TASK_WORKER="1"),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert bad.returncode == 2
    assert bad.stderr.count("\n") == 1
    assert "TASKSERVER_TASK_WORKER" in bad.stderr


def test_run_help_gives_one_default_per_setting(tmp_path: Path) -> None:
    out = subprocess.run(
        [TASKSERVER, "run", "--help"],
        cwd=tmp_path,
        env=clean_env(COLUMNS="200"),
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    options = re.split(r"\n\s+(?=--)", out.split("options:", 1)[1])
    port = next(o for o in options if o.startswith("--port"))
    assert "default: 8080" in port
    for option in options:
        if "--help" not in option:
            assert option.count("default:") == 1, option
    assert "(default: None)" not in out


def test_version() -> None:
    done = subprocess.run(
        [TASKSERVER, "--version"], env=clean_env(), capture_output=True, text=True, timeout=30
    )
    assert (done.returncode, done.stdout.strip()) == (0, f"taskserver {version('taskserver')}")


def test_output_into_a_closed_pipe_ends_quietly(
    start: Callable[..., Started], tmp_path: Path
) -> None:
    server = start(cwd=tmp_path)
    read, write = os.pipe()
    os.close(read)  # as `| head` does once it has read enough: every write gets EPIPE
    try:
        done = subprocess.run(
            [TASKSERVER, "stats", "--url", server.url],
            env=clean_env(),
            stdout=write,
            stderr=subprocess.PIPE,
            text=True,
            timeout=30,
        )
    finally:
        os.close(write)
    # 141 = 128 + SIGPIPE: what the shell reports for `cat big | head`.
    assert (done.returncode, done.stderr) == (141, "")
    assert server.terminate()[0] == 0


def test_serving_static_files_leaves_no_task_thread_behind(
    start: Callable[..., Started], tmp_path: Path
) -> None:
    import urllib.request

    server = start(cwd=tmp_path)
    for path in ("/", "/dashboard", "/dashboard/static/dashboard.js", "/dashboard/static/api.js"):
        with urllib.request.urlopen(server.url + path, timeout=10) as response:
            assert response.status == 200
    code, log = server.terminate()
    assert code == 0, log
    assert "thread" not in log, log


def test_no_setting_takes_the_name_of_a_reserved_variable() -> None:
    from taskserver.config import ENV_PREFIX, FIELDS, NOT_SETTINGS, load_settings

    assert not {ENV_PREFIX + name.upper() for name in FIELDS} & set(NOT_SETTINGS)
    assert load_settings(env={"TASKSERVER_URL": "http://127.0.0.1:9"}).port == 8080
