"""The layout of the tests: test files hold tests, helpers live in ``tests/helpers/`` (one
module per concern), shared fixtures in ``tests/conftest.py``, and everything imports a
helper one way, ``from tests.helpers.NAME import ...``.

So no test file imports another test file (or conftest), nothing imports a helper
bare (``from helpers_x import``, which only works while pytest puts ``tests/`` on
``sys.path``) or relatively, no private name (``_x``) is imported from a helper,
nothing in ``tests/`` edits ``sys.path``, and a script that runs a helper module
(``python -m tests.helpers.NAME``) names one that exists.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STYLE = "write `from tests.helpers.NAME import ...`"
# Where a helper module is named in text: `-m tests.helpers.loopback`, tests/helpers/x.py
# (lower case: module names; NAME in the docs stands for any).
HELPER_REF = re.compile(r"\btests[./]helpers[./]([a-z_][a-z0-9_]*)\b")


def _helper_modules(root: Path) -> set[str]:
    return {p.stem for p in (root / "tests" / "helpers").glob("*.py") if p.stem != "__init__"}


def _module_problems(mod: str, where: str, helpers: set[str], bare: set[str]) -> list[str]:
    parts = mod.split(".")
    if parts[0] in bare or parts[0].startswith("helpers"):
        return [f"{where}: bare import of {mod}; {STYLE}"]
    if parts[0] != "tests":
        return []
    if len(parts) > 1 and parts[1].startswith("test_"):
        return [f"{where}: imports the test file {mod}; move what it needs to tests/helpers/"]
    if len(parts) > 1 and parts[1] == "conftest":
        return [f"{where}: imports {mod}; fixtures come by name, helpers from tests/helpers/"]
    if len(parts) == 3 and parts[1] == "helpers" and parts[2] in helpers:
        return []
    return [f"{where}: imports {mod}; {STYLE}"]


def import_problems(path: Path, root: Path) -> list[str]:
    """What in ``path`` breaks the one import style (every file under tests/)."""
    rel = path.relative_to(root).as_posix()
    helpers = _helper_modules(root)
    bare = {p.stem for p in (root / "tests").glob("*.py")} | {"helpers"}
    problems = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), rel)):
        where = f"{rel}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.ImportFrom):
            if node.level:
                problems.append(f"{where}: relative import; {STYLE}")
            elif node.module in ("tests", "tests.helpers"):
                names = ", ".join(a.name for a in node.names)
                problems.append(f"{where}: imports {names} from {node.module}; {STYLE}")
            else:
                problems += _module_problems(node.module, where, helpers, bare)
                if node.module.startswith("tests."):
                    private = [a.name for a in node.names if a.name.startswith("_")]
                    if private:
                        problems.append(f"{where}: imports the private {', '.join(private)} from {node.module}; "
                                        f"make what several files use public")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in bare | {"tests"} or alias.name.startswith("helpers"):
                    problems.append(f"{where}: `import {alias.name}`; {STYLE}")
        elif (isinstance(node, ast.Attribute) and node.attr == "path" and isinstance(node.value, ast.Name)
              and node.value.id == "sys"):
            problems.append(f"{where}: uses sys.path; import from the project root instead ({STYLE})")
    return problems


def layout_problems(root: Path) -> list[str]:
    """Every breach of the layout in the project at ``root``."""
    tests = root / "tests"
    problems = []
    for path in sorted(tests.glob("*.py")):
        if not (path.name.startswith("test_") or path.name in ("conftest.py", "__init__.py")):
            problems.append(f"tests/{path.name}: not a test file; helpers go in tests/helpers/")
    for path in sorted((tests / "helpers").glob("test_*.py")):
        problems.append(f"tests/helpers/{path.name}: a test file among the helpers")
    for name in ("tests/__init__.py", "tests/helpers/__init__.py"):
        if not (root / name).is_file():
            problems.append(f"{name} is missing: `tests.helpers.NAME` must import as a package")
    for path in sorted(tests.rglob("*.py")):
        problems += import_problems(path, root)
    # Scripts and CI name helper modules in strings (`python -m tests.helpers.NAME`).
    helpers = _helper_modules(root)
    for path, n, text in _strings(root):
        for name in HELPER_REF.findall(text):
            if name not in helpers:
                problems.append(f"{path.relative_to(root).as_posix()}:{n}: names tests.helpers.{name}, "
                                f"which does not exist")
    return problems


def _strings(root: Path):
    """(file, line, text) of the string constants of the Python files under tests/ and bench/
    and of the lines of the shell scripts there and in .ci/ (this file's examples left out)."""
    for folder in ("tests", "bench", ".ci"):
        for path in sorted((root / folder).rglob("*")) if (root / folder).is_dir() else []:
            if not path.is_file() or ".venv" in path.parts or path.resolve() == Path(__file__).resolve():
                continue
            if path.suffix == ".py":
                for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                    if isinstance(node, ast.Constant) and isinstance(node.value, str):
                        yield path, node.lineno, node.value
            elif path.suffix in ("", ".sh"):
                try:
                    lines = path.read_text(encoding="utf-8").splitlines()
                except UnicodeDecodeError:
                    continue
                for n, line in enumerate(lines, 1):
                    yield path, n, line


def test_tests_follow_the_layout():
    problems = layout_problems(ROOT)
    assert not problems, "\n".join(problems)


def test_each_breach_is_caught(tmp_path):
    """A project that breaks every rule once: each breach is reported, the good file is not."""
    files = {
        "tests/__init__.py": "",
        "tests/helpers/__init__.py": "",
        "tests/helpers/models.py": "X = 1\n",
        "tests/conftest.py": "from tests.helpers.models import X\n",
        "tests/test_good.py": "import sys\nimport pytest\nfrom tests.helpers.models import X\nfrom pipeline import params\n"
                              "def test_x():\n    assert sys.argv and X\n",
        "tests/test_other_file.py": "from tests.test_good import test_x\n",
        "tests/test_bare.py": "from helpers_models import X\n",
        "tests/test_bare_import.py": "import helpers_model\n",
        "tests/test_relative.py": "from .helpers.models import X\n",
        "tests/test_module_as_name.py": "from tests.helpers import models\n",
        "tests/test_missing_helper.py": "from tests.helpers.nothing import X\n",
        "tests/test_conftest.py": "from tests.conftest import X\n",
        "tests/test_syspath.py": "import sys\nsys.path.insert(0, 'tests')\n",
        "tests/test_private.py": "from tests.helpers.models import _add\n",
        "tests/helpers_extra.py": "Y = 2\n",
        "bench/run_server.py": "CMD = ['python', '-m', 'tests.helpers.gone']\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    problems = layout_problems(tmp_path)
    expected = {
        "tests/test_other_file.py:1": "imports the test file tests.test_good",
        "tests/test_bare.py:1": "bare import of helpers_models",
        "tests/test_bare_import.py:1": "`import helpers_model`",
        "tests/test_relative.py:1": "relative import",
        "tests/test_module_as_name.py:1": "imports models from tests.helpers",
        "tests/test_missing_helper.py:1": "imports tests.helpers.nothing",
        "tests/test_conftest.py:1": "imports tests.conftest",
        "tests/test_syspath.py:2": "uses sys.path",
        "tests/test_private.py:1": "imports the private _add",
        "tests/helpers_extra.py": "not a test file",
        "bench/run_server.py:1": "names tests.helpers.gone",
    }
    for where, what in expected.items():
        assert any(p.startswith(where + ":") and what in p for p in problems), (where, what, problems)
    assert len(problems) == len(expected), problems
    assert not [p for p in problems if p.split(":")[0] in ("tests/test_good.py", "tests/conftest.py")]
