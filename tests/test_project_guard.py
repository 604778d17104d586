"""The user's project is out of the tests' reach: the suite works in a folder of its own,
every test is checked against a snapshot of the project (tests/helpers/project_guard.py),
and CI runs the README's two commands in the README's order, so the tests also meet a
populated data/ as a new user's second command does."""
from __future__ import annotations

import os
import re
from pathlib import Path

from tests.helpers.project_guard import changes, snapshot

ROOT = Path(__file__).resolve().parents[1]


def _project(root: Path) -> Path:
    (root / "data").mkdir(parents=True)
    (root / "data" / ".gitignore").write_text("/*\n")
    (root / ".git" / "refs" / "heads").mkdir(parents=True)
    (root / ".git" / "refs" / "heads" / "main").write_text("abc\n")
    (root / ".git" / "objects").mkdir()
    (root / ".venv").mkdir()
    (root / ".venv" / "pyvenv.cfg").write_text("home = /usr\n")
    (root / "params.yaml").write_text("seed: 0\n")
    return root


def test_the_snapshot_sees_what_a_stray_stage_leaves(tmp_path):
    root = _project(tmp_path / "project")
    before = snapshot(root)
    # A stage run with the project as working folder: outputs, DVC's tmp, an experiment ref.
    (root / "data" / "train").mkdir()
    (root / "data" / "train" / "val.csv").write_text("step\n")
    (root / ".dvc" / "tmp").mkdir(parents=True)
    (root / ".git" / "refs" / "exps").mkdir()
    params = root / "params.yaml"
    stat = params.stat()
    params.write_text("seed: 1\n")  # same size: only the mtime tells
    os.utime(params, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    (root / "data" / ".gitignore").unlink()
    diff = changes(before, snapshot(root))
    assert "added   data/train/val.csv" in diff and "added   data/train/" in diff
    assert "added   .dvc/tmp/" in diff and "added   .git/refs/exps/" in diff
    assert "changed params.yaml" in diff and "removed data/.gitignore" in diff


def test_environments_caches_and_git_objects_are_not_the_project(tmp_path):
    root = _project(tmp_path / "project")
    before = snapshot(root)
    (root / ".venv" / "lib").mkdir()
    (root / ".git" / "objects" / "ab").write_bytes(b"x")
    (root / "pipeline" / "__pycache__").mkdir(parents=True)
    (root / "pipeline" / "__pycache__" / "m.pyc").write_bytes(b"x")
    assert changes(before, snapshot(root)) == ["added   pipeline/"]


def test_the_suite_does_not_work_in_the_project_root():
    cwd = Path.cwd().resolve()
    assert cwd != ROOT and ROOT not in cwd.parents
    assert not Path("data").exists() and not Path("params.yaml").exists()
    assert str(ROOT) in os.environ["PYTHONPATH"].split(os.pathsep)  # subprocesses import this checkout


def _readme_commands() -> list[str]:
    """The `./run ...` lines of the README's Quick start, in order."""
    text = (ROOT / "README.md").read_text()
    start = text.index("## Quick start")
    section = text[start:text.index("\n## ", start + 1)]
    blocks = re.findall(r"```bash\n(.*?)```", section, flags=re.S)
    return [line.strip() for block in blocks for line in block.splitlines() if line.strip().startswith("./run ")]


def test_ci_runs_the_readme_two_commands_in_the_readme_order():
    readme = _readme_commands()
    assert readme == ["./run repro", "./run test"], readme
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()
          if line.strip().startswith("./run ")]
    assert ci == readme
