"""A private PostgreSQL server for the tests, started and stopped by the tests themselves.

``PostgresServer.start()`` runs ``initdb`` into a fresh temporary directory and starts
``postgres`` as a child process on a free loopback port (TCP on 127.0.0.1 only, its unix
socket inside the temporary directory), waits until it accepts connections (``pg_isready``
against a deadline, failing at once if the child exits), and ``stop()`` ends it by its pid
(SIGINT: fast shutdown; SIGKILL past a deadline) and removes the directory. No system
service, no configuration file of the machine is touched.

Authentication over TCP is scram-sha-256 with a random password (in the DSN), so a test
can also show what a wrong password does; the unix socket (in a 0700 directory) trusts.

PostgreSQL refuses to run as root: under root, ``initdb`` and ``postgres`` run as the
``postgres`` system user (Debian's package creates it; created here if absent) through
``setpriv``, which execs in place, so the child's pid is the postmaster's own. The child
also gets a parent-death signal (SIGINT), so a test run that is killed outright does not
leave a server behind (only its temporary directory).

Every test shares one server; isolation is a fresh database per test
(``create_database``). Terminating a backend (``pg_terminate_backend``) is harmless to
the other tests, but a backend killed with SIGKILL counts as a crash to PostgreSQL: the
postmaster ends every other backend and reinitialises shared memory, so every test's
connections would drop. Tests must never ``kill -9`` a backend.
"""

from __future__ import annotations

import glob
import itertools
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

#: The database superuser the DSNs name (initdb's ``-U``), whatever the OS user is.
SUPERUSER = "postgres"
#: The OS user that runs the server when the tests run as root.
OS_USER = "postgres"
#: Beyond the defaults: small memory, room for multi-node tests' connection pools.
SERVER_SETTINGS = {
    "listen_addresses": "127.0.0.1",
    "max_connections": "200",
    "shared_buffers": "32MB",
    "dynamic_shared_memory_type": "posix",
    "log_min_messages": "warning",
    "log_connections": "off",
}
START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
_VERSION = re.compile(r"/(\d+)(?:\.\d+)?/bin$")


def find_bindir(
    pg_config: str | None = "pg_config",
    lib_glob: str = "/usr/lib/postgresql/*/bin",
    path: str | None = None,
) -> Path | None:
    """The directory holding ``initdb``, ``postgres`` and ``pg_isready``, or ``None``.

    Tried in order: ``pg_config --bindir`` (Debian's libpq-dev ships a pg_config whose
    bindir may hold no server), the newest ``/usr/lib/postgresql/N/bin``, then ``PATH``.
    """

    def usable(directory: Path) -> bool:
        return all((directory / name).is_file() for name in ("initdb", "postgres", "pg_isready"))

    if pg_config is not None and (found := shutil.which(pg_config, path=path)):
        try:
            out = subprocess.run(
                [found, "--bindir"], capture_output=True, text=True, timeout=10, check=True
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            out = ""
        if out and usable(Path(out)):
            return Path(out)

    def version(directory: str) -> int:
        match = _VERSION.search(directory)
        return int(match.group(1)) if match else 0

    for directory in sorted(glob.glob(lib_glob), key=version, reverse=True):
        if usable(Path(directory)):
            return Path(directory)
    if found := shutil.which("initdb", path=path):
        parent = Path(found).resolve().parent  # /usr/local/bin/initdb may be a symlink
        if usable(parent):
            return parent
    return None


def free_port() -> int:
    """A loopback TCP port nobody listens on right now (``start`` retries if it is taken)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _os_user() -> pwd.struct_passwd | None:
    """Under root: the unprivileged user that runs the server (created if missing)."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam(OS_USER)
    except KeyError:
        command = ["useradd", "--system", "--user-group", "--no-create-home"]
        command += ["--home-dir", "/nonexistent", "--shell", "/usr/sbin/nologin", OS_USER]
        subprocess.run(command, check=True, capture_output=True)
        return pwd.getpwnam(OS_USER)


@dataclass
class PostgresServer:
    """One private server. ``dsn`` names its maintenance database ``postgres``."""

    bindir: Path
    root: Path
    port: int
    password: str
    pid: int
    proc: subprocess.Popen[bytes]
    host: str = "127.0.0.1"
    user: str = SUPERUSER
    created: list[str] = field(default_factory=list)
    _names: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    @property
    def dsn(self) -> str:
        return self.dsn_for("postgres")

    @property
    def log(self) -> Path:
        return self.root / "postgres.log"

    def dsn_for(self, database: str, *, password: str | None = None) -> str:
        """A ``postgresql://`` URL for ``database`` (``password`` overrides the real one)."""
        secret = self.password if password is None else password
        return f"postgresql://{self.user}:{secret}@{self.host}:{self.port}/{database}"

    def _next_name(self) -> str:
        name = f"test_{next(self._names)}"
        self.created.append(name)
        return name

    def create_database(self) -> str:
        """A fresh empty database (``CREATE DATABASE test_<n>``); returns its DSN.

        Synchronous (``psql``), for sync tests and fixtures; async code uses
        ``create_database_async`` so as not to hold its event loop.
        """
        name = self._next_name()
        self.psql(f"CREATE DATABASE {name}")
        return self.dsn_for(name)

    async def create_database_async(self) -> str:
        """``create_database`` over asyncpg, without blocking the running loop."""
        import asyncpg

        name = self._next_name()
        connection = await asyncpg.connect(self.dsn)
        try:
            await connection.execute(f"CREATE DATABASE {name}")
        finally:
            await connection.close()
        return self.dsn_for(name)

    def psql(self, *commands: str) -> str:
        """Run each SQL command on the maintenance database (each in its own transaction)."""
        args = [str(self.bindir / "psql"), "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1"]
        args += ["-h", self.host, "-p", str(self.port), "-U", self.user, "-d", "postgres"]
        for command in commands:
            args += ["-c", command]
        env = {**os.environ, "PGPASSWORD": self.password, "PGCONNECT_TIMEOUT": "10"}
        result = subprocess.run(args, capture_output=True, text=True, env=env, timeout=60)
        if result.returncode != 0:
            raise RuntimeError(f"psql {commands!r} failed: {result.stderr.strip()}")
        return result.stdout

    def drop_created(self) -> None:
        """Drop every database ``create_database`` made, closing their connections."""
        if self.created:
            self.psql(*(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)" for name in self.created))
            self.created.clear()

    def stop(self) -> None:
        """Fast shutdown by pid (SIGINT), SIGKILL past ``STOP_TIMEOUT``; remove the directory."""
        try:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGINT)
                try:
                    self.proc.wait(STOP_TIMEOUT)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(STOP_TIMEOUT)
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    @classmethod
    def start(cls, bindir: Path, *, attempts: int = 3) -> PostgresServer:
        """``initdb`` into a new temporary directory and start a server there.

        Raises ``RuntimeError`` with the server's log if it does not come up. A port taken
        between ``free_port`` and the server's bind is retried with another one.
        """
        user = _os_user()
        root = Path(tempfile.mkdtemp(prefix="taskserver-pg-"))
        try:
            if user is not None:
                os.chown(root, user.pw_uid, user.pw_gid)
            password = secrets.token_urlsafe(24)
            _initdb(bindir, root, password, user)
            for attempt in range(attempts):
                server = _launch(bindir, root, password, user)
                if server is not None:
                    return server
                if attempt == attempts - 1 or "could not bind" not in _read(root / "postgres.log"):
                    break
            raise RuntimeError(f"PostgreSQL did not start:\n{_read(root / 'postgres.log')}")
        except BaseException:
            shutil.rmtree(root, ignore_errors=True)
            raise


def _as_user(user: pwd.struct_passwd | None, *, pdeathsig: bool = False) -> list[str]:
    """The command prefix that runs a program as ``user`` (in place: setpriv execs)."""
    prefix: list[str] = []
    if user is not None:
        prefix = ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--clear-groups"]
    elif pdeathsig and shutil.which("setpriv"):
        prefix = ["setpriv"]
    if prefix and pdeathsig:
        prefix.append("--pdeathsig=INT")
    return [*prefix, "--"] if prefix else []


def _env(user: pwd.struct_passwd | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["LC_ALL"] = env["LANG"] = "C.UTF-8"
    if user is not None:
        env.update(HOME=str(Path(tempfile.gettempdir())), USER=user.pw_name, LOGNAME=user.pw_name)
    return env


def _initdb(bindir: Path, root: Path, password: str, user: pwd.struct_passwd | None) -> None:
    pwfile = root / "pwfile"
    pwfile.write_text(password + "\n")
    pwfile.chmod(0o600)
    if user is not None:
        os.chown(pwfile, user.pw_uid, user.pw_gid)
    args = [str(bindir / "initdb"), "-D", str(root / "data"), "-U", SUPERUSER]
    args += [f"--pwfile={pwfile}", "--auth-host=scram-sha-256", "--auth-local=trust"]
    args += ["--encoding=UTF8", "--locale=C.UTF-8", "--no-sync", "--no-instructions"]
    result = subprocess.run(
        _as_user(user) + args, capture_output=True, text=True, env=_env(user), timeout=120
    )
    pwfile.unlink()
    if result.returncode != 0:
        raise RuntimeError(f"initdb failed ({result.returncode}):\n{result.stdout}{result.stderr}")


def _launch(
    bindir: Path, root: Path, password: str, user: pwd.struct_passwd | None
) -> PostgresServer | None:
    """Start ``postgres`` on a free port and wait until it is ready; ``None`` if it exited."""
    port = free_port()
    settings = {**SERVER_SETTINGS, "port": str(port), "unix_socket_directories": str(root)}
    args = [str(bindir / "postgres"), "-D", str(root / "data")]
    for name, value in settings.items():
        args += ["-c", f"{name}={value}"]
    with (root / "postgres.log").open("ab") as log:  # the child keeps its own descriptor
        proc = subprocess.Popen(
            _as_user(user, pdeathsig=True) + args,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=_env(user),
            start_new_session=True,  # a ^C in the terminal goes to pytest, not to the server
        )
    server = PostgresServer(bindir, root, port, password, proc.pid, proc)
    deadline = time.monotonic() + START_TIMEOUT
    ready = [str(bindir / "pg_isready"), "-q", "-h", "127.0.0.1", "-p", str(port), "-t", "1"]
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return None
        # 0: accepting; 1: rejecting (still starting up); 2: no response yet.
        if subprocess.run(ready, env=_env(None), timeout=10).returncode == 0:
            return server
        time.sleep(0.02)
    proc.kill()
    proc.wait(STOP_TIMEOUT)
    log_text = _read(root / "postgres.log")
    raise RuntimeError(f"PostgreSQL not ready after {START_TIMEOUT}s:\n{log_text}")


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""
