"""Task options: what a caller may ask for, how it is checked, how defaults resolve.

One place for both doors (the Python API and ``POST /tasks``), so both accept
the same options and refuse bad ones with the same message naming the field.
Resolution, most specific first: the call < defaults for the task's ``name`` <
defaults for its ``queue`` < settings.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace
from typing import Any

import orjson

from ..config import Settings
from ..errors import NotSerializable, ValidationError
from ..models import RetryPolicy
from ..storage import NewTask

#: Every option a task accepts (``data`` aside), for the API's unknown-field check.
OPTIONS = frozenset(
    {
        "name",
        "queue",
        "priority",
        "delay",
        "available_at",
        "serial_group",
        "unique_key",
        "unique_for",
        "timeout",
        "max_attempts",
        "retry",
    }
)
#: Queue names, task names, group and unique keys: printable, bounded.
LABEL = re.compile(r"^[\w.:/@-]{1,200}$")
#: Delays beyond ten years are almost certainly a unit mistake (ms for s).
MAX_DELAY = 10 * 365 * 86400.0
RETRY_FIELDS = frozenset({"base", "factor", "cap", "jitter"})


@dataclass(frozen=True, slots=True)
class Defaults:
    """Defaults for a queue or a task name; ``None`` means "not set here"."""

    queue: str | None = None
    priority: int | None = None
    max_attempts: int | None = None
    timeout: float | None = None
    retry: RetryPolicy | None = None


@dataclass(frozen=True, slots=True)
class TaskSpec:
    """One task to enqueue: its data and options (names as for ``TaskServer.task``)."""

    data: Any
    options: dict[str, Any] = field(default_factory=dict)

    def with_defaults(self, defaults: dict[str, Any]) -> TaskSpec:
        """This spec with ``defaults`` filled in where it sets nothing."""
        return replace(self, options={**defaults, **self.options})


def encode_parsed(data: Any, field_name: str = "data") -> str:
    """The JSON text of ``data`` that was parsed from JSON just now (an HTTP body): what is
    stored. ``data`` itself is what a worker sees: JSON's own types, which decoding the
    text back would only copy. Raises ``NotSerializable`` as ``encode_payload`` does."""
    try:
        return orjson.dumps(data).decode()
    except TypeError as exc:
        raise NotSerializable(
            f"{field_name} cannot be encoded as JSON: {exc}", field=field_name
        ) from None


def encode_payload(data: Any, field_name: str = "data") -> tuple[str, Any]:
    """JSON-encode ``data`` and decode it back: what is stored and what a worker will see.

    Raises ``NotSerializable`` naming the field before anything is written.
    """
    try:
        raw = orjson.dumps(data)
    except TypeError as exc:
        raise NotSerializable(
            f"{field_name} cannot be encoded as JSON: {exc}", field=field_name
        ) from None
    return raw.decode(), orjson.loads(raw)


def _number(
    value: Any, name: str, *, lo: float, hi: float, integer: bool = False, positive: bool = False
) -> float:
    ok = not isinstance(value, bool) and isinstance(value, int | float)
    if ok and integer and not isinstance(value, int):
        ok = False
    if ok and not math.isfinite(value):
        ok = False
    if ok and (value < lo or value > hi or (positive and value <= 0)):
        ok = False
    if not ok:
        kind = "an integer" if integer else "a number"
        bound = f"above {lo:g}" if positive else f"from {lo:g}"
        raise ValidationError(f"{name} must be {kind} {bound} to {hi:g}, got {value!r}", field=name)
    return float(value)


def _label(value: Any, name: str) -> str:
    if not isinstance(value, str) or not LABEL.match(value):
        raise ValidationError(
            f"{name} must be 1-200 letters, digits or _ . : / @ -, got {value!r}", field=name
        )
    return value


def retry_policy(value: Any, name: str = "retry") -> RetryPolicy:
    """A ``RetryPolicy`` from one, or from a JSON object with base/factor/cap/jitter."""
    if isinstance(value, RetryPolicy):
        return value
    if not isinstance(value, dict):
        raise ValidationError(
            f"{name} must be an object with {', '.join(sorted(RETRY_FIELDS))}", field=name
        )
    for key in value:
        if key not in RETRY_FIELDS:
            raise ValidationError(f"unknown field {key!r} in {name}", field=f"{name}.{key}")
    return RetryPolicy(
        base=_number(value.get("base", 1.0), f"{name}.base", lo=0, hi=MAX_DELAY),
        factor=_number(value.get("factor", 2.0), f"{name}.factor", lo=1, hi=100),
        cap=_number(value.get("cap", 960.0), f"{name}.cap", lo=0, hi=MAX_DELAY),
        jitter=_number(value.get("jitter", 0.1), f"{name}.jitter", lo=0, hi=1),
    )


def prepare(
    spec: TaskSpec,
    *,
    where: str,
    now: float,
    settings: Settings,
    by_name: Defaults | None,
    by_queue: Defaults | None,
) -> NewTask:
    """Check ``spec`` and resolve its defaults into a ``NewTask``.

    ``where`` prefixes field names in errors (``tasks[2].``). Raises
    ``ValidationError`` (or ``NotSerializable``) naming the field; nothing is
    written by then.
    """
    opts = spec.options
    for key in opts:
        if key not in OPTIONS:
            raise ValidationError(
                f"unknown option {key!r}; allowed: {', '.join(sorted(OPTIONS))}", field=where + key
            )

    def pick(key: str) -> Any:
        if opts.get(key) is not None:
            return opts[key]
        for source in (by_name, by_queue):
            value = getattr(source, key, None) if source is not None else None
            if value is not None:
                return value
        return None

    try:
        text, value = encode_payload(spec.data)
        name = _label(opts["name"], "name") if opts.get("name") is not None else None
        raw_queue = pick("queue")
        queue = "default" if raw_queue is None else _label(raw_queue, "queue")
        raw_priority = pick("priority")
        priority = 0 if raw_priority is None else raw_priority  # `or 0` let {} and "" pass
        priority = int(_number(priority, "priority", lo=-1000, hi=1000, integer=True))
        timeout = pick("timeout")
        timeout = (
            _number(timeout, "timeout", lo=0, hi=MAX_DELAY, positive=True)
            if timeout is not None
            else settings.default_timeout or None
        )
        attempts = pick("max_attempts")
        max_attempts = (
            int(_number(attempts, "max_attempts", lo=1, hi=1000, integer=True))
            if attempts is not None
            else settings.default_max_attempts
        )
        retry = pick("retry")
        policy = retry_policy(retry) if retry is not None else None
        available_at = None
        if opts.get("delay") is not None and opts.get("available_at") is not None:
            raise ValidationError("give delay or available_at, not both", field="delay")
        if opts.get("delay") is not None:
            available_at = now + _number(opts["delay"], "delay", lo=0, hi=MAX_DELAY)
        elif opts.get("available_at") is not None:
            available_at = _number(opts["available_at"], "available_at", lo=0, hi=now + MAX_DELAY)
        group = opts.get("serial_group")
        serial_group = _label(group, "serial_group") if group is not None else None
        raw_key = opts.get("unique_key")
        unique_key = _label(raw_key, "unique_key") if raw_key is not None else None
        unique_for = opts.get("unique_for")
        if unique_for is not None:
            unique_for = _number(unique_for, "unique_for", lo=0, hi=MAX_DELAY)
            if unique_key is None:
                raise ValidationError("unique_for needs a unique_key", field="unique_for")
    except ValidationError as exc:
        field_name: str = exc.field or "data"
        raise type(exc)(str(exc), field=where + field_name) from None
    return NewTask(
        text,
        value,
        max_attempts,
        timeout,
        queue,
        priority,
        available_at,
        name,
        serial_group,
        unique_key,
        policy,
        unique_for,
    )
