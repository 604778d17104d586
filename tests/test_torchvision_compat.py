"""torchvision (open_clip's transforms, and transformers imports it when installed)
must import beside the CPU torch even where its compiled ops were built for CUDA."""
from __future__ import annotations

import subprocess
import sys

import pytest

pytest.importorskip("torchvision")

IMPORTS = "import torchvision, open_clip; from transformers import GPT2LMHeadModel; print('imported')"


def run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


def test_torchvision_open_clip_and_transformers_import_after_pipeline():
    done = run("import pipeline; " + IMPORTS)
    assert done.returncode == 0 and "imported" in done.stdout, done.stderr[-2000:]


def test_the_schemas_are_defined_only_where_the_compiled_ops_do_not_load():
    bare = run(IMPORTS)
    guarded = run("import pipeline, torchvision; from pipeline.core import torchvision_compat as c; "
                  "print('defined' if c._library is not None else 'untouched')")
    assert guarded.returncode == 0, guarded.stderr[-2000:]
    if bare.returncode == 0:  # torchvision's own ops load: nothing may be redefined
        assert "untouched" in guarded.stdout
    else:
        assert "torchvision::nms does not exist" in bare.stderr
        assert "defined" in guarded.stdout
