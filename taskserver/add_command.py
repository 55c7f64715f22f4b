"""``taskserver tasks add DATA [options] [--wait]``: enqueue through ``Client``.

Without ``--wait`` it prints the new id (``--json``: the task's links too). With
``--wait`` it follows the task's event stream: on a terminal a live progress bar
with the task's message, else one plain line per event; then the result on stdout
(exit 0) or the error on stderr (exit 1). Bad ``DATA`` (not JSON) exits 2.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
from typing import Any, TextIO

import aiohttp
import orjson

from .client import Client
from .errors import AccessDenied, ServerBusy, TaskNotFound, TaskServerError, ValidationError

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_NOT_FOUND, EXIT_UNREACHABLE = 0, 1, 2, 3, 4
BAR = 24
#: Options given on the command line as --flag VALUE, with their types.
FLAGS: dict[str, type] = {
    "queue": str,
    "name": str,
    "priority": int,
    "delay": float,
    "timeout": float,
    "max_attempts": int,
    "serial_group": str,
    "unique_key": str,
    "unique_for": float,
}


def add_parser(verbs: Any, common: argparse.ArgumentParser) -> None:
    """Add ``add`` to ``taskserver tasks``."""
    add = verbs.add_parser("add", parents=[common], help="enqueue a task (DATA is JSON)")
    add.add_argument("data", metavar="DATA", help="the task's data as JSON, e.g. '{\"n\": 1}'")
    for name, kind in FLAGS.items():
        add.add_argument(f"--{name.replace('_', '-')}", dest=name, type=kind, default=None)
    add.add_argument(
        "--wait", action="store_true", help="follow it to its end; print the result or error"
    )
    add.set_defaults(action="add")


def run(args: argparse.Namespace) -> int:
    """Carry out ``tasks add``; the exit code."""
    try:
        data = orjson.loads(args.data)
    except orjson.JSONDecodeError as exc:
        return _fail(f"DATA is not valid JSON: {exc}", EXIT_USAGE)
    options = {k: getattr(args, k) for k in FLAGS if getattr(args, k) is not None}
    token = os.environ.get("TASKSERVER_API_TOKEN") or None
    try:
        return asyncio.run(_add(args, Client(args.url, token), data, options))
    except (aiohttp.ClientConnectionError, TimeoutError) as exc:
        return _fail(f"cannot reach {args.url}: {exc or 'timed out'}", EXIT_UNREACHABLE)
    except ValidationError as exc:
        where = f" ({exc.field})" if exc.field else ""
        return _fail(f"{exc}{where}", EXIT_USAGE)
    except TaskNotFound as exc:
        return _fail(str(exc), EXIT_NOT_FOUND)
    except (AccessDenied, ServerBusy, TaskServerError) as exc:
        return _fail(str(exc), EXIT_FAILED)


def _fail(message: str, code: int) -> int:
    print(f"taskserver: error: {message}", file=sys.stderr)
    return code


async def _add(args: argparse.Namespace, client: Client, data: Any, options: dict[str, Any]) -> int:
    async with client:
        task_id = await client.task(data, **options)
        if not args.wait:
            if args.json:
                _write_json({"id": task_id, "url": f"/tasks/{task_id}"})
            else:
                print(task_id)
            return EXIT_OK
        await follow(client, task_id, sys.stdout)
        task = await client.get(task_id)
    if task["state"] == "succeeded":
        if args.json:
            _write_json(task)
        else:
            _write_json(task["result"])
        return EXIT_OK
    error = task.get("error") or task["state"]
    print(f"taskserver: task {task_id} {task['state']}: {error}", file=sys.stderr)
    if args.json:
        _write_json(task)
    return EXIT_FAILED


def _write_json(value: Any) -> None:
    sys.stdout.write(orjson.dumps(value, option=orjson.OPT_INDENT_2).decode() + "\n")


def bar(fraction: float, message: str, width: int) -> str:
    """One line: ``[#####-----]  50% message``, cut to ``width`` columns."""
    fraction = min(1.0, max(0.0, fraction))
    filled = round(BAR * fraction)
    line = f"[{'#' * filled}{'-' * (BAR - filled)}] {fraction:4.0%} {message}"
    return line[: max(10, width - 1)]


async def follow(client: Client, task_id: int, out: TextIO) -> None:
    """Show the task's events until its last: a redrawn bar on a TTY, else plain lines.

    Messages go to stderr when stdout is the result's (not a TTY): scripts that pipe
    stdout get only the result.
    """
    tty = out.isatty()
    log = out if tty else sys.stderr
    drawn = False
    fraction, message = 0.0, ""
    async for event in client.events(task_id):
        body = event.json()
        if tty:
            if isinstance(body.get("progress"), int | float):
                fraction = float(body["progress"])
            if event.event == "finished":
                fraction = 1.0
            message = str(body.get("message") or message).replace("\n", " ")
            width = shutil.get_terminal_size().columns
            line = bar(fraction, f"{event.event}: {message}" if message else event.event, width)
            log.write("\r\x1b[2K" + line)
            log.flush()
            drawn = True
        else:
            line = event.event
            if isinstance(body.get("progress"), int | float):
                line += f" {body['progress']:.0%}"
            if body.get("message"):
                line += f" {str(body['message']).replace(chr(10), ' ')}"
            print(line, file=log, flush=True)
    if drawn:
        log.write("\n")
        log.flush()
