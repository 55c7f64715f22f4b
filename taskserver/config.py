"""One frozen ``Settings`` object, and where its values come from.

Precedence, lowest first: the defaults below < the TOML file
(``config/taskserver.toml`` when it exists, or the one named by ``--config`` /
``TASKSERVER_CONFIG``) < ``TASKSERVER_<NAME>`` environment variables < CLI flags.
Unknown keys and bad values raise ``ConfigError`` naming the key and its source.
The ``TASKSERVER_*`` variables in ``NOT_SETTINGS`` are not settings: the server
leaves them alone, so no setting may take one of their names.
Every field's help text is also its ``--flag`` help, so ``--help`` stays complete.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from .credentials import ApiToken, check_api_token, parse_api_tokens
from .errors import ConfigError

DEFAULT_CONFIG_FILE = Path("config/taskserver.toml")
ENV_PREFIX = "TASKSERVER_"
#: ``TASKSERVER_*`` variables that are not settings, and who reads them. A new one
#: goes here, or ``taskserver run`` refuses it as an unknown setting.
CONFIG_ENV = ENV_PREFIX + "CONFIG"
URL_ENV = ENV_PREFIX + "URL"
NOT_SETTINGS = {
    CONFIG_ENV: "the settings file to read (see load_settings)",
    URL_ENV: "the server the admin commands talk to (taskserver/admin.py)",
}

Check = Callable[[Any], str | None]


def _range(lo: float, hi: float | None = None) -> Check:
    def check(value: Any) -> str | None:
        if value < lo or (hi is not None and value > hi):
            return f"must be between {lo} and {hi}" if hi is not None else f"must be >= {lo}"
        return None

    return check


def _choice(*options: str) -> Check:
    def check(value: Any) -> str | None:
        return None if value in options else f"must be one of {', '.join(options)}"

    return check


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(value: str) -> tuple[Network, ...]:
    """Addresses and CIDR networks, space or comma separated; ``ValueError`` naming a bad one."""
    networks = []
    for item in filter(None, re.split(r"[\s,]+", value)):
        try:
            networks.append(ipaddress.ip_network(item.strip("[]"), strict=False))
        except ValueError:
            raise ValueError(f"{item!r} is not an IP address or a CIDR network") from None
    return tuple(networks)


def _networks(value: Any) -> str | None:
    try:
        parse_networks(value)
    except ValueError as exc:
        return str(exc)
    return None


def _app_ref(value: Any) -> str | None:
    if value is None or (
        isinstance(value, str) and value.count(":") == 1 and all(value.split(":"))
    ):
        return None
    return "must look like 'package.module:function'"


def _db_address(value: Any) -> str | None:
    if not isinstance(value, str) or not value:
        return "must be a file path, ':memory:' or a postgresql:// URL"
    if value.startswith(("postgresql://", "postgres://")):
        parts = urlsplit(value)
        try:
            parts.port  # noqa: B018 - raises on a bad port
        except ValueError:
            return "has a bad port in its postgresql:// URL"
    elif "://" in value:
        return "must be a file path, ':memory:' or a postgresql:// URL"
    return None


def _node_name(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not 1 <= len(value) <= 200 or not value.isprintable():
        return "must be 1-200 printable characters"
    return None


#: A dashboard path: empty (none), or absolute without a trailing slash.
_PATH = re.compile(r"^(/[A-Za-z0-9._~-]+)+$")


def _dashboard_path(value: Any) -> str | None:
    if value == "" or (isinstance(value, str) and _PATH.match(value)):
        return None
    return "must be an absolute path like /dashboard (letters, digits, ._~-), or '' for none"


def _setting(
    default: Any,
    help: str,
    check: Check | None = None,
    *,
    file_only: bool = False,
    secret: bool = False,
    separated: bool = False,
) -> Any:
    # file_only: a table, not a scalar; no --flag and no environment variable.
    # secret: left out of repr() and of error messages, so that no log shows a key.
    # separated: a list in one string; the TOML file may give an array of strings.
    metadata = {
        "help": help,
        "check": check,
        "file_only": file_only,
        "secret": secret,
        "separated": separated,
    }
    return field(default=default, repr=not secret, metadata=metadata)


@dataclass(frozen=True, slots=True, kw_only=True)
class Settings:
    """Everything that can be configured. Immutable once loaded."""

    host: str = _setting("127.0.0.1", "address to listen on")
    port: int = _setting(8080, "TCP port to listen on (0 picks a free one)", _range(0, 65535))
    db: str = _setting(
        "taskserver.db",
        "SQLite database file (':memory:' keeps tasks in memory only, not durable), or a"
        " postgresql:// URL: every taskserver given the same one shares its queues",
        _db_address,
    )
    node_name: str | None = _setting(
        None,
        "PostgreSQL: this server's name in the cluster, unique among running servers"
        " (default: host:port)",
        _node_name,
    )
    prefetch: int = _setting(
        64,
        "PostgreSQL: tasks a server claims beyond its idle workers while its tasks are short"
        " (under 50 ms lately): each claim costs a commit; 0: only for idle workers",
        _range(0, 10_000),
    )
    lease: float = _setting(
        30.0,
        "PostgreSQL: seconds without a heartbeat after which the other servers rescue a"
        " server's running tasks",
        _range(1.0, 3600.0),
    )
    app: str | None = _setting(
        None,
        "application setup function, 'package.module:function'; default: the built-in demo",
        _app_ref,
    )
    task_workers: int = _setting(
        4, "number of task workers (tasks run at the same time)", _range(0, 4096)
    )
    process_workers: int = _setting(
        0, "processes for CPU-bound task callbacks (0: one per CPU core)", _range(0, 256)
    )
    synchronous: str = _setting(
        "NORMAL",
        "SQLite synchronous mode: NORMAL survives a process crash, FULL also power loss",
        _choice("NORMAL", "FULL"),
    )
    # 10,000 ready tasks cost a few MB; the rest of a backlog waits on disk.
    ready_window: int = _setting(
        10_000, "queued tasks held in memory; the rest stay on disk", _range(1)
    )
    max_queued: int = _setting(
        1_000_000, "queued tasks accepted before new ones get HTTP 503", _range(1)
    )
    # Bounds what one group commit can hold, so a stalled disk pushes back on callers.
    max_pending_writes: int = _setting(
        100_000, "writes waiting for the next commit before callers get HTTP 503", _range(1)
    )
    default_timeout: float = _setting(0.0, "seconds a task may run (0: no limit)", _range(0))
    default_max_attempts: int = _setting(
        1, "attempts per task unless the task says otherwise", _range(1, 1000)
    )
    retry_base: float = _setting(1.0, "seconds before the first retry of a failed task", _range(0))
    retry_factor: float = _setting(
        2.0, "each further retry waits this many times longer", _range(1, 100)
    )
    retry_cap: float = _setting(
        960.0, "longest wait between retries, in seconds (16 min)", _range(0)
    )
    retry_jitter: float = _setting(
        0.1, "random spread of retry delays, as a fraction", _range(0, 1)
    )
    process_max_tasks: int = _setting(
        0, "recycle a cpu_bound worker process after this many tasks (0: never)", _range(0)
    )
    process_max_memory_mb: int = _setting(
        0,
        "recycle a cpu_bound worker process once its peak memory passes this (0: never)",
        _range(0),
    )
    retention: float = _setting(
        14 * 86400.0,
        "seconds ended tasks are kept before automatic purge (0: forever)",
        _range(0),
    )
    event_retention: float = _setting(
        7 * 86400.0, "seconds events are kept for replay (0: forever)", _range(0)
    )
    max_events: int = _setting(
        1_000_000, "events kept for replay at most, newest first (0: no limit)", _range(0)
    )
    maintenance_interval: float = _setting(300.0, "seconds between retention runs", _range(0.01))
    grace_period: float = _setting(
        10.0,
        "seconds running tasks get to finish on shutdown before they are re-queued",
        _range(0),
    )
    # Python's default is 5 ms: the SQLite writer thread, between two statements,
    # would wait that long for the GIL whenever the event loop is busy.
    gil_switch_interval: float = _setting(
        0.0001,
        "seconds a thread may hold Python's GIL while another waits for it"
        " (sys.setswitchinterval while the server runs, Python's own while two or more"
        " task callbacks run in threads at once; 0: leave Python's default)",
        _range(0, 0.1),
    )
    # Python's default is 700: at that, the cyclic GC ran every few requests.
    gc_threshold: int = _setting(
        10_000,
        "allocations between two young-generation garbage collections while the server"
        " runs; what exists at start is frozen out of collections (0: leave Python's GC)",
        _range(0, 1_000_000),
    )
    max_body_bytes: int = _setting(
        1_048_576, "largest accepted HTTP request body, in bytes", _range(1)
    )
    # --- hostile clients: connection bound and timeouts (taskserver/netguard.py) ---
    # A connection costs one descriptor and a few KB; the open-files limit caps it anyway.
    max_connections: int = _setting(
        10_000,
        "client connections open at once (capped by the open-files limit); a new one"
        " past it is answered 503 with Retry-After and closed",
        _range(1),
    )
    # Go's ReadHeaderTimeout, nginx's client_header_timeout: a slow head is an attack.
    request_head_timeout: float = _setting(
        10.0,
        "seconds a request's head (request line and headers) may take, from connecting"
        " or from its first byte on a kept-alive connection; then 408 and close",
        _range(0.01),
    )
    # nginx holds at most 4 x 8 KiB of a head by default; aiohttp's own bound was ~1 MB.
    max_head_bytes: int = _setting(
        65_536,
        "bytes a request's head may reach while incomplete (each line at most 8190, at"
        " most 100 headers); past it 431 and close",
        _range(1024),
    )
    # 30 s for a 1 MiB body is a floor of about 35 KB/s.
    request_body_timeout: float = _setting(
        30.0,
        "seconds a request's body may take to arrive once its head has; then 408 and"
        " close (event streams and long polls have no body and are not cut)",
        _range(0.01),
    )
    # nginx's default; aiohttp's own is an hour.
    keepalive_timeout: float = _setting(
        75.0, "seconds an idle keep-alive connection stays open between requests", _range(0.01)
    )
    subscriber_queue: int = _setting(
        1_000,
        "events held for an SSE subscriber whose connection takes no more before it is dropped"
        " (one round of them is kept however many)",
        _range(1),
    )
    max_subscribers: int = _setting(20_000, "open SSE streams allowed at once", _range(1))
    heartbeat: float = _setting(15.0, "seconds between SSE keep-alive comments", _range(0.05))
    base_url: str = _setting("", "public URL of this server, used in task topics and links")
    trusted_proxies: str = _setting(
        "",
        "addresses or CIDR networks of reverse proxies, space or comma separated (a TOML"
        " array too): only from these peers are Forwarded / X-Forwarded-For, -Proto, -Host"
        " believed (client address, scheme, host)",
        _networks,
        separated=True,
    )
    dashboard_path: str = _setting(
        "/dashboard",
        "where the live dashboard is served, behind the API's authentication ('': none)",
        _dashboard_path,
    )
    log_level: str = _setting(
        "INFO", "logging level", _choice("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
    )
    log_format: str = _setting(
        "text",
        "log lines as text, or json: one object per line (time, level, logger, message,"
        " task_id and queue where there is one)",
        _choice("text", "json"),
    )
    access_log: bool = _setting(
        False, "log every HTTP request: method, path, status, duration, client address"
    )
    # --- the Mercure hub at /.well-known/mercure (taskserver/push/mercure.py) ---
    mercure_jwt_alg: str = _setting(
        "HS256", "JWT algorithm of the Mercure keys; tokens must use it", _choice("HS256", "RS256")
    )
    mercure_publisher_jwt_key: str = _setting(
        "",
        "Mercure publisher key: HS256 secret, or RS256 public key as PEM text or a PEM file path",
        secret=True,
    )
    mercure_subscriber_jwt_key: str = _setting(
        "", "Mercure subscriber key, same forms (empty: the publisher key)", secret=True
    )
    mercure_anonymous: bool = _setting(
        False, "let Mercure subscribers without a token connect (public updates only)"
    )
    mercure_cors_origins: str = _setting(
        "", "origins allowed to use the hub cross-origin, space or comma separated ('*': any)"
    )
    mercure_publish_origins: str = _setting(
        "", "origins allowed to publish with the cookie, space or comma separated ('*': any)"
    )
    mercure_cookie_name: str = _setting(
        "mercureAuthorization", "cookie holding a Mercure token for browsers"
    )
    mercure_private_tasks: bool = _setting(
        False,
        "send task events to Mercure subscribers authorized for the task's topic only, and"
        " make task data private on the API (the hub does so anyway once an API credential"
        " is configured)",
    )
    mercure_subscriptions: bool = _setting(
        True, "serve the Mercure subscriptions API (/.well-known/mercure/subscriptions)"
    )
    # --- who may use the API (taskserver/access.py) and TLS ---
    api_token: str = _setting(
        "",
        "bearer token with every scope (read, enqueue, metrics, admin); any token makes the API"
        " require one, on loopback too",
        check_api_token,
        secret=True,
    )
    api_tokens: tuple[ApiToken, ...] = _setting(
        (),
        "named tokens with their own scopes, as [api_tokens.NAME] tables of the config file",
        file_only=True,
    )
    api_jwt_key: str = _setting(
        "",
        "key verifying API JWTs (scopes in the 'taskserver' claim): HS256 secret,"
        " or RS256 public key as PEM text or a PEM file path",
        secret=True,
    )
    api_jwt_alg: str = _setting(
        "HS256", "JWT algorithm of api_jwt_key; tokens must use it", _choice("HS256", "RS256")
    )
    insecure_no_auth: bool = _setting(
        False,
        "serve the API without credentials on a non-loopback --host (anyone who reaches"
        " the port can read, enqueue, cancel and purge)",
    )
    tls_cert: str = _setting("", "PEM file with the TLS certificate chain: serve HTTPS")
    tls_key: str = _setting("", "PEM file with the TLS private key (with tls_cert)")

    @property
    def public_url(self) -> str:
        """``base_url`` or, when unset, the URL the server listens on."""
        host = f"[{self.host}]" if ":" in self.host else self.host  # IPv6, as URLs write it
        return self.base_url.rstrip("/") or f"http://{host}:{self.port}"


FIELDS: dict[str, dataclasses.Field[Any]] = {f.name: f for f in dataclasses.fields(Settings)}


#: Booleans as written in the environment or on the command line (TOML has its own).
_BOOLS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


def _type_of(name: str) -> str:
    return str(FIELDS[name].type)


def coerce(name: str, value: Any, source: str) -> Any:
    """Convert ``value`` (a string from env/CLI, or a TOML value) to the field's type and check it.

    Raises ``ConfigError`` that names the key and where the value came from.
    """
    if name not in FIELDS:
        raise ConfigError(f"unknown setting '{name}' in {source}")
    if name == "api_tokens":
        return parse_api_tokens(value, source)
    kind = _type_of(name)
    try:
        if value is None or (kind == "str | None" and value == ""):
            if "None" not in kind:
                raise ValueError
            converted: Any = None
        elif kind == "bool":
            if isinstance(value, bool):
                converted = value
            elif isinstance(value, str) and value.strip().lower() in _BOOLS:
                converted = _BOOLS[value.strip().lower()]
            else:
                raise ValueError
        elif kind == "int":
            if isinstance(value, bool | float):
                raise ValueError
            converted = int(value)
        elif kind == "float":
            if isinstance(value, bool):
                raise ValueError
            converted = float(value)
        elif isinstance(value, str):
            converted = value
        elif (
            FIELDS[name].metadata["separated"]
            and isinstance(value, list)
            and all(isinstance(v, str) for v in value)
        ):
            converted = " ".join(value)
        else:
            raise ValueError
        if isinstance(converted, float) and not math.isfinite(converted):
            raise ValueError
    except (ValueError, TypeError):
        wanted = kind.replace(" | None", "")
        raise ConfigError(
            f"{name}: expected {wanted}, got {_shown(name, value)} (from {source})"
        ) from None
    check: Check | None = FIELDS[name].metadata["check"]
    problem = check(converted) if check is not None and converted is not None else None
    if problem:
        raise ConfigError(f"{name}: {problem}, got {_shown(name, value)} (from {source})")
    return converted


def _shown(name: str, value: Any) -> str:
    """``value`` as an error message may quote it: a secret's type or length only."""
    if not FIELDS[name].metadata["secret"]:
        return repr(value)
    if isinstance(value, str):
        return f"{len(value)} characters"
    return type(value).__name__


def load_settings(
    *,
    config_file: str | Path | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Build ``Settings`` from every source, in precedence order.

    ``config_file`` names a TOML file that must exist; when ``None`` the
    ``TASKSERVER_CONFIG`` variable, then ``config/taskserver.toml`` (if present)
    are used. ``overrides`` are CLI values, already keyed by setting name; a
    ``None`` there means "not given".
    """
    env = os.environ if env is None else env
    values: dict[str, Any] = {}

    path = Path(config_file) if config_file else None
    if path is None and env.get(CONFIG_ENV):
        path = Path(env[CONFIG_ENV])
    if path is not None and not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    if path is None and DEFAULT_CONFIG_FILE.is_file():
        path = DEFAULT_CONFIG_FILE
    if path is not None:
        try:
            table = tomllib.loads(path.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path} is not valid TOML: {exc}") from None
        for key, value in table.items():
            values[key] = coerce(key, value, str(path))

    for var, value in env.items():
        if var.startswith(ENV_PREFIX) and var not in NOT_SETTINGS:
            key = var[len(ENV_PREFIX) :].lower()
            if key not in FIELDS:
                raise ConfigError(f"unknown setting in environment variable {var}")
            if FIELDS[key].metadata["file_only"]:
                raise ConfigError(f"{key} is a table: set it in the config file, not in {var}")
            values[key] = coerce(key, value, f"environment variable {var}")

    for key, value in (overrides or {}).items():
        if value is not None:
            values[key] = coerce(key, value, f"--{key.replace('_', '-')}")

    return Settings(**values)
