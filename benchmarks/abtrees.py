"""A/B runs: the same section against ``HEAD`` and an older commit, alternated.

``scripts/bench --only backlog --ab HEAD~1`` exports ``taskserver/`` as it was at
that commit and at ``HEAD`` (``git archive``: uncommitted changes are not
measured) into the run's temporary directory; a section
that takes ``opts.trees`` starts each of its servers with one tree's package
first on ``PYTHONPATH`` (the benchmark code itself is always this checkout's),
alternating the trees round by round, and prints each figure per tree.
"""

from __future__ import annotations

import io
import subprocess
import tarfile
from dataclasses import dataclass
from pathlib import Path

from .bench import ROOT, BenchError, child_env


@dataclass(frozen=True)
class Tree:
    """Which ``taskserver/`` a server runs: ``path`` None is this checkout."""

    label: str
    path: Path | None = None

    def env(self) -> dict[str, str]:
        """The server's environment: this tree's package found first."""
        env = child_env()
        if self.path is not None:
            env["PYTHONPATH"] = f"{self.path}:{env['PYTHONPATH']}"
        return env


def _git(*args: str) -> bytes:
    done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, check=False)
    if done.returncode:
        raise BenchError(f"git {' '.join(args)}: {done.stderr.decode(errors='replace').strip()}")
    return done.stdout


def dirty() -> bool:
    """True when ``taskserver/`` has changes not committed (an A/B run measures ``HEAD``)."""
    return bool(_git("status", "--porcelain", "--", "taskserver").strip())


def export(rev: str, tmp: Path) -> Tree:
    """``taskserver/`` as at ``rev``, unpacked under ``tmp``."""
    sha = _git("rev-parse", "--short", f"{rev}^{{commit}}").decode().strip()
    target = tmp / f"ab-{sha}"
    archive = _git("archive", "--format=tar", sha, "taskserver")
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(target, filter="data")
    return Tree(sha, target)


def trees(ab: str | None, tmp: Path) -> tuple[Tree, ...]:
    """This checkout alone, or (with ``ab``) that commit's tree and ``HEAD``'s, both
    exported at the start, so editing the checkout during the run changes nothing."""
    if ab is None:
        return (Tree("this tree"),)
    return (export(ab, tmp), export("HEAD", tmp))


def alternated(trees: tuple[Tree, ...], round_: int) -> tuple[Tree, ...]:
    """The trees in round ``round_``'s order: the order flips every round."""
    return trees if round_ % 2 == 0 else tuple(reversed(trees))
