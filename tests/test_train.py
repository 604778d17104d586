"""Training: the loss falls on a learnable task, curve/metrics/model are written, DDP works."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.features import FeatureShardError
from pipeline.models.pretrained import ModelError
from pipeline.models.captioner import ClipCaptioner
from pipeline.params import MapperParams, ParamsError, TrainParams
from pipeline.train import train
from tests.helpers_model import FEATURE_ATTRS, save_tiny_gpt, scene_table, write_features, torch_threads


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with torch_threads(1):
        yield

REPO = Path(__file__).resolve().parents[1]
MAPPER = MapperParams(type="transformer", prefix_length=3, clip_length=2, layers=1, heads=2)
TRAIN = TrainParams(epochs=6, batch_size=8, lr=1e-2, warmup_steps=2, precision="fp32", log_every=2,
                    finetune_gpt=True)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    gpt = save_tiny_gpt(root / "gpt")
    feats = write_features(root / "features", scene_table(n_per_class=4))
    return root, gpt, feats


def read_curve(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_training_lowers_the_loss_and_writes_everything(data, tmp_path):
    root, gpt, feats = data
    out, curve, metrics_path = tmp_path / "model", tmp_path / "train/loss.csv", tmp_path / "metrics/train.json"
    metrics = train(feats, gpt, out, curve, metrics_path, MAPPER, TRAIN, progress=False)

    rows = read_curve(curve)
    assert [int(r["step"]) for r in rows] == sorted(int(r["step"]) for r in rows)
    first, last = float(rows[0]["train_loss"]), float(rows[-1]["train_loss"])
    assert last < 0.5 * first
    vals = [float(r["val_loss"]) for r in rows if r["val_loss"]]
    assert len(vals) == TRAIN.epochs and vals[-1] < vals[0]
    assert {int(r["epoch"]) for r in rows} == set(range(1, TRAIN.epochs + 1))

    saved = json.loads(metrics_path.read_text())
    assert saved == metrics
    # 12 classes x 4 images, a third of each class in train (j % 3 == 0: 2 of 4), 2 captions each.
    assert metrics["train_images"] == 24 and metrics["train_pairs"] == 48
    assert metrics["steps"] == TRAIN.epochs * 6
    assert metrics["val_loss"] == pytest.approx(vals[-1], rel=1e-5)
    model = ClipCaptioner.load(out)
    assert metrics["params_trainable"] == sum(p.numel() for p in model.parameters())
    assert model.features["model_id"] == FEATURE_ATTRS["model_id"] and model.features["dim"] == 16
    assert not list(tmp_path.glob(".*tmp*")) and not list((tmp_path / "metrics").glob(".*"))


def test_frozen_gpt_is_not_changed_by_training(data, tmp_path):
    root, gpt, feats = data
    params = TRAIN.model_copy(update={"finetune_gpt": False, "epochs": 1})
    metrics = train(feats, gpt, tmp_path / "m", tmp_path / "c.csv", tmp_path / "t.json", MAPPER, params,
                    progress=False)
    model = ClipCaptioner.load(tmp_path / "m")
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(gpt)
    for (name, p), q in zip(model.gpt.state_dict().items(), base.state_dict().values()):
        assert torch.equal(p, q), name
    assert metrics["params_trainable"] == sum(p.numel() for p in model.mapper.parameters())


def test_bad_inputs_name_the_key_or_file(data, tmp_path):
    root, gpt, feats = data
    with pytest.raises(ParamsError, match="mapper.width"):
        train(feats, gpt, tmp_path / "m", tmp_path / "c.csv", tmp_path / "t.json",
              MAPPER.model_copy(update={"width": 64}), TRAIN, progress=False)
    with pytest.raises(ModelError, match="config.json"):
        train(feats, tmp_path / "nogpt", tmp_path / "m", tmp_path / "c.csv", tmp_path / "t.json",
              MAPPER, TRAIN, progress=False)
    with pytest.raises(ParamsError, match="mapper.prefix_length"):  # GPT-2 has 64 positions
        train(feats, gpt, tmp_path / "m", tmp_path / "c.csv", tmp_path / "t.json",
              MAPPER.model_copy(update={"prefix_length": 63}), TRAIN, progress=False)
    only_test = write_features(tmp_path / "f", scene_table(n_per_class=2, splits=("test",)), shards=1)
    with pytest.raises(FeatureShardError, match="no images in the train split"):
        train(only_test, gpt, tmp_path / "m", tmp_path / "c.csv", tmp_path / "t.json", MAPPER, TRAIN,
              progress=False)
    assert not (tmp_path / "m").exists()


def test_ddp_two_processes_with_torchrun(data, tmp_path):
    root, gpt, feats = data
    (tmp_path / "params.yaml").write_text(
        "mapper: {type: mlp, prefix_length: 2}\n"
        "train: {epochs: 2, batch_size: 4, lr: 0.003, warmup_steps: 1, precision: fp32, log_every: 1}\n")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "stages.cli", "train", "--params", str(tmp_path / "params.yaml"), "--features", str(feats),
           "--gpt", str(gpt), "--out", str(tmp_path / "model"), "--curve", str(tmp_path / "loss.csv"),
           "--metrics", str(tmp_path / "train.json"), "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((tmp_path / "train.json").read_text())
    assert metrics["world_size"] == 2
    # 48 pairs split over 2 ranks: 24 each, 6 batches of 4 per epoch.
    assert metrics["steps"] == 2 * 6
    assert len(read_curve(tmp_path / "loss.csv")) == 12
    model = ClipCaptioner.load(tmp_path / "model")
    assert model.mapper_type == "mlp"


def test_a_clip_folder_that_did_not_make_the_features_is_refused_before_training(data, tmp_path):
    from pipeline.models.demo import build_demo_clip
    from pipeline.params import DemoClip

    root, gpt, feats = data
    clip = build_demo_clip(tmp_path / "clip", DemoClip(hidden_size=32, layers=1, heads=2, projection_dim=16,
                                                        pretrain_steps=0), 32) or tmp_path / "clip"
    with pytest.raises(ModelError, match="model_id"):
        train(feats, gpt, tmp_path / "m", tmp_path / "c.csv", tmp_path / "t.json", MAPPER, TRAIN,
              progress=False, clip_dir=clip)
    assert not (tmp_path / "c.csv").exists() and not (tmp_path / "m").exists()
