"""bench/gpu_check.sh, which CI cannot run on a GPU: its shell is valid, and with
`--tiny --device cpu` every part (embed, train, generate, the torchrun check) runs
through the stage code; without pydantic it skips the stage code, saying so, and
still measures the model-only bounds."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.sh"


def _run(*args: str, env: dict | None = None) -> tuple[subprocess.CompletedProcess, dict]:
    env = dict(env or os.environ)
    env.update(OMP_NUM_THREADS="1", PYTHON=sys.executable)
    proc = subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    last = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else "{}"
    return proc, json.loads(last) if last.startswith("{") else {}


def test_shell_syntax():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


@pytest.mark.slow
def test_every_part_runs_through_the_stage_code_on_cpu():
    proc, result = _run("--tiny", "--device", "cpu", "--torchrun")
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert result["bench"] == "gpu_check" and not result["failed"] and not result["skipped"]
    rows = {(r["part"], r["what"].split(" ")[0]) for r in result["rows"]}
    assert rows == {("embed", "ViT-B/32"), ("embed", "ViT-L/14"), ("train", "steady-state"),
                    ("train", "pipeline.train.run.train"), ("generate", "pipeline.generate.run.generate,"),
                    ("torchrun", "capline")}
    assert [r["world_size"] for r in result["rows"] if r["part"] == "torchrun"] == [2, 2]
    for r in result["rows"]:
        if r["part"] == "embed":
            assert r["images"] == 48 and r["images_per_s"] > 0 and r["device"] == "cpu"
        if r["part"] == "torchrun" and "generate" in r["what"]:
            assert r["identical_to_one_process"] == "8/8"
    assert "| part | what | figures |" in proc.stdout


@pytest.mark.slow
def test_without_pydantic_the_stage_code_is_skipped_saying_so(tmp_path):
    # A Python where `import pydantic` fails, as on a GPU machine holding only the ML stack.
    (tmp_path / "sitecustomize.py").write_text("import sys\nsys.modules['pydantic'] = None\n")
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    proc, result = _run("--tiny", "--device", "cpu", env=env)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert "pydantic is missing" in proc.stdout and "stage code OFF" in proc.stdout
    assert {(r["part"], r["what"]) for r in result["rows"]} == {
        ("embed", "ViT-B/32"), ("embed", "ViT-L/14"), ("train", "steady-state step (model only)")}
    reasons = {s["part"]: s["reason"] for s in result["skipped"]}
    assert set(reasons) == {"embed", "train", "generate", "torchrun"}
    assert all("pydantic" in reasons[p] for p in ("embed", "train", "generate"))
