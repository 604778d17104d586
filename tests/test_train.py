"""Training: the loss falls, curves/metrics/model are written, the best weights are kept,
a killed run resumes to the same weights, DDP equals one process, batches are global."""
from __future__ import annotations

import csv
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.core.files import read_metrics
from pipeline.core.checkpoint import load_checkpoint
from pipeline.formats.features import FeatureShardError
from pipeline.models.captioner import ClipCaptioner, tokenize_captions
from pipeline.models.pretrained import ModelError
from pipeline.core.params import MapperParams, ParamsError, TrainParams
from pipeline.train.loop import Stopped
from pipeline.train.run import train
from pipeline.train.data import build_captions, epoch_batches, load_training_data
from tests.helpers.torchrun import free_port, node, run_nodes, run_torchrun, standalone
from tests.helpers.features import FEATURE_ATTRS, scene_table, write_features

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REPO = Path(__file__).resolve().parents[1]
MAPPER = MapperParams(type="transformer", prefix_length=3, clip_length=2, layers=1, heads=2)
TRAIN = TrainParams(epochs=6, batch_size=8, lr=1e-2, warmup_steps=2, precision="fp32", log_every=2,
                    finetune_gpt=True)
TIMING = ("load_seconds", "tokenize_seconds", "train_seconds", "val_seconds", "checkpoint_seconds", "seconds",
          "samples_per_s", "tokens_per_s", "resumed_from_step")


@pytest.fixture(scope="module")
def data(tmp_path_factory, tiny_gpt_dir, scene_features):
    return tmp_path_factory.mktemp("train"), tiny_gpt_dir, scene_features(n_per_class=4)


def read_curve(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _run(data, out: Path, mapper=MAPPER, params=TRAIN, **kw) -> dict:
    root, gpt, feats = data
    return train(feats, gpt, out / "model", out / "train/loss.csv", out / "metrics.json", mapper, params,
                 progress=False, val_curve_path=out / "train/val.csv", **kw)


def _weights(model_dir: Path) -> dict:
    from safetensors.torch import load_file

    weights = {f"mapper.{k}": v for k, v in load_file(str(model_dir / "mapper.safetensors")).items()}
    weights.update({f"gpt.{k}": v for k, v in load_file(str(model_dir / "gpt/model.safetensors")).items()})
    return weights


def test_training_lowers_the_loss_and_writes_everything(data, tmp_path):
    metrics = _run(data, tmp_path)
    rows = read_curve(tmp_path / "train/loss.csv")
    assert list(rows[0]) == ["step", "epoch", "train_loss", "lr"]
    assert [int(r["step"]) for r in rows] == sorted(int(r["step"]) for r in rows)
    assert float(rows[-1]["train_loss"]) < 0.5 * float(rows[0]["train_loss"])
    vals = read_curve(tmp_path / "train/val.csv")
    assert [int(r["epoch"]) for r in vals] == list(range(1, TRAIN.epochs + 1))
    assert float(vals[-1]["val_loss"]) < float(vals[0]["val_loss"])
    assert {int(r["epoch"]) for r in rows} == set(range(1, TRAIN.epochs + 1))

    saved = read_metrics(tmp_path / "metrics.json")
    assert saved == metrics
    # 12 classes x 4 images, a third of each class in train (j % 3 == 0: 2 of 4), 2 captions each.
    assert metrics["train_images"] == 24 and metrics["train_pairs"] == 48
    assert metrics["steps"] == TRAIN.epochs * 6
    assert metrics["val_loss"] == pytest.approx(float(vals[-1]["val_loss"]), rel=1e-5)
    best = min(vals, key=lambda r: float(r["val_loss"]))
    assert metrics["best_step"] == int(best["step"]) and metrics["kept"] == "best"
    assert metrics["best_val_loss"] == pytest.approx(float(best["val_loss"]), rel=1e-5)
    for key in ("samples_per_s", "tokens_per_s", "train_seconds", "load_seconds", "tokenize_seconds"):
        assert metrics[key] >= 0, key
    assert metrics["samples_per_s"] > 0 and metrics["tokens_per_s"] > metrics["samples_per_s"]
    model = ClipCaptioner.load(tmp_path / "model")
    assert metrics["params_trainable"] == sum(p.numel() for p in model.parameters())
    assert model.features["model_id"] == FEATURE_ATTRS["model_id"] and model.features["dim"] == 16
    assert not list(tmp_path.glob(".*tmp*")) and not list(tmp_path.glob("train/.*"))


def test_frozen_gpt_gets_no_gradients_and_is_not_changed(data, tmp_path):
    root, gpt, feats = data
    params = TRAIN.model_copy(update={"finetune_gpt": False, "epochs": 1})
    metrics = _run(data, tmp_path, params=params)
    model = ClipCaptioner.load(tmp_path / "model")
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(gpt)
    for (name, p), q in zip(model.gpt.state_dict().items(), base.state_dict().values()):
        assert torch.equal(p, q), name
    assert metrics["params_trainable"] == sum(p.numel() for p in model.mapper.parameters())
    # No weight gradient of GPT-2 is even built: only the mapper's.
    model.train()
    vectors, ids = torch.randn(3, 16), torch.tensor([[1, 2, 3], [1, 2, 3], [4, 5, 6]])
    model(vectors, ids, torch.ones_like(ids)).backward()
    assert all(p.grad is None for p in model.gpt.parameters())
    assert all(p.grad is not None for p in model.mapper.parameters())


def test_bad_inputs_name_the_key_or_file(data, tmp_path):
    root, gpt, feats = data
    with pytest.raises(ParamsError, match="mapper.width"):
        _run(data, tmp_path, mapper=MAPPER.model_copy(update={"width": 64}))
    with pytest.raises(ModelError, match="config.json"):
        train(feats, tmp_path / "nogpt", tmp_path / "m", tmp_path / "c.csv", tmp_path / "t.json",
              MAPPER, TRAIN, progress=False)
    with pytest.raises(ParamsError, match="mapper.prefix_length"):  # GPT-2 has 64 positions
        _run(data, tmp_path, mapper=MAPPER.model_copy(update={"prefix_length": 63}))
    with pytest.raises(ParamsError, match=r"train.batch_size: 8 is not divisible by 1 process\(es\) x "
                                          r"train.grad_accum 3"):
        _run(data, tmp_path, params=TRAIN.model_copy(update={"grad_accum": 3}))
    with pytest.raises(ParamsError, match="more than the 48 caption pairs"):
        _run(data, tmp_path, params=TRAIN.model_copy(update={"batch_size": 64}))
    only_test = write_features(tmp_path / "f", scene_table(n_per_class=2, splits=("test",)), shards=1)
    with pytest.raises(FeatureShardError, match="no images in the train split"):
        train(only_test, gpt, tmp_path / "m", tmp_path / "c.csv", tmp_path / "t.json", MAPPER, TRAIN,
              progress=False)
    assert not (tmp_path / "model").exists() and not (tmp_path / "m").exists()


# ------------------------------------------------------------------ resume
RESUME = TRAIN.model_copy(update={"epochs": 3, "checkpoint_every": 4, "eval_every": 5, "grad_accum": 2})
DROPOUT = MAPPER.model_copy(update={"dropout": 0.2})  # the RNG states matter


@pytest.fixture(scope="module")
def uninterrupted(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("whole")
    return out, _run(data, out, mapper=DROPOUT, params=RESUME, checkpoint_dir=out / "ck")


@pytest.mark.parametrize("stops", [(5,), (6,), (12,), (3, 9, 16)],
                         ids=["mid-epoch", "epoch-end", "after-2nd-epoch", "three-kills"])
def test_killed_run_resumes_to_identical_weights(data, uninterrupted, tmp_path, stops, caplog):
    whole, expected = uninterrupted
    for stop in stops:
        with pytest.raises(Stopped):
            _run(data, tmp_path, mapper=DROPOUT, params=RESUME, checkpoint_dir=tmp_path / "ck", stop_after=stop)
        assert not (tmp_path / "model").exists()
    with caplog.at_level(logging.INFO, logger="pipeline"):
        metrics = _run(data, tmp_path, mapper=DROPOUT, params=RESUME, checkpoint_dir=tmp_path / "ck")
    resumed_from = max(s for s in range(1, stops[-1] + 1) if s % 4 == 0 or s % 6 == 0)
    assert f"resuming from {tmp_path / 'ck' / f'step-{resumed_from:09d}'}" in caplog.text
    assert metrics["resumed_from_step"] == resumed_from
    a, b = _weights(whole / "model"), _weights(tmp_path / "model")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k  # bit for bit
    for name in ("train/loss.csv", "train/val.csv"):
        assert (tmp_path / name).read_text() == (whole / name).read_text(), name
    assert {k: v for k, v in metrics.items() if k not in TIMING} == \
           {k: v for k, v in expected.items() if k not in TIMING}
    assert not list((tmp_path / "ck").iterdir())  # a finished run leaves nothing to resume


def test_checkpoint_of_other_params_is_ignored_with_the_reason(data, tmp_path, caplog):
    with pytest.raises(Stopped):
        _run(data, tmp_path, params=RESUME, checkpoint_dir=tmp_path / "ck", stop_after=4)
    other = RESUME.model_copy(update={"lr": 0.02})
    with caplog.at_level(logging.INFO, logger="pipeline"):
        metrics = _run(data, tmp_path, params=other, checkpoint_dir=tmp_path / "ck")
    assert "step-000000004 ignored: made by another run (params.train.lr: 0.01 there, 0.02 here)" in caplog.text
    assert metrics["resumed_from_step"] == 0
    # Other features: ignored too, named.
    with pytest.raises(Stopped):
        _run(data, tmp_path, params=RESUME, checkpoint_dir=tmp_path / "ck", stop_after=4)
    root, gpt, feats = data
    feats2 = write_features(tmp_path / "f2", scene_table(n_per_class=4, seed=1))
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="pipeline"):
        train(feats2, gpt, tmp_path / "m2", tmp_path / "c.csv", tmp_path / "t.json", MAPPER, RESUME,
              progress=False, checkpoint_dir=tmp_path / "ck")
    assert "ignored: made by another run (features:" in caplog.text


def test_resume_with_keep_last(data, tmp_path):
    params = RESUME.model_copy(update={"keep": "last"})
    with pytest.raises(Stopped):
        _run(data, tmp_path, params=params, checkpoint_dir=tmp_path / "ck", stop_after=7)
    metrics = _run(data, tmp_path, params=params, checkpoint_dir=tmp_path / "ck")
    assert metrics["resumed_from_step"] == 6 and metrics["kept"] == "last" and metrics["steps"] == 18


def test_checkpoint_holds_the_whole_state(data, tmp_path):
    with pytest.raises(Stopped):
        _run(data, tmp_path, params=RESUME, checkpoint_dir=tmp_path / "ck", stop_after=4)
    ck = load_checkpoint(tmp_path / "ck" / "step-000000004")
    assert sorted(ck.meta["modules"]) == ["gpt", "mapper"] and sorted(ck.meta["stateful"]) == \
           ["optimizer", "scaler", "schedule"]
    state = ck.state
    assert state["progress"]["step"] == 4 and state["progress"]["epoch"] == 1 and state["progress"]["position"] == 4
    assert set(ck.rng[0]) >= {"python", "numpy", "torch"}
    assert {p.name for p in (tmp_path / "ck" / "step-000000004").iterdir()} == {"checkpoint.json",
                                                                              "tensors.safetensors"}


def test_model_folder_holds_the_best_weights_and_early_stopping(data, tmp_path, monkeypatch):
    import pipeline.train.run as tr

    # Validation losses scripted: the best is the 5th validation (step 5), then worse.
    script = [3.0, 2.5, 2.0, 1.8, 1.5, 1.6, 1.7, 1.55, 1.9] + [2.0] * 100

    def scripted(job):  # the n-th validation of each run gets script[n]
        job.validations = getattr(job, "validations", 0) + 1
        return script[job.validations - 1]

    monkeypatch.setattr(tr, "validation_loss", scripted)
    params = TRAIN.model_copy(update={"epochs": 2, "eval_every": 1, "checkpoint_every": 1})
    metrics = _run(data, tmp_path / "a", params=params)
    assert metrics["best_step"] == 5 and metrics["best_val_loss"] == 1.5 and metrics["steps"] == 12
    assert [float(r["val_loss"]) for r in read_curve(tmp_path / "a/train/val.csv")][:6] == script[:6]
    # The same run stopped right after step 5: its checkpoint has the weights that were kept.
    with pytest.raises(Stopped):
        _run(data, tmp_path / "b", params=params.model_copy(update={"keep": "last"}),
             checkpoint_dir=tmp_path / "b/ck", stop_after=5)
    kept = ClipCaptioner.load(tmp_path / "a/model")
    ref = ClipCaptioner.load(tmp_path / "a/model")
    load_checkpoint(tmp_path / "b/ck/step-000000005").restore(modules={"mapper": ref.mapper, "gpt": ref.gpt})
    for (k, v), w in zip(kept.state_dict().items(), ref.state_dict().values()):
        assert torch.equal(v, w), k
    last = _run(data, tmp_path / "c", params=params.model_copy(update={"keep": "last"}))
    assert last["kept"] == "last" and last["best_step"] == 5
    assert not all(torch.equal(v, w) for v, w in zip(_weights(tmp_path / "a/model").values(),
                                                     _weights(tmp_path / "c/model").values()))

    early = _run(data, tmp_path / "d", params=params.model_copy(update={"early_stopping_patience": 3}))
    assert early["stopped_early"] and early["steps"] == 8 and early["best_step"] == 5
    assert torch.equal(_weights(tmp_path / "d/model")["mapper.project.weight"],
                       _weights(tmp_path / "a/model")["mapper.project.weight"])


# ------------------------------------------------------------- batches
def test_batches_are_global_and_independent_of_processes(data):
    root, gpt, feats = data
    from pipeline.models.pretrained import load_gpt

    _, tok = load_gpt(gpt)
    d = load_training_data(feats, tok, 40, max_memory_gb=1.0)
    a = epoch_batches(d, 8, seed=0, epoch=1, bucket=False)
    assert a.shape == (6, 8) and sorted(a.reshape(-1)) == list(range(48))
    assert not np.array_equal(a, epoch_batches(d, 8, seed=0, epoch=2, bucket=False))
    assert np.array_equal(a, epoch_batches(d, 8, seed=0, epoch=1, bucket=False))
    # Length bucketing: same pairs, less padding.
    lengths = d.train.lengths
    b = epoch_batches(d, 8, seed=0, epoch=1, bucket=True)
    assert sorted(b.reshape(-1)) == list(range(48))
    pad = lambda batches: sum(len(x) * lengths[x].max() - lengths[x].sum() for x in batches)  # noqa: E731
    assert pad(b) < pad(a)


def test_one_caption_tokeniser_batched_or_not(data):
    """Training's batched tokenising and the model's encode_caption are the one tokeniser:
    stripped captions, cut to max_tokens with EOS kept as the last id."""
    root, gpt, feats = data
    from pipeline.models.pretrained import load_gpt

    model = ClipCaptioner.from_settings(MAPPER.model_dump(), 16, *load_gpt(gpt))
    tok, eos = model.tokenizer, model.eos_token_id
    caps = ["a red circle", "  one blue square here ", "a green triangle " * 10]
    batched = tokenize_captions(tok, caps, 7)
    assert batched == [model.encode_caption(c, 7) for c in caps]
    assert batched[0] == tok("a red circle", add_special_tokens=False)["input_ids"] + [eos]
    assert batched[1] == tok("one blue square here", add_special_tokens=False)["input_ids"] + [eos]
    assert len(batched[2]) == 7 and batched[2][-1] == eos
    built = build_captions(tok, [3, 9], [["a red circle", " "], ["one"]], 7)
    assert list(built.rows) == [3, 9] and list(built.tokens(0)) == batched[0]


def test_streamed_features_train_like_loaded_ones(data, tmp_path):
    """A feature set over train.max_memory_gb is read shard by shard: every pair once per epoch."""
    root, gpt, _ = data
    feats = write_features(tmp_path / "f", scene_table(n_per_class=8), shards=6)
    params = TRAIN.model_copy(update={"epochs": 4, "max_memory_gb": 3 * 16 * 4 * 17 / 2**30})
    from pipeline.models.pretrained import load_gpt

    _, tok = load_gpt(gpt)
    d = load_training_data(feats, tok, 40, params.max_memory_gb)
    assert d.vectors.streamed and d.window == 1 and d.n_shards == 6
    order = epoch_batches(d, 8, seed=0, epoch=1, bucket=False).reshape(-1)
    assert len(set(order)) == len(order) == len(d.train) // 8 * 8
    shards = d.pair_shard[order]
    assert (np.diff(shards) != 0).sum() <= d.n_shards - 1  # one shard after another
    metrics = train(feats, gpt, tmp_path / "m", tmp_path / "c.csv", tmp_path / "t.json", MAPPER, params,
                    progress=False)
    assert metrics["streamed"] and metrics["val_loss"] < 2.0
    assert d.vectors.capacity == 2


@pytest.mark.parametrize("max_memory_gb", [1.0, 1000 / 2**30], ids=["in-memory", "streamed"])
def test_feature_shards_of_mixed_encoders_are_refused(data, tmp_path, max_memory_gb):
    """A feature folder whose last shard was made by another CLIP is refused before
    training, whether the vectors are loaded (they fit train.max_memory_gb) or streamed."""
    from pipeline.formats.features import read_feature_shard, write_feature_shard

    root, gpt, _ = data
    feats = write_features(tmp_path / "f", scene_table(n_per_class=4), shards=3)
    last = read_feature_shard(feats / "00002.h5")
    last.attrs = {**last.attrs, "model_id": "another/clip"}
    write_feature_shard(feats / "00002.h5", last)
    params = TRAIN.model_copy(update={"epochs": 1, "max_memory_gb": max_memory_gb})
    with pytest.raises(FeatureShardError, match=r"00002.h5: attribute 'model_id' is 'another/clip', but "
                                                r"00000.h5 has 'test/clip'"):
        train(feats, gpt, tmp_path / "m", tmp_path / "c.csv", tmp_path / "t.json", MAPPER, params, progress=False)
    assert not (tmp_path / "m").exists() and not (tmp_path / "c.csv").exists()


def test_grad_accum_gives_the_weights_of_one_batch(data, tmp_path):
    """One process, the same global batch of 8 taken whole and as 2 micro-batches of 4
    (of different token counts: micro-batches are cut after sorting by length): the same
    weights and curves to float tolerance. The micro-batches' summed token losses must
    be divided by the global batch's token count, not each by its own. Nothing random:
    no dropout (GPT-2 frozen, in eval mode)."""
    params = TRAIN.model_copy(update={"epochs": 2, "finetune_gpt": False, "keep": "last", "log_every": 1})
    # An MLP mapper: every weight has a gradient (an attention key bias has none, so Adam
    # would turn its rounding noise into steps of lr).
    mlp = MapperParams(type="mlp", prefix_length=3)
    one = _run(data, tmp_path / "one", mapper=mlp, params=params)
    two = _run(data, tmp_path / "two", mapper=mlp, params=params.model_copy(update={"grad_accum": 2}))
    assert one["steps"] == two["steps"] == 12 and two["grad_accum"] == 2
    a, b = _weights(tmp_path / "one/model"), _weights(tmp_path / "two/model")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6), (k, float((a[k] - b[k]).abs().max()))
    for x, y in zip(read_curve(tmp_path / "one/train/loss.csv"), read_curve(tmp_path / "two/train/loss.csv")):
        assert float(x["train_loss"]) == pytest.approx(float(y["train_loss"]), rel=1e-4)
    assert one["val_loss"] == pytest.approx(two["val_loss"], rel=1e-4)


def test_peak_rss_does_not_grow_with_the_number_of_shards(tmp_path):
    """Streamed training of 4 and of 12 shards (16 MiB of vectors each): the same peak memory."""
    peaks = {}
    for shards in (4, 12):
        proc = subprocess.run([sys.executable, "-m", "tests.helpers.train_rss", str(tmp_path / f"s{shards}"), str(shards)],
                              capture_output=True, text=True, timeout=600,
                              env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)})
        assert proc.returncode == 0, proc.stderr[-3000:]
        peaks[shards] = json.loads(proc.stdout.strip().splitlines()[-1])
    assert peaks[12]["streamed"] and peaks[12]["feature_mib"] == 192
    # 8 more shards would be +128 MiB if they were held; allow 40 MiB of noise.
    assert peaks[12]["peak_mib"] < peaks[4]["peak_mib"] + 40, peaks


# --------------------------------------------------------------------- DDP
def _stage_args(tmp_path: Path, feats, gpt, name: str, params_yaml: str) -> list[str]:
    (tmp_path / f"{name}.yaml").write_text(params_yaml)
    out = tmp_path / name
    return ["train", "--params", str(tmp_path / f"{name}.yaml"), "--features", str(feats), "--gpt", str(gpt),
            "--out", str(out / "model"), "--curve", str(out / "loss.csv"), "--val-curve", str(out / "val.csv"),
            "--metrics", str(out / "train.json"), "--checkpoints", str(out / "ck"), "--no-progress"]


def _torchrun(tmp_path: Path, feats, gpt, name: str, params_yaml: str, nproc: int) -> Path:
    proc = run_torchrun(standalone(nproc, _stage_args(tmp_path, feats, gpt, name, params_yaml)), cwd=tmp_path)
    (tmp_path / name / "stderr.txt").write_text(proc.stderr)
    return tmp_path / name


def test_ddp_two_processes_equal_one_process(data, tmp_path):
    """Same global batch with 2 gloo processes and with 1 (2 micro-batches): the same
    weights. Without gradient averaging across ranks (each rank stepping on its own
    half of the batch) this fails. Nothing random: no dropout (GPT-2 frozen, in eval mode)."""
    root, gpt, feats = data
    common = ("mapper: {type: transformer, prefix_length: 3, clip_length: 2, layers: 1, heads: 2}\n"
              "train: {epochs: 2, batch_size: 8, lr: 0.01, warmup_steps: 1, precision: fp32, log_every: 1, "
              "keep: last, finetune_gpt: false%s}\n")
    two = _torchrun(tmp_path, feats, gpt, "two", common % "", 2)
    one = _torchrun(tmp_path, feats, gpt, "one", common % ", grad_accum: 2", 1)
    m2, m1 = read_metrics(two / "train.json"), read_metrics(one / "train.json")
    assert m2["world_size"] == 2 and m1["world_size"] == 1 and m2["steps"] == m1["steps"] == 12
    a, b = _weights(two / "model"), _weights(one / "model")
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6), k
    assert m2["train_loss"] == pytest.approx(m1["train_loss"], rel=1e-4)
    assert m2["val_loss"] == pytest.approx(m1["val_loss"], rel=1e-4)
    assert len(read_curve(two / "loss.csv")) == 12


def test_checkpoint_of_another_world_size_is_ignored(data, tmp_path):
    """A 2-process rerun finds the checkpoint of a 1-process run with the same params:
    it holds one rank's RNG states and sums, so it is not resumed (named as made with
    another world size) and the run starts over."""
    from pipeline.core.params import load_params

    root, gpt, feats = data
    yaml = ("mapper: {type: transformer, prefix_length: 3, clip_length: 2, layers: 1, heads: 2}\n"
            "train: {epochs: 1, batch_size: 8, lr: 0.01, warmup_steps: 1, precision: fp32, log_every: 1, "
            "keep: last, finetune_gpt: false, checkpoint_every: 2}\n")
    (tmp_path / "one.yaml").write_text(yaml)
    p = load_params(tmp_path / "one.yaml")
    with pytest.raises(Stopped):  # the same params as the CLI reads, in one process
        train(feats, gpt, tmp_path / "one/model", tmp_path / "one/loss.csv", tmp_path / "one/train.json",
              p.mapper, p.train, progress=False, checkpoint_dir=tmp_path / "two" / "ck", stop_after=4,
              device=p.device)
    assert [c.name for c in sorted((tmp_path / "two" / "ck").glob("step-*"))][-1] == "step-000000004"
    two = _torchrun(tmp_path, feats, gpt, "two", yaml, 2)
    stderr = (two / "stderr.txt").read_text()
    # The only difference is the world size: everything else of the identity agrees.
    assert "step-000000004 ignored: made by another run (world_size: 1 there, 2 here)" in stderr
    assert "resuming from" not in stderr
    metrics = read_metrics(two / "train.json")
    assert metrics["world_size"] == 2 and metrics["resumed_from_step"] == 0 and metrics["steps"] == 6
    assert len(read_curve(two / "loss.csv")) == 6


def test_two_nodes_on_loopback_equal_one_process(data, tmp_path):
    """The same job as two torchrun nodes (one process each, c10d rendezvous on 127.0.0.1)
    and as one process with grad_accum 2: the same weights. Each node's process has
    LOCAL_RANK 0, so a process that took its share by local rank instead of global rank
    (both nodes on the same half of every batch) fails this, as does skipping the all-reduce."""
    root, gpt, feats = data
    common = ("mapper: {type: transformer, prefix_length: 3, clip_length: 2, layers: 1, heads: 2}\n"
              "train: {epochs: 2, batch_size: 8, lr: 0.01, warmup_steps: 1, precision: fp32, log_every: 1, "
              "keep: last, finetune_gpt: false%s}\n")
    args = _stage_args(tmp_path, feats, gpt, "nodes", common % "")
    port = free_port()
    run_nodes([node(2, r, port, args) for r in (0, 1)], cwd=tmp_path)
    one = _torchrun(tmp_path, feats, gpt, "one", common % ", grad_accum: 2", 1)
    two = tmp_path / "nodes"
    m2, m1 = read_metrics(two / "train.json"), read_metrics(one / "train.json")
    assert m2["world_size"] == 2 and m1["world_size"] == 1 and m2["steps"] == m1["steps"] == 12
    a, b = _weights(two / "model"), _weights(one / "model")
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6), k
    assert m2["val_loss"] == pytest.approx(m1["val_loss"], rel=1e-4)


# ------------------------------------------------------------ a real kill
def test_sigkill_then_rerun_gives_the_same_weights(data, tmp_path):
    root, gpt, feats = data
    (tmp_path / "p.yaml").write_text(
        "mapper: {type: transformer, prefix_length: 3, clip_length: 2, layers: 1, heads: 2, dropout: 0.1}\n"
        "train: {epochs: 12, batch_size: 8, lr: 0.01, warmup_steps: 2, precision: fp32, log_every: 2, "
        "finetune_gpt: true, checkpoint_every: 5}\n")

    def cmd(out):
        return [sys.executable, "-m", "stages.cli", "train", "--params", str(tmp_path / "p.yaml"),
                "--features", str(feats), "--gpt", str(gpt), "--out", str(out / "model"),
                "--curve", str(out / "loss.csv"), "--val-curve", str(out / "val.csv"),
                "--metrics", str(out / "train.json"), "--checkpoints", str(out / "ck"), "--no-progress"]

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    subprocess.run(cmd(tmp_path / "whole"), env=env, check=True, capture_output=True, timeout=300)
    killed = tmp_path / "killed"
    proc = subprocess.Popen(cmd(killed), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while not list((killed / "ck").glob("step-*")) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "model").exists(), "the run ended before it could be killed"
    again = subprocess.run(cmd(killed), env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming from" in again.stderr
    a, b = _weights(tmp_path / "whole" / "model"), _weights(killed / "model")
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert (killed / "loss.csv").read_text() == (tmp_path / "whole" / "loss.csv").read_text()


def test_a_clip_folder_that_did_not_make_the_features_is_refused_before_training(data, tmp_path, hub_clip_dir):
    root, gpt, feats = data
    clip = hub_clip_dir  # the demo CLIP at TINY_CLIP's sizes: not the features' test/clip
    with pytest.raises(ModelError, match="model_id"):
        train(feats, gpt, tmp_path / "m", tmp_path / "c.csv", tmp_path / "t.json", MAPPER, TRAIN,
              progress=False, clip_dir=clip)
    assert not (tmp_path / "c.csv").exists() and not (tmp_path / "m").exists()
