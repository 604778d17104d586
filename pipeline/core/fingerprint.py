"""Fingerprints of finished work, so that a rerun reuses exactly what it would remake.

The download and embed stages keep their outputs between DVC runs (``persist`` in
dvc.yaml), so a killed ``dvc repro`` resumes them. A finished shard is reused only
when its fingerprint, written beside it (or into it) when it was made, equals the
one the current run would write: the shard's inputs, the params that change its
bytes, the code that makes it and the libraries whose versions change its bytes.

* ``digest``: sha256 of a JSON value in canonical form;
* ``file_sha256``: sha256 of a file, read in blocks;
* ``code_sha256``: sha256 of every project module a module runs (followed through
  its imports, also those inside functions): the same files DVC's code deps cover,
  so a code change remakes what DVC would remake without ``persist``;
* ``library_versions``: installed versions of the distributions named;
* ``describe_difference``: which entries of two fingerprints differ, for the log;
* ``RedoLog``: one log line per shard that is remade, naming why (at most a few
  per reason, then a count).

Standard library only: the download stage must not import torch.
"""
from __future__ import annotations

import ast
import hashlib
import json
import logging
from functools import lru_cache
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional

ROOT = Path(__file__).resolve().parents[2]  # the folder holding the pipeline and stages packages
PACKAGES = ("pipeline", "stages")


# --------------------------------------------------------------------- digests
def digest(value: Any) -> str:
    """sha256 of ``value`` as canonical JSON (sorted keys, no spaces)."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes (about 1-2 s per GB)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def library_versions(*distributions: str) -> dict[str, str]:
    """``{name: version}`` of installed distributions (``"absent"`` when not installed)."""
    out = {}
    for name in distributions:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "absent"
    return out


# ------------------------------------------------------------------------ code
def module_file(name: str) -> Optional[Path]:
    """The file of module ``name`` inside the project, or None (third-party, absent)."""
    if name.split(".")[0] not in PACKAGES:
        return None
    base = ROOT.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _with_parents(name: str) -> list[str]:
    """Importing ``a.b.c`` runs ``a/__init__``, ``a/b/__init__`` and ``a/b/c``."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imports_of(path: Path) -> set[str]:
    """Every module a file imports anywhere in its body (absolute names)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    here = _module_name(path)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            names.add(module)
            # `from pkg import sub` imports the submodule pkg.sub when there is one.
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return names


def modules_run_by(entry_modules: Iterable[str]) -> set[Path]:
    """Files of the project that importing ``entry_modules`` runs, transitively."""
    seen: set[Path] = set()
    todo = [m for e in entry_modules for m in _with_parents(e)]
    while todo:
        name = todo.pop()
        path = module_file(name)
        if path is None or path in seen:
            continue
        seen.add(path)
        for imported in imports_of(path):
            todo.extend(_with_parents(imported))
    return seen


@lru_cache(maxsize=None)
def code_sha256(entry_module: str) -> str:
    """sha256 over the project files ``entry_module`` runs (relative names and contents)."""
    h = hashlib.sha256()
    for path in sorted(modules_run_by([entry_module]), key=lambda p: p.relative_to(ROOT).as_posix()):
        h.update(path.relative_to(ROOT).as_posix().encode("utf-8") + b"\0")
        h.update(hashlib.sha256(path.read_bytes()).digest())
    return h.hexdigest()


# ---------------------------------------------------------------- differences
def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, Mapping) and value:
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: value}


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 24 else text[:12] + "…" + text[-8:]


class _Absent:
    def __repr__(self) -> str:
        return "<absent>"


_ABSENT = _Absent()  # a key one side lacks; never equal to any value


def describe_difference(saved: Mapping[str, Any], current: Mapping[str, Any], limit: int = 4,
                        nothing: str = "the fingerprints differ") -> str:
    """Which entries differ, as ``key: saved there, current here`` (nested keys dotted);
    ``nothing`` when no entry does (the digests differ in what the entries do not show)."""
    a, b = _flatten(saved), _flatten(current)
    diffs = []
    for key in sorted(set(a) | set(b)):
        if a.get(key, _ABSENT) != b.get(key, _ABSENT):
            diffs.append(f"{key}: {_short(a.get(key, _ABSENT))} there, {_short(b.get(key, _ABSENT))} here")
    if not diffs:
        return nothing
    more = f" (and {len(diffs) - limit} more)" if len(diffs) > limit else ""
    return "; ".join(diffs[:limit]) + more


class RedoLog:
    """Log lines for finished shards that are remade, each naming why.

    The first ``per_reason`` shards of each distinct reason get their own line; the
    rest are counted and summed up by ``close()``, so a params change over thousands
    of shards gives a few lines, not thousands.
    """

    def __init__(self, logger: logging.Logger, what: str, per_reason: int = 3) -> None:
        self.logger = logger
        self.what = what
        self.per_reason = per_reason
        self.counts: dict[str, int] = {}

    def note(self, shard: str, reason: str) -> None:
        n = self.counts.get(reason, 0) + 1
        self.counts[reason] = n
        if n <= self.per_reason:
            self.logger.warning("%s: remaking %s, made with other inputs: %s", self.what, shard, reason)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def close(self) -> None:
        for reason, n in self.counts.items():
            if n > self.per_reason:
                self.logger.warning("%s: remaking %d more shards for the same reason: %s",
                                    self.what, n - self.per_reason, reason)
