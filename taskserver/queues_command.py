"""``taskserver queues list|pause|resume``: see and steer queues through ``Client``.

``list`` prints a table (``--json``: the list); ``pause NAME`` and ``resume NAME``
print the queue as it is now. A paused queue takes tasks and starts none, across
restarts. Exit codes as ``admin``: 1 refused, 2 bad usage, 4 unreachable.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from typing import Any

import aiohttp
import orjson

from .client import Client
from .errors import TaskServerError, ValidationError

EXIT_OK, EXIT_REFUSED, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 4
COLUMNS = ("name", "paused", "queued", "waiting", "running", "retrying", "concurrency")


def add_parser(commands: Any, common: argparse.ArgumentParser, parser_class: type) -> None:
    """Add ``queues list|pause|resume`` to the CLI's subcommands."""
    queues = commands.add_parser("queues", help="list, pause or resume queues")
    verbs = queues.add_subparsers(dest="verb", required=True, parser_class=parser_class)
    listing = verbs.add_parser("list", parents=[common], help="every queue and its counts")
    listing.set_defaults(action="queues")
    for verb, text in (
        ("pause", "start no more tasks of the queue (it still takes new ones)"),
        ("resume", "start the queue's tasks again"),
    ):
        sub = verbs.add_parser(verb, parents=[common], help=text)
        sub.add_argument("name", metavar="NAME", help="the queue")
        sub.set_defaults(action="queues")


def run(args: argparse.Namespace) -> int:
    """Carry out ``queues …``; the exit code."""
    token = os.environ.get("TASKSERVER_API_TOKEN") or None
    try:
        return asyncio.run(_run(args, Client(args.url, token)))
    except (aiohttp.ClientConnectionError, TimeoutError) as exc:
        return _fail(f"cannot reach {args.url}: {exc or 'timed out'}", EXIT_UNREACHABLE)
    except ValidationError as exc:
        return _fail(f"{exc}{f' ({exc.field})' if exc.field else ''}", EXIT_USAGE)
    except TaskServerError as exc:
        return _fail(str(exc), EXIT_REFUSED)


def _fail(message: str, code: int) -> int:
    print(f"taskserver: error: {message}", file=sys.stderr)
    return code


async def _run(args: argparse.Namespace, client: Client) -> int:
    async with client:
        if args.verb == "list":
            rows = await client.queues()
            if args.json:
                _write_json(rows)
            else:
                print(table(rows))
            return EXIT_OK
        act = client.pause_queue if args.verb == "pause" else client.resume_queue
        queue = await act(args.name)
    if args.json:
        _write_json(queue)
    else:
        print(f"queue {queue['name']} {'paused' if queue.get('paused') else 'running'}")
    return EXIT_OK


def _write_json(value: Any) -> None:
    sys.stdout.write(orjson.dumps(value, option=orjson.OPT_INDENT_2).decode() + "\n")


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


def table(rows: list[dict[str, Any]]) -> str:
    """Rows as aligned columns, a header first."""
    cells = [list(COLUMNS)] + [[_cell(r.get(c)) for c in COLUMNS] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(COLUMNS))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(line.rstrip() for line in lines)
