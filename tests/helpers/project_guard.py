"""The project's own files, which no test may read through a default path or change.

A test or bench that runs a stage with the project root as its working folder, or
leans on a default path such as ``data/models/clip``, reads the user's pipeline
outputs (after ``./run repro``) or writes beside them. The suite therefore runs in an
empty working folder of its own, and every test is checked against a snapshot of the
project tree (names, sizes, modification times) taken before it: a file or folder
that appears, vanishes or changes under the project fails that test, named.
"""
from __future__ import annotations

import os
from pathlib import Path

# Not the project's content: environments, caches, git's object store.
SKIPPED_NAMES = {".git", "__pycache__", ".pytest_cache", ".mypy_cache", ".ruff_cache", ".whl"}
# What git keeps that a test could leave behind: branches, tags, DVC experiment refs.
GIT_KEPT = (".git/refs", ".git/packed-refs")

Snapshot = dict[str, tuple[int, int]]


def _skipped(folder: Path, name: str) -> bool:
    return (name in SKIPPED_NAMES or name.endswith(".egg-info")
            or (folder / name / "pyvenv.cfg").is_file())  # a virtual environment, whatever its name


def _walk(root: Path, start: Path, out: Snapshot, skip: bool) -> None:
    for folder, dirs, files in os.walk(start):
        here = Path(folder)
        if skip:
            dirs[:] = [d for d in dirs if not _skipped(here, d)]
        for name in dirs:
            out[(here / name).relative_to(root).as_posix() + "/"] = (-1, 0)
        for name in files:
            path = here / name
            try:
                st = path.lstat()
            except FileNotFoundError:  # removed while we walked
                continue
            out[path.relative_to(root).as_posix()] = (st.st_size, st.st_mtime_ns)


def snapshot(root: Path) -> Snapshot:
    """Every file (size, mtime) and folder under ``root``, but for caches and environments."""
    out: Snapshot = {}
    _walk(root, root, out, skip=True)
    for rel in GIT_KEPT:
        path = root / rel
        if path.is_dir():
            _walk(root, path, out, skip=False)
        elif path.is_file():
            st = path.stat()
            out[rel] = (st.st_size, st.st_mtime_ns)
    return out


def changes(before: Snapshot, after: Snapshot, limit: int = 12) -> list[str]:
    """What differs, one line a path: ``added``, ``removed`` or ``changed``."""
    lines = [f"added   {p}" for p in sorted(after.keys() - before.keys())]
    lines += [f"removed {p}" for p in sorted(before.keys() - after.keys())]
    lines += [f"changed {p}" for p in sorted(before.keys() & after.keys()) if before[p] != after[p]]
    return lines[:limit] + ([f"... and {len(lines) - limit} more"] if len(lines) > limit else [])


def message(root: Path, what: str, diff: list[str]) -> str:
    return (f"{what} changed the project's own files under {root}:\n  " + "\n  ".join(diff) +
            "\nA test or bench must pass every path explicitly (under tmp_path) or work in a temporary "
            "copy of the project: never use the project root as working folder or rely on a default path.")
