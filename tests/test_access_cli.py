"""``taskserver run`` is secure by default and serves HTTPS itself: real processes, real TLS."""

from __future__ import annotations

import datetime
import ipaddress
import os
import ssl
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import aiohttp
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from taskserver.web.tls import server_context

from .conftest import ROOT, ServerProcess

TOKEN = "cli-token-0123456789abcdef"


def _run(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """``python -m taskserver run --port 0 ...`` that must exit on its own."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("TASKSERVER_")}
    return subprocess.run(
        [sys.executable, "-m", "taskserver", "run", "--port", "0", *args],
        capture_output=True,
        text=True,
        env={**clean, "PYTHONPATH": str(ROOT), **env},
        cwd=tmp_path,
        timeout=30,
    )


def _one_line(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 2, (done.returncode, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    return lines[0]


def self_signed(tmp_path: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key, as PEM files."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "taskserver test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


# --- secure by default ------------------------------------------------------------------------


def test_an_open_api_on_a_public_address_refuses_to_start(tmp_path: Path) -> None:
    for host in ("0.0.0.0", "::", "example.com"):
        line = _one_line(_run(tmp_path, "--host", host))
        assert "api_token" in line, line
        assert "insecure_no_auth" in line, line


def test_a_short_token_is_refused(tmp_path: Path) -> None:
    line = _one_line(_run(tmp_path, "--api-token", "short"))
    assert "api_token: must be at least 16 characters" in line


# The run_server fixture leaves its log file open (see tests/test_browser.py).
pytestmark = pytest.mark.filterwarnings(r"ignore:unclosed file .*server-\d+\.log:ResourceWarning")


async def test_the_opt_out_is_loud(run_server: Callable[..., ServerProcess]) -> None:
    server = run_server("--host", "0.0.0.0", "--insecure-no-auth", "true")
    assert "insecure_no_auth: the API on 0.0.0.0" in server.log.read_text()
    url = server.url.replace("0.0.0.0", "127.0.0.1")
    async with aiohttp.ClientSession() as session:
        assert (await session.get(f"{url}/stats")).status == 200


async def test_a_token_from_the_environment_guards_a_public_address(
    run_server: Callable[..., ServerProcess],
) -> None:
    server = run_server("--host", "0.0.0.0", env={"TASKSERVER_API_TOKEN": TOKEN})
    url = server.url.replace("0.0.0.0", "127.0.0.1")
    async with aiohttp.ClientSession() as session:
        response = await session.get(f"{url}/stats")
        assert response.status == 401
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
        headers = {"Authorization": f"Bearer {TOKEN}"}
        assert (await session.get(f"{url}/stats", headers=headers)).status == 200
        assert (await session.get(f"{url}/healthz")).status == 200
        # The dashboard's page and files are public; what they show is not. No framing.
        page = await session.get(f"{url}/")
        assert page.status == 200
        assert page.headers["X-Frame-Options"] == "DENY"
        assert page.headers["Content-Security-Policy"] == "frame-ancestors 'none'"


async def test_an_apps_authorizer_counts_as_a_credential(
    run_server: Callable[..., ServerProcess],
) -> None:
    server = run_server("--host", "0.0.0.0", "--app", "tests.helpers:setup_with_authorizer")
    url = server.url.replace("0.0.0.0", "127.0.0.1")
    async with aiohttp.ClientSession() as session:
        assert (await session.get(f"{url}/stats")).status == 403
        assert (await session.get(f"{url}/stats", headers={"X-User": "admin"})).status == 200


def test_the_admin_commands_send_the_token(
    run_server: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    server = run_server(env={"TASKSERVER_API_TOKEN": TOKEN})
    clean = {k: v for k, v in os.environ.items() if not k.startswith("TASKSERVER_")}

    def stats(**env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "taskserver", "stats", "--url", server.url, "--json"],
            capture_output=True,
            text=True,
            env={**clean, "PYTHONPATH": str(ROOT), **env},
            timeout=30,
        )

    refused = stats()
    assert refused.returncode == 1
    assert "HTTP 401" in refused.stderr
    done = stats(TASKSERVER_API_TOKEN=TOKEN)
    assert done.returncode == 0, done.stderr
    assert '"workers"' in done.stdout


# --- TLS ------------------------------------------------------------------------------------------


async def test_https_with_a_token(run_server: Callable[..., ServerProcess], tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path)
    server = run_server(
        "--tls-cert", str(cert), "--tls-key", str(key), env={"TASKSERVER_API_TOKEN": TOKEN}
    )
    assert server.url.startswith("https://127.0.0.1:")
    trust = ssl.create_default_context(cafile=str(cert))
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=trust)) as session:
        response = await session.post(f"{server.url}/tasks", json={"data": 1}, headers=headers)
        assert response.status == 202
        assert (await session.get(f"{server.url}/tasks/1", headers=headers)).status == 200
        assert (await session.get(f"{server.url}/tasks/1")).status == 401
        # The topic and the hub's Link say https.
        assert (await response.json())["topic"].startswith("https://127.0.0.1:")
        assert response.headers["Link"].startswith("<https://127.0.0.1:")
        # The login cookie is Secure over TLS.
        response = await session.post(
            f"{server.url}/session", json={"token": TOKEN}, headers={"Origin": server.url}
        )
        assert response.status == 200
        assert "Secure" in [p.strip() for p in response.headers["Set-Cookie"].split(";")]
    # Plain HTTP on the TLS port gets nothing.
    async with aiohttp.ClientSession() as session:
        plain = server.url.replace("https://", "http://")
        with pytest.raises(aiohttp.ClientError):
            await session.get(f"{plain}/healthz")


def test_tls_1_2_at_least(tmp_path: Path) -> None:
    context = server_context(*map(str, self_signed(tmp_path)))
    assert context is not None
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2
    assert server_context("", "") is None


def test_unusable_tls_files_exit_2(tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path)
    line = _one_line(_run(tmp_path, "--tls-cert", str(cert)))
    assert "tls_key is not set" in line
    line = _one_line(_run(tmp_path, "--tls-cert", "missing.pem", "--tls-key", str(key)))
    assert "tls_cert: cannot read missing.pem" in line
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    line = _one_line(_run(tmp_path, "--tls-cert", str(garbage), "--tls-key", str(key)))
    assert "not a PEM certificate" in line
    (tmp_path / "other").mkdir()
    other_cert, _ = self_signed(tmp_path / "other")
    line = _one_line(_run(tmp_path, "--tls-cert", str(other_cert), "--tls-key", str(key)))
    assert "not a PEM certificate and its unencrypted private key" in line
