"""ClipCap-like released checkpoints: a transformer mapper's state dict and a fine-tuned
GPT-2's, under the release's key names, saved with torch.save as the release is."""
from __future__ import annotations

import torch

from pipeline.models.pretrained import load_gpt

W, CLIP, K, CL, LAYERS, HEADS = 32, 16, 3, 2, 2, 8  # hub_gpt_dir is 32 wide; tiny_clip_dir's image_embeds 16


def rand(*shape):
    return torch.randn(*shape) * 0.2


def released_gpt(gpt_dir, prefix: str, mask_buffers: bool) -> dict:
    """GPT-2's weights, fine-tuned (perturbed), under ``prefix``; with the causal-mask
    buffers old transformers versions saved (as in ClipCap's files)."""
    gpt, _ = load_gpt(gpt_dir)
    torch.manual_seed(7)
    state = {}
    for name, t in gpt.state_dict().items():
        state[prefix + name] = t + 0.05 * torch.randn_like(t) if t.is_floating_point() else t
    state[prefix + "lm_head.weight"] = state[prefix + "transformer.wte.weight"]  # tied, saved twice
    if mask_buffers:
        n = gpt.config.n_positions
        for i in range(gpt.config.n_layer):
            state[f"{prefix}transformer.h.{i}.attn.bias"] = torch.tril(torch.ones(n, n)).view(1, 1, n, n)
            state[f"{prefix}transformer.h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    return state


def clipcap_transformer_state(gpt_dir, clip_dim=CLIP) -> dict:
    torch.manual_seed(0)
    p = "clip_project."
    state = {p + "linear.weight": rand(CL * W, clip_dim), p + "linear.bias": rand(CL * W),
             p + "prefix_const": torch.randn(K, W)}
    for i in range(LAYERS):
        q = f"{p}transformer.layers.{i}."
        state.update({
            q + "norm1.weight": 1 + rand(W), q + "norm1.bias": rand(W),
            q + "attn.to_queries.weight": rand(W, W),          # bias=False in ClipCap
            q + "attn.to_keys_values.weight": rand(2 * W, W),  # bias=False
            q + "attn.project.weight": rand(W, W), q + "attn.project.bias": rand(W),
            q + "norm2.weight": 1 + rand(W), q + "norm2.bias": rand(W),
            q + "mlp.fc1.weight": rand(2 * W, W), q + "mlp.fc1.bias": rand(2 * W),
            q + "mlp.fc2.weight": rand(W, 2 * W), q + "mlp.fc2.bias": rand(W),
        })
    return {**state, **released_gpt(gpt_dir, "gpt.", mask_buffers=True)}


def save(tmp_path, state: dict, name="weights.pt"):
    path = tmp_path / name
    torch.save(state, path)
    return path
