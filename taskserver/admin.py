"""``taskserver tasks …`` and ``taskserver stats``: the admin commands.

They talk to a running server over its HTTP API (``--url``, default from
``TASKSERVER_URL`` or ``http://127.0.0.1:8080``), so they work the same on the
server's machine and from a laptop through a tunnel; ``list``, ``show`` and
``stats`` can also read the database file itself (``--db``, read-only). Tables
for people, ``--json`` for scripts. ``TASKSERVER_API_TOKEN``, the server's own
setting, is sent as the bearer token when set.

Exit codes scripts can trust: 0 done; 1 the server refused (e.g. 409: the task
already ended); 2 bad usage; 3 no such task; 4 the server cannot be reached
(and 141 when stdout's reader went away, see ``cli``). ``retry`` with several
ids exits with the highest code of theirs.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import aiohttp
import orjson

from . import add_command, queues_command
from .config import URL_ENV
from .models import TaskState
from .storage import Snapshot, SnapshotError, is_postgres

EXIT_OK, EXIT_REFUSED, EXIT_USAGE, EXIT_NOT_FOUND, EXIT_UNREACHABLE = 0, 1, 2, 3, 4
DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhdw]?)$")
UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
DEFAULT_URL = "http://127.0.0.1:8080"
LIST_COLUMNS = ("id", "state", "queue", "name", "attempts", "progress", "error")


def duration(text: str) -> float:
    """``14d``, ``12h``, ``30m``, ``45s`` or plain seconds, as seconds (argparse type)."""
    match = DURATION.match(text.strip())
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration like 14d, 12h, 30m or 90")
    return float(match.group(1)) * UNITS[match.group(2)]


def add_commands(commands: Any, parser_class: type[argparse.ArgumentParser]) -> None:
    """Add ``tasks`` and ``stats`` to the CLI's subcommands."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--url",
        default=os.environ.get(URL_ENV, DEFAULT_URL),
        help=f"the running server (default: ${URL_ENV} or {DEFAULT_URL})",
    )
    common.add_argument("--json", action="store_true", help="print JSON for scripts")

    offline = argparse.ArgumentParser(add_help=False)
    offline.add_argument(
        "--db",
        metavar="FILE",
        help="read this database file directly instead of asking --url "
        "(read-only; works while the server runs, or without it)",
    )

    stats = commands.add_parser("stats", parents=[common, offline], help="worker and task counters")
    stats.set_defaults(action="stats")

    tasks = commands.add_parser("tasks", help="add, list, show, cancel, retry or purge tasks")
    verbs = tasks.add_subparsers(dest="verb", required=True, parser_class=parser_class)
    listing = verbs.add_parser("list", parents=[common, offline], help="one page of tasks")
    listing.add_argument(
        "--state", choices=[s.value for s in TaskState], help="only tasks in this state"
    )
    listing.add_argument("--limit", type=int, default=50, help="rows (default %(default)s)")
    listing.add_argument("--after", type=int, default=0, help="ids above this one")
    listing.set_defaults(action="list")
    show = verbs.add_parser("show", parents=[common, offline], help="one task, whole")
    show.add_argument("id", type=int)
    show.set_defaults(action="show")
    cancel = verbs.add_parser("cancel", parents=[common], help="cancel a task")
    cancel.add_argument("id", type=int)
    cancel.set_defaults(action="cancel")
    retry = verbs.add_parser("retry", parents=[common], help="re-queue failed/cancelled tasks")
    retry.add_argument("ids", type=int, nargs="*", metavar="ID")
    retry.add_argument("--failed", action="store_true", help="every failed task")
    retry.set_defaults(action="retry")
    purge = verbs.add_parser("purge", parents=[common], help="delete ended tasks")
    purge.add_argument(
        "--older-than",
        type=duration,
        required=True,
        metavar="AGE",
        help="finished longer ago than this: 14d, 12h, 30m, 90 (seconds)",
    )
    which = purge.add_argument_group("which ended tasks (default: all of them)")
    which.add_argument(
        "--finished", action="store_true", help="succeeded, failed and cancelled tasks"
    )
    which.add_argument("--succeeded", action="store_true")
    which.add_argument("--failed", action="store_true")
    which.add_argument("--cancelled", action="store_true")
    purge.set_defaults(action="purge")
    add_command.add_parser(verbs, common)
    queues_command.add_parser(commands, common, parser_class)


def run(args: argparse.Namespace) -> int:
    """Carry out an admin command; returns the exit code."""
    if args.action == "retry" and not args.ids and not args.failed:
        return _usage("give task ids or --failed")
    if args.action == "retry" and args.ids and args.failed:
        return _usage("give task ids or --failed, not both")
    if args.action == "add":
        return add_command.run(args)
    if args.action == "queues":
        return queues_command.run(args)
    if getattr(args, "db", None):
        return _offline(args)
    try:
        return asyncio.run(_run(args))
    except (aiohttp.ClientConnectionError, TimeoutError) as exc:
        print(f"taskserver: error: cannot reach {args.url}: {exc or 'timed out'}", file=sys.stderr)
        return EXIT_UNREACHABLE


def _usage(message: str) -> int:
    print(f"taskserver: error: {message}", file=sys.stderr)
    return EXIT_USAGE


async def _run(args: argparse.Namespace) -> int:
    base = args.url.rstrip("/")
    timeout = aiohttp.ClientTimeout(total=60)
    token = os.environ.get("TASKSERVER_API_TOKEN")  # the same token the server is given
    headers = {"Authorization": f"Bearer {token}"} if token else None
    async with aiohttp.ClientSession(base, timeout=timeout, headers=headers) as http:
        if args.action == "retry" and args.ids:
            return await _retry_each(http, args)
        status, payload = await _call(http, *_request(args))
    if status >= 400:
        return _refused(status, payload)
    _print(args, payload)
    return EXIT_OK


async def _call(http: aiohttp.ClientSession, method: str, path: str, body: Any) -> tuple[int, Any]:
    """One request: its status and its body, JSON when it is (else the text that came)."""
    async with http.request(method, path, json=body) as response:
        raw = await response.read()
    try:
        return response.status, orjson.loads(raw or b"null")
    except orjson.JSONDecodeError:
        return response.status, raw.decode(errors="replace").strip()  # not ours: say what came


def _detail(payload: Any) -> str:
    return str(payload.get("detail") if isinstance(payload, dict) else payload)


def _refused(status: int, payload: Any) -> int:
    """Say why on stderr, in one line; the exit code for an HTTP error ``status``."""
    print(f"taskserver: error: {_detail(payload)} (HTTP {status})", file=sys.stderr)
    if status == 404:
        return EXIT_NOT_FOUND
    return EXIT_USAGE if status in (400, 422) else EXIT_REFUSED


async def _retry_each(http: aiohttp.ClientSession, args: argparse.Namespace) -> int:
    """``retry ID...``: each task on its own, so a missing one exits 3 and a refused one 1.

    With several ids the exit code is the highest of theirs; every failure gets
    its own line on stderr.
    """
    retried: list[int] = []
    errors: dict[str, str] = {}
    code = EXIT_OK
    for task_id in args.ids:
        status, payload = await _call(http, "POST", f"/tasks/{task_id}/retry", None)
        if status < 400:
            retried.append(task_id)
            continue
        code = max(code, _refused(status, payload))
        errors[str(task_id)] = _detail(payload)
    _print(args, {"retried": retried, "errors": errors})
    return code


def _offline(args: argparse.Namespace) -> int:
    """``list``, ``show`` and ``stats`` read straight from the database file."""
    if is_postgres(args.db):
        return _usage(
            "--db reads a SQLite file while no server runs; for a PostgreSQL cluster ask"
            " any of its servers (--url)"
        )
    try:
        snapshot = Snapshot(args.db)
    except (FileNotFoundError, SnapshotError) as exc:
        print(f"taskserver: error: cannot read {args.db}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        payload: Any
        if args.action == "show":
            task = snapshot.get_task(args.id)
            if task is None:
                print(f"taskserver: error: task {args.id} does not exist", file=sys.stderr)
                return EXIT_NOT_FOUND
            payload = task.to_json()
        elif args.action == "list":
            state = TaskState(args.state) if args.state else None
            tasks = snapshot.list_tasks(state=state, after=args.after, limit=args.limit)
            last = tasks[-1].id if len(tasks) == args.limit else None
            payload = {"tasks": [t.to_json() for t in tasks], "next_after": last}
        else:
            queues = {
                name: {s.value: n for s, n in by_state.items()}
                for name, by_state in snapshot.count_by_queue().items()
            }
            payload = {
                "workers": None,
                "tasks": {s.value: n for s, n in snapshot.count_by_state().items()},
                "queues": queues,
            }
    finally:
        snapshot.close()
    _print(args, payload)
    return EXIT_OK


def _print(args: argparse.Namespace, payload: Any) -> None:
    if args.json:
        sys.stdout.write(orjson.dumps(payload, option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        print(_human(args.action, payload))


def _request(args: argparse.Namespace) -> tuple[str, str, Any]:
    action = args.action
    if action == "stats":
        return "GET", "/stats", None
    if action == "list":
        query = f"?limit={args.limit}&after={args.after}"
        if args.state:
            query += f"&state={args.state}"
        return "GET", f"/tasks{query}", None
    if action == "show":
        return "GET", f"/tasks/{args.id}", None
    if action == "cancel":
        return "DELETE", f"/tasks/{args.id}", None
    if action == "retry":
        body: dict[str, Any] = {"failed": True} if args.failed else {"ids": args.ids}
        return "POST", "/tasks:retry", body
    states = [s for s in ("succeeded", "failed", "cancelled") if getattr(args, s)]
    if args.finished or not states:
        states = ["succeeded", "failed", "cancelled"]
    return "POST", "/tasks:purge", {"older_than": args.older_than, "states": states}


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.2f}"
    text = str(value).replace("\n", " ")
    return text if len(text) <= 60 else text[:57] + "..."


def _field(key: str, value: Any) -> str:
    """One field of a whole task, for people: JSON values, ISO 8601 UTC times, whole text."""
    if value is None or (key.endswith("_at") and not value):
        return "-"
    if key.endswith("_at") and isinstance(value, int | float):
        moment = datetime.fromtimestamp(value, UTC).isoformat(timespec="milliseconds")
        return moment.replace("+00:00", "Z")
    if isinstance(value, str) and key not in ("data", "result"):
        return value
    return orjson.dumps(value).decode()


def table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """Rows as an aligned text table."""
    cells = [[_cell(row.get(c)) for c in columns] for row in rows]
    widths = [max([len(c), *(len(r[i]) for r in cells)]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join(line.rstrip() for line in lines)


def _human(action: str, payload: Any) -> str:
    if action == "list":
        text = table(payload["tasks"], LIST_COLUMNS) if payload["tasks"] else "no tasks"
        if payload.get("next_after"):
            text += f"\nmore: --after {payload['next_after']}"
        return text
    if action in ("show", "cancel"):
        width = max(len(k) for k in payload)
        return "\n".join(f"{k.ljust(width)}  {_field(k, v)}" for k, v in payload.items())
    if action == "retry":  # the errors went to stderr, one line each
        return f"re-queued {len(payload['retried'])} task(s)"
    if action == "purge":
        return f"purged {payload['purged']} task(s)"
    workers = payload["workers"]
    busy = f"{workers['busy']} busy / {workers['total']} total" if workers else "(read from file)"
    lines = [
        f"workers  {busy}",
        "tasks    " + ", ".join(f"{k} {v}" for k, v in payload["tasks"].items()),
    ]
    queues = payload.get("queues") or {}
    if queues:
        rows = [{"queue": name, **counts} for name, counts in queues.items()]
        lines += ["", table(rows, ("queue", "queued", "waiting", "running", "retrying"))]
    return "\n".join(lines)
