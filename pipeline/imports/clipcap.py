"""ClipCap's released checkpoints (state dicts of its ClipCaptionModel) -> capline mappers.

Key layout of the released files (rmokady/CLIP_prefix_caption):

* ``clip_project.model.{0,2}.*``: the MLP, Linear -> Tanh -> Linear (ours: ``net.{0,3}``,
  a Dropout sits at ``net.2``).
* ``clip_project.linear.*``, ``clip_project.prefix_const`` and
  ``clip_project.transformer.layers.N.{norm1, attn.to_queries, attn.to_keys_values,
  attn.project, norm2, mlp.fc1, mlp.fc2}.*``: the transformer, pre-LayerNorm blocks
  with 8 heads, ReLU MLP of ratio 2, no final norm. Its queries have no bias and
  ``to_keys_values`` is ONE Linear whose output rows are [keys; values] (reshaped to
  (2, heads, head_dim)); ours is torch's ``in_proj_weight`` [q; k; v] with a bias,
  which is set to zero.
* ``gpt.*``: GPT2LMHeadModel's own keys.
"""
from __future__ import annotations

import re

import torch

from pipeline.imports.keymap import Keys
from pipeline.imports.weights import ImportFailed
from pipeline.models.mapper import MLPConfig, MLPMapper, TransformerConfig, TransformerMapper

PREFIX = "clip_project."
HEADS = 8  # fixed in ClipCap's TransformerMapper
MLP_RATIO = 2.0


def _layer_count(keys: Keys) -> int:
    found = {int(m.group(1)) for k in keys.left
             if (m := re.match(rf"^{re.escape(PREFIX)}transformer\.layers\.(\d+)\.", k))}
    return max(found) + 1 if found else 0


def _check(source: str, what: str, got: int, asked: int | None) -> int:
    if asked is not None and asked != got:
        raise ImportFailed(f"{source}: --{what} {asked}, but the checkpoint's shapes say {got}")
    return got


def mlp_mapper(keys: Keys, width: int, prefix_length: int) -> MLPMapper:
    w0 = keys.take(PREFIX + "model.0.weight")
    b0 = keys.take(PREFIX + "model.0.bias")
    w2 = keys.take(PREFIX + "model.2.weight")
    b2 = keys.take(PREFIX + "model.2.bias")
    if keys.missing:
        keys.done()
    k = _check(keys.source, "prefix-length", w2.shape[0] // width, prefix_length)
    mapper = MLPMapper(MLPConfig(clip_dim=int(w0.shape[1]), width=width, prefix_length=k))
    mapper.load_state_dict({"net.0.weight": w0, "net.0.bias": b0, "net.3.weight": w2, "net.3.bias": b2})
    return mapper


def transformer_mapper(keys: Keys, width: int, prefix_length: int, clip_length: int | None) -> TransformerMapper:
    layers = _layer_count(keys)
    linear_w = keys.take(PREFIX + "linear.weight")
    linear_b = keys.take(PREFIX + "linear.bias")
    const = keys.take(PREFIX + "prefix_const")
    if keys.missing or layers == 0:
        keys.missing.extend([] if layers else [PREFIX + "transformer.layers.0.*"])
        keys.done()
    k = _check(keys.source, "prefix-length", int(const.shape[0]), prefix_length)
    cl = _check(keys.source, "clip-length", int(linear_w.shape[0]) // width, clip_length)
    config = TransformerConfig(clip_dim=int(linear_w.shape[1]), width=width, prefix_length=k, clip_length=cl,
                               layers=layers, heads=HEADS, mlp_ratio=MLP_RATIO, dropout=0.0)
    mapper = TransformerMapper(config)
    state = {"project.weight": linear_w, "project.bias": linear_b, "prefix_const": const}
    for i in range(layers):
        src, dst = f"{PREFIX}transformer.layers.{i}.", f"blocks.layers.{i}."
        queries = keys.take(src + "attn.to_queries.weight")
        keys_values = keys.take(src + "attn.to_keys_values.weight")  # rows: [keys; values]
        state[dst + "self_attn.in_proj_weight"] = torch.cat([queries, keys_values], dim=0)
        state[dst + "self_attn.in_proj_bias"] = torch.zeros(3 * width)  # ClipCap's q/k/v have no bias
        for ours, theirs in (("self_attn.out_proj", "attn.project"), ("norm1", "norm1"), ("norm2", "norm2"),
                             ("linear1", "mlp.fc1"), ("linear2", "mlp.fc2")):
            for p in ("weight", "bias"):
                state[f"{dst}{ours}.{p}"] = keys.take(f"{src}{theirs}.{p}")
    if keys.missing:
        keys.done()
    mapper.load_state_dict(state)
    return mapper
