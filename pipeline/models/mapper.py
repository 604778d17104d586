"""Mapping networks: one CLIP vector -> ``prefix_length`` GPT-2 input embeddings.

Two variants from ClipCap (Mokady et al. 2021):

* ``MLPMapper``: Linear(clip_dim -> width*K/2) -> Tanh -> Linear(-> width*K). Its size
  grows with K squared (K=10 at 512 -> 768 is about 32M parameters).
* ``TransformerMapper``: the CLIP vector becomes ``clip_length`` tokens, a learned
  constant of ``prefix_length`` tokens is appended, and pre-LayerNorm self-attention
  blocks mix them; the outputs at the constant's positions are the prefix.
"""
from __future__ import annotations

import torch
from torch import nn

from pipeline.params import MapperParams


class MLPMapper(nn.Module):
    def __init__(self, clip_dim: int, width: int, prefix_length: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.width = width
        self.prefix_length = prefix_length
        hidden = width * prefix_length // 2
        self.net = nn.Sequential(
            nn.Linear(clip_dim, hidden),
            nn.Tanh(),
            nn.Dropout(dropout),
            nn.Linear(hidden, width * prefix_length),
        )

    def forward(self, clip_vectors: torch.Tensor) -> torch.Tensor:
        """[B, clip_dim] -> [B, prefix_length, width]."""
        return self.net(clip_vectors).view(-1, self.prefix_length, self.width)


class TransformerMapper(nn.Module):
    def __init__(
        self,
        clip_dim: int,
        width: int,
        prefix_length: int,
        clip_length: int,
        layers: int,
        heads: int,
        mlp_ratio: float = 2.0,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"mapper.heads: {heads} does not divide the prefix width {width}")
        self.width = width
        self.prefix_length = prefix_length
        self.clip_length = clip_length
        self.project = nn.Linear(clip_dim, clip_length * width)
        # The learned constant whose transformed positions become the prefix.
        self.prefix_const = nn.Parameter(torch.randn(prefix_length, width))
        block = nn.TransformerEncoderLayer(
            d_model=width,
            nhead=heads,
            dim_feedforward=int(width * mlp_ratio),
            dropout=dropout,
            activation="relu",
            batch_first=True,
            norm_first=True,
        )
        # enable_nested_tensor only matters with padding masks, which a prefix never has.
        self.blocks = nn.TransformerEncoder(block, num_layers=layers, enable_nested_tensor=False)

    def forward(self, clip_vectors: torch.Tensor) -> torch.Tensor:
        """[B, clip_dim] -> [B, prefix_length, width]."""
        b = clip_vectors.shape[0]
        x = self.project(clip_vectors).view(b, self.clip_length, self.width)
        const = self.prefix_const.unsqueeze(0).expand(b, -1, -1).to(x.dtype)
        out = self.blocks(torch.cat([x, const], dim=1))
        return out[:, self.clip_length:]


def build_mapper(params: MapperParams, clip_dim: int, width: int) -> nn.Module:
    """The mapper ``params`` describes, for CLIP vectors of ``clip_dim`` and GPT-2 of ``width``."""
    if params.width is not None and params.width != width:
        raise ValueError(f"mapper.width: {params.width} does not match GPT-2's n_embd {width}")
    if params.type == "mlp":
        return MLPMapper(clip_dim, width, params.prefix_length, params.dropout)
    return TransformerMapper(
        clip_dim,
        width,
        params.prefix_length,
        params.clip_length,
        params.layers,
        params.heads,
        params.mlp_ratio,
        params.dropout,
    )


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
