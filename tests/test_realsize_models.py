"""The realsize builders: GPT-2 small keeps its 50,257-row embedding and LM head under
a byte-level BPE tokenizer trained on the captions and loaded as gpt2's files are;
CLIP is whole (ViT-B/32 with the hub processor's settings, the default text tower) with
a CLIP BPE tokenizer trained on the captions, loaded as openai/clip-vit-base-patch32's."""
from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline.pin.realsize import (CLIP_VOCAB, GPT2_VOCAB, build_realsize_clip, build_realsize_gpt, clip_config,
                                      train_bpe)
from tests.helpers.models import folder_digest, torch_threads

CAPTIONS = ["a large red circle on the left", "two shapes: a blue square and a green triangle",
            "there is a tiny yellow disc at the center"] * 20
# Small towers for the fast tests: the code paths of the real sizes (clip_config checks those).
SMALL_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, patch_size=16,
                    image_size=32, projection_dim=16)
SMALL_TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)


@pytest.fixture(scope="module")
def small_clip(tmp_path_factory):
    folder = tmp_path_factory.mktemp("realsize-clip") / "clip"
    with torch_threads(1):
        build_realsize_clip(folder, CAPTIONS, text=SMALL_TEXT, **SMALL_VISION)
    return folder


def test_bpe_is_byte_level_and_as_large_as_the_corpus_gives(tmp_path):
    from transformers import GPT2TokenizerFast

    folder = train_bpe(CAPTIONS, tmp_path / "bpe")
    vocab = json.loads((folder / "vocab.json").read_text())
    merges = (folder / "merges.txt").read_text().splitlines()
    assert vocab["<|endoftext|>"] == 0 and len(vocab) > 256
    # Every word of the corpus ends up one token: no merge was left undone.
    tok = GPT2TokenizerFast.from_pretrained(folder)
    pre = tok.backend_tokenizer.pre_tokenizer
    assert all(len(tok.tokenize(c)) == len(pre.pre_tokenize_str(c)) for c in CAPTIONS)
    assert len(merges) > 0 and len(tok) == len(vocab) < GPT2_VOCAB


def test_gpt_keeps_the_real_vocabulary_rows(tmp_path):
    from pipeline.models.pretrained import load_gpt

    with torch_threads(1):
        build_realsize_gpt(tmp_path / "gpt", CAPTIONS)
        model, tok = load_gpt(tmp_path / "gpt")
    cfg = model.config
    assert (cfg.vocab_size, cfg.n_embd, cfg.n_layer, cfg.n_head, cfg.n_positions) == (50257, 768, 12, 12, 1024)
    assert model.get_output_embeddings().weight.shape == (50257, 768)
    assert cfg.eos_token_id == tok.eos_token_id == 0 and tok.pad_token_id == 0
    ids = tok("a red zebra!")["input_ids"]
    assert max(ids) < len(tok) and tok.decode(ids) == "a red zebra!"
    # Ids the tokenizer lacks (GPT-2 may emit any of its 50,257) decode to nothing, not an error.
    assert tok.decode([50_000, 49_999]) == ""


def test_clip_tokenizer_is_clips_and_round_trips_the_captions(small_clip):
    from transformers import AutoTokenizer

    from pipeline.pin.demo import PROMPT

    tok = AutoTokenizer.from_pretrained(small_clip)
    assert type(tok).__name__ in ("CLIPTokenizerFast", "CLIPTokenizer")
    assert json.loads((small_clip / "tokenizer_config.json").read_text())["tokenizer_class"].startswith("CLIPTokenizer")
    # CLIP's layout: 256 byte symbols, the same ending a word, the merges, then BOS and EOS (EOS pads).
    vocab = tok.get_vocab()
    assert vocab["!"] == 0 and vocab["!</w>"] == 256 and 512 < len(tok) <= CLIP_VOCAB
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|startoftext|>", "<|endoftext|>", "<|endoftext|>")
    assert (tok.bos_token_id, tok.eos_token_id) == (len(tok) - 2, len(tok) - 1) and tok.model_max_length == 77
    backend = tok.backend_tokenizer
    for text in [*CAPTIONS[:3], PROMPT]:
        words = [w for w, _ in backend.pre_tokenizer.pre_tokenize_str(backend.normalizer.normalize_str(text))]
        ids = tok(text)["input_ids"]
        assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
        assert len(ids) == len(words) + 2  # every word of the corpus is one token: no merge left undone
        assert tok.decode(ids, skip_special_tokens=True) == " ".join(words)  # lower case, CLIP's spacing
    ids = tok("A Zebra, über-fast! 🦓")["input_ids"]  # words and bytes the captions never had still encode
    assert tok.eos_token_id not in ids[:-1] and tok.decode(ids, skip_special_tokens=True) == "a zebra , über - fast ! 🦓"


def test_clip_is_whole_and_loads_as_the_hubs(small_clip):
    from pipeline.models.pretrained import clip_text_missing, load_clip, load_clip_text

    assert clip_text_missing(small_clip) is None
    with torch_threads(1):
        vision, _ = load_clip(small_clip)
        text, tok = load_clip_text(small_clip)
    config = json.loads((small_clip / "config.json").read_text())
    assert config["model_type"] == "clip" and config["architectures"] == ["CLIPModel"]
    assert vision.config.projection_dim == text.config.projection_dim == config["projection_dim"] == 16
    assert (text.config.bos_token_id, text.config.eos_token_id, text.config.pad_token_id) == \
        (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
    # The real 49,408-row embedding, whatever the width.
    assert text.get_input_embeddings().weight.shape == (CLIP_VOCAB, 32)


def test_clip_config_is_openai_clip_vit_base_patch32(small_clip):
    from transformers import AutoTokenizer

    config = clip_config(AutoTokenizer.from_pretrained(small_clip))  # the default sizes, nothing built
    t, v = config.text_config, config.vision_config
    assert (t.hidden_size, t.intermediate_size, t.num_hidden_layers, t.num_attention_heads, t.vocab_size,
            t.max_position_embeddings, t.projection_dim, t.hidden_act) == \
        (512, 2048, 12, 8, 49408, 77, 512, "quick_gelu")
    assert (v.hidden_size, v.num_hidden_layers, v.patch_size, v.image_size, v.projection_dim) == (768, 12, 32, 224, 512)
    assert config.projection_dim == 512 and abs(config.logit_scale_init_value - 2.6592) < 1e-9
    assert t.eos_token_id not in (None, 2)  # 2 would select transformers' legacy pooling (argmax id)


def test_clip_is_seeded(small_clip, tmp_path):
    from pipeline.models.pretrained import weights_sha256

    with torch_threads(1):
        # Another order of the same captions (the BPE trainer breaks ties between pairs by id).
        build_realsize_clip(tmp_path / "again", CAPTIONS[::-1], text=SMALL_TEXT, **SMALL_VISION)
        build_realsize_clip(tmp_path / "seed1", CAPTIONS, seed=1, text=SMALL_TEXT, **SMALL_VISION)
    assert folder_digest(tmp_path / "again") == folder_digest(small_clip)
    assert weights_sha256(tmp_path / "seed1") != weights_sha256(small_clip)


def test_clipscore_runs_on_the_realsize_clip(small_clip, tmp_path):
    import torch
    from transformers import AutoTokenizer, CLIPModel

    from pipeline.evaluate.clipscore import PROMPT, ClipScorer, score_sets
    from tests.helpers.evaluate import REFERENCES, RESULTS, write_image_shard

    write_image_shard(tmp_path / "images" / "00000.tar", list(REFERENCES))
    with torch_threads(1):
        scorer = ClipScorer.load(small_clip, torch.device("cpu"))
        images = scorer.images(tmp_path / "images", list(REFERENCES))
        scores = score_sets(scorer, images, REFERENCES, {"model": RESULTS})["model"]
        # The text embedding is CLIP's own: pooled at the first EOS, projected.
        caption = RESULTS["img-a"]
        model, tok = CLIPModel.from_pretrained(small_clip).eval(), AutoTokenizer.from_pretrained(small_clip)
        with torch.no_grad():
            out = model.get_text_features(**tok([PROMPT + caption], return_tensors="pt"))
        direct = torch.nn.functional.normalize(out if torch.is_tensor(out) else out.pooler_output, dim=-1)[0]
        ours = scorer.texts([caption])[0]
    assert set(images) == set(REFERENCES) and set(scores.per_image) == set(RESULTS)
    assert np.allclose(ours, direct.numpy(), atol=1e-5)
    assert 0.0 <= scores.clip_s <= 2.5 and 0.0 <= scores.refclip_s <= 2.5
    assert all(np.isfinite([r["clip_s"], r["refclip_s"]]).all() for r in scores.per_image.values())


def test_pinning_the_realsize_clip_needs_the_captions(tmp_path):
    from pipeline.pin.run import pin_model
    from pipeline.models.pretrained import ModelError
    from tests.helpers.models import tiny_params

    with pytest.raises(ModelError, match="clip.model 'realsize': needs the prepared demo dataset"):
        pin_model("clip", tiny_params(clip_model="realsize"), tmp_path / "clip", None)
    with pytest.raises(ModelError, match="clip.model 'realsize' takes its vocabulary"):
        pin_model("clip", tiny_params(clip_model="realsize"), tmp_path / "clip", tmp_path / "no-source")
