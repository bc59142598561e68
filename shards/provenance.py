"""Which code made a dataset or a model: Tessera's version and the git commit of its source; and what rendered a
dataset's samples (:data:`Rendering`, gathered by ``ingest.rendering``), which tells old samples from new where a
later release or library renders differently (a fix to windowing, to a vendor's reader) and most commits do not.

A job submitted with a working directory runs a copy of the source without its ``.git``: ``tessera submit``
names the commit it sent in ``TESSERA_SOURCE_COMMIT``, which wins over what the copy can tell.
"""

from __future__ import annotations

import functools
import os
import subprocess
from importlib import metadata
from pathlib import Path

COMMIT_VARIABLE = "TESSERA_SOURCE_COMMIT"
SOURCE = Path(__file__).resolve().parents[1]  # the checkout's root (or where the packages are installed)
DIRTY = "+changes"  # a commit with uncommitted changes to tracked files: not exactly that commit's code


def _git(folder: Path, *args: str) -> str | None:
    try:
        # --no-optional-locks: `status` would refresh the index under index.lock, in a checkout a user works in
        cmd = ["git", "--no-optional-locks", "-C", str(folder), *args]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def source_commit(root: Path = SOURCE) -> str | None:
    """The commit of the git checkout whose root is ``root``, with :data:`DIRTY` when tracked files differ from it
    (untracked files are not code a user runs by accident); None where ``root`` is no checkout's root: packages
    installed into a virtual environment inside some other project's checkout are not that project's code."""
    found = (_git(root, "rev-parse", "--show-toplevel", "HEAD") or "").splitlines()  # none without a commit
    if len(found) != 2 or Path(found[0]).resolve() != Path(root).resolve():
        return None
    commit = found[1]
    changed = _git(root, "status", "--porcelain", "--untracked-files=no")
    return commit + (DIRTY if changed else "")


@functools.cache
def commit() -> str:
    """This process's source commit: the submitter's where the job was sent one, else its checkout's, else
    ``unknown`` (an installed package)."""
    return os.environ.get(COMMIT_VARIABLE) or source_commit() or "unknown"


def version() -> str:
    """Tessera's installed version (``unknown`` when run from a tree that was never installed)."""
    try:
        return metadata.version("tessera")
    except metadata.PackageNotFoundError:
        return "unknown"


def made_by() -> str:
    """One line for a manifest: ``tessera <version> (<commit>)``."""
    return f"tessera {version()} ({commit()})"


# What rendered a dataset's samples, as the manifest records it (``ingest.rendering.rendered_with``): Tessera's
# rendering of the kind of input and the versions of the libraries whose output the samples hold.
Rendering = dict[str, str]


def combined(found: list[Rendering]) -> Rendering | None:
    """One record of several (a run's workers, a dataset's runs): each entry's versions, ``a | b`` where they
    differ; None when none was recorded."""
    if not found:
        return None
    names = list(dict.fromkeys(name for one in found for name in one))
    return {
        name: " | ".join(sorted({one.get(name, "none") for one in found}, key=lambda v: (v == "none", v)))
        for name in names
    }


def differences(before: Rendering, now: Rendering) -> list[str]:
    """``"name old -> new"`` for each entry that differs (``none`` where one side lacks it)."""
    names = list(dict.fromkeys([*before, *now]))
    return [
        f"{name} {before.get(name, 'none')} -> {now.get(name, 'none')}"
        for name in names
        if before.get(name) != now.get(name)
    ]


def mixed(found: list[Rendering]) -> list[str]:
    """``"name a | b"`` for each entry on which ``found`` differ: samples made two ways."""
    return [f"{name} {versions}" for name, versions in (combined(found) or {}).items() if " | " in versions]


def describe_rendering(found: Rendering | None) -> str:
    """One line: ``tessera wsi rendering 1, numpy 2.4.6, ...``."""
    if not found:
        return "not recorded (made before Tessera recorded it)"
    return ", ".join(f"{name} {version}" for name, version in found.items())
