"""The built wheel: what it holds, what it pulls in, and that it runs once installed.

One wheel is built (from a copy of the source tree, so a stale ``build/`` cannot leak
into it) and installed with its dependencies into a fresh venv outside the repository;
then the installed ``taskserver`` answers ``--version`` and serves the demo for real
requests from a working directory that has no ``taskserver/`` folder to import from.
Building and installing take about 10 s here (pip's cache holds the dependencies after
``scripts/setup``).
"""

from __future__ import annotations

import email.parser
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import tomllib
import urllib.request
import zipfile
from collections.abc import Iterator
from email.message import Message
from pathlib import Path

import pytest

from .conftest import LISTENING, ROOT

PACKAGE = ROOT / "taskserver"
#: The development tools: none may be a runtime requirement of the wheel.
DEV_TOOLS = {"pytest", "mypy", "ruff", "playwright", "schemathesis", "build", "hypothesis"}
#: Left out of the copy that is built: at the top, what is not source; anywhere, bytecode.
TOP_SKIP = shutil.ignore_patterns(".git", ".venv*", "build", "dist", "*.egg-info", "test-output")
ANY_SKIP = shutil.ignore_patterns("__pycache__", "*.pyc")


def _skip(folder: str, names: list[str]) -> set[str]:
    skipped = set(ANY_SKIP(folder, names))
    return skipped | set(TOP_SKIP(folder, names)) if Path(folder) == ROOT else skipped


def source_files() -> set[str]:
    """Every file of the package in the source tree, as a path inside the wheel."""
    return {
        path.relative_to(ROOT).as_posix()
        for path in PACKAGE.rglob("*")
        if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc"
    }


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A wheel built by pip from a clean copy of the repository."""
    work = tmp_path_factory.mktemp("wheel")
    source = work / "src"
    shutil.copytree(ROOT, source, ignore=_skip)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(work), str(source)],
        check=True,
        capture_output=True,
        timeout=120,
    )
    (built,) = work.glob("taskserver-*.whl")
    return built


def metadata(wheel: Path) -> Message:
    """The METADATA of ``wheel``: its headers, and the README as its payload."""
    with zipfile.ZipFile(wheel) as archive:
        (name,) = [n for n in archive.namelist() if n.endswith(".dist-info/METADATA")]
        return email.parser.HeaderParser().parsestr(archive.read(name).decode())


def test_wheel_holds_every_package_file_and_nothing_else(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
    shipped = {n for n in names if n.startswith("taskserver/")}
    source = source_files()
    # The tree is walked, not listed: files moved into sub-folders stay covered.
    assert {"taskserver/py.typed", "taskserver/__init__.py", "taskserver/cli.py"} <= source
    assert any(n.endswith(".html") for n in source)
    assert any(n.endswith(".js") for n in source)
    assert any(n.endswith(".css") for n in source)
    assert sorted(source - shipped) == [], "source files missing from the wheel"
    assert sorted(shipped - source) == [], "files in the wheel that the source tree lacks"
    others = {n.split("/")[0] for n in names - shipped}
    assert others == {wheel.name.split("-")[0] + "-" + wheel.name.split("-")[1] + ".dist-info"}


def test_wheel_requires_the_runtime_dependencies_only(wheel: Path) -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requires = metadata(wheel).get_all("Requires-Dist") or []
    runtime = [r for r in requires if "extra ==" not in r]
    normalized = [re.sub(r"\s+", "", r) for r in runtime]
    assert sorted(normalized) == sorted(
        re.sub(r"\s+", "", d).replace("'", '"') for d in project["dependencies"]
    )
    names = {re.split(r"[\s\[<>=!~;]", r, maxsplit=1)[0].lower() for r in runtime}
    assert names.isdisjoint(DEV_TOOLS), names & DEV_TOOLS
    assert any("pytest" in r and 'extra == "dev"' in r for r in requires)  # kept as an extra


@pytest.fixture(scope="module")
def installed(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with the wheel and its runtime dependencies; returns its bin/."""
    venv = tmp_path_factory.mktemp("venv")
    subprocess.run(
        [sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=60
    )
    python = venv / "bin" / "python"
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "-q", str(wheel)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    return venv / "bin"


def _clean_env(tmp: Path) -> dict[str, str]:
    # No PYTHONPATH and no TASKSERVER_* of the caller: only the installed package counts.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TASKSERVER_", "PYTHON"))}
    return {**env, "PYTHONUNBUFFERED": "1", "HOME": str(tmp)}


def test_installed_venv_has_no_test_tools(installed: Path) -> None:
    listing = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(installed / "python"), "list"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout.lower()
    present = {line.split()[0] for line in listing.splitlines()[2:] if line.strip()}
    assert "taskserver" in present
    assert present.isdisjoint(DEV_TOOLS), present & DEV_TOOLS


def test_installed_wheel_reports_its_version(installed: Path, tmp_path: Path) -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    done = subprocess.run(
        [str(installed / "taskserver"), "--version"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=_clean_env(tmp_path),
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"taskserver {project['version']}"


@pytest.fixture
def installed_server(installed: Path, tmp_path: Path) -> Iterator[str]:
    """The installed ``taskserver run`` (the demo) on a free loopback port; yields its URL."""
    log = tmp_path / "server.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [str(installed / "taskserver"), "run", "--port", "0", "--db", "tasks.db"],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=tmp_path,
            env=_clean_env(tmp_path),
        )
    try:
        deadline = time.monotonic() + 30
        while not (match := LISTENING.search(log.read_text())):
            assert proc.poll() is None, f"exited {proc.returncode}:\n{log.read_text()}"
            assert time.monotonic() < deadline, f"did not start:\n{log.read_text()}"
            time.sleep(0.02)
        yield match.group(1)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, log.read_text()
        assert (tmp_path / "tasks.db").is_file()  # relative --db: the cwd, not the venv
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def _get(url: str) -> tuple[int, str, str]:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.status, response.headers["Content-Type"], response.read().decode()


def test_installed_wheel_serves_the_demo_and_its_static_files(installed_server: str) -> None:
    status, kind, body = _get(installed_server + "/healthz")
    assert (status, kind.split(";")[0]) == (200, "application/json")
    status, kind, page = _get(installed_server + "/")
    assert (status, kind.split(";")[0]) == (200, "text/html")
    assert "<html" in page.lower()
    # Every asset the page links to is served from the installed package.
    assets = re.findall(r'(?:src|href)="(/dashboard/static/[^"]+)"', page)
    assert assets, page[:500]
    for asset in assets:
        status, _, body = _get(installed_server + asset.split("?")[0])
        assert status == 200, asset
        assert body, asset
