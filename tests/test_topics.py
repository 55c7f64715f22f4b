"""Topic selectors: exact, ``*``, and RFC 6570 templates as "could be an expansion"."""

from __future__ import annotations

import time

import pytest

from taskserver.push.topics import Selectors, TemplateTooComplex, compile_template, matches

BOOKS = "https://example.com/books"


@pytest.mark.parametrize(
    ("topic", "selector", "expected"),
    [
        ("anything at all", "*", True),
        (f"{BOOKS}/1", f"{BOOKS}/1", True),
        (f"{BOOKS}/1", f"{BOOKS}/2", False),
        # {var}: unreserved characters and percent-escapes, never a "/"
        (f"{BOOKS}/1", BOOKS + "/{id}", True),
        (f"{BOOKS}/a%2Fb", BOOKS + "/{id}", True),
        (f"{BOOKS}/caf\u00e9", BOOKS + "/{id}", True),
        (f"{BOOKS}/1/reviews", BOOKS + "/{id}", False),
        (f"{BOOKS}/a b", BOOKS + "/{id}", False),
        (f"{BOOKS}/1,2", BOOKS + "/{id}", True),  # a list value
        # {+var} and {#var} allow reserved characters
        (f"{BOOKS}/1/reviews", BOOKS + "/{+path}", True),
        (f"{BOOKS}#a/b", BOOKS + "{#frag}", True),
        (f"{BOOKS}/1.json", BOOKS + "/{id}.{format}", True),
        (f"{BOOKS}/1", BOOKS + "/{id}.{format}", False),
        # operators
        (f"{BOOKS}/a/b", BOOKS + "{/x,y}", True),
        (f"{BOOKS}/a/b/c", BOOKS + "{/x,y}", False),
        (f"{BOOKS}/a/b/c", BOOKS + "{/x*}", True),
        (f"{BOOKS}?page=2&size=10", BOOKS + "{?page,size}", True),
        (f"{BOOKS}?other=1", BOOKS + "{?page,size}", False),
        (f"{BOOKS};v=1;w", BOOKS + "{;v,w}", True),
        (f"{BOOKS}.json", BOOKS + "{.format}", True),
        # prefix modifiers bound a lone variable
        (f"{BOOKS}/abc", BOOKS + "/{id:3}", True),
        (f"{BOOKS}/abcd", BOOKS + "/{id:3}", False),
        # a template matches itself; a broken one only itself
        (BOOKS + "/{id}", BOOKS + "/{id}", True),
        (f"{BOOKS}/1", BOOKS + "/{id", False),
        (BOOKS + "/{id", BOOKS + "/{id", True),
        (f"{BOOKS}/1", BOOKS + "/id}", False),
        (f"{BOOKS}/1", BOOKS + "/{i d}", False),
        (f"{BOOKS}/1", BOOKS + "/{}", False),
    ],
)
def test_matching(topic: str, selector: str, expected: bool) -> None:
    assert matches(topic, selector) is expected
    assert Selectors([selector], trusted=True).match(topic) is expected


def test_plain_strings_are_not_templates() -> None:
    assert compile_template(BOOKS) is None
    assert compile_template(BOOKS + "/{id") is None
    assert compile_template(BOOKS + "/{id}") is not None


def test_selectors_split_exact_templates_and_all() -> None:
    selectors = Selectors(["*", f"{BOOKS}/1", BOOKS + "/{id}", f"{BOOKS}/1"])
    assert selectors.match_all
    assert selectors.exact == {f"{BOOKS}/1", BOOKS + "/{id}"}
    assert len(selectors.templates) == 1
    assert selectors.raw == ("*", f"{BOOKS}/1", BOOKS + "/{id}")
    some = Selectors([f"{BOOKS}/1", BOOKS + "/{id}.json"])
    assert some.match_any(["x", f"{BOOKS}/2.json"])
    assert not some.match_every(["x", f"{BOOKS}/2.json"])
    assert some.match_every([f"{BOOKS}/1", f"{BOOKS}/2.json"])


def test_ambiguous_untrusted_templates_are_refused_but_signed_ones_are_not() -> None:
    ambiguous = BOOKS + "/{a}-{b}-{c}"
    with pytest.raises(TemplateTooComplex):
        Selectors([ambiguous])
    assert Selectors([ambiguous], trusted=True).match(f"{BOOKS}/x-y-z")


def test_matching_stays_fast_on_a_hostile_topic() -> None:
    # One ambiguous junction allowed: quadratic at worst, on a topic of the longest size.
    selectors = Selectors(["x{a}.{b}"])
    topic = "x" + "a." * 1023 + "!"
    started = time.perf_counter()
    assert not selectors.match(topic)
    assert time.perf_counter() - started < 1.0
