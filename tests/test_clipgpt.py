"""The seed's mapper (``mapper.type: clipgpt``) and training chosen parts of GPT-2
(``train.finetune_gpt_layers``): sizes, the forward pass, which weights train."""
from __future__ import annotations

import csv

import pytest
import torch

from pipeline.core.params import MapperParams, ParamsError, TrainParams, parse_params
from pipeline.models.captioner import ClipCaptioner
from pipeline.core.params import Decoding
from pipeline.text.decoding import decode_batch
from pipeline.models.mapper import (ClipGptConfig, ClipGptMapper, MapperConfigError, count_parameters,
                                    from_config_dict, make_config)
from pipeline.models.trainable import finetune_gpt_parts
from pipeline.train.run import train
from tests.helpers.models import load_tiny_gpt

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def closed_form(width: int, k: int, layers: int, fe: int) -> int:
    """Per post-norm block: q/k/v and out projections 4W^2+4W, feed-forward 2*fe*W^2 + fe*W + W,
    two LayerNorms 4W; then Linear(W -> K*W)."""
    block = (4 + 2 * fe) * width * width + (9 + fe) * width
    return layers * block + width * k * width + k * width


@pytest.mark.parametrize("width,k,layers,fe", [(16, 4, 2, 4), (32, 3, 1, 2)])
def test_clipgpt_size_is_the_closed_form(width, k, layers, fe):
    m = ClipGptMapper(ClipGptConfig(width, width, k, layers, heads=4, forward_expansion=fe))
    assert count_parameters(m) == closed_form(width, k, layers, fe)


def test_each_vector_is_a_one_token_sequence_through_a_post_norm_encoder():
    torch.manual_seed(0)
    width, k = 16, 3
    m = ClipGptMapper(ClipGptConfig(width, width, k, layers=1, heads=4, dropout=0.0)).eval()
    x = torch.randn(5, width)
    # By hand: attention over one token is out_proj(v); post-norm: norm(x + sublayer(x)).
    layer = m.encoder.layers[0]
    v = x @ layer.self_attn.in_proj_weight[2 * width:].T + layer.self_attn.in_proj_bias[2 * width:]
    h = layer.norm1(x + layer.self_attn.out_proj(v))
    h = layer.norm2(h + layer.linear2(torch.relu(layer.linear1(h))))
    want = m.project(h).view(5, k, width)
    assert torch.allclose(m(x), want, atol=1e-5)
    # Batched images never see each other.
    assert torch.allclose(m(x[:2]), want[:2], atol=1e-5)


def test_clipgpt_settings_are_checked_and_saved():
    config = make_config(MapperParams(type="clipgpt", prefix_length=2, layers=1, heads=2, forward_expansion=3)
                         .model_dump(), 8, 8)
    assert config == ClipGptConfig(8, 8, 2, 1, 2, 3, 0.0)
    mapper = ClipGptMapper(config)
    rebuilt = from_config_dict({"type": "clipgpt", **config.__dict__})
    assert rebuilt.config == config
    with pytest.raises(MapperConfigError, match="clipgpt needs CLIP vectors as wide as GPT-2"):
        make_config({"type": "clipgpt"}, 16, 32)
    with pytest.raises(ParamsError, match="mapper.heads"):
        parse_params({"mapper": {"type": "clipgpt", "heads": 5}})  # demo GPT-2 is 128 wide
    del mapper


def test_finetune_gpt_layers_needs_finetune_gpt_and_known_parts(tiny_gpt_dir):
    with pytest.raises(ParamsError, match="train.finetune_gpt_layers: .*needs train.finetune_gpt: true"):
        parse_params({"train": {"finetune_gpt": False, "finetune_gpt_layers": [0]}})
    with pytest.raises(ParamsError, match="train.finetune_gpt_layers"):
        parse_params({"train": {"finetune_gpt_layers": ["lm_head"]}})
    gpt, _ = load_tiny_gpt(tiny_gpt_dir)  # 2 blocks
    with pytest.raises(ParamsError, match=r"train.finetune_gpt_layers: block -3 does not exist; GPT-2 has 2"):
        finetune_gpt_parts(gpt, [0, -3])


def test_only_the_chosen_parts_require_grad(tiny_gpt_dir):
    gpt, _ = load_tiny_gpt(tiny_gpt_dir)
    finetune_gpt_parts(gpt, ["wte", "wpe", 0, -1, "ln_f"])  # the seed's choice on a 2-block GPT-2: all of it
    assert all(p.requires_grad for p in gpt.parameters())
    finetune_gpt_parts(gpt, [-1, "ln_f"])
    trained = {n for n, p in gpt.named_parameters() if p.requires_grad}
    assert trained == {n for n, _ in gpt.named_parameters() if n.startswith(("transformer.h.1.", "transformer.ln_f."))}


def test_clipgpt_trains_through_the_train_entry_point(tmp_path, tiny_gpt_dir, scene_features):
    feats = scene_features(n_per_class=4, dim=32)  # as wide as the tiny GPT-2, like pooler_output
    mapper = MapperParams(type="clipgpt", prefix_length=2, layers=1, heads=2, forward_expansion=2, dropout=0.1)
    params = TrainParams(epochs=4, batch_size=8, lr=1e-2, warmup_steps=2, precision="fp32", log_every=2,
                         finetune_gpt=True, finetune_gpt_layers=[0, "ln_f"])
    metrics = train(feats, tiny_gpt_dir, tmp_path / "model", tmp_path / "loss.csv", tmp_path / "metrics.json",
                    mapper, params, progress=False)
    with open(tmp_path / "loss.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert float(rows[-1]["train_loss"]) < 0.9 * float(rows[0]["train_loss"])
    model = ClipCaptioner.load(tmp_path / "model")
    assert model.mapper.kind == "clipgpt" and model.mapper.config.prefix_length == 2
    base, _ = load_tiny_gpt(tiny_gpt_dir)
    now, before = model.gpt.state_dict(), base.state_dict()
    changed = {n for n in before if not torch.equal(now[n], before[n])}
    assert changed and all(n.startswith(("transformer.h.0.", "transformer.ln_f.")) for n in changed), changed
    gpt_trained = sum(p.numel() for n, p in base.named_parameters()
                      if n.startswith(("transformer.h.0.", "transformer.ln_f.")))
    assert metrics["params_trainable"] == count_parameters(model.mapper) + gpt_trained


def test_the_seed_recipe_trains_on_demo_features_at_tiny_width(tmp_path, tiny_gpt_dir, scene_features):
    """configs/clip-gpt-captioning-flickr30k.yaml's mapper and GPT-2 parts, as merged into
    params.yaml, through the train entry point; only size and speed settings are changed."""
    from pathlib import Path

    from pipeline.core.recipes import merged_params

    root = Path(__file__).resolve().parents[1]
    _, params, _ = merged_params(root / "params.yaml", [root / "configs/clip-gpt-captioning-flickr30k.yaml"])
    fast = params.train.model_copy(update={"epochs": 3, "batch_size": 8, "lr": 1e-2, "warmup_steps": 2,
                                           "precision": "fp32", "log_every": 2})
    feats = scene_features(n_per_class=4, dim=32)
    train(feats, tiny_gpt_dir, tmp_path / "model", tmp_path / "loss.csv", tmp_path / "metrics.json",
          params.mapper, fast, progress=False)
    with open(tmp_path / "loss.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert float(rows[-1]["train_loss"]) < 0.9 * float(rows[0]["train_loss"])
    model = ClipCaptioner.load(tmp_path / "model")
    c = model.mapper.config
    assert (model.mapper.kind, c.prefix_length, c.layers, c.heads, c.forward_expansion, c.dropout) == \
        ("clipgpt", 4, 6, 16, 4, 0.1)
    assert model.features["dim"] == 32 and len(decode_batch(model, torch.randn(2, 32), Decoding(max_new_tokens=3), ["a", "b"])) == 2


def test_the_seed_recipe_runs_at_real_size(tmp_path, scene_features):
    """The small release's shapes: 768-wide pooler_output vectors (ViT-B/32's), the seed's
    mapper (ep_len 4, 6 layers, 16 heads) and GPT-2 small (random weights, its 50,257-row
    embedding) with its embeddings, first and last blocks and ln_f trained; then captions."""
    from pathlib import Path

    from pipeline.core.recipes import merged_params
    from pipeline.pin.realsize import build_realsize_gpt
    from tests.helpers.features import scene_table

    root = Path(__file__).resolve().parents[1]
    _, params, _ = merged_params(root / "params.yaml", [root / "configs/clip-gpt-captioning-flickr30k.yaml"])
    table = scene_table(n_per_class=1, dim=768)
    gpt_dir = tmp_path / "gpt"
    build_realsize_gpt(gpt_dir, [c for caps in table.captions for c in caps])
    feats = scene_features(n_per_class=1, dim=768, shards=1)
    fast = params.train.model_copy(update={"epochs": 1, "batch_size": 8, "warmup_steps": 1, "precision": "fp32",
                                           "log_every": 1})
    metrics = train(feats, gpt_dir, tmp_path / "model", tmp_path / "loss.csv", tmp_path / "metrics.json",
                    params.mapper, fast, progress=False)
    model = ClipCaptioner.load(tmp_path / "model")
    assert model.gpt.config.n_embd == 768 and model.gpt.config.n_layer == 12 and model.gpt.config.vocab_size == 50257
    assert count_parameters(model.mapper) == closed_form(768, 4, 6, 4)
    parts = ("transformer.wte.", "transformer.wpe.", "transformer.h.0.", "transformer.h.11.", "transformer.ln_f.")
    tuned = sum(p.numel() for n, p in model.gpt.named_parameters() if n.startswith(parts))
    assert metrics["params_trainable"] == closed_form(768, 4, 6, 4) + tuned
    captions = decode_batch(model, torch.randn(2, 768), Decoding(num_beams=2, max_new_tokens=4), ["a", "b"])
    assert len(captions) == 2
