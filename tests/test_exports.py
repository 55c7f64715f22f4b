"""STYLE rule 1: a small front door whose ``__all__`` is sorted and complete."""

from __future__ import annotations

import ast
from pathlib import Path

import taskserver

INIT = Path(taskserver.__file__)


def _public_names_defined() -> set[str]:
    """Names bound at the top level of ``taskserver/__init__.py`` that are not private."""
    tree = ast.parse(INIT.read_text(encoding="utf-8"))
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.ImportFrom | ast.Import):
            names.update((alias.asname or alias.name).split(".")[0] for alias in node.names)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
    names.discard("annotations")  # from __future__ import annotations
    return {name for name in names if not name.startswith("_")}


def _isort_style(name: str) -> tuple[int, str]:
    # The order ruff's RUF022 (enabled for this project) keeps __all__ in:
    # SCREAMING_CASE first, then CamelCase, then everything else.
    if name.isupper():
        return (0, name)
    if name[:1].isupper():
        return (1, name)
    return (2, name)


def test_all_is_sorted() -> None:
    assert taskserver.__all__ == sorted(taskserver.__all__, key=_isort_style)
    assert len(set(taskserver.__all__)) == len(taskserver.__all__)


def test_all_equals_the_public_names_defined() -> None:
    assert set(taskserver.__all__) == _public_names_defined()


def test_every_exported_name_resolves() -> None:
    for name in taskserver.__all__:
        assert getattr(taskserver, name) is not None, name
