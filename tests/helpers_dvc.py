"""What each DVC stage's command runs, from its imports, against what dvc.yaml declares.

``modules_run_by(cmd)`` follows every import (module level, inside functions and
package ``__init__`` files) from the stage's command module, transitively within
``pipeline/`` and ``stages/``. ``missing_deps(dvc)`` lists the (stage, file) pairs
whose file is run but not covered by a dep of that stage (a file, or a folder
holding it), so that editing it could leave the stage's outputs stale.
"""
from __future__ import annotations

import ast
import shlex
from pathlib import Path
from typing import Iterable, Optional

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "stages")


def _module_file(name: str) -> Optional[Path]:
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
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
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
        path = _module_file(name)
        if path is None or path in seen:
            continue
        seen.add(path)
        for imported in imports_of(path):
            todo.extend(_with_parents(imported))
    return seen


def stage_entry_modules(cmd: str) -> list[str]:
    """``capline train --x y`` -> the modules that run it: the CLI group and stages/train.py."""
    words = shlex.split(cmd)
    if not words or words[0] != "capline" or len(words) < 2:
        raise ValueError(f"stage command {cmd!r} does not start with `capline SUBCOMMAND`")
    return ["stages.cli", f"stages.{words[1]}"]


def _covered(path: Path, deps: list[str]) -> bool:
    rel = path.relative_to(ROOT).as_posix()
    return any(rel == d or rel.startswith(d.rstrip("/") + "/") for d in deps)


def _commands(stage: dict) -> list[str]:
    cmd = stage["cmd"]
    return cmd if isinstance(cmd, list) else [cmd]


def missing_deps(dvc: dict) -> list[tuple[str, str]]:
    """(stage, file) pairs a stage runs without depending on them."""
    missing = []
    for name, stage in dvc["stages"].items():
        deps = [str(d) for d in stage.get("deps", [])]
        for cmd in _commands(stage):
            for path in sorted(modules_run_by(stage_entry_modules(cmd))):
                if not _covered(path, deps):
                    missing.append((name, path.relative_to(ROOT).as_posix()))
    return missing


def _declared(stage: dict) -> list[str]:
    """Every data path a stage declares: deps, outs, metrics and plots."""
    paths = [str(d) for d in stage.get("deps", [])]
    for kind in ("outs", "metrics", "plots"):
        for entry in stage.get(kind, []):
            paths.append(next(iter(entry)) if isinstance(entry, dict) else str(entry))
    return [p for p in paths if p.startswith("data/")]


def _related(a: str, b: str) -> bool:
    """The same path, or one inside the other (a file of a declared folder)."""
    a, b = a.rstrip("/"), b.rstrip("/")
    return a == b or a.startswith(b + "/") or b.startswith(a + "/")


def undeclared_paths(dvc: dict) -> list[tuple[str, str]]:
    """Data paths a command names that its stage does not declare, and declared data
    paths its command never names (they would be tracked but not used, or the reverse)."""
    problems = []
    for name, stage in dvc["stages"].items():
        declared = _declared(stage)
        named = [w for cmd in _commands(stage) for w in shlex.split(cmd) if w.startswith("data/")]
        for w in named:
            if not any(_related(w, d) for d in declared):
                problems.append((name, f"command names {w} but the stage does not declare it"))
        for d in declared:
            if not any(_related(d, w) for w in named):
                problems.append((name, f"declares {d} but its command never names it"))
    return problems
