"""Generation: batched beam search equals one-at-a-time, EOS stops captions, files are COCO."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pipeline.text.decoding import generate_ids, prepare_for_inference
from pipeline.generate.run import caption_vectors, derangement, run as generate
from pipeline.formats.features import FeatureShardError
from pipeline.models.captioner import ClipCaptioner
from pipeline.core.params import Decoding, GenerateParams, MapperParams, TrainParams
from pipeline.train.run import train
from tests.helpers.features import scene_table, write_features

pytestmark = pytest.mark.usefixtures("one_torch_thread")

GEN = GenerateParams(split="test", batch_size=5, num_beams=3, max_new_tokens=12, precision="fp32")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_gpt_dir, scene_features):
    root = tmp_path_factory.mktemp("gen")
    gpt = tiny_gpt_dir
    table = scene_table(n_per_class=6)
    feats = scene_features(n_per_class=6)  # the shards of `table`
    mapper = MapperParams(type="mlp", prefix_length=2)
    params = TrainParams(epochs=30, batch_size=8, lr=3e-3, warmup_steps=5, precision="fp32", finetune_gpt=True)
    train(feats, gpt, root / "model", root / "loss.csv", root / "train.json", mapper, params, progress=False)
    return root, feats, table


def texts(nbest):
    return [[c.text for c in caps] for caps in nbest]


@pytest.mark.parametrize("precision", ["fp32", "auto"])
def test_batched_beam_search_equals_one_at_a_time(trained, precision):
    from pipeline.core.runtime import choose_precision

    root, feats, table = trained
    device = torch.device("cpu")
    model = prepare_for_inference(ClipCaptioner.load(root / "model"), device, choose_precision(precision, device))
    vectors, keys = table.embeddings[:12], table.keys[:12]
    params = GEN.model_copy(update={"precision": precision, "num_return_sequences": 3})
    one = caption_vectors(model, vectors, params.model_copy(update={"batch_size": 1}), keys, False)
    many = caption_vectors(model, vectors, params, keys, False)
    assert texts(one) == texts(many)  # every caption of the n-best, in the same order
    # Scores agree to rounding (a matmul over 9 rows and one over 45 may add in another order).
    assert [c.score for caps in one for c in caps] == pytest.approx([c.score for caps in many for c in caps],
                                                                    abs=1e-3)
    assert len({caps[0].text for caps in many}) > 1  # the captions depend on the image


def test_trained_model_names_what_is_in_the_image(trained):
    root, feats, table = trained
    model = ClipCaptioner.load(root / "model")
    test = [i for i, s in enumerate(table.splits) if s == "test"]
    caps = [c[0].text for c in caption_vectors(model, table.embeddings[test], GEN, [table.keys[i] for i in test],
                                               False)]
    right = 0
    for i, cap in zip(test, caps):
        colour, shape = table.captions[i][0].split()[1:3]
        right += colour in cap.split() and shape in cap.split()
    # 12 classes: chance is 1/12; the vectors carry the class.
    assert right >= 0.75 * len(test), caps


def test_eos_stops_captions(trained):
    root, feats, table = trained
    model = ClipCaptioner.load(root / "model")
    ids, _ = generate_ids(model, torch.from_numpy(table.embeddings[:6]), Decoding(num_beams=2, max_new_tokens=30),
                          keys=[""] * 6)
    eos = model.eos_token_id
    assert ids.shape[1] < 30  # every beam finished long before the cap
    assert all(eos in row for row in ids.tolist())
    for row, text in zip(ids.tolist(), model.decode(ids)):
        assert text == model.tokenizer.decode(row[: row.index(eos)]).strip()
        assert "<|endoftext|>" not in text and text
    # max_new_tokens is capped by GPT-2's 64 positions minus the prefix.
    long, _ = generate_ids(model, torch.from_numpy(table.embeddings[:1]),
                           Decoding(num_beams=1, max_new_tokens=500, min_new_tokens=64 - model.prefix_length), keys=[""])
    assert long.shape[1] == 64 - model.prefix_length


def test_generate_writes_coco_files_and_a_shuffled_control(trained, tmp_path):
    root, feats, table = trained
    metrics = generate(root / "model", feats, tmp_path / "captions", GEN, metrics_path=tmp_path / "g.json",
                       progress=False)
    results = json.loads((tmp_path / "captions/results.json").read_text())
    shuffled = json.loads((tmp_path / "captions/results_shuffled.json").read_text())
    refs = json.loads((tmp_path / "captions/references.json").read_text())
    test_keys = [k for k, s in zip(table.keys, table.splits) if s == "test"]
    assert [r["image_id"] for r in results] == test_keys
    assert [r["image_id"] for r in shuffled] == test_keys
    assert sorted(r["caption"] for r in shuffled) == sorted(r["caption"] for r in results)
    # The control gives no image the caption made from its own vector (captions of one class may match).
    own = {r["image_id"]: r["caption"] for r in results}
    perm = derangement(len(test_keys), GEN.seed)
    assert [r["caption"] for r in shuffled] == [own[test_keys[j]] for j in perm]
    assert [im["id"] for im in refs["images"]] == test_keys
    by_key = {k: c for k, c in zip(table.keys, table.captions)}
    assert len(refs["annotations"]) == sum(len(by_key[k]) for k in test_keys)
    assert len({a["id"] for a in refs["annotations"]}) == len(refs["annotations"])
    for a in refs["annotations"]:
        assert a["caption"] in by_key[a["image_id"]]
    assert metrics["captions"] == len(test_keys) == json.loads((tmp_path / "g.json").read_text())["captions"]
    assert metrics["captions_per_s"] > 0


def test_images_without_reference_captions_are_left_out(trained, tmp_path):
    from pipeline.evaluate.cocofiles import load_references, load_results
    from pipeline.formats.features import FeatureTable

    root, feats, table = trained
    test = [i for i, s in enumerate(table.splits) if s == "test"]
    captions = [list(c) for c in table.captions]
    captions[test[0]] = []  # e.g. a COCO image without annotations, or img2dataset's blank caption
    captions[test[1]] = ["", "  ", captions[test[1]][0]]
    other = write_features(tmp_path / "f", FeatureTable(keys=table.keys, embeddings=table.embeddings,
                                                        splits=table.splits, captions=captions,
                                                        attrs=dict(table.attrs)), shards=1)
    metrics = generate(root / "model", other, tmp_path / "c", GEN, progress=False)
    results = json.loads((tmp_path / "c/results.json").read_text())
    refs = json.loads((tmp_path / "c/references.json").read_text())
    kept = [table.keys[i] for i in test[1:]]
    assert [r["image_id"] for r in results] == kept and metrics["captions"] == len(kept)
    assert [im["id"] for im in refs["images"]] == kept
    assert all(a["caption"].strip() for a in refs["annotations"])
    assert [a["caption"] for a in refs["annotations"] if a["image_id"] == kept[0]] == [captions[test[1]][2]]
    # The evaluate stage accepts what generate wrote.
    references = load_references(tmp_path / "c/references.json")
    assert list(load_results(tmp_path / "c/results.json", references)) == kept
    assert list(load_results(tmp_path / "c/results_shuffled.json", references)) == kept


def test_derangement_moves_every_image():
    for n in (2, 3, 10, 101):
        p = derangement(n, seed=n)
        assert sorted(p) == list(range(n)) and not np.any(p == np.arange(n))
    assert list(derangement(7, 1)) == list(derangement(7, 1))


def test_generate_refuses_features_of_another_encoder(trained, tmp_path):
    root, feats, table = trained
    table.attrs["output"] = "pooler_output"
    other = write_features(tmp_path / "other", table, shards=1)
    table.attrs["output"] = "image_embeds"
    with pytest.raises(FeatureShardError, match="output"):
        generate(root / "model", other, tmp_path / "c", GEN, progress=False)
    assert not (tmp_path / "c").exists()


def test_generate_command(trained, tmp_path):
    from click.testing import CliRunner

    from stages.cli import capline

    root, feats, table = trained
    (tmp_path / "params.yaml").write_text("generate: {split: val, num_beams: 2, batch_size: 4, precision: fp32}\n")
    args = ["generate", "--params", str(tmp_path / "params.yaml"), "--model", str(root / "model"),
            "--features", str(feats), "--out", str(tmp_path / "out"), "--metrics", str(tmp_path / "m.json"),
            "--no-progress"]
    res = CliRunner().invoke(capline, args)
    assert res.exit_code == 0, res.output
    n_val = sum(s == "val" for s in table.splits)
    assert len(json.loads((tmp_path / "out/results.json").read_text())) == n_val
    assert json.loads((tmp_path / "m.json").read_text())["split"] == "val"
    bad = CliRunner().invoke(capline, args + ["--model", str(tmp_path / "nothing")])
    assert bad.exit_code == 1 and "captioner.json" in bad.stderr
    (tmp_path / "bad.yaml").write_text("generate: {num_beam: 2}\n")
    bad = CliRunner().invoke(capline, args + ["--params", str(tmp_path / "bad.yaml")])
    assert bad.exit_code == 1 and "generate.num_beam" in bad.stderr


def test_torchrun_two_processes_write_what_one_process_writes(trained, tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    import yaml

    root, feats, table = trained
    generate(root / "model", feats, tmp_path / "one", GEN, tmp_path / "one.json", progress=False)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"generate": GEN.model_dump()}))
    repo = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "stages.cli", "generate", "--params", str(tmp_path / "params.yaml"), "--model", str(root / "model"),
           "--features", str(feats), "--out", str(tmp_path / "two"), "--metrics", str(tmp_path / "two.json"),
           "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(repo)}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("results.json", "results_shuffled.json", "references.json"):
        assert (tmp_path / "two" / name).read_bytes() == (tmp_path / "one" / name).read_bytes(), name
    assert json.loads((tmp_path / "two.json").read_text())["world_size"] == 2


def _nbest(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("update", [
    {"num_beams": 1, "do_sample": True, "num_return_sequences": 3, "temperature": 1.3, "top_k": 8, "top_p": 0.95},
    {"num_beams": 3, "num_return_sequences": 3},
], ids=["sampling", "beam"])
def test_nbest_file_lists_every_caption_best_first(trained, tmp_path, update):
    root, feats, table = trained
    params = GEN.model_copy(update={**update, "precision": "auto"})
    metrics = generate(root / "model", feats, tmp_path / "a", params, progress=False)
    rows = _nbest(tmp_path / "a/nbest.jsonl")
    results = json.loads((tmp_path / "a/results.json").read_text())
    assert [r["image_id"] for r in rows] == [r["image_id"] for r in results]
    for row, result in zip(rows, results):
        assert len(row["captions"]) == 3
        scores = [c["score"] for c in row["captions"]]
        assert scores == sorted(scores, reverse=True) and all(s <= 0 for s in scores)
        assert row["captions"][0]["caption"] == result["caption"]  # results.json: the first of the n-best
    assert metrics["num_return_sequences"] == 3 and metrics["precision"] in ("bf16", "fp32")
    assert metrics["device"] == "cpu"
    # Same params and seed: the same files.
    generate(root / "model", feats, tmp_path / "b", params, progress=False)
    for name in ("nbest.jsonl", "results.json", "results_shuffled.json", "generation_config.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    # In batches of one: the same captions, the same scores to rounding.
    generate(root / "model", feats, tmp_path / "c", params.model_copy(update={"batch_size": 1}), progress=False)
    for name in ("results.json", "results_shuffled.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "c" / name).read_bytes(), name
    one = _nbest(tmp_path / "c/nbest.jsonl")
    assert [[c["caption"] for c in r["captions"]] for r in one] == [[c["caption"] for c in r["captions"]] for r in rows]
    assert [c["score"] for r in one for c in r["captions"]] == pytest.approx(
        [c["score"] for r in rows for c in r["captions"]], abs=1e-3)


def test_sampling_follows_the_seed(trained, tmp_path):
    root, feats, table = trained
    params = GEN.model_copy(update={"num_beams": 1, "do_sample": True, "num_return_sequences": 4,
                                    "temperature": 2.0, "seed": 1})
    generate(root / "model", feats, tmp_path / "a", params, progress=False)
    generate(root / "model", feats, tmp_path / "b", params.model_copy(update={"seed": 2}), progress=False)
    a, b = _nbest(tmp_path / "a/nbest.jsonl"), _nbest(tmp_path / "b/nbest.jsonl")
    texts = lambda rows: [[c["caption"] for c in r["captions"]] for r in rows]  # noqa: E731
    assert texts(a) != texts(b)
    assert sum(len(set(t)) > 1 for t in texts(a)) > len(a) // 2  # several different captions per image


def test_generation_config_beside_the_results_is_the_one_used(trained, tmp_path):
    from transformers import GenerationConfig

    from pipeline.models.decoding_config import decoding_from_config
    from pipeline.core.params import Decoding

    root, feats, table = trained
    params = GEN.model_copy(update={"num_beams": 4, "length_penalty": 0.6, "no_repeat_ngram_size": 2,
                                    "repetition_penalty": 1.2, "min_new_tokens": 2, "num_return_sequences": 2})
    generate(root / "model", feats, tmp_path / "c", params, progress=False)
    config = GenerationConfig.from_pretrained(tmp_path / "c")
    assert decoding_from_config(config) == Decoding(**{k: getattr(params, k) for k in Decoding.model_fields})
    assert config.early_stopping is True and config.eos_token_id is not None
    # A greedy run removes the n-best list of the previous run in the same folder.
    generate(root / "model", feats, tmp_path / "c", GEN.model_copy(update={"num_beams": 1}), progress=False)
    assert not (tmp_path / "c/nbest.jsonl").exists()
    # The trained model folder carries the code's decoding defaults (the length cut to the 64 positions
    # GPT-2 has after the prefix of 2), in transformers' format.
    assert decoding_from_config(GenerationConfig.from_pretrained(root / "model")) == Decoding(
        max_new_tokens=min(Decoding().max_new_tokens, 64 - 2))
