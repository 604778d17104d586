"""Mapper networks and the ClipCaptioner: shapes, sizes, loss, freezing, save/load."""
from __future__ import annotations

import json

import pytest
import torch

from pipeline.formats.features import FeatureShardError
from pipeline.models.captioner import CONFIG_NAME, ClipCaptioner
from pipeline.models.pretrained import ModelError
from pipeline.models.mapper import (MapperConfigError, MLPConfig, MLPMapper, TransformerConfig, TransformerMapper,
                                    count_parameters, from_config_dict, make_config)
from pipeline.text.decoding import decode_batch
from pipeline.core.params import Decoding, MapperParams
from tests.helpers.features import FEATURE_ATTRS
from tests.helpers.models import load_tiny_gpt

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def linear(i: int, o: int) -> int:
    return i * o + o


def test_mlp_mapper_size_matches_the_paper_formula():
    clip, width, k = 512, 768, 10
    m = MLPMapper(MLPConfig(clip, width, k))
    hidden = width * k // 2
    expected = linear(clip, hidden) + linear(hidden, width * k)
    assert count_parameters(m) == expected
    # The paper's "about 32M" for K=10.
    assert 30e6 < expected < 33e6
    out = m(torch.randn(3, clip))
    assert out.shape == (3, k, width)


def test_transformer_mapper_size_and_shape():
    clip, width, k, cl, layers, ratio = 24, 16, 5, 3, 2, 2.0
    m = TransformerMapper(TransformerConfig(clip, width, k, cl, layers, heads=4, mlp_ratio=ratio))
    ff = int(width * ratio)
    block = 3 * width * width + 3 * width + linear(width, width) + linear(width, ff) + linear(ff, width) + 4 * width
    expected = linear(clip, cl * width) + k * width + layers * block
    assert count_parameters(m) == expected
    x = torch.randn(2, clip)
    out = m(x)
    assert out.shape == (2, k, width)
    # The prefix depends on the image vector.
    assert not torch.allclose(m(x), m(torch.randn(2, clip)))


def test_mapper_config_refuses_a_width_gpt_does_not_have():
    with pytest.raises(MapperConfigError, match="mapper.width"):
        make_config(MapperParams(type="mlp", width=64).model_dump(), clip_dim=8, width=32)
    config = make_config(MapperParams(type="mlp", prefix_length=2).model_dump(), 8, 32)
    assert config == MLPConfig(clip_dim=8, width=32, prefix_length=2, dropout=0.0)


def test_unknown_mapper_type_names_the_key_and_the_choices():
    with pytest.raises(MapperConfigError, match=r"mapper.type: 'lstm' is not one of clipgpt, cross_attention, mlp, transformer"):
        make_config({"type": "lstm", "prefix_length": 2}, 8, 32)


def test_a_saved_config_rebuilds_the_same_mapper_without_the_params_schema():
    config = make_config(MapperParams(type="transformer", prefix_length=3, clip_length=2, layers=2, heads=2)
                         .model_dump(), 8, 16)
    assert isinstance(config, TransformerConfig) and config.layers == 2 and config.clip_length == 2
    torch.manual_seed(0)
    mapper = TransformerMapper(config)
    saved = json.loads(json.dumps({"type": "transformer", **config.__dict__}))
    rebuilt = from_config_dict(saved)
    rebuilt.load_state_dict(mapper.state_dict())
    x = torch.randn(2, 8)
    assert torch.equal(mapper(x), rebuilt(x))


def make_model(gpt_dir, finetune=False, **mapper):
    gpt, tok = load_tiny_gpt(gpt_dir)
    params = MapperParams(**{"type": "transformer", "prefix_length": 3, "clip_length": 2, "layers": 1, "heads": 2, **mapper})
    torch.manual_seed(0)
    return ClipCaptioner.from_settings(params.model_dump(), 16, gpt, tok, features={**FEATURE_ATTRS, "dim": 16},
                                       finetune_gpt=finetune)


def test_mismatched_width_names_the_key(tiny_gpt_dir):
    with pytest.raises(MapperConfigError, match="mapper.width"):
        make_model(tiny_gpt_dir, width=48)
    with pytest.raises(MapperConfigError, match="mapper.heads"):
        make_model(tiny_gpt_dir, heads=5)


def test_captions_end_with_eos_and_are_cut_keeping_it(tiny_gpt_dir):
    model = make_model(tiny_gpt_dir)
    eos = model.tokenizer.eos_token_id
    ids = model.encode_caption("a red circle", max_tokens=40)
    assert len(ids) == 4 and ids[-1] == eos and eos not in ids[:-1]
    cut = model.encode_caption("one red circle here", max_tokens=3)
    assert len(cut) == 3 and cut[-1] == eos
    assert cut[:2] == model.encode_caption("one red", max_tokens=40)[:2]


def batch(model, captions):
    rows = [model.encode_caption(c, 40) for c in captions]
    t = max(map(len, rows))
    ids = torch.full((len(rows), t), 7, dtype=torch.long)
    mask = torch.zeros((len(rows), t), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    return ids, mask


def test_loss_ignores_padding(tiny_gpt_dir):
    model = make_model(tiny_gpt_dir).eval()
    x = torch.randn(2, 16)
    ids, mask = batch(model, ["a red circle", "one blue square here"])
    assert (mask == 0).any()
    loss = model(x, ids, mask)
    other = ids.masked_fill(mask == 0, 3)  # different ids in the pad positions
    assert torch.allclose(loss, model(x, other, mask))
    # The padded short caption scores exactly as it does alone, unpadded.
    ids1, mask1 = batch(model, ["a red circle"])
    s_pair = model(x, ids, mask, reduction="sum")
    s_alone = model(x[:1], ids1, mask1, reduction="sum") + model(x[1:], ids[1:], mask[1:], reduction="sum")
    assert torch.allclose(s_pair, s_alone, atol=1e-5)
    # Each caption token (EOS included) counts once: the mean is the sum over 4 + 5 tokens.
    assert torch.allclose(loss, s_pair / 9, atol=1e-6)
    # Changing a real token does change it.
    changed = ids.clone()
    changed[0, 1] = (changed[0, 1] + 1) % model.tokenizer.vocab_size
    assert not torch.allclose(loss, model(x, changed, mask))


def test_prefix_position_k_minus_1_predicts_the_first_caption_token(tiny_gpt_dir):
    """The loss equals next-token cross-entropy over GPT-2's full logits of cat(prefix, caption)."""
    import torch.nn.functional as F

    model = make_model(tiny_gpt_dir).eval()
    x = torch.randn(2, 16)
    captions = ["a red circle", "one blue square here"]
    ids, mask = batch(model, captions)
    k = model.prefix_length
    want = torch.zeros(())
    with torch.no_grad():
        for i, caption in enumerate(captions):
            row = torch.tensor([model.encode_caption(caption, 40)])
            embeds = torch.cat([model.prefix(x[i:i + 1]), model.gpt.get_input_embeddings()(row)], dim=1)
            logits = model.gpt(inputs_embeds=embeds).logits[0]
            # Position k-1 (the last prefix slot) predicts token 0; the last token predicts nothing.
            want = want + F.cross_entropy(logits[k - 1:k - 1 + row.shape[1]], row[0], reduction="sum")
        got = model(x, ids, mask, reduction="sum")
    assert torch.allclose(got, want, atol=1e-4), (got, want)


def test_frozen_gpt_gets_no_gradient_and_stays_in_eval_mode(tiny_gpt_dir):
    model = make_model(tiny_gpt_dir, finetune=False)
    model.train()
    assert model.mapper.training and not model.gpt.training
    assert not any(m.training for m in model.gpt.modules())
    ids, mask = batch(model, ["a red circle", "a green square"])
    model(torch.randn(2, 16), ids, mask).backward()
    assert all(p.grad is None and not p.requires_grad for p in model.gpt.parameters())
    assert all(p.grad is not None for p in model.mapper.parameters())
    assert count_parameters(model, trainable_only=True) == count_parameters(model.mapper)

    tuned = make_model(tiny_gpt_dir, finetune=True).train()
    assert tuned.gpt.training
    tuned(torch.randn(2, 16), ids, mask).backward()
    assert tuned.gpt.get_input_embeddings().weight.grad is not None


def test_save_load_round_trip_gives_identical_outputs(tiny_gpt_dir, tmp_path):
    model = make_model(tiny_gpt_dir, finetune=True).eval()
    with torch.no_grad():  # make GPT-2 differ from the saved base so its weights must be saved too
        model.gpt.get_input_embeddings().weight.add_(0.01)
    out = model.save(tmp_path / "model")
    assert sorted(p.name for p in out.iterdir()) == ["captioner.json", "generation_config.json", "gpt",
                                                    "mapper.safetensors"]
    assert not list(out.rglob("*.bin")) and not list(out.rglob("*.pt"))
    cfg = json.loads((out / CONFIG_NAME).read_text())
    assert cfg["features"]["model_id"] == FEATURE_ATTRS["model_id"] and cfg["clip_dim"] == 16
    assert cfg["mapper"]["width"] == 32

    loaded = ClipCaptioner.load(out)
    x = torch.randn(3, 16)
    ids, mask = batch(model, ["a red circle", "one blue square here", "a green triangle"])
    with torch.no_grad():
        assert torch.equal(model.prefix(x), loaded.prefix(x))
        assert torch.equal(model(x, ids, mask), loaded(x, ids, mask))
    d = Decoding(num_beams=2, max_new_tokens=5)
    assert decode_batch(model, x, d, ["a", "b", "c"]) == decode_batch(loaded, x, d, ["a", "b", "c"])
    # Saving again over a model folder replaces it; over another folder it refuses.
    model.save(out)
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(ModelError):
        model.save(other)
    assert (other / "keep.txt").read_text() == "mine"


def test_check_features_names_the_mismatch(tiny_gpt_dir):
    model = make_model(tiny_gpt_dir)
    model.check_features(dict(FEATURE_ATTRS), 16, "x.h5")
    with pytest.raises(FeatureShardError, match="output"):
        model.check_features({**FEATURE_ATTRS, "output": "pooler_output"}, 16, "x.h5")
    with pytest.raises(FeatureShardError, match="dim 8"):
        model.check_features(dict(FEATURE_ATTRS), 8, "x.h5")
