"""Mapping networks: one CLIP vector -> ``prefix_length`` GPT-2 input embeddings.

Each mapper type is registered by name with a config dataclass beside its class,
so a saved captioner (``captioner.json``: ``{"type": ..., **config}``) is rebuilt
from this file alone, without the params schema. Adding a mapper type means one
class + its ``Config`` here (decorated with ``@register``) and its test.

Two types from ClipCap (Mokady et al. 2021):

* ``mlp``: Linear(clip_dim -> width*K/2) -> Tanh -> Linear(-> width*K). Its size
  grows with K squared (K=10 at 512 -> 768 is about 32M parameters).
* ``transformer``: the CLIP vector becomes ``clip_length`` tokens, a learned
  constant of ``prefix_length`` tokens is appended, and pre-LayerNorm self-attention
  blocks mix them; the outputs at the constant's positions are the prefix.

One from jmisilo/clip-gpt-captioning (the seed project):

* ``clipgpt``: CLIP's ``pooler_output`` (as wide as GPT-2) goes through a post-norm
  ``nn.TransformerEncoder`` as a sequence of ONE token, then Linear(width ->
  prefix_length*width) makes the prefix (the seed calls prefix_length ``ep_len``).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch
from torch import nn

from pipeline.core.errors import ParamsError


class MapperConfigError(ParamsError):
    """Mapper settings that cannot build a mapper; the message names the ``mapper.*`` key."""


# type name -> mapper class (each with a ``Config`` dataclass and ``__init__(config)``)
MAPPERS: dict[str, type[nn.Module]] = {}


def register(name: str) -> Callable[[type[nn.Module]], type[nn.Module]]:
    def add(cls: type[nn.Module]) -> type[nn.Module]:
        MAPPERS[name] = cls
        cls.kind = name  # type: ignore[attr-defined]
        return cls
    return add


@dataclass(frozen=True)
class MLPConfig:
    clip_dim: int
    width: int
    prefix_length: int
    dropout: float = 0.0


@register("mlp")
class MLPMapper(nn.Module):
    Config = MLPConfig

    def __init__(self, config: MLPConfig) -> None:
        super().__init__()
        self.config = config
        width, k = config.width, config.prefix_length
        self.net = nn.Sequential(
            nn.Linear(config.clip_dim, width * k // 2),
            nn.Tanh(),
            nn.Dropout(config.dropout),
            nn.Linear(width * k // 2, width * k),
        )

    def forward(self, clip_vectors: torch.Tensor) -> torch.Tensor:
        """[B, clip_dim] -> [B, prefix_length, width]."""
        return self.net(clip_vectors).view(-1, self.config.prefix_length, self.config.width)


@dataclass(frozen=True)
class TransformerConfig:
    clip_dim: int
    width: int
    prefix_length: int
    clip_length: int = 10
    layers: int = 8
    heads: int = 8
    mlp_ratio: float = 2.0
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.width % self.heads:
            raise MapperConfigError(f"mapper.heads: {self.heads} does not divide the prefix width {self.width} "
                                    "(GPT-2's n_embd)")


@register("transformer")
class TransformerMapper(nn.Module):
    Config = TransformerConfig

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.config = config
        width = config.width
        self.project = nn.Linear(config.clip_dim, config.clip_length * width)
        # The learned constant whose transformed positions become the prefix.
        self.prefix_const = nn.Parameter(torch.randn(config.prefix_length, width))
        block = nn.TransformerEncoderLayer(
            d_model=width,
            nhead=config.heads,
            dim_feedforward=int(width * config.mlp_ratio),
            dropout=config.dropout,
            activation="relu",
            batch_first=True,
            norm_first=True,
        )
        # enable_nested_tensor only matters with padding masks, which a prefix never has.
        self.blocks = nn.TransformerEncoder(block, num_layers=config.layers, enable_nested_tensor=False)

    def forward(self, clip_vectors: torch.Tensor) -> torch.Tensor:
        """[B, clip_dim] -> [B, prefix_length, width]."""
        b = clip_vectors.shape[0]
        c = self.config
        x = self.project(clip_vectors).view(b, c.clip_length, c.width)
        const = self.prefix_const.unsqueeze(0).expand(b, -1, -1).to(x.dtype)
        out = self.blocks(torch.cat([x, const], dim=1))
        return out[:, c.clip_length:]


@dataclass(frozen=True)
class ClipGptConfig:
    clip_dim: int
    width: int
    prefix_length: int = 4  # the seed's ep_len
    layers: int = 6
    heads: int = 16
    forward_expansion: int = 4
    dropout: float = 0.1

    def __post_init__(self) -> None:
        # The seed feeds the pooled vector to the encoder as it is: no projection to GPT-2's width.
        if self.clip_dim != self.width:
            raise MapperConfigError(f"mapper.type: clipgpt needs CLIP vectors as wide as GPT-2 (got {self.clip_dim} "
                                    f"for n_embd {self.width}); use clip.output: pooler_output of a CLIP whose "
                                    "vision width equals GPT-2's (ViT-B/32 + gpt2, ViT-L/14 + gpt2-medium)")
        if self.width % self.heads:
            raise MapperConfigError(f"mapper.heads: {self.heads} does not divide the prefix width {self.width} "
                                    "(GPT-2's n_embd)")


@register("clipgpt")
class ClipGptMapper(nn.Module):
    Config = ClipGptConfig

    def __init__(self, config: ClipGptConfig) -> None:
        super().__init__()
        self.config = config
        width = config.width
        block = nn.TransformerEncoderLayer(
            d_model=width,
            nhead=config.heads,
            dim_feedforward=width * config.forward_expansion,
            dropout=config.dropout,
            activation="relu",
            batch_first=True,
            norm_first=False,  # post-norm, as the seed (torch's default)
        )
        self.encoder = nn.TransformerEncoder(block, num_layers=config.layers, enable_nested_tensor=False)
        self.project = nn.Linear(width, config.prefix_length * width)

    def forward(self, clip_vectors: torch.Tensor) -> torch.Tensor:
        """[B, clip_dim] -> [B, prefix_length, width]; each vector is its own 1-token sequence."""
        c = self.config
        x = self.encoder(clip_vectors.unsqueeze(1)).squeeze(1)
        return self.project(x).view(-1, c.prefix_length, c.width)


def mapper_types() -> list[str]:
    return sorted(MAPPERS)


def mapper_class(kind: str) -> type[nn.Module]:
    if kind not in MAPPERS:
        raise MapperConfigError(f"mapper.type: {kind!r} is not one of {', '.join(mapper_types())}")
    return MAPPERS[kind]


def make_config(settings: Mapping[str, Any], clip_dim: int, width: int) -> Any:
    """The config of the mapper ``settings`` describe (the params' ``mapper`` section or
    a saved ``captioner.json`` entry), for CLIP vectors of ``clip_dim`` and GPT-2 of ``width``.

    Settings the type does not use are ignored (``clip_length`` means nothing to ``mlp``).
    """
    cls = mapper_class(str(settings.get("type")))
    asked = settings.get("width")
    if asked is not None and int(asked) != width:
        raise MapperConfigError(f"mapper.width: {asked} does not match GPT-2's n_embd {width}")
    names = {f.name for f in dataclasses.fields(cls.Config)} - {"clip_dim", "width"}
    values = {k: settings[k] for k in names if settings.get(k) is not None}
    return cls.Config(clip_dim=int(clip_dim), width=int(width), **values)


def build_mapper(kind: str, config: Any) -> nn.Module:
    return mapper_class(kind)(config)


def config_dict(mapper: nn.Module) -> dict[str, Any]:
    """What ``captioner.json`` stores to rebuild ``mapper``: its type and config."""
    return {"type": mapper.kind, **dataclasses.asdict(mapper.config)}


def from_config_dict(saved: Mapping[str, Any]) -> nn.Module:
    """Rebuild a mapper (random weights) from ``config_dict``'s output."""
    saved = dict(saved)
    cls = mapper_class(str(saved.pop("type", None)))
    return cls(cls.Config(**saved))


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
