"""The realsize builders: GPT-2 small keeps its 50,257-row embedding and LM head under
a byte-level BPE tokenizer trained on the captions and loaded as gpt2's files are;
ViT-B/32 has the hub processor's settings."""
from __future__ import annotations

import json

from pipeline.models.realsize import GPT2_VOCAB, build_realsize_gpt, train_bpe
from tests.helpers.models import torch_threads

CAPTIONS = ["a large red circle on the left", "two shapes: a blue square and a green triangle",
            "there is a tiny yellow disc at the center"] * 20


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
