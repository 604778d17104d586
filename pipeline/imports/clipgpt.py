"""clip-gpt-captioning's released ``model.pt`` (the state dict of its ``Net``) -> the
``clipgpt`` mapper.

Keys: ``ie.model.*`` (CLIP's vision tower, frozen in training: the pinned CLIP that
embeds the images replaces it, so these are left out), ``mp.transformer_encoder.
layers.N.*`` (torch's TransformerEncoderLayer: the same names as ours under
``encoder.``), ``mp.mapper.*`` (Linear to ep_len x width: our ``project``) and
``td.model.*`` (GPT2LMHeadModel's keys).
"""
from __future__ import annotations

import re

from pipeline.imports.keymap import Keys
from pipeline.imports.weights import ImportFailed
from pipeline.models.mapper import ClipGptConfig, ClipGptMapper

# The two releases' settings (the project's ConfigS / ConfigL) and the models they were trained from.
SIZES = {
    "small": {"clip": "openai/clip-vit-base-patch32", "gpt": "gpt2", "width": 768,
              "config": {"prefix_length": 4, "layers": 6, "heads": 16, "forward_expansion": 4, "dropout": 0.1}},
    "large": {"clip": "openai/clip-vit-large-patch14", "gpt": "gpt2-medium", "width": 1024,
              "config": {"prefix_length": 4, "layers": 5, "heads": 16, "forward_expansion": 4, "dropout": 0.08}},
}
LAYER_KEYS = ("self_attn.in_proj_weight", "self_attn.in_proj_bias", "self_attn.out_proj.weight",
              "self_attn.out_proj.bias", "linear1.weight", "linear1.bias", "linear2.weight", "linear2.bias",
              "norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias")


def clipgpt_mapper(keys: Keys, size: str, width: int) -> ClipGptMapper:
    if size not in SIZES:
        raise ImportFailed(f"--size {size!r}: one of {', '.join(SIZES)}")
    settings = SIZES[size]["config"]
    keys.drop([k for k in keys.left if k.startswith("ie.")])
    found = {int(m.group(1)) for k in keys.left if (m := re.match(r"^mp\.transformer_encoder\.layers\.(\d+)\.", k))}
    layers = max(found) + 1 if found else 0
    if layers != settings["layers"]:
        raise ImportFailed(f"{keys.source}: {layers} encoder layers, but the {size} release has "
                           f"{settings['layers']}; is --size right?")
    state = {f"encoder.layers.{i}.{name}": keys.take(f"mp.transformer_encoder.layers.{i}.{name}")
             for i in range(layers) for name in LAYER_KEYS}
    state["project.weight"] = keys.take("mp.mapper.weight")
    state["project.bias"] = keys.take("mp.mapper.bias")
    if keys.missing:
        keys.done()
    mapper = ClipGptMapper(ClipGptConfig(clip_dim=width, width=width, **settings))
    mapper.load_state_dict(state)
    return mapper
