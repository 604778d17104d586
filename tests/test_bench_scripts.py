"""The benchmark scripts (and the GPU check, which CI cannot run) still match the
library: every name they import from the pipeline package exists."""
import importlib
import re
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
SCRIPTS = sorted(p for p in BENCH.iterdir() if p.suffix in (".py", ".sh"))
IMPORT = re.compile(r"^\s*from (pipeline[\w.]*) import ([\w, ]+)", re.MULTILINE)


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_pipeline_imports_resolve(script):
    found = IMPORT.findall(script.read_text())
    for module, names in found:
        mod = importlib.import_module(module)
        for name in filter(None, (n.strip().split(" as ")[0].strip() for n in names.split(","))):
            assert hasattr(mod, name), f"{script.name}: {module} has no {name}"


def test_the_scripts_are_found():
    names = {p.name for p in SCRIPTS}
    assert {"embed.py", "download.py", "generate.py", "train.py", "gpu_check.sh"} <= names
