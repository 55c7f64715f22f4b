"""Mercure topic selectors: exact strings, RFC 6570 URI templates, and ``*``.

A string matches a selector when (protocol draft-07, "Topic selectors"):

* the selector is ``*``; or
* string and selector are identical (so a template also matches itself, which
  authorizes subscribing to that template); or
* the selector is a valid URI template and the string *could be an expansion*
  of it.

"Could be an expansion" is decided by compiling the template to a regular
expression, as the reference hub does. Values of ``{var}`` (and of the ``.``,
``/``, ``;``, ``?``, ``&`` operators) are unreserved characters, percent-escapes
and, since topics are IRIs, non-ASCII characters; so ``{id}`` never matches
across a ``/``. ``{+var}`` and ``{#var}`` also allow reserved characters. A
prefix modifier (``{id:3}``) bounds a lone variable's length; with several
variables in one expression the bound is not applied (lenient). A selector that
is not a valid template (unbalanced braces, bad variable names) only matches
itself.

**Bounded cost.** Python's ``re`` backtracks, where the reference hub's Go
regexps run in linear time. A run of value characters followed by a literal it
cannot contain (``{id}/x``: ``/`` is never part of ``{id}``) is matched
possessively, without backtracking, which is exact. A run followed by a character
it *can* contain (``{id}.{format}``: ``.`` is unreserved) or by another
expression must backtrack; each such *ambiguous junction* multiplies the worst
case by the topic's length. Selectors from requests (untrusted) may hold at most
``MAX_AMBIGUOUS`` of them, else ``TemplateTooComplex``; selectors from a signed
token are the operator's own and are not limited. Compiled patterns are cached,
with a bound.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache

#: The selector that matches every topic.
MATCH_ALL = "*"

#: Compiled templates kept around; selectors repeat (every tab of a page subscribes alike).
PATTERN_CACHE = 4096

#: Backtracking junctions allowed in an untrusted template: one keeps the worst case
#: quadratic in the topic's length (``{id}.{format}`` has one).
MAX_AMBIGUOUS = 1

# Characters an expansion may produce. The range admits IRI characters
# (ucschar and iprivate, simplified to "anything above ASCII").
_UNRESERVED = "A-Za-z0-9\\-._~\u00a0-\U0010ffff"
_RESERVED = ":/?#\\[\\]@!$&'()*+,;="
_PCT = "%[0-9A-Fa-f]{2}"

_NAME_CHAR = r"(?:[A-Za-z0-9_]|%[0-9A-Fa-f]{2})"
_VARSPEC = re.compile(rf"({_NAME_CHAR}(?:\.?{_NAME_CHAR})*)(\*|:([1-9][0-9]{{0,3}}))?")
_OPERATORS = "+#./;?&"
#: Characters besides the value characters that each operator's expansion may hold.
_OPERATOR_CHARS = {"": ",=", "+": "", "#": "", ".": ".,=", "/": "/,=", ";": ";,=", "?": "?&,="}
_OPERATOR_CHARS["&"] = _OPERATOR_CHARS["?"]


class TemplateTooComplex(ValueError):
    """An untrusted template would make matching too slow (see the module docstring)."""


@dataclass(frozen=True, slots=True)
class _Expr:
    op: str
    #: (name, explode, prefix length or 0)
    varspecs: tuple[tuple[str, bool, int], ...]

    @property
    def reserved(self) -> bool:
        return self.op in ("+", "#")

    @property
    def explode(self) -> bool:
        return any(explode for _, explode, _ in self.varspecs)

    @property
    def bound(self) -> int:
        """The prefix length of a lone prefixed variable, else 0 (unbounded)."""
        return self.varspecs[0][2] if len(self.varspecs) == 1 else 0

    def can_hold(self, char: str) -> bool:
        """Whether ``char`` can appear in an expansion of this expression."""
        if char == "%":
            return True  # a percent-escape
        if self.reserved and char in _RESERVED.replace("\\", ""):
            return True
        return re.fullmatch(f"[{_UNRESERVED}]", char) is not None or (
            char in _OPERATOR_CHARS[self.op]
        )


def _run(extra: str, *, reserved: bool, possessive: bool, bound: int = 0) -> str:
    """A regex for a run of value characters (plus ``extra``), at most ``bound`` if set."""
    allowed = _UNRESERVED + (_RESERVED if reserved else "") + re.escape(extra)
    repeat = f"{{0,{bound}}}" if bound else "*"
    return f"(?:[{allowed}]|{_PCT}){repeat}{'+' if possessive else ''}"


def _expression(expr: _Expr, possessive: bool) -> str:
    """The regex for one ``{op var,var...}`` expression (RFC 6570 §3.2).

    Any subset of the variables may be undefined (their expansion is left out);
    lists and maps expand with ``,`` and, exploded, with the operator's separator
    and ``=``. ``possessive`` makes the value runs match without backtracking:
    the caller sets it when what follows cannot be mistaken for part of them.
    """
    op, explode, bound = expr.op, expr.explode, expr.bound
    # A prefix applies to strings only, so a bounded value holds no ",".
    composite = "" if bound else (",=" if explode else ",")
    if op in ("", "+", "#"):
        body = _run(composite, reserved=op != "", possessive=possessive, bound=bound)
        return f"(?:\\#{body})?" if op == "#" else body
    value = _run(composite, reserved=False, possessive=possessive, bound=bound)
    count = "*" if explode else f"{{0,{len(expr.varspecs)}}}"
    if op == ".":
        # "." is itself a value character: any number of labels reads as one.
        return f"(?:\\.{value})?"
    if op == "/":
        return f"(?:/{value}){count}"
    if explode:
        # Exploded maps bring their own keys; a free key also covers the names.
        key = _run("", reserved=False, possessive=possessive)
    else:
        key = "(?:" + "|".join(re.escape(name) for name, _, _ in expr.varspecs) + ")"
    if op == ";":
        return f"(?:;{key}(?:={value})?){count}"
    # "?" and "&": name=value pairs, the first after the operator, the rest after "&".
    more = "*" if explode else f"{{0,{len(expr.varspecs) - 1}}}"
    pair = f"{key}={value}"
    return f"(?:\\{op}{pair}(?:&{pair}){more})?"


def _parse(selector: str) -> list[str | _Expr] | None:
    """Literals and expressions, adjacent simple/reserved ones merged; ``None`` if invalid."""
    parts: list[str | _Expr] = []
    pos = 0
    while pos < len(selector):
        start = selector.find("{", pos)
        literal = selector[pos : start if start >= 0 else len(selector)]
        if "}" in literal:
            return None  # a closing brace with no opening one
        if literal:
            parts.append(literal)
        if start < 0:
            break
        end = selector.find("}", start)
        if end < 0:
            return None  # unbalanced
        inner = selector[start + 1 : end]
        op = inner[:1] if inner[:1] in _OPERATORS else ""
        specs: list[tuple[str, bool, int]] = []
        for spec in inner[len(op) :].split(","):
            match = _VARSPEC.fullmatch(spec)
            if match is None:
                return None  # empty expression, nested brace or bad name
            specs.append((match.group(1), match.group(2) == "*", int(match.group(3) or 0)))
        expr = _Expr(op, tuple(specs))
        previous = parts[-1] if parts else None
        if isinstance(previous, _Expr) and previous.op in ("", "+") and op in ("", "+"):
            # {a}{+b} can only be one run: the larger class of the two, exactly.
            merged = "+" if "+" in (op, previous.op) else ""
            expr = _Expr(merged, (*previous.varspecs, *specs))
            parts[-1] = expr
        else:
            parts.append(expr)
        pos = end + 1
    return parts


def compile_template(selector: str, *, trusted: bool = False) -> re.Pattern[str] | None:
    """The regex of ``selector`` if it is a valid URI template with an expression.

    Returns ``None`` for a plain string or anything that is not a valid template
    (then the selector can only match exactly). Raises ``TemplateTooComplex``
    for an untrusted template with more than ``MAX_AMBIGUOUS`` ambiguous junctions.
    """
    if "{" not in selector and "}" not in selector:
        return None
    pattern, ambiguous = _compile(selector)
    if not trusted and ambiguous > MAX_AMBIGUOUS:
        raise TemplateTooComplex(
            f"topic selector {selector!r} is too ambiguous a URI template: a variable is "
            f"followed by a character it may contain more than {MAX_AMBIGUOUS} time(s)"
        )
    return pattern


@lru_cache(maxsize=PATTERN_CACHE)
def _compile(selector: str) -> tuple[re.Pattern[str] | None, int]:
    parts = _parse(selector)
    if parts is None or not any(isinstance(p, _Expr) for p in parts):
        return None, 0
    regex: list[str] = []
    ambiguous = 0
    for index, part in enumerate(parts):
        if isinstance(part, str):
            regex.append(re.escape(part))
            continue
        following = parts[index + 1] if index + 1 < len(parts) else None
        if following is None:
            safe = True  # the run must reach the end of the topic
        elif isinstance(following, str):
            safe = not part.can_hold(following[0])
        else:
            safe = False  # another expression, optional: cannot tell where this one ends
        ambiguous += not safe
        regex.append(_expression(part, possessive=safe))
    return re.compile("".join(regex)), ambiguous


def matches(topic: str, selector: str) -> bool:
    """Whether ``topic`` matches ``selector`` (``*``, identical, or a template expansion).

    The selector is trusted (no complexity limit): use ``Selectors`` for input.
    """
    if selector == MATCH_ALL or topic == selector:
        return True
    pattern = compile_template(selector, trusted=True)
    return pattern is not None and pattern.fullmatch(topic) is not None


class Selectors:
    """A set of topic selectors, split for fast matching. Immutable.

    ``exact`` holds every selector but ``*`` (a template matches itself too);
    ``templates`` the compiled valid templates; ``match_all`` is set by ``*``.
    Untrusted selectors (the default) raise ``TemplateTooComplex`` as
    ``compile_template`` does.
    """

    __slots__ = ("exact", "match_all", "raw", "templates")

    def __init__(self, selectors: Iterable[str], *, trusted: bool = False) -> None:
        self.raw: tuple[str, ...] = tuple(dict.fromkeys(selectors))
        self.match_all = MATCH_ALL in self.raw
        self.exact = frozenset(s for s in self.raw if s != MATCH_ALL)
        compiled = (compile_template(s, trusted=trusted) for s in self.exact)
        self.templates = tuple(p for p in compiled if p is not None)

    def __repr__(self) -> str:
        return f"<Selectors {list(self.raw)!r}>"

    def __bool__(self) -> bool:
        return bool(self.raw)

    def match_template(self, topic: str) -> bool:
        """Whether ``topic`` could be an expansion of one of the templates."""
        return any(p.fullmatch(topic) is not None for p in self.templates)

    def match(self, topic: str) -> bool:
        """Whether ``topic`` matches at least one selector."""
        return self.match_all or topic in self.exact or self.match_template(topic)

    def match_any(self, topics: Iterable[str]) -> bool:
        """Whether at least one of ``topics`` matches at least one selector."""
        return any(self.match(t) for t in topics)

    def match_every(self, topics: Iterable[str]) -> bool:
        """Whether each of ``topics`` matches at least one selector (publish rights)."""
        return all(self.match(t) for t in topics)
