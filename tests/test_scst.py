"""Self-critical training: the policy gradient is that of the sampling policy, the reward
rises, epochs 0 passes the model through, the best val epoch is kept, a killed run
resumes to the same bytes, a frozen GPT-2 stays frozen."""
from __future__ import annotations

import csv
import json
import logging
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers.torchrun import run_torchrun, standalone
from tests.helpers.features import scene_table, write_features
from tests.helpers.models import save_tiny_gpt
from pipeline.core.files import read_metrics
from pipeline.core.params import MapperParams, ScstParams, TrainParams

needs_java = pytest.mark.skipif(
    subprocess.run(["java", "-version"], capture_output=True).returncode != 0, reason="needs Java")

MAPPER = MapperParams(type="transformer", prefix_length=3, clip_length=2, layers=1, heads=2)
XE = TrainParams(epochs=4, batch_size=8, lr=1e-2, warmup_steps=2, precision="fp32", log_every=2, finetune_gpt=True)
SCST = ScstParams(epochs=12, batch_size=8, lr=2e-3, samples=4, max_tokens=8, precision="fp32", log_every=2)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def xe(tmp_path_factory):
    """A cross-entropy model on a small learnable task (fine-tuned GPT-2), and one with GPT-2 frozen."""
    from pipeline.train.run import train

    root = tmp_path_factory.mktemp("scst")
    gpt = save_tiny_gpt(root / "gpt")
    feats = write_features(root / "features", scene_table(n_per_class=12, splits=("train", "train", "val")))
    train(feats, gpt, root / "xe", root / "loss.csv", root / "train.json", MAPPER, XE, progress=False)
    frozen = XE.model_copy(update={"finetune_gpt": False, "epochs": 1})
    train(feats, gpt, root / "xe_frozen", root / "loss2.csv", root / "train2.json", MAPPER, frozen, progress=False)
    return root, feats


def run(root: Path, feats: Path, out: str, params: ScstParams, model: str = "xe", **kwargs) -> dict:
    from pipeline.scst.run import scst

    return scst(root / model, feats, root / out / "model", root / out / "reward.csv", root / out / "val.csv",
                root / out / "scst.json", params, progress=False, **kwargs)


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# ------------------------------------------------------------------ pieces
def test_advantages_mean_of_others_and_greedy():
    from pipeline.scst.rewards import advantages

    r = np.array([1.0, 2.0, 3.0, 0.0, 0.0, 6.0])  # two images, three samples each
    assert np.allclose(advantages(r, 3), [1 - 2.5, 2 - 2.0, 3 - 1.5, 0 - 3.0, 0 - 3.0, 6 - 0.0])
    assert np.allclose(advantages(r, 3, np.array([2.0, 1.0])), [-1, 0, 1, -1, -1, 5])
    # Equivalently k/(k-1) times the deviation from the image's mean reward.
    g = r.reshape(2, 3)
    assert np.allclose(advantages(r, 3), (1.5 * (g - g.mean(axis=1, keepdims=True))).reshape(-1))
    with pytest.raises(ValueError):
        advantages(r, 1)


def test_caption_mask_stops_after_the_first_eos():
    from pipeline.scst.rewards import caption_mask

    ids = torch.tensor([[5, 6, 0, 0, 0], [5, 0, 7, 0, 0], [5, 6, 7, 8, 9]])
    assert caption_mask(ids, 0).tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]]


def test_scored_log_probabilities_are_the_sampling_policy(xe):
    """What the loss weighs, token_logprobs of the sampled ids, equals the log-probabilities
    the shared decoding path drew them with (the seeded sampler's record, up to each EOS)."""
    from pipeline.formats.features import load_features
    from pipeline.models.captioner import ClipCaptioner
    from pipeline.text.decoding import generate_ids
    from pipeline.core.params import Decoding
    from pipeline.scst.rewards import caption_mask

    root, feats = xe
    model = ClipCaptioner.load(root / "xe")
    vectors = torch.from_numpy(load_features(feats, split="train").embeddings[:6])
    d = Decoding(num_beams=1, do_sample=True, num_return_sequences=3, max_new_tokens=8, top_k=0, top_p=1.0)
    ids, sampler = generate_ids(model, vectors, d, keys=[str(i) for i in range(6)])
    mask = caption_mask(ids, model.eos_token_id)
    theirs = torch.stack(sampler.token_logprobs, dim=1)[:, :ids.shape[1]] * mask
    ours = model.token_logprobs(vectors.repeat_interleave(3, dim=0), ids.clone(), mask)
    assert torch.allclose(ours, theirs, atol=1e-5)
    assert (mask.sum(dim=1) < ids.shape[1]).any()  # some captions ended before the cap
    # The same image's samples are the same whatever else is in the batch (DDP needs this).
    alone, _ = generate_ids(model, vectors[2:3], d, keys=["2"])
    assert torch.equal(alone, ids[6:9, :alone.shape[1]]) and (ids[6:9, alone.shape[1]:] == model.pad_token_id).all()


def test_sampling_prints_no_attention_mask_warning(xe, caplog):
    """transformers drops generate's all-ones mask, then GPT-2 warns at finished rows' padding;
    the decoding path silences exactly that warning (it is shown once per process, so reset)."""
    from transformers.utils import logging as hf_logging

    from pipeline.formats.features import load_features
    from pipeline.models.captioner import ClipCaptioner
    from pipeline.text.decoding import generate_ids
    from pipeline.core.params import Decoding

    root, feats = xe
    model = ClipCaptioner.load(root / "xe")
    vectors = torch.from_numpy(load_features(feats, split="train").embeddings[:6])
    hf_logging.warning_once.cache_clear()
    d = Decoding(num_beams=1, do_sample=True, num_return_sequences=4, max_new_tokens=8)
    with caplog.at_level(logging.WARNING, logger="transformers"):
        ids, _ = generate_ids(model, vectors, d, keys=[str(i) for i in range(6)])
    assert (ids == model.eos_token_id).any()  # finished rows were padded: the warning's trigger
    assert not [r for r in caplog.records if "attention_mask" in r.getMessage()]


# ----------------------------------------------------------------- the stage
@needs_java
def test_reward_rises_and_outputs_are_written(xe):
    root, feats = xe
    metrics = run(root, feats, "mean", SCST)
    # The same run with a learning rate of ~0: the cross-entropy policy's own rewards
    # under the same sampling (the noise floor of this small task).
    run(root, feats, "still", SCST.model_copy(update={"lr": 1e-12}))
    rows = read_csv(root / "mean" / "val.csv")
    assert [int(r["epoch"]) for r in rows] == list(range(SCST.epochs + 1))
    learned = [float(r["sample_reward"]) for r in rows[1:]]
    still = [float(r["sample_reward"]) for r in read_csv(root / "still" / "val.csv")[1:]]
    # The policy learns what CIDEr-D rewards: its later epochs' samples score clearly
    # above the unchanged policy's (epoch means of 12 steps are noisy, hence the means).
    # Measured over seeds 0-2: +0.61 to +0.95; with the advantage's sign flipped, -1.4 to -1.7.
    assert np.mean(learned[-4:]) > np.mean(still) + 0.3, (learned, still)
    curve = read_csv(root / "mean" / "reward.csv")
    assert len(curve) >= SCST.epochs and all(float(r["sample_tokens"]) > 1 for r in curve)
    assert read_metrics(root / "mean" / "scst.json") == metrics
    assert metrics["best_epoch"] == max(range(len(rows)), key=lambda e: (float(rows[e]["val_cider"]), -e))
    assert metrics["val_cider_best"] >= metrics["val_cider_xe"]
    assert metrics["tokenizer_agreement"] == 1.0 and 0 < metrics["seconds_reward_fraction"] < 1
    assert (root / "mean" / "model" / "captioner.json").is_file()


@needs_java
def test_greedy_baseline_runs(xe):
    root, feats = xe
    metrics = run(root, feats, "greedy", SCST.model_copy(update={"baseline": "greedy", "epochs": 1}))
    curve = read_csv(root / "greedy" / "reward.csv")
    # The greedy caption's reward is the baseline, not the samples' mean.
    assert any(abs(float(r["baseline_reward"]) - float(r["reward"])) > 1e-6 for r in curve)
    assert metrics["baseline"] == "greedy"


def test_epochs_zero_passes_the_model_through(xe):
    root, feats = xe
    metrics = run(root, feats, "off", SCST.model_copy(update={"epochs": 0}))
    assert metrics["passed_through"] is True
    src, dst = root / "xe", root / "off" / "model"
    files = sorted(p.relative_to(src) for p in src.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(dst) for p in dst.rglob("*") if p.is_file())
    assert all((src / f).read_bytes() == (dst / f).read_bytes() for f in files)
    assert read_csv(root / "off" / "reward.csv") == []


@needs_java
def test_a_ruinous_run_keeps_the_cross_entropy_weights(xe):
    """Validation CIDEr picks the best epoch, epoch 0 included: a learning rate that wrecks
    the model hands on the cross-entropy weights."""
    from safetensors.torch import load_file

    root, feats = xe
    metrics = run(root, feats, "ruin", SCST.model_copy(update={"lr": 0.5, "epochs": 2, "grad_clip": None}))
    assert metrics["best_epoch"] == 0 and metrics["val_cider_best"] == metrics["val_cider_xe"]
    before = load_file(root / "xe" / "mapper.safetensors")
    after = load_file(root / "ruin" / "model" / "mapper.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before)


@needs_java
def test_killed_run_resumes_to_the_same_bytes(xe, tmp_path):
    from pipeline.train.loop import Stopped

    root, feats = xe
    params = SCST.model_copy(update={"epochs": 2, "checkpoint_every": 2})
    run(root, feats, "whole", params)
    ckpt = tmp_path / "ckpt"
    steps_per_epoch = -(-96 // params.batch_size)  # 96 train images
    with pytest.raises(Stopped):  # mid-epoch, one step after a checkpoint: that step is redone
        run(root, feats, "resumed", params, checkpoint_dir=ckpt, stop_after=steps_per_epoch + 3)
    assert sorted(p.name for p in ckpt.iterdir())[-1] == f"step-{steps_per_epoch + 2:09d}"
    metrics = run(root, feats, "resumed", params, checkpoint_dir=ckpt)
    for name in ("model/mapper.safetensors", "model/gpt/model.safetensors", "reward.csv", "val.csv"):
        assert (root / "whole" / name).read_bytes() == (root / "resumed" / name).read_bytes(), name
    assert metrics["steps"] == 2 * steps_per_epoch
    assert not [p for p in ckpt.iterdir() if p.name.startswith("step-")]  # removed when done


@needs_java
def test_checkpoint_of_other_params_is_ignored_with_the_reason(xe, tmp_path, caplog):
    """A checkpoint made with another scst.lr is not resumed: it is named with the
    difference and replaced by this run's. One made with another log_every (which does
    not change the trajectory) is resumed."""
    from pipeline.core.checkpoint import load_checkpoint
    from pipeline.train.loop import Stopped

    root, feats = xe
    params = SCST.model_copy(update={"epochs": 1, "checkpoint_every": 1})
    ckpt = tmp_path / "ckpt"
    steps = lambda: sorted(p.name for p in ckpt.iterdir() if p.name.startswith("step-"))  # noqa: E731
    with pytest.raises(Stopped):
        run(root, feats, "first", params, checkpoint_dir=ckpt, stop_after=2)
    assert steps() == ["step-000000001", "step-000000002"]
    other = params.model_copy(update={"lr": 4e-3})
    with caplog.at_level(logging.INFO, logger="pipeline"), pytest.raises(Stopped):
        run(root, feats, "other", other, checkpoint_dir=ckpt, stop_after=1)
    assert "step-000000002 ignored: made by another run (scst.lr: 0.002 there, 0.004 here)" in caplog.text
    assert "resuming from" not in caplog.text
    # It started over: one step done, its own checkpoint in place of the other run's.
    assert steps() == ["step-000000001"]
    assert load_checkpoint(ckpt / "step-000000001").identity["scst"]["lr"] == 4e-3
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="pipeline"), pytest.raises(Stopped):
        run(root, feats, "other", other.model_copy(update={"log_every": 3}), checkpoint_dir=ckpt, stop_after=2)
    assert f"scst: resuming from {ckpt / 'step-000000001'}" in caplog.text and "ignored" not in caplog.text


@needs_java
def test_reward_is_cider_d_with_the_training_splits_document_frequencies(xe, tmp_path):
    """The reward SCST hands the policy is CIDEr-D against the image's training references
    with document frequencies from the training split, not from the val references (nor
    both). Here the val references share no word with the training ones, so the corpora
    weigh the captions' n-grams differently. One step over all 33 training images, greedy baseline: the step's
    baseline reward is the mean reward of the cross-entropy model's greedy captions,
    which the test computes itself."""
    from pipeline.text.cider import CiderD
    from pipeline.text.tokenizer import fast_ptb_tokenize, ptb_tokenize
    from pipeline.core.params import Decoding
    from pipeline.models.captioner import ClipCaptioner
    from pipeline.text.decoding import decode_batch

    root, _ = xe
    table = scene_table(n_per_class=3, splits=("train",))
    table.splits = ["val" if key.endswith("_00") and caps[0].split()[1] == "red" else "train"
                    for key, caps in zip(table.keys, table.captions)]
    for i, split in enumerate(table.splits):  # val words: none of the captions' words
        if split == "val":
            table.captions[i] = ["the scarlet thing", "something scarlet there"]
    feats = write_features(tmp_path / "features", table)
    train_rows = [i for i, s in enumerate(table.splits) if s == "train"]
    val_rows = [i for i, s in enumerate(table.splits) if s == "val"]
    assert len(train_rows) == 33 and len(val_rows) == 3
    params = SCST.model_copy(update={"epochs": 1, "batch_size": 33, "samples": 2, "baseline": "greedy",
                                     "log_every": 1})
    from pipeline.scst.run import scst

    out = tmp_path / "out"
    scst(root / "xe", feats, out / "model", out / "reward.csv", out / "val.csv", out / "scst.json", params,
         progress=False)
    (row,) = read_csv(out / "reward.csv")
    assert int(row["step"]) == 1

    model = ClipCaptioner.load(root / "xe").eval()
    vectors = torch.from_numpy(table.embeddings[train_rows])
    d = Decoding(num_beams=1, max_new_tokens=params.max_tokens)
    nbest = decode_batch(model, vectors, d, [table.keys[i] for i in train_rows])
    greedy = [fast_ptb_tokenize(caps[0].text) for caps in nbest]
    flat = ptb_tokenize([c for i in train_rows + val_rows for c in table.captions[i]])
    refs = [flat[2 * j:2 * j + 2] for j in range(len(train_rows) + len(val_rows))]  # two captions an image
    train_refs, val_refs = refs[:len(train_rows)], refs[len(train_rows):]

    def mean_reward(corpus):
        cider = CiderD(corpus)
        return float(np.mean([cider.score(c, cider.vectors(r)) for c, r in zip(greedy, train_refs)]))

    expected = mean_reward(train_refs)
    assert float(row["baseline_reward"]) == pytest.approx(expected, rel=1e-5)
    for wrong in (val_refs, train_refs + val_refs):  # what the test tells apart
        # 8% (val) and 0.2% (train and val) apart here; the curve keeps 6 significant digits.
        assert abs(mean_reward(wrong) - expected) > 1e-3 * expected


@needs_java
def test_frozen_gpt_stays_frozen(xe):
    from safetensors.torch import load_file

    root, feats = xe
    metrics = run(root, feats, "frozen", SCST.model_copy(update={"epochs": 1, "lr": 1e-2}), model="xe_frozen")
    assert metrics["gpt_updated"] is False
    before = json.loads((root / "xe_frozen" / "captioner.json").read_text())
    after = json.loads((root / "frozen" / "model" / "captioner.json").read_text())
    assert before["finetune_gpt"] is after["finetune_gpt"] is False
    a, b = load_file(root / "xe_frozen" / "mapper.safetensors"), load_file(root / "frozen" / "model" / "mapper.safetensors")
    if metrics["best_epoch"] == 1:
        assert any(not torch.equal(a[k], b[k]) for k in a)  # the mapper did learn



def _scst_args(root: Path, feats: Path, tmp_path: Path, name: str, params_yaml: str) -> list[str]:
    (tmp_path / f"{name}.yaml").write_text(params_yaml)
    out = tmp_path / name
    return ["scst", "--params", str(tmp_path / f"{name}.yaml"), "--model", str(root / "xe"), "--features", str(feats),
            "--out", str(out / "model"), "--curve", str(out / "reward.csv"), "--val-curve", str(out / "val.csv"),
            "--metrics", str(out / "scst.json"), "--checkpoints", str(out / "ck"), "--no-progress"]


def _without_key_bias(name: str, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both tensors, less the key part of a fused query/key/value bias. Attention is blind to
    the key bias (softmax ignores a shift), so its gradient is 0 plus rounding noise, which
    Adam scales up to steps of lr: it wanders differently in any two runs that round differently."""
    if name.endswith(("in_proj_bias", "attn.c_attn.bias")):
        width = len(a) // 3
        keep = torch.ones(len(a), dtype=torch.bool)
        keep[width:2 * width] = False
        return a[keep], b[keep]
    return a, b


@needs_java
def test_two_processes_equal_one_process(xe, tmp_path):
    """scst.batch_size is the global number of images: 2 gloo processes (4 images each) and
    1 process (8) make the same weights. Each image's samples are seeded by the image, not
    the process, so both draw the same captions; without DDP's gradient all-reduce each
    process would step on its own half and this fails."""
    from safetensors.torch import load_file

    root, feats = xe
    params = ("device: cpu\nscst: {epochs: 2, batch_size: 8, lr: 0.002, samples: 4, max_tokens: 8, "
              "precision: fp32, log_every: 1}\n")
    for name, nproc in (("two", 2), ("one", 1)):
        run_torchrun(standalone(nproc, _scst_args(root, feats, tmp_path, name, params)), cwd=tmp_path)
    two, one = tmp_path / "two", tmp_path / "one"
    m2, m1 = read_metrics(two / "scst.json"), read_metrics(one / "scst.json")
    assert m2["world_size"] == 2 and m1["world_size"] == 1 and m2["steps"] == m1["steps"] == 24
    for name in ("mapper.safetensors", "gpt/model.safetensors"):
        a, b = load_file(two / "model" / name), load_file(one / "model" / name)
        for k in a:
            assert torch.allclose(*_without_key_bias(k, a[k], b[k]), rtol=1e-4, atol=1e-6), (name, k)
    r2, r1 = read_csv(two / "reward.csv"), read_csv(one / "reward.csv")
    assert len(r2) == len(r1) == 24
    for x, y in zip(r2, r1):
        assert float(x["reward"]) == pytest.approx(float(y["reward"]), abs=1e-9)  # the same captions
    assert m2["val_cider_best"] == pytest.approx(m1["val_cider_best"], rel=1e-6)


def test_params_refuse_mean_baseline_with_one_sample():
    from pipeline.core.params import ParamsError, parse_params

    with pytest.raises(ParamsError, match="scst.samples"):
        parse_params({"scst": {"samples": 1}})
    assert parse_params({"scst": {"samples": 1, "baseline": "greedy"}}).scst.samples == 1


def test_cli_error_for_a_missing_model_is_one_line(tmp_path):
    from click.testing import CliRunner

    from stages.cli import capline

    (tmp_path / "params.yaml").write_text("scst: {epochs: 0}\n")
    res = CliRunner().invoke(capline, ["scst", "--params", str(tmp_path / "params.yaml"), "--model",
                                       str(tmp_path / "nothing"), "--out", str(tmp_path / "m")])
    assert res.exit_code == 1 and "not a trained captioner folder" in res.output and "Traceback" not in res.output
