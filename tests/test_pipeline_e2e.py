"""The whole DAG, for real: `dvc repro` and `dvc exp run` in a fresh git repository.

The repository is copied (tracked and new files, not data/ or the venv) into a
temporary folder with one commit, the demo is shrunk through params.yaml, and
DVC runs the `capline` stage commands exactly as a user's `dvc repro` would.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

SMALL = {
    "data": {"demo": {"images": 160}},
    "download": {"records_per_shard": 50, "workers": 4},
    "clip": {"batch_size": 32, "workers": 1},
    "mapper": {"layers": 1, "prefix_length": 4, "clip_length": 4},
    "train": {"epochs": 2, "batch_size": 32, "warmup_steps": 5, "log_every": 2},
    "scst": {"epochs": 1, "batch_size": 32, "samples": 2, "max_tokens": 12, "log_every": 2},
    "generate": {"num_beams": 2, "max_new_tokens": 12},
    "evaluate": {"baseline_candidates": 5, "report_images": 10},
}


def _merge(base: dict, over: dict) -> dict:
    for k, v in over.items():
        base[k] = _merge(base.get(k, {}), v) if isinstance(v, dict) else v
    return base


def _env() -> dict:
    env = dict(os.environ)
    # `capline` lives beside this interpreter; DVC runs it through the shell.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t.invalid",
               GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t.invalid")
    return env


def _run(cmd: list[str], cwd: Path) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=900)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{out[-6000:]}"
    return out


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    dest = tmp_path_factory.mktemp("repo")
    files = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout.split()
    for rel in files:
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    params = yaml.safe_load((dest / "params.yaml").read_text())
    (dest / "params.yaml").write_text(yaml.safe_dump(_merge(params, SMALL), sort_keys=False))
    _run(["git", "init", "-q"], dest)
    _run(["git", "add", "-A"], dest)
    _run(["git", "commit", "-qm", "initial"], dest)
    return dest


def _stages_run(output: str) -> set[str]:
    return {line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage '")}


def test_repro_then_experiment(repo: Path):
    out = _run(["dvc", "repro"], repo)
    assert _stages_run(out) == {
        "prepare", "model_clip", "model_gpt", "download", "embed", "train", "scst", "generate", "generate_xe",
        "evaluate"
    }

    metrics = json.loads(_run(["dvc", "metrics", "show", "--json"], repo))
    flat = json.dumps(metrics)
    scores = json.loads((repo / "data/metrics/eval.json").read_text())
    for name in ("bleu_4", "meteor", "rouge_l", "cider", "baseline_cider", "control_cider", "xe_cider",
                 "cider_vs_xe", "clip_s", "refclip_s", "baseline_clip_s", "control_clip_s", "xe_clip_s"):
        assert isinstance(scores[name], float), name
        assert 0.0 <= scores[name] <= 10.0
        assert name in flat  # dvc metrics show lists it
    assert "clipscore_skipped" not in scores and "xe_skipped" not in scores
    assert (repo / "data/eval/report.html").stat().st_size > 0
    assert (repo / "data/train/loss.csv").read_text().startswith("step")
    assert (repo / "data/scst/reward.csv").read_text().startswith("step")
    assert json.loads((repo / "data/metrics/scst.json").read_text())["epochs"] == 1
    assert not list((repo / "data/checkpoints/scst").glob("step-*"))  # removed when done

    # Nothing changed: everything is cached.
    assert "Data and pipelines are up to date" in _run(["dvc", "status"], repo)
    assert _stages_run(_run(["dvc", "repro"], repo)) == set()

    # SCST off: the cross-entropy model is copied through; its captions are cached.
    out = _run(["dvc", "exp", "run", "-S", "scst.epochs=0"], repo)
    assert _stages_run(out) == {"scst", "generate", "evaluate"}
    assert (repo / "data/captions/results.json").read_bytes() == (repo / "data/captions_xe/results.json").read_bytes()
    assert json.loads((repo / "data/metrics/eval.json").read_text())["cider_vs_xe"] == 1.0

    # A mapper change reruns training and what follows, nothing before it.
    out = _run(["dvc", "exp", "run", "-S", "mapper.layers=2", "-S", "scst.epochs=1"], repo)
    assert _stages_run(out) == {"train", "scst", "generate", "generate_xe", "evaluate"}
    config = json.loads((repo / "data/model/captioner.json").read_text())
    assert config["mapper"]["layers"] == 2
    from safetensors import safe_open

    with safe_open(repo / "data/model/mapper.safetensors", "pt") as f:
        blocks = {k.split(".")[2] for k in f.keys() if k.startswith("blocks.layers.")}
    assert len(blocks) == 2

    shown = _run(["dvc", "exp", "show", "--json"], repo)
    assert "cider" in shown and "xe_cider" in shown and "scst.epochs" in shown
