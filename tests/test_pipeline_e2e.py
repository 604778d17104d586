"""The whole DAG, for real: `dvc repro` and `dvc exp run` in a fresh git repository.

The repository is copied (tracked and new files, not data/ or the venv) into a
temporary folder with one commit, the demo is shrunk through params.yaml, and
DVC runs the `capline` stage commands exactly as a user's `dvc repro` would.
"""
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

import yaml

from tests.helpers.repo import copy_project, env, run as _run, stages_run as _stages_run

pytestmark = pytest.mark.slow

SMALL = {
    "data": {"demo": {"images": 160}},
    "download": {"records_per_shard": 50, "workers": 4},
    "clip": {"batch_size": 32, "workers": 1},
    "gpt": {"demo": {"pretrain_steps": 20, "pretrain_documents": 100}},
    "mapper": {"layers": 1, "prefix_length": 4, "clip_length": 4},
    "train": {"epochs": 3, "batch_size": 32, "warmup_steps": 5, "log_every": 2, "checkpoint_every": 5},
    "scst": {"epochs": 1, "batch_size": 32, "samples": 2, "max_tokens": 12, "log_every": 2},
    "generate": {"num_beams": 2, "max_new_tokens": 12},
    "evaluate": {"baseline_candidates": 5, "report_images": 10},
}


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    return copy_project(tmp_path_factory.mktemp("repo"), SMALL)


def test_repro_then_experiment(repo: Path):
    out = _run(["dvc", "repro"], repo)
    assert _stages_run(out) == {
        "prepare", "model_clip", "model_gpt", "download", "embed_plan", "embed", "datastore", "retrieve", "train",
        "scst", "generate", "generate_xe", "transfer", "evaluate"
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
    # The transfer experiment is off by default: its figures are there, null.
    assert {k: scores[k] for k in ("transfer_cider", "transfer_cider_source_datastore", "transfer_ratio")} == \
        dict.fromkeys(("transfer_cider", "transfer_cider_source_datastore", "transfer_ratio"))
    assert (repo / "data/eval/report.html").stat().st_size > 0
    assert (repo / "data/train/loss.csv").read_text().startswith("step")
    assert (repo / "data/train/val.csv").read_text().startswith("step,epoch,val_loss")
    # One plot draws the train and the validation loss.
    plots = json.loads(_run(["dvc", "plots", "show", "--json"], repo))
    plots = plots.get("data", plots)  # dvc 3: {"data": {plot name: [...]}}
    loss = [p for name, plot in plots.items() if "loss" in name.lower() for p in plot]
    drawn = json.dumps(loss)
    assert "train_loss" in drawn and "val_loss" in drawn, list(plots)
    assert not list((repo / "data/checkpoints/train").iterdir())  # a finished run leaves none
    assert (repo / "data/scst/reward.csv").read_text().startswith("step")
    assert json.loads((repo / "data/metrics/scst.json").read_text())["epochs"] == 1
    assert not list((repo / "data/checkpoints/scst").glob("step-*"))  # removed when done

    # Nothing changed: everything is cached.
    assert "Data and pipelines are up to date" in _run(["dvc", "status"], repo)
    assert _stages_run(_run(["dvc", "repro"], repo)) == set()

    # SCST off: the cross-entropy model is copied through; its captions are cached. When
    # the one SCST epoch above did not beat the cross-entropy model on validation, its
    # output already was that model, byte for byte, and DVC rightly reruns nothing after it.
    kept_xe = json.loads((repo / "data/metrics/scst.json").read_text())["best_epoch"] == 0
    out = _run(["dvc", "exp", "run", "-S", "scst.epochs=0"], repo)
    assert _stages_run(out) == ({"scst"} if kept_xe else {"scst", "generate", "transfer", "evaluate"})
    assert (repo / "data/captions/results.json").read_bytes() == (repo / "data/captions_xe/results.json").read_bytes()
    assert json.loads((repo / "data/metrics/eval.json").read_text())["cider_vs_xe"] == 1.0

    # A mapper change reruns training and what follows, nothing before it.
    out = _run(["dvc", "exp", "run", "-S", "mapper.layers=2", "-S", "scst.epochs=1"], repo)
    assert _stages_run(out) == {"train", "scst", "generate", "generate_xe", "transfer", "evaluate"}
    config = json.loads((repo / "data/model/captioner.json").read_text())
    assert config["mapper"]["layers"] == 2
    from safetensors import safe_open

    with safe_open(repo / "data/model/mapper.safetensors", "pt") as f:
        blocks = {k.split(".")[2] for k in f.keys() if k.startswith("blocks.layers.")}
    assert len(blocks) == 2

    # `dvc exp show` compares the experiments: scst.epochs 0 and 1, each with both models' CIDEr.
    rows = [exp["revs"][0] if "revs" in exp else exp
            for commit in json.loads(_run(["dvc", "exp", "show", "--json"], repo))
            for exp in [commit, *(commit.get("experiments") or [])]]
    seen = {}
    for row in rows:
        data = (row.get("data") or {})
        params = data.get("params", {}).get("params.yaml", {}).get("data", {})
        metrics = data.get("metrics", {}).get("data/metrics/eval.json", {}).get("data", {})
        if "scst" in params and "cider" in metrics and "xe_cider" in metrics:
            seen[params["scst"]["epochs"]] = metrics["cider_vs_xe"]
    assert {0, 1} <= set(seen) and seen[0] == 1.0, seen

    # A decoding change reruns generate (and transfer, which decodes the same way) and evaluate only:
    # train does not read the generate section.
    out = _run(["dvc", "exp", "run", "-S", "generate.num_beams=3", "-S", "generate.num_return_sequences=2"], repo)
    assert _stages_run(out) == {"generate", "generate_xe", "transfer", "evaluate"}
    nbest = [json.loads(line) for line in (repo / "data/captions/nbest.jsonl").read_text().splitlines()]
    assert nbest and all(len(row["captions"]) == 2 for row in nbest)

    # The trained folder holds its CLIP and decoding defaults: it captions a shard on its own.
    assert (repo / "data/model/clip/pin.json").is_file() and (repo / "data/model/generation_config.json").is_file()
    shard = sorted((repo / "data/images").glob("*.tar"))[0]
    out = _run(["capline", "caption", "--model", "data/model", "--num-beams", "2", "--format", "jsonl",
                "--no-progress", str(shard)], repo)
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert rows and all(r.get("captions") for r in rows)

    # Another prefix mapper: embed_plan reruns and writes the same answer, so embed does not.
    out = _run(["dvc", "exp", "run", "-S", "mapper.type=mlp"], repo)
    assert _stages_run(out) == {"embed_plan", "train", "scst", "generate", "generate_xe", "transfer", "evaluate"}

    # Retrieval: the captioner reads each image's 2 nearest captions; the model records its datastore.
    out = _run(["dvc", "exp", "run", "-S", "retrieval.k=2", "-S", "retrieval.max_caption_tokens=12"], repo)
    assert _stages_run(out) == {"datastore", "retrieve", "train", "scst", "generate", "generate_xe", "transfer",
                                "evaluate"}
    retrieval = json.loads((repo / "data/model/captioner.json").read_text())["retrieval"]
    manifest = json.loads((repo / "data/datastore/manifest.json").read_text())
    assert retrieval["k"] == 2 and retrieval["datastore"]["fingerprint"] == manifest["fingerprint"]
    assert isinstance(json.loads((repo / "data/metrics/eval.json").read_text())["cider"], float)


def _lock_outs(repo: Path, stage: str) -> dict:
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"][stage]
    # The metrics file holds timings, different in any two runs; everything else must match.
    return {o["path"]: o["md5"] for o in lock["outs"] if not o["path"].startswith("data/metrics/")}


def test_killed_dvc_repro_resumes_to_the_same_model(repo: Path):
    """Kill `dvc repro` (its whole process group) after train's first checkpoint; `dvc
    repro` again resumes, and ends with the weights, curves and dvc.lock entries of an
    uninterrupted run. (Params no run has used yet: with params DVC has seen finish,
    `dvc repro` restores the outputs from its run cache and trains nothing.)"""
    _run(["dvc", "repro"], repo)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["train"]["seed"] = 7
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    checkpoints = repo / "data/checkpoints/train"
    shutil.rmtree(checkpoints, ignore_errors=True)

    proc = subprocess.Popen(["dvc", "repro"], cwd=repo, env=env(repo), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 600
    while not list(checkpoints.glob("step-*")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert list(checkpoints.glob("step-*")), "no checkpoint appeared before the run ended"
    assert not (repo / "data/model_xe").exists()  # DVC removed the output before running

    out = _run(["dvc", "repro"], repo)
    assert "resuming from" in out and "train" in _stages_run(out)
    assert json.loads((repo / "data/metrics/train.json").read_text())["resumed_from_step"] > 0
    assert not list(checkpoints.iterdir())
    resumed = {str(p.relative_to(repo)): p.read_bytes() for p in (repo / "data/model_xe").rglob("*.safetensors")}
    resumed_lock = _lock_outs(repo, "train")
    curves = {n: (repo / "data/train" / n).read_text() for n in ("loss.csv", "val.csv")}

    # The same params uninterrupted (--force: neither the run cache nor the outputs reused).
    out = _run(["dvc", "repro", "--force", "--single-item", "train"], repo)
    assert "resuming from" not in out
    assert json.loads((repo / "data/metrics/train.json").read_text())["resumed_from_step"] == 0
    assert {str(p.relative_to(repo)): p.read_bytes() for p in (repo / "data/model_xe").rglob("*.safetensors")} == resumed
    assert {n: (repo / "data/train" / n).read_text() for n in ("loss.csv", "val.csv")} == curves
    assert _lock_outs(repo, "train") == resumed_lock and "data/model_xe" in resumed_lock
