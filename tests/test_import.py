"""`capline import`: released checkpoints (ClipCap, clip-gpt-captioning) -> model folders.

Each equality test builds a state dict with the released files' key names and layout
(tiny widths), imports it through the CLI, and compares the imported captioner's
logits with the original architecture's forward pass computed here, by hand, from
the raw tensors."""
from __future__ import annotations

import json
import math
import re

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from pipeline.imports.run import import_clipcap
from pipeline.imports.weights import ImportFailed
from pipeline.models.captioner import ClipCaptioner
from pipeline.core.params import Decoding
from pipeline.text.decoding import decode_batch
from pipeline.models.pretrained import load_gpt
from stages.cli import capline
from tests.helpers.clipcap import (CL, CLIP, HEADS, K, LAYERS, W, clipcap_transformer_state, rand, released_gpt,
                                   save)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def clipcap_transformer_prefix(s: dict, x: torch.Tensor) -> torch.Tensor:
    """ClipCap's TransformerMapper: linear -> clip_length tokens, + prefix_const, pre-norm
    blocks whose attention takes keys and values from ONE Linear reshaped (2, heads, d)."""
    p, b, d = "clip_project.", x.shape[0], W // HEADS
    h = (x @ s[p + "linear.weight"].T + s[p + "linear.bias"]).view(b, CL, W)
    h = torch.cat([h, s[p + "prefix_const"].expand(b, K, W)], dim=1)
    n = h.shape[1]
    for i in range(LAYERS):
        q = f"{p}transformer.layers.{i}."
        y = F.layer_norm(h, (W,), s[q + "norm1.weight"], s[q + "norm1.bias"])
        queries = (y @ s[q + "attn.to_queries.weight"].T).view(b, n, HEADS, d)
        kv = (y @ s[q + "attn.to_keys_values.weight"].T).view(b, n, 2, HEADS, d)
        keys, values = kv[:, :, 0], kv[:, :, 1]
        att = (torch.einsum("bnhd,bmhd->bnmh", queries, keys) / math.sqrt(d)).softmax(dim=2)
        out = torch.einsum("bnmh,bmhd->bnhd", att, values).reshape(b, n, W)
        h = h + out @ s[q + "attn.project.weight"].T + s[q + "attn.project.bias"]
        y = F.layer_norm(h, (W,), s[q + "norm2.weight"], s[q + "norm2.bias"])
        y = torch.relu(y @ s[q + "mlp.fc1.weight"].T + s[q + "mlp.fc1.bias"])
        h = h + y @ s[q + "mlp.fc2.weight"].T + s[q + "mlp.fc2.bias"]
    return h[:, CL:]


def gpt_logits(gpt_dir, s: dict, prefix: str, prefix_embeds: torch.Tensor, ids: torch.Tensor,
               positions_by_hand: bool = False) -> torch.Tensor:
    """GPT2LMHeadModel (the original LM) with the checkpoint's weights, reading cat(prefix, wte(ids)),
    plus wpe(positions) added by hand before GPT-2 adds them itself where the original does so."""
    gpt, _ = load_gpt(gpt_dir)
    gpt.load_state_dict({k[len(prefix):]: v for k, v in s.items()
                         if k.startswith(prefix) and not re.search(r"\.attn\.(bias|masked_bias)$", k)})
    embeds = torch.cat([prefix_embeds, gpt.transformer.wte(ids)], dim=1)
    if positions_by_hand:
        embeds = embeds + gpt.transformer.wpe(torch.arange(embeds.shape[1]))
    return gpt(inputs_embeds=embeds).logits


def our_logits(model: ClipCaptioner, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """The imported captioner's logits predicting each caption token (its training forward)."""
    return model._real_token_logits(x, ids, torch.ones_like(ids))


def invoke(*args):
    return CliRunner().invoke(capline, ["import", *map(str, args)])


@torch.no_grad()
def test_clipcap_transformer_import_gives_clipcaps_logits(tmp_path, hub_gpt_dir, tiny_clip_dir):
    state = clipcap_transformer_state(hub_gpt_dir)
    result = invoke("clipcap", save(tmp_path, state), "--mapper", "transformer", "--prefix-length", K,
                    "--clip-length", CL, "--clip", tiny_clip_dir, "--gpt", hub_gpt_dir, "--out", tmp_path / "m")
    assert result.exit_code == 0, result.output
    model = ClipCaptioner.load(tmp_path / "m")
    torch.manual_seed(1)
    x, ids = torch.randn(3, CLIP), torch.randint(4, 20, (3, 5))
    want = gpt_logits(hub_gpt_dir, state, "gpt.", clipcap_transformer_prefix(state, x), ids)[:, K - 1:-1]
    assert torch.allclose(our_logits(model, x, ids), want.reshape(-1, want.shape[-1]), atol=1e-4)
    # The folder is self-sufficient and says what it reads; ClipCap's captions end at '.'.
    cfg = json.loads((tmp_path / "m/captioner.json").read_text())
    assert cfg["features"]["output"] == "image_embeds" and cfg["features"]["normalized"] is False
    assert cfg["features"]["model_id"] == "clip" and (tmp_path / "m/clip/config.json").is_file()
    assert cfg["finetune_gpt"] is True and cfg["mapper"]["layers"] == LAYERS
    assert model.tokenizer.convert_ids_to_tokens(model.eos_token_id) == "."
    assert len(decode_batch(model, x, Decoding(max_new_tokens=4), ["a", "b", "c"])) == 3


@torch.no_grad()
def test_clipcap_mlp_import_gives_clipcaps_logits(tmp_path, hub_gpt_dir):
    torch.manual_seed(2)
    hidden = W * K // 2
    state = {"clip_project.model.0.weight": rand(hidden, CLIP), "clip_project.model.0.bias": rand(hidden),
             "clip_project.model.2.weight": rand(W * K, hidden), "clip_project.model.2.bias": rand(W * K),
             **released_gpt(hub_gpt_dir, "gpt.", mask_buffers=False)}
    out = import_clipcap(save(tmp_path, state), "mlp", K, None, hub_gpt_dir, tmp_path / "m")
    model = ClipCaptioner.load(out)
    x, ids = torch.randn(2, CLIP), torch.randint(4, 20, (2, 4))
    s = state
    prefix = (torch.tanh(x @ s["clip_project.model.0.weight"].T + s["clip_project.model.0.bias"])
              @ s["clip_project.model.2.weight"].T + s["clip_project.model.2.bias"]).view(2, K, W)
    want = gpt_logits(hub_gpt_dir, state, "gpt.", prefix, ids)[:, K - 1:-1]
    assert torch.allclose(our_logits(model, x, ids), want.reshape(-1, want.shape[-1]), atol=1e-4)


SEED_LAYERS = 6  # the small release
SEED_K, SEED_HEADS = 4, 16


def seed_state(gpt_dir) -> dict:
    torch.manual_seed(3)
    state = {"ie.model.embeddings.patch_embedding.weight": rand(W, 3, 8, 8),  # CLIP's tower: left out
             "mp.mapper.weight": rand(SEED_K * W, W), "mp.mapper.bias": rand(SEED_K * W)}
    for i in range(SEED_LAYERS):
        q = f"mp.transformer_encoder.layers.{i}."
        state.update({
            q + "self_attn.in_proj_weight": rand(3 * W, W), q + "self_attn.in_proj_bias": rand(3 * W),
            q + "self_attn.out_proj.weight": rand(W, W), q + "self_attn.out_proj.bias": rand(W),
            q + "linear1.weight": rand(4 * W, W), q + "linear1.bias": rand(4 * W),
            q + "linear2.weight": rand(W, 4 * W), q + "linear2.bias": rand(W),
            q + "norm1.weight": 1 + rand(W), q + "norm1.bias": rand(W),
            q + "norm2.weight": 1 + rand(W), q + "norm2.bias": rand(W),
        })
    return {**state, **released_gpt(gpt_dir, "td.model.", mask_buffers=False)}


def seed_prefix(s: dict, x: torch.Tensor) -> torch.Tensor:
    """The seed's Mapping on one pooled vector: post-norm encoder layers over a 1-token
    sequence (attention over one token is out_proj(v)), then Linear -> ep_len vectors."""
    h = x
    for i in range(SEED_LAYERS):
        q = f"mp.transformer_encoder.layers.{i}."
        v = h @ s[q + "self_attn.in_proj_weight"][2 * W:].T + s[q + "self_attn.in_proj_bias"][2 * W:]
        h = F.layer_norm(h + v @ s[q + "self_attn.out_proj.weight"].T + s[q + "self_attn.out_proj.bias"], (W,),
                         s[q + "norm1.weight"], s[q + "norm1.bias"])
        y = torch.relu(h @ s[q + "linear1.weight"].T + s[q + "linear1.bias"])
        h = F.layer_norm(h + y @ s[q + "linear2.weight"].T + s[q + "linear2.bias"], (W,),
                         s[q + "norm2.weight"], s[q + "norm2.bias"])
    return (h @ s["mp.mapper.weight"].T + s["mp.mapper.bias"]).view(-1, SEED_K, W)


@torch.no_grad()
def test_clip_gpt_captioning_import_gives_the_seeds_prefix_and_gpt(tmp_path, tiny_gpt_dir, tiny_clip_dir):
    state = seed_state(tiny_gpt_dir)
    result = invoke("clip-gpt-captioning", save(tmp_path, state), "--size", "small", "--clip", tiny_clip_dir,
                    "--gpt", tiny_gpt_dir, "--out", tmp_path / "m")
    assert result.exit_code == 0, result.output
    model = ClipCaptioner.load(tmp_path / "m")
    assert model.mapper.kind == "clipgpt" and model.features["output"] == "pooler_output"
    x, ids = torch.randn(3, W), torch.randint(2, 12, (3, 4))
    assert torch.allclose(model.prefix(x), seed_prefix(state, x), atol=1e-4)
    # The seed's forward: wpe added by hand to cat(prefix, wte(ids)), then again inside GPT-2.
    want = gpt_logits(tiny_gpt_dir, state, "td.model.", seed_prefix(state, x), ids,
                      positions_by_hand=True)[:, SEED_K - 1:-1]
    assert torch.allclose(our_logits(model, x, ids), want.reshape(-1, want.shape[-1]), atol=1e-4)
    wrong = invoke("clip-gpt-captioning", save(tmp_path, state), "--size", "large", "--gpt", tiny_gpt_dir,
                   "--out", tmp_path / "m2")
    assert wrong.exit_code == 1 and "6 encoder layers, but the large release has 5" in wrong.output


class Payload:
    """Any class: unpickling it means running code the file names."""


def test_a_checkpoint_that_needs_pickle_code_is_refused(tmp_path, hub_gpt_dir):
    path = save(tmp_path, {"clip_project.prefix_const": torch.zeros(2), "extra": Payload()})
    result = invoke("clipcap", path, "--mapper", "mlp", "--prefix-length", K, "--gpt", hub_gpt_dir,
                    "--out", tmp_path / "m")
    assert result.exit_code == 1
    assert "refused: loading it needs pickle to run code" in result.output and "weights_only=True" in result.output
    assert not (tmp_path / "m").exists()


def test_every_key_is_mapped_or_the_import_names_it(tmp_path, hub_gpt_dir):
    state = clipcap_transformer_state(hub_gpt_dir)
    del state["clip_project.transformer.layers.1.mlp.fc2.bias"]
    state["clip_project.transformer.layers.0.attn.to_queries.bias"] = torch.zeros(W)
    with pytest.raises(ImportFailed) as err:
        import_clipcap(save(tmp_path, state), "transformer", K, None, hub_gpt_dir, tmp_path / "m")
    message = str(err.value)
    assert "missing keys: clip_project.transformer.layers.1.mlp.fc2.bias" in message
    assert "unexpected keys: clip_project.transformer.layers.0.attn.to_queries.bias" in message
    state = clipcap_transformer_state(hub_gpt_dir)
    del state["gpt.transformer.h.0.mlp.c_fc.weight"]
    with pytest.raises(ImportFailed, match=r"missing keys: gpt\.transformer\.h\.0\.mlp\.c_fc\.weight"):
        import_clipcap(save(tmp_path, state), "transformer", K, None, hub_gpt_dir, tmp_path / "m")
    assert not (tmp_path / "m").exists()


def test_an_rn50x4_mapper_needs_a_640_wide_clip(tmp_path, hub_gpt_dir, hub_clip_dir, caplog):
    state = clipcap_transformer_state(hub_gpt_dir, clip_dim=640)
    with pytest.raises(ImportFailed, match=r"--clip .*: its image_embeds is \d+ wide, the checkpoint's mapper reads 640"):
        import_clipcap(save(tmp_path, state), "transformer", K, CL, hub_gpt_dir, tmp_path / "m", hub_clip_dir)
    with caplog.at_level("WARNING"):
        import_clipcap(save(tmp_path, state), "transformer", K, CL, hub_gpt_dir, tmp_path / "m")
    assert "open_clip:RN50x4/openai" in caplog.text
    with pytest.raises(ImportFailed, match="--prefix-length 40, but the checkpoint's shapes say 3"):
        import_clipcap(save(tmp_path, state), "transformer", 40, CL, hub_gpt_dir, tmp_path / "m")


def test_an_imported_folder_runs_through_the_generate_stage(tmp_path, hub_gpt_dir):
    from pipeline.core.params import GenerateParams
    from pipeline.generate.run import run as generate
    from tests.helpers.features import scene_table, write_features

    state = clipcap_transformer_state(hub_gpt_dir)
    model_dir = import_clipcap(save(tmp_path, state), "transformer", K, CL, hub_gpt_dir, tmp_path / "m")
    table = scene_table(n_per_class=3, dim=CLIP)
    table.attrs["normalized"] = False  # ClipCap reads raw image_embeds; the folder records it
    feats = write_features(tmp_path / "features", table, shards=1)
    metrics = generate(model_dir, feats, tmp_path / "captions", GenerateParams(num_beams=2, max_new_tokens=5),
                       progress=False, device="cpu")
    results = json.loads((tmp_path / "captions/results.json").read_text())
    assert metrics["captions"] == len(results) == table.splits.count("test") > 0
    # Features of normalised vectors are another input: refused, naming the attribute.
    table.attrs["normalized"] = True
    other = write_features(tmp_path / "features_normalized", table, shards=1)
    with pytest.raises(Exception, match="normalized"):
        generate(model_dir, other, tmp_path / "captions2", GenerateParams(num_beams=2, max_new_tokens=5),
                 progress=False, device="cpu")
