"""What each DVC stage's command runs, from its imports, against what dvc.yaml declares.

``modules_run_by(cmd)`` follows every import (module level, inside functions and
package ``__init__`` files) from the stage's command module, transitively within
``pipeline/`` and ``stages/``. ``missing_deps(dvc)`` lists the (stage, file) pairs
whose file is run but not covered by a dep of that stage (a file, or a folder
holding it), so that editing it could leave the stage's outputs stale.
"""
from __future__ import annotations

import shlex
from pathlib import Path

# One import walker for the tests and for the stages' code fingerprints (resume).
from pipeline.core.fingerprint import ROOT, imports_of, modules_run_by

__all__ = ["ROOT", "imports_of", "missing_deps", "modules_run_by", "stage_entry_modules", "undeclared_paths"]


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


# Paths a command names on purpose without declaring them: train's checkpoints must
# survive DVC deleting the stage's outputs before a rerun (docs/model.md).
UNTRACKED = ("data/checkpoints/",)


def undeclared_paths(dvc: dict) -> list[tuple[str, str]]:
    """Data paths a command names that its stage does not declare, and declared data
    paths its command never names (they would be tracked but not used, or the reverse)."""
    problems = []
    for name, stage in dvc["stages"].items():
        declared = _declared(stage)
        named = [w for cmd in _commands(stage) for w in shlex.split(cmd)
                 if w.startswith("data/") and not w.startswith(UNTRACKED)]
        for w in named:
            if not any(_related(w, d) for d in declared):
                problems.append((name, f"command names {w} but the stage does not declare it"))
        for d in declared:
            if not any(_related(d, w) for w in named):
                problems.append((name, f"declares {d} but its command never names it"))
    return problems
