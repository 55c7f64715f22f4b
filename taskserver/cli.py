"""``taskserver run``: the command line.

Errors in what the user typed or configured exit with status 2 and one line
on stderr saying what to fix; a clean stop (SIGINT, SIGTERM) exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import logging
import os
import signal
import ssl
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from aiohttp import web

from . import admin
from .config import FIELDS, Settings, load_settings
from .errors import ConfigError
from .runtime.workers import TASK_THREAD_PREFIX
from .web import logs, netguard, tls
from .web.app import ACCESS, TASKSERVER, create_app, load_setup
from .web.exposure import check_exposure

log = logging.getLogger("taskserver")

#: Connections the kernel may hold accepted before the server takes them (capped by
#: net.core.somaxconn). aiohttp's 128 overflows in a burst of connects, and each SYN
#: the kernel then drops costs its client a retransmit one second later.
LISTEN_BACKLOG = 1024


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line, exit 2: what to fix, without the usage block.
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="taskserver",
        description="A task server: HTTP, durable in-process "
        "task workers and Server-Sent Events in one process.",
    )
    parser.add_argument("--version", action="version", version=f"taskserver {_version()}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    run = commands.add_parser(
        "run",
        help="serve HTTP and run the task workers",
        description="Serve HTTP and run the task workers. Every flag can also be set in "
        "config/taskserver.toml or as TASKSERVER_<NAME> in the environment; flags win.",
    )
    run.add_argument(
        "--config",
        metavar="FILE",
        help="TOML settings file (default: config/taskserver.toml if present); "
        "named API tokens go there only, as [api_tokens.NAME] tables",
    )
    for name, field in FIELDS.items():
        if field.metadata["file_only"]:
            continue  # a table: the config file only
        # default=None: a flag not given must not hide the file's or the environment's value.
        text = field.metadata["help"].replace("%", "%%")  # argparse %-formats help
        if "default:" not in text:  # some say it in their own words ("default: the demo")
            text += f" (default: {_shown(field.default)})"
        run.add_argument(
            f"--{name.replace('_', '-')}", dest=name, metavar=name.upper(), default=None, help=text
        )
    admin.add_commands(commands, _Parser)
    return parser


def _version() -> str:
    try:
        return importlib.metadata.version("taskserver")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - run from a bare tree
        return "unknown"


def _shown(default: Any) -> str:
    text = "none" if default is None else "''" if default == "" else str(default)
    return text.replace("%", "%%")


def _fail(message: str) -> NoReturn:
    print(f"taskserver: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``taskserver`` command."""
    args = _parser().parse_args(argv)
    if args.command == "run":
        overrides = {name: getattr(args, name, None) for name in FIELDS}
        try:
            settings = load_settings(config_file=args.config, overrides=overrides)
        except ConfigError as exc:
            _fail(str(exc))
        # As uvicorn and celery do: --app mypkg.tasks:setup is found in the current
        # directory, whichever way taskserver was started.
        if os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())
        raise SystemExit(run(settings))
    raise SystemExit(_quiet_on_closed_pipe(admin.run, args))


#: The exit status of a command killed by SIGPIPE, as the shell reports it (128 + 13).
EXIT_PIPE = 128 + signal.SIGPIPE


def _quiet_on_closed_pipe(command: Callable[[argparse.Namespace], int], args: Any) -> int:
    """Run ``command``; when stdout's reader went away (``| head``), end without a traceback.

    Python's own advice for SIGPIPE: point stdout at devnull so the flush at
    exit cannot fail again, and exit as a process killed by SIGPIPE would.
    """
    try:
        code = command(args)
        sys.stdout.flush()  # inside the try: a failing flush at exit would print a traceback
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_PIPE
    return code


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency except on Windows
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def run(settings: Settings) -> int:
    """Build the app, bind, serve until SIGINT/SIGTERM, stop gracefully. Returns the exit code."""
    logs.configure(settings.log_level, settings.log_format)
    loop = _new_loop()
    asyncio.set_event_loop(loop)
    try:
        try:
            setup = load_setup(settings.app) if settings.app else None
            app = loop.run_until_complete(create_app(settings, setup))
            check_exposure(app[ACCESS], settings)
            ssl_context = tls.server_context(settings.tls_cert, settings.tls_key)
        except ConfigError as exc:
            _fail(str(exc))
        code = loop.run_until_complete(_serve(app, settings, ssl_context))
    finally:
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()
    # Task threads only: aiohttp's static files use the loop's default executor,
    # whose idle threads end with the interpreter.
    stuck = [t for t in threading.enumerate() if t.name.startswith(TASK_THREAD_PREFIX)]
    deadline = time.monotonic() + 0.2  # idle ones are ending: the pool was shut down
    for thread in stuck:
        thread.join(max(0.0, deadline - time.monotonic()))
    stuck = [t for t in stuck if t.is_alive()]
    if stuck:
        # A thread callback that ignores ctx.cancelled cannot be stopped, and the
        # interpreter would wait for it forever at exit. Everything is stored and
        # closed by now, so leave without waiting.
        log.warning("exiting with %d task thread(s) still running", len(stuck))
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


async def _serve(
    app: web.Application, settings: Settings, ssl_context: ssl.SSLContext | None = None
) -> int:
    # shutdown_timeout: how long open requests get; running tasks get grace_period after.
    # The runner does TLS itself (TlsGate): connections count from accept, not handshake.
    access: dict[str, Any] = logs.access_logger() if settings.access_log else {"access_log": None}
    runner = netguard.runner(app, settings, ssl_context, shutdown_timeout=5.0, **access)
    try:
        await runner.setup()  # starts the TaskServer: opens the store, recovers, starts workers
    except ConfigError as exc:  # e.g. the database cannot be reached
        _fail(str(exc))
    try:
        site = web.TCPSite(runner, settings.host, settings.port, backlog=LISTEN_BACKLOG)
        try:
            await site.start()
        except OSError as exc:
            _fail(f"cannot listen on {settings.host}:{settings.port}: {exc.strerror or exc}")
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        address: Any = runner.addresses[0] if runner.addresses else (settings.host, settings.port)
        scheme = "https" if ssl_context is not None else "http"
        host = f"[{address[0]}]" if ":" in str(address[0]) else str(address[0])  # IPv6
        app[TASKSERVER].set_public_url(f"{scheme}://{host}:{address[1]}")
        # Parsed by tests and scripts that start on port 0: keep the wording.
        log.info("taskserver listening on %s://%s:%s", scheme, host, address[1])
        await stop.wait()
        log.info("stopping: no new tasks; running ones get %gs", settings.grace_period)
    finally:
        await runner.cleanup()
    log.info("stopped")
    return 0


if __name__ == "__main__":  # pragma: no cover
    main()
