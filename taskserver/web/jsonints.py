"""Integers too wide for 64 bits in a JSON request body.

orjson parses an integer outside [-2**63, 2**64 - 1] as a float without a word,
so ``18446744073709551616`` would be stored as ``1.8446744073709552e+19``: a
different value. Such bodies are refused instead (``ValidationError`` naming
the field). An integer outside the range has at least 19 digits in a row: the
check counts a body's digits, looks for such a run only when there are 19 or
more, and parses again (exactly, with the standard library) only a body that
has one (a long number, or a long string of digits), to find the field. A body
nested deeper than that parser's recursion limit (orjson takes 1,024 levels) is
scanned for its number tokens instead, and the field is then named ``body``.
"""

from __future__ import annotations

import json
import re
from typing import Any

from ..errors import ValidationError

INT_MIN = -(2**63)
INT_MAX = 2**64 - 1
_LONG_DIGITS = re.compile(rb"[0-9]{19}")
_DIGITS = b"0123456789"
#: A JSON string (skipped) or number: group 1 its integer part, 2 and 3 what makes it a float.
_TOKEN = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"|(-?[0-9]+)(\.[0-9]+)?([eE][-+]?[0-9]+)?')


def refuse_wide_integers(raw: bytes) -> None:
    """Raise ``ValidationError`` naming the first field of the JSON document ``raw``
    (already known to be valid JSON) that holds an integer outside 64 bits."""
    # Counting the digits is ~10x faster than the regex: most bodies have too few for a run.
    if len(raw) - len(raw.translate(None, _DIGITS)) < 19 or _LONG_DIGITS.search(raw) is None:
        return
    try:
        path = _first_wide(json.loads(raw))
    except RecursionError:  # nested deeper than the standard library parses
        path = "" if _has_wide_token(raw) else None
    if path is not None:
        name = path or "body"
        raise ValidationError(
            f"{name} holds an integer that does not fit in a 64-bit integer "
            f"({INT_MIN} to {INT_MAX}); send larger numbers as strings",
            field=name,
        )


def _first_wide(document: Any) -> str | None:
    # Iterative, in document order: a body may nest deeper than Python's recursion limit.
    stack: list[tuple[str, Any]] = [("", document)]
    while stack:
        path, value = stack.pop()
        if type(value) is int:
            if not INT_MIN <= value <= INT_MAX:
                return path
        elif isinstance(value, dict):
            items = [(f"{path}.{k}" if path else k, v) for k, v in value.items()]
            stack.extend(reversed(items))
        elif isinstance(value, list):
            stack.extend(reversed([(f"{path}[{i}]", v) for i, v in enumerate(value)]))
    return None


def _has_wide_token(raw: bytes) -> bool:
    # Outside strings, digits are number tokens only (``raw`` is valid JSON).
    for match in _TOKEN.finditer(raw):
        digits = match.group(1)
        if digits is None or match.group(2) or match.group(3):
            continue  # a string or a float
        if len(digits) > 20 or not INT_MIN <= int(digits) <= INT_MAX:
            return True
    return False
