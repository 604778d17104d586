"""The real-size profile, reduced: `dvc repro` with configs/realsize.yaml (fewer images
and steps, the same models) through bench/realsize.py, in a temporary git repository.

ViT-B/32 and GPT-2 small with random weights, GPT-2's 50,257-row embedding and LM
head, the byte-level BPE tokenizer trained on the captions and loaded as gpt2's,
640x480 JPEGs: the shapes and code paths of a hub run, with no download.
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
    assert set(result["stages"]) == {"prepare", "model_clip", "model_gpt", "download", "embed", "train",
                                     "scst", "generate", "generate_xe", "evaluate"}
    for key in ("embed_images_per_s", "train_samples_per_s", "scst_sampled_captions_per_s", "generate_captions_per_s",
                "peak_rss_mib"):
        assert result[key] > 0, key
    assert result["images"] == 40 and result["device"] == "cpu" and result["train_steps"] > 0
    assert result["scst_steps"] > 0


def test_models_are_the_real_architectures(run):
    repo, _ = run
    clip = json.loads((repo / "data/models/clip/config.json").read_text())
    assert (clip["hidden_size"], clip["num_hidden_layers"], clip["patch_size"], clip["image_size"],
            clip["projection_dim"]) == (768, 12, 32, 224, 512)
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
    from pipeline.features import load_features

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
    # Nothing left to do: the DAG is complete and cached.
    status = subprocess.run(["dvc", "status"], cwd=repo, capture_output=True, text=True,
                            env=dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
                                     PYTHONPATH=str(repo)))
    assert "up to date" in status.stdout, status.stdout + status.stderr
