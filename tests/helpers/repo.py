"""A copy of the project in a fresh git repository, for tests that run `dvc repro` for real.

The tracked and new files (not data/, not the venv) are copied, params.yaml is
overlaid with the test's settings, and one commit is made (`dvc exp` needs it).
DVC then runs the `capline` stage commands exactly as a user's `dvc repro` would.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Optional

import yaml

ROOT = Path(__file__).resolve().parents[2]


def merge(base: dict, over: dict) -> dict:
    for k, v in over.items():
        base[k] = merge(base.get(k, {}), v) if isinstance(v, dict) else v
    return base


def env(repo: Path) -> dict:
    """The environment for commands in the copy ``repo``: its own code, not this checkout's."""
    out = dict(os.environ)
    # `capline` lives beside this interpreter; DVC runs it through the shell.
    out["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{out.get('PATH', '')}"
    out["PYTHONPATH"] = str(repo)
    out.update(GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t.invalid",
               GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t.invalid")
    return out


def run(cmd: list[str], cwd: Path, timeout: float = 900) -> str:
    """Run ``cmd``; its stdout and stderr, or a failure showing their end."""
    proc = subprocess.run(cmd, cwd=cwd, env=env(cwd), capture_output=True, text=True, timeout=timeout)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{out[-6000:]}"
    return out


def stages_run(output: str) -> set[str]:
    """The stages a `dvc repro` / `dvc exp run` output says it ran."""
    return {line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage '")}


def copy_project(dest: Path, params: Optional[dict] = None) -> Path:
    """The project's files in ``dest`` with ``params`` overlaid on params.yaml, committed."""
    files = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout.split()
    for rel in files:
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    base = yaml.safe_load((dest / "params.yaml").read_text())
    (dest / "params.yaml").write_text(yaml.safe_dump(merge(base, params or {}), sort_keys=False))
    run(["git", "init", "-q"], dest)
    run(["git", "add", "-A"], dest)
    run(["git", "commit", "-qm", "initial"], dest)
    return dest
