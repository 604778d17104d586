"""The whole DAG, for real: `dvc repro` and `dvc exp run` in a fresh git repository.

The repository is copied (tracked and new files, not data/ or the venv) into a
temporary folder with one commit, the demo is shrunk through params.yaml, and
DVC runs the `capline` stage commands exactly as a user's `dvc repro` would.
"""
import json
from pathlib import Path

import pytest

from tests.helpers_repo import copy_project, run as _run, stages_run as _stages_run

pytestmark = pytest.mark.slow

SMALL = {
    "data": {"demo": {"images": 160}},
    "download": {"records_per_shard": 50, "workers": 4},
    "clip": {"batch_size": 32, "workers": 1},
    "mapper": {"layers": 1, "prefix_length": 4, "clip_length": 4},
    "train": {"epochs": 2, "batch_size": 32, "warmup_steps": 5, "log_every": 2},
    "generate": {"num_beams": 2, "max_new_tokens": 12},
    "evaluate": {"baseline_candidates": 5, "report_images": 10},
}


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    return copy_project(tmp_path_factory.mktemp("repo"), SMALL)


def test_repro_then_experiment(repo: Path):
    out = _run(["dvc", "repro"], repo)
    assert _stages_run(out) == {
        "prepare", "model_clip", "model_gpt", "download", "embed", "train", "generate", "evaluate"
    }

    metrics = json.loads(_run(["dvc", "metrics", "show", "--json"], repo))
    flat = json.dumps(metrics)
    scores = json.loads((repo / "data/metrics/eval.json").read_text())
    for name in ("bleu_4", "meteor", "rouge_l", "cider", "baseline_cider", "control_cider"):
        assert isinstance(scores[name], float), name
        assert 0.0 <= scores[name] <= 10.0
        assert name in flat  # dvc metrics show lists it
    assert (repo / "data/eval/report.html").stat().st_size > 0
    assert (repo / "data/train/loss.csv").read_text().startswith("step")

    # Nothing changed: everything is cached.
    assert "Data and pipelines are up to date" in _run(["dvc", "status"], repo)
    assert _stages_run(_run(["dvc", "repro"], repo)) == set()

    # A mapper change reruns training and what follows, nothing before it.
    out = _run(["dvc", "exp", "run", "-S", "mapper.layers=2"], repo)
    assert _stages_run(out) == {"train", "generate", "evaluate"}
    config = json.loads((repo / "data/model/captioner.json").read_text())
    assert config["mapper"]["layers"] == 2
    from safetensors import safe_open

    with safe_open(repo / "data/model/mapper.safetensors", "pt") as f:
        blocks = {k.split(".")[2] for k in f.keys() if k.startswith("blocks.layers.")}
    assert len(blocks) == 2

    shown = _run(["dvc", "exp", "show", "--json"], repo)
    assert "cider" in shown
