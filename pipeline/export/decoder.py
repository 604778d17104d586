"""GPT-2 as one decoding step with past keys/values, written out for ONNX export.

transformers' GPT-2 reads its past from a ``Cache`` object and builds masks through
helpers that the exporter cannot follow; this module computes the same thing from
the same weights with plain tensor ops, so the graph is exactly this code.

Inputs: ``inputs_embeds`` [B, S, E] (the prefix, or nothing), ``input_ids`` [B, T]
(caption tokens, or nothing), and per layer ``past_key_i``/``past_value_i``
[B, H, P, D]. The step reads ``cat(inputs_embeds, wte[input_ids])`` at positions
P .. P+S+T-1. Outputs: ``logits`` [B, 1, V] (the last position's) and per layer ``key_i``/``value_i``
[B, H, S+T, D], the new positions only (the caller appends them to its cache).
Every row has the same length (a prefix of fixed length, then one token per step
for every row), so there is no padding and the causal mask is the only mask.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.models.pretrained import ModelError


def check_supported(config) -> None:
    """Refuse GPT-2 variants this step does not compute (it would give other logits)."""
    wanted = {"activation_function": "gelu_new", "scale_attn_weights": True,
              "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False,
              "add_cross_attention": False}
    for key, value in wanted.items():
        got = getattr(config, key, value)
        if got != value:
            raise ModelError(f"export: GPT-2 with {key}={got!r} is not supported (expected {value!r})")


class GptStep(nn.Module):
    def __init__(self, gpt) -> None:
        super().__init__()
        check_supported(gpt.config)
        body = gpt.transformer
        self.n_head = int(gpt.config.n_head)
        self.eps = float(gpt.config.layer_norm_epsilon)
        self.wte = body.wte
        self.wpe = body.wpe
        self.blocks = body.h
        self.ln_f = body.ln_f
        # A separate, transposed copy of the tied embedding: a plain [E, V] MatMul that
        # dynamic quantisation turns into an int8 one (the lookup table stays fp32).
        self.head = nn.Parameter(gpt.get_output_embeddings().weight.detach().t().contiguous())

    def forward(self, inputs_embeds: torch.Tensor, input_ids: torch.Tensor, *past: torch.Tensor):
        x = torch.cat([inputs_embeds, self.wte(input_ids)], dim=1)
        start = past[0].shape[2]
        steps = x.shape[1]
        positions = torch.arange(steps, device=x.device) + start
        x = x + self.wpe(positions)[None]
        # Query i (position start+i) sees keys 0 .. start+i.
        keys_at = torch.arange(start + steps, device=x.device)
        blocked = keys_at[None, :] > positions[:, None]
        new = []
        for i, block in enumerate(self.blocks):
            a, (k, v) = self.attention(block, block.ln_1(x), past[2 * i], past[2 * i + 1], blocked)
            x = x + a
            x = x + linear(block.mlp.c_proj, gelu_tanh(linear(block.mlp.c_fc, block.ln_2(x))))
            new += [k, v]
        # generate reads the last position's logits only: the head runs on that one.
        logits = self.ln_f(x[:, -1:]) @ self.head
        return (logits, *new)

    def attention(self, block, x, past_k, past_v, blocked):
        attn = block.attn
        b, t, e = x.shape
        d = e // self.n_head
        q, k, v = linear(attn.c_attn, x).split(e, dim=2)
        q, k, v = (z.view(b, t, self.n_head, d).transpose(1, 2) for z in (q, k, v))
        keys = torch.cat([past_k, k], dim=2)
        values = torch.cat([past_v, v], dim=2)
        scores = (q @ keys.transpose(-1, -2)) / math.sqrt(d)
        scores = scores.masked_fill(blocked, torch.finfo(scores.dtype).min)
        out = (scores.softmax(-1) @ values).transpose(1, 2).reshape(b, t, e)
        return linear(attn.c_proj, out), (k, v)


def linear(conv1d, x: torch.Tensor) -> torch.Tensor:
    """GPT-2's Conv1D as MatMul + Add (its addmm would export as Gemm, which dynamic quantisation skips)."""
    return x @ conv1d.weight + conv1d.bias


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GPT-2's ``gelu_new`` (the tanh approximation), as its formula."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


def io_names(n_layer: int) -> tuple[list[str], list[str]]:
    """(input names, output names) of the decoder graph."""
    past = [f"past_{kind}_{i}" for i in range(n_layer) for kind in ("key", "value")]
    new = [f"{kind}_{i}" for i in range(n_layer) for kind in ("key", "value")]
    return ["inputs_embeds", "input_ids", *past], ["logits", *new]
