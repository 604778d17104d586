"""The real-size profile, reduced: `dvc repro` with configs/realsize.yaml (fewer images
and steps, the same models) through bench/realsize.py, in a temporary git repository.

The whole CLIP ViT-B/32 (both towers, CLIP's BPE tokenizer) and GPT-2 small with random
weights, GPT-2's 50,257-row embedding and LM head, the byte-level BPE tokenizer trained
on the captions and loaded as gpt2's, 640x480 JPEGs: the shapes and code paths of a hub
run (CLIPScore included), with no download.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    repo = tmp_path_factory.mktemp("realsize") / "repo"
    env = dict(os.environ, OMP_NUM_THREADS="1")  # a shared CI machine: one thread per process waits least
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "realsize.py"), "--images", "40", "--epochs", "1",
                           "--max-new-tokens", "5", "--keep", str(repo)],
                          env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    return repo, json.loads(proc.stdout.strip().splitlines()[-1])


def test_every_stage_ran_and_was_measured(run):
    _, result = run
    assert result["bench"] == "realsize"
    assert set(result["stages"]) == {"prepare", "model_clip", "model_gpt", "download", "embed_plan", "embed",
                                     "datastore", "retrieve", "train", "scst", "generate", "generate_xe", "transfer",
                                     "evaluate"}
    for key in ("embed_images_per_s", "train_samples_per_s", "scst_sampled_captions_per_s", "generate_captions_per_s",
                "peak_rss_mib"):
        assert result[key] > 0, key
    assert result["images"] == 40 and result["device"] == "cpu" and result["train_steps"] > 0
    assert result["scst_steps"] > 0 and isinstance(result["clip_s"], float)  # CLIPScore ran at real size


def test_models_are_the_real_architectures(run):
    repo, _ = run
    clip = json.loads((repo / "data/models/clip/config.json").read_text())
    assert clip["model_type"] == "clip" and clip["projection_dim"] == 512  # the whole CLIP, as the hub's
    vision, text = clip["vision_config"], clip["text_config"]
    assert (vision["hidden_size"], vision["num_hidden_layers"], vision["patch_size"], vision["image_size"],
            vision["projection_dim"]) == (768, 12, 32, 224, 512)
    assert (text["hidden_size"], text["num_hidden_layers"], text["num_attention_heads"], text["vocab_size"],
            text["max_position_embeddings"], text["projection_dim"]) == (512, 12, 8, 49408, 77, 512)
    gpt = json.loads((repo / "data/models/gpt/config.json").read_text())
    assert (gpt["n_embd"], gpt["n_layer"], gpt["n_head"], gpt["vocab_size"], gpt["n_positions"]) == \
        (768, 12, 12, 50257, 1024)
    pins = [json.loads((repo / f"data/models/{k}/pin.json").read_text()) for k in ("clip", "gpt")]
    assert [p["model_id"] for p in pins] == ["realsize", "realsize"]


def test_the_tokenizer_is_byte_level_bpe_loaded_as_gpt2s(run):
    from transformers import AutoTokenizer

    from pipeline.models.pretrained import load_gpt

    repo, _ = run
    folder = repo / "data/model/gpt"  # the trained captioner's copy, as generate loads it
    tok = AutoTokenizer.from_pretrained(folder)
    assert type(tok).__name__ in ("GPT2TokenizerFast", "GPT2Tokenizer")
    assert json.loads((folder / "tokenizer_config.json").read_text())["tokenizer_class"].startswith("GPT2Tokenizer")
    backend = json.loads(tok.backend_tokenizer.to_str())
    assert backend["model"]["type"] == "BPE" and backend["pre_tokenizer"]["type"] == "ByteLevel"
    assert 256 < len(tok) < 50257 and tok.eos_token == "<|endoftext|>"
    text = "A zebra, über-fast! 🦓"  # words and bytes the captions never had still encode
    assert tok.decode(tok(text)["input_ids"]) == text
    model, tok = load_gpt(folder)
    assert model.get_input_embeddings().weight.shape == (50257, 768) and tok.pad_token == tok.eos_token


def test_the_data_flowed_at_real_size(run):
    from pipeline.formats.features import load_features

    repo, _ = run
    with tarfile.open(next((repo / "data/images").glob("*.tar"))) as tar:
        meta = json.loads(tar.extractfile(next(m for m in tar.getmembers() if m.name.endswith(".json"))).read())
    assert (meta["width"], meta["height"]) == (640, 480)
    table = load_features(repo / "data/features")
    assert table.embeddings.shape == (40, 512) and np.isfinite(table.embeddings).all()
    assert table.attrs["normalized"] in (False, 0)  # ClipCap's raw image_embeds
    config = json.loads((repo / "data/model/captioner.json").read_text())
    assert config["mapper"]["type"] == "transformer" and config["mapper"]["layers"] == 8
    assert config["clip_dim"] == 512 and config["mapper"]["width"] == 768 and config["finetune_gpt"] is False
    results = json.loads((repo / "data/captions/results.json").read_text())
    generate = json.loads((repo / "data/metrics/generate.json").read_text())
    assert len(results) == generate["captions"] > 0
    scores = json.loads((repo / "data/metrics/eval.json").read_text())
    assert isinstance(scores["cider"], float)
    # CLIPScore at real size: the pinned whole CLIP scored the captions of both models.
    assert "clipscore_skipped" not in scores
    assert all(isinstance(scores[k], float) for k in ("clip_s", "refclip_s", "xe_clip_s", "control_clip_s"))
    # Nothing left to do: the DAG is complete and cached.
    status = subprocess.run(["dvc", "status"], cwd=repo, capture_output=True, text=True,
                            env=dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
                                     PYTHONPATH=str(repo)))
    assert "up to date" in status.stdout, status.stdout + status.stderr


def test_the_trained_model_captions_a_file_and_keeps_the_whole_clip(run, tmp_path):
    from pipeline.models.pretrained import clip_text_missing

    repo, _ = run
    assert clip_text_missing(repo / "data/model/clip") is None  # train's copy of the CLIP is whole too
    with tarfile.open(next((repo / "data/images").glob("*.tar"))) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(".jpg"))
        (tmp_path / "photo.jpg").write_bytes(tar.extractfile(member).read())
    proc = subprocess.run([sys.executable, "-m", "stages.cli", "caption", "--model", "data/model", "--device", "cpu",
                           "--max-new-tokens", "5", "--format", "jsonl", "--no-progress", str(tmp_path / "photo.jpg")],
                          cwd=repo, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(repo)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(rows) == 1 and "error" not in rows[0] and rows[0]["captions"], rows
