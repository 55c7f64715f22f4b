"""Log lines: text or one JSON object per line (``log_format``), and the access log.

``JsonFormatter`` writes ``time`` (UTC, ISO 8601, milliseconds), ``level``, ``logger``,
``message``, then every field given through logging's ``extra`` (``task_id`` and
``queue`` where a line is about a task, the access log's fields), and ``exception``
with the traceback when there is one. Values that are not JSON are written as text.

``AccessLogger`` (``access_log = true``) logs one line per request to
``taskserver.access``: method, path (without the query string, which may carry a
Mercure token), status, duration and the client address (the one a trusted proxy
reported, ``forwarded.py``), as fields and in the message.
"""

from __future__ import annotations

import logging
import sys
from datetime import UTC, datetime
from typing import Any

import orjson
from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

from .forwarded import CLIENT

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
ACCESS_LOGGER = "taskserver.access"
#: What every LogRecord has: anything else on a record came through ``extra``.
_STANDARD = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {
    "message",
    "asctime",
    "taskName",
}


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exception"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return orjson.dumps(entry, default=str).decode()


def configure(level: str, log_format: str) -> None:
    """Log to stderr at ``level``, as text or JSON lines (``log_format``)."""
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=level, handlers=[handler])  # as before: a no-op if configured


class AccessLogger(AbstractAccessLogger):
    """One line per request: method, path, status, duration and client address."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        client = request.get(CLIENT) or request.remote or "-"
        fields = {
            "method": request.method,
            "path": request.path,
            "status": response.status,
            "duration_ms": round(time * 1000, 3),
            "client": client,
            "bytes": response.body_length,
        }
        self.logger.info(
            "%s %s %s %d %.1fms",
            client,
            request.method,
            request.path,
            response.status,
            time * 1000,
            extra=fields,
        )

    @property
    def enabled(self) -> bool:
        return self.logger.isEnabledFor(logging.INFO)


def access_logger() -> dict[str, Any]:
    """The ``web.AppRunner`` arguments that turn the access log on."""
    return {"access_log": logging.getLogger(ACCESS_LOGGER), "access_log_class": AccessLogger}
