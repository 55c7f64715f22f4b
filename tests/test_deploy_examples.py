"""examples/deploy/: the Dockerfile, the systemd unit and the nginx site agree with the code.

Docker cannot run here, so the Dockerfile is read and its settings are given to a real
``taskserver run``. The unit goes through ``systemd-analyze verify`` and the nginx site
through ``nginx -t`` (Debian's binary; .ci/run unpacks it when nginx is not installed).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
import zipfile
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Any

import pytest

from taskserver import Settings, load_settings

from .conftest import ROOT, ServerProcess
from .test_access_cli import self_signed
from .test_packaging import metadata, source_files

DEPLOY = ROOT / "examples" / "deploy"
#: How long open requests get on shutdown before running tasks get grace_period
#: (``shutdown_timeout`` in taskserver's ``_serve``): a stop timeout must cover both.
OPEN_REQUESTS_DRAIN = 5.0
STOP_BUDGET = Settings().grace_period + OPEN_REQUESTS_DRAIN


def _dockerfile() -> list[tuple[str, str]]:
    """The Dockerfile's instructions of the final stage, as (INSTRUCTION, arguments)."""
    text = re.sub(r"\\\n", " ", (DEPLOY / "Dockerfile").read_text())
    lines = [line.strip() for line in text.splitlines()]
    steps = [tuple(line.split(None, 1)) for line in lines if line and not line.startswith("#")]
    last_from = max(i for i, step in enumerate(steps) if step[0] == "FROM")
    return [(step[0].upper(), step[1]) for step in steps[last_from:]]


def _docker_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for instruction, args in _dockerfile():
        if instruction == "ENV":
            for part in shlex.split(args):
                name, value = part.split("=", 1)
                env[name] = value
    return env


def test_dockerfile_runs_as_a_user_with_the_database_on_the_volume() -> None:
    steps = _dockerfile()
    final = dict(steps)
    assert final["FROM"] == "python:3.11-slim"
    user = final["USER"].split(":")[0]
    assert user not in {"root", "0"}
    env = _docker_env()
    db = PurePosixPath(env["TASKSERVER_DB"])
    assert db.parent.as_posix() in final["VOLUME"]
    assert final["WORKDIR"] == db.parent.as_posix()
    assert final["EXPOSE"] == env["TASKSERVER_PORT"]
    assert final["STOPSIGNAL"] == "SIGTERM"
    assert final["CMD"].startswith("["), "exec form: taskserver must be PID 1 to get SIGTERM"
    # Every TASKSERVER_* the image sets is a real setting with a valid value.
    load_settings(config_file=None, env={**env, "TASKSERVER_API_TOKEN": "x" * 32})
    # The documented stop timeout outlasts the graceful stop.
    text = (DEPLOY / "Dockerfile").read_text()
    timeouts = [float(t) for t in re.findall(r"docker stop -t (\d+)", text)]
    assert timeouts, "the Dockerfile says which docker stop -t to use"
    assert min(timeouts) > STOP_BUDGET
    assert "TASKSERVER_API_TOKEN" in text


def test_docker_build_stage_copies_enough_to_build_the_wheel(tmp_path: Path) -> None:
    # What the build stage COPYs is all the wheel is built from: it must be enough.
    text = re.sub(r"\\\n", " ", (DEPLOY / "Dockerfile").read_text())
    build_stage = text.split("\nFROM ")[1]
    context = tmp_path / "context"
    context.mkdir()
    for sources in re.findall(r"^COPY (?!--from)(.+) \S+$", build_stage, re.MULTILINE):
        for source in sources.split():
            origin = ROOT / source.rstrip("/")
            if origin.is_dir():
                shutil.copytree(
                    origin, context / source, ignore=shutil.ignore_patterns("__pycache__")
                )
            else:
                shutil.copy2(origin, context / source)
    assert (context / "taskserver").is_dir()
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "-q",
            "-w",
            str(tmp_path),
            str(context),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    (wheel,) = tmp_path.glob("taskserver-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        shipped = {n for n in archive.namelist() if n.startswith("taskserver/")}
    assert shipped == source_files()
    # setuptools only warns when the readme is missing: the description shows it.
    description = str(metadata(wheel).get_payload())
    assert description.strip() == (ROOT / "README.md").read_text().strip()


def test_docker_settings_refuse_to_start_without_a_token(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TASKSERVER_")}
    settings = {**_docker_env(), "TASKSERVER_DB": str(tmp_path / "t.db"), "TASKSERVER_PORT": "0"}
    assert settings["TASKSERVER_HOST"] == "0.0.0.0"
    done = subprocess.run(  # refused before it binds anything
        [sys.executable, "-m", "taskserver", "run"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**env, **settings, "PYTHONPATH": str(ROOT)},
        timeout=60,
    )
    assert done.returncode == 2, done.stderr
    assert "api_token" in done.stderr


def test_docker_healthcheck_path_is_open_with_a_token_set(
    run_server: Callable[..., ServerProcess],
) -> None:
    check = dict(_dockerfile())["HEALTHCHECK"]
    paths = re.findall(r"/[a-z]+z\b", check)
    assert paths == ["/healthz"], check
    server = run_server(env={"TASKSERVER_API_TOKEN": "t" * 32})
    with urllib.request.urlopen(server.url + paths[0], timeout=10) as response:
        assert response.status == 200  # no Authorization header: a probe has no token
    with pytest.raises(urllib.error.HTTPError) as refused:  # while the API needs it
        urllib.request.urlopen(server.url + "/tasks", timeout=10)
    assert refused.value.code == 401
    refused.value.close()


def _unit() -> dict[str, list[str]]:
    values: dict[str, list[str]] = {}
    for line in (DEPLOY / "taskserver.service").read_text().splitlines():
        if "=" in line and not line.lstrip().startswith(("#", ";", "[")):
            key, value = line.split("=", 1)
            values.setdefault(key.strip(), []).append(value.strip())
    return values


def _unit_env() -> dict[str, str]:
    return dict(item.split("=", 1) for item in _unit().get("Environment", []))


def test_systemd_unit_settings() -> None:
    unit = {key: values[-1] for key, values in _unit().items()}
    assert unit["User"] not in {"root", "0"}
    assert unit["KillSignal"] == "SIGTERM"
    assert float(unit["TimeoutStopSec"]) > STOP_BUDGET
    assert unit["Restart"] == "on-failure"
    assert unit["NoNewPrivileges"] == "yes"
    assert unit["ProtectSystem"] == "strict"
    assert unit["EnvironmentFile"].startswith("/etc/")
    env = _unit_env()
    db = PurePosixPath(env["TASKSERVER_DB"])
    assert db.parent == PurePosixPath("/var/lib") / unit["StateDirectory"]
    assert db.parent.as_posix() in unit["ReadWritePaths"].split()
    assert unit["WorkingDirectory"] == db.parent.as_posix()
    assert unit["ExecStart"].split()[1:] == ["run"]
    load_settings(config_file=None, env=env)  # real settings, valid values


def test_systemd_unit_verifies(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("no systemd-analyze")
    # verify wants an executable ExecStart: the one of this venv stands in for /opt's.
    text = (DEPLOY / "taskserver.service").read_text()
    executable = _unit()["ExecStart"][-1].split()[0]
    unit = tmp_path / "taskserver.service"
    unit.write_text(text.replace(executable, str(Path(sys.executable).with_name("taskserver"))))
    done = subprocess.run(
        [analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60
    )
    # verify exits 0 on an unknown key or a bad value, and says so: no output is the pass.
    assert (done.returncode, done.stdout + done.stderr) == (0, "")


def _nginx() -> str | None:
    return (
        shutil.which("nginx")
        or shutil.which("nginx", path="/usr/sbin")
        or os.environ.get("TEST_NGINX")
    )


def _nginx_site() -> str:
    return (DEPLOY / "nginx.conf").read_text()


def _nginx_location(site: str, uri: str) -> str:
    """The body of the location block nginx picks for ``uri``: the longest prefix, unless a
    regex (``~``, tried in order) matches."""
    blocks: list[tuple[str, str]] = re.findall(r"location ([^{]+)\{([^}]*)\}", site)
    prefixes = [(m.strip(), b) for m, b in blocks if not m.startswith("~")]
    regexes = [(m.strip()[1:].strip(), b) for m, b in blocks if m.startswith("~")]
    longest = max((p for p in prefixes if uri.startswith(p[0])), key=lambda p: len(p[0]))
    for pattern, body in regexes:
        if re.search(pattern, uri):
            return body
    return longest[1]


def test_nginx_site_matches_taskserver(run_server: Callable[..., ServerProcess]) -> None:
    site = _nginx_site()
    unit_env = _unit_env()
    upstream = re.search(r"upstream taskserver \{\s*server ([\d.]+):(\d+);", site)
    assert upstream is not None
    assert (upstream[1], upstream[2]) == (unit_env["TASKSERVER_HOST"], unit_env["TASKSERVER_PORT"])
    assert re.search(r"listen 443 ssl http2;|http2 on;", site), "HTTP/2 to browsers"
    for header in ("X-Forwarded-For", "X-Forwarded-Proto", "X-Forwarded-Host"):
        assert re.search(rf"proxy_set_header {header} +\$", site), header
    assert "$proxy_add_x_forwarded_for" not in site, "appending keeps what the client forged"
    # The streams are the routes that answer text/event-stream, as the served document says;
    # each, with an API prefix or not, reaches a location that is unbuffered and waits
    # longer than a few heartbeats for the next byte.
    server = run_server()
    with urllib.request.urlopen(server.url + "/openapi.json", timeout=10) as response:
        document = json.load(response)
    streams = {
        path
        for path, item in document["paths"].items()
        for operation in item.values()
        if "text/event-stream" in json.dumps(operation.get("responses", {}))
    }
    assert "/events" in streams, streams
    for path in sorted(streams):
        for prefix in ("", "/jobs"):
            url = (path if path.startswith("/.well-known/") else prefix + path).replace("{id}", "7")
            body = _nginx_location(site, url)
            assert "proxy_buffering off;" in body, url
            timeout = re.search(r"proxy_read_timeout (\d+)([smh]);", body)
            assert timeout is not None, url
            seconds = int(timeout[1]) * {"s": 1, "m": 60, "h": 3600}[timeout[2]]
            assert seconds > 4 * Settings().heartbeat, url
    assert "proxy_buffering off;" not in _nginx_location(site, "/tasks/7"), "only streams"
    body_limit = re.search(r"client_max_body_size (\d+)m;", site)
    assert body_limit is not None
    assert int(body_limit[1]) * 1024 * 1024 > Settings().max_body_bytes


def test_nginx_accepts_the_site(tmp_path: Path) -> None:
    nginx = _nginx()
    if nginx is None:
        if os.environ.get("CI"):
            pytest.fail("CI is set: no nginx binary (.ci/run unpacks Debian's)", pytrace=False)
        pytest.skip("no nginx binary: apt-get install nginx to check examples/deploy/nginx.conf")
    cert, key = self_signed(tmp_path)
    site = re.sub(r"ssl_certificate +\S+;", f"ssl_certificate {cert};", _nginx_site())
    site = re.sub(r"ssl_certificate_key +\S+;", f"ssl_certificate_key {key};", site)
    (tmp_path / "site.conf").write_text(site)
    temp = "\n".join(
        f"    {kind}_temp_path {tmp_path}/{kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    (tmp_path / "nginx.conf").write_text(
        f"error_log stderr;\npid {tmp_path}/nginx.pid;\nevents {{}}\n"
        f"http {{\n    access_log off;\n{temp}\n    include {tmp_path}/site.conf;\n}}\n"
    )
    done = subprocess.run(
        [
            nginx,
            "-t",
            "-q",
            "-e",
            "stderr",
            "-p",
            str(tmp_path),
            "-c",
            str(tmp_path / "nginx.conf"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert "[warn]" not in done.stderr, done.stderr


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_behind_a_real_nginx(tmp_path: Path, run_server: Callable[..., ServerProcess]) -> None:
    """The site, run by a real nginx in front of a real taskserver with the unit's
    trusted_proxies: taskserver sees the URL the browser used, never the forged client,
    and an event reaches the browser at once through the proxy."""
    nginx = _nginx()
    if nginx is None:
        if os.environ.get("CI"):
            pytest.fail("CI is set: no nginx binary (.ci/run unpacks Debian's)", pytrace=False)
        pytest.skip("no nginx binary: apt-get install nginx (or set TEST_NGINX)")
    token = "n" * 32
    env = {
        "TASKSERVER_TRUSTED_PROXIES": _unit_env()["TASKSERVER_TRUSTED_PROXIES"],
        "TASKSERVER_API_TOKEN": token,
    }
    server = run_server("--log-format", "json", "--access-log", "true", env=env)
    upstream = server.url.removeprefix("http://")
    port = _free_port()
    cert, key = self_signed(tmp_path)
    site = _nginx_site()
    site = re.sub(r"ssl_certificate +\S+;", f"ssl_certificate {cert};", site)
    site = re.sub(r"ssl_certificate_key +\S+;", f"ssl_certificate_key {key};", site)
    site = re.sub(r"(upstream taskserver \{\s*server )[\d.:]+;", rf"\g<1>{upstream};", site)
    site = site.replace("listen 443 ssl http2;", f"listen 127.0.0.1:{port} ssl http2;")
    site = re.sub(r"\n\s*listen (\[::\]:)?(80|443)[^;]*;", "", site)  # the others
    site = re.sub(r"server \{\s*server_name [^;]+;\s*return 301[^}]*\}", "", site)
    temp = "\n".join(
        f"    {kind}_temp_path {tmp_path}/{kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    (tmp_path / "nginx.conf").write_text(
        f"error_log stderr;\npid {tmp_path}/nginx.pid;\nevents {{}}\n"
        f"http {{\n    access_log off;\n{temp}\n{site}\n}}\n"
    )
    errors = tmp_path / "nginx.log"
    with errors.open("w") as out:  # nginx keeps its own copy of the descriptor
        proxy = subprocess.Popen(
            [nginx, "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf"), "-g", "daemon off;"],
            stderr=out,
        )
    try:
        deadline = time.monotonic() + 10
        while True:
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    break
            assert proxy.poll() is None, errors.read_text()
            assert time.monotonic() < deadline, "nginx did not listen"
            time.sleep(0.02)
        tls = ssl.create_default_context(cafile=str(cert))
        base = f"https://127.0.0.1:{port}"
        browser = {
            "Host": "tasks.example.com",
            "Authorization": f"Bearer {token}",
            "X-Forwarded-For": "6.6.6.6",  # forged by the client: nginx overwrites it
        }

        def fetch(path: str, body: bytes | None = None) -> Any:
            headers = {**browser, **({"Content-Type": "application/json"} if body else {})}
            request = urllib.request.Request(base + path, data=body, headers=headers)
            return urllib.request.urlopen(request, timeout=10, context=tls)

        with fetch("/stats") as response:
            assert response.status == 200
            # No base_url: the hub's Link is built on what nginx forwarded (the port too:
            # this nginx listens on a test port, not 443).
            link = response.headers["Link"]
            assert f"<https://tasks.example.com:{port}/.well-known/mercure>" in link
        with fetch("/events") as stream:
            assert stream.headers["Content-Type"].startswith("text/event-stream")
            assert stream.readline().startswith(b":")  # the opening comment, unbuffered
            with fetch("/tasks", json.dumps({"data": "via nginx"}).encode()) as created:
                task_id = json.load(created)["id"]
            while not (line := stream.readline()).startswith(b"data:"):
                assert line, "the stream ended"
            assert json.loads(line[5:])["task_id"] == task_id
    finally:
        proxy.terminate()
        proxy.wait(10)
    assert server.terminate() == 0
    lines = [json.loads(line) for line in server.log.read_text().splitlines()]
    access = [line for line in lines if line["logger"] == "taskserver.access"]
    assert {line["path"] for line in access} >= {"/stats", "/tasks"}  # a stream: at its end
    assert {line["client"] for line in access} == {"127.0.0.1"}, "the forged one not believed"
