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

One from SmallCap (Ramos et al. 2023), which reads patch tokens instead of one vector:

* ``cross_attention``: the vision tower's last hidden state [T, clip_dim] is attended
  to by a cross-attention layer added to every block of the frozen GPT-2 (between
  its self-attention and its MLP, as transformers' ``add_cross_attention``), at the
  inner width ``width // reduce_factor``; the prefix is ``prefix_length`` learned
  start embeddings. Mappers that read patch tokens say so with ``patch_tokens = True``
  and attach to GPT-2 for one computation with ``attached(gpt, tokens)``.
"""
from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F
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
        # What the mapper reads: one pooled vector per image, or the patch tokens
        # (embed's ``patch_tokens`` dataset), and whether GPT-2 must stay frozen.
        cls.patch_tokens = bool(getattr(cls, "patch_tokens", False))  # type: ignore[attr-defined]
        cls.freezes_gpt = bool(getattr(cls, "freezes_gpt", False))  # type: ignore[attr-defined]
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


@dataclass(frozen=True)
class CrossAttentionConfig:
    clip_dim: int  # width of the patch tokens (the vision tower's hidden size)
    width: int
    prefix_length: int = 1
    reduce_factor: int = 4
    gpt_layers: int = 12  # one cross-attention layer per GPT-2 block (taken from GPT-2)
    gpt_heads: int = 12  # heads of each, as GPT-2's (taken from GPT-2)
    dropout: float = 0.0

    def __post_init__(self) -> None:
        inner, rest = divmod(self.width, self.reduce_factor)
        if rest or inner % self.gpt_heads:
            raise MapperConfigError(
                f"mapper.reduce_factor: {self.reduce_factor} does not give a cross-attention width that GPT-2's "
                f"{self.gpt_heads} heads divide (n_embd {self.width} / {self.reduce_factor}); SmallCap uses 1, 2, "
                "4, 8 or 16")

    @property
    def inner(self) -> int:
        return self.width // self.reduce_factor


class CrossAttention(nn.Module):
    """SmallCap's cross-attention at inner width ``inner``: queries from GPT-2's residual
    stream (after a LayerNorm), keys and values from the patch tokens, output back to GPT-2's width."""

    def __init__(self, width: int, token_width: int, inner: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.ln = nn.LayerNorm(width, eps=1e-5)  # GPT-2's layer_norm_epsilon
        self.q = nn.Linear(width, inner)
        self.kv = nn.Linear(token_width, 2 * inner)
        self.out = nn.Linear(inner, width)

    def keys_values(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, T, token_width] -> keys, values [B, heads, T, inner / heads]: once per image."""
        b, t, _ = tokens.shape
        k, v = self.kv(tokens).view(b, t, 2, self.heads, -1).permute(2, 0, 3, 1, 4)
        return k, v

    def forward(self, hidden: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """``hidden`` [N, L, width] with N = B x R rows, image-major (an image's R beams or samples
        adjacent, as generate and the sampler lay them out); ``k``, ``v`` of the B images.

        The R rows of an image become one query sequence of R x L over its keys and values:
        cross-attention has no mask, so each query attends alone and the result equals R
        copies of K/V, without making them."""
        n, length, _ = hidden.shape
        b = k.shape[0]
        if n % b:
            raise ValueError(f"cross-attention: {n} rows are not a whole number of rows per each of {b} images")
        q = self.q(self.ln(hidden)).view(b, (n // b) * length, self.heads, -1).transpose(1, 2)
        o = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype),
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.out(o.transpose(1, 2).reshape(n, length, -1))


@register("cross_attention")
class CrossAttentionMapper(nn.Module):
    """Cross-attention over patch tokens in each block of a frozen GPT-2 (SmallCap)."""

    Config = CrossAttentionConfig
    patch_tokens = True
    freezes_gpt = True

    def __init__(self, config: CrossAttentionConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        # GPT-2 reads these learned embeddings before the caption (SmallCap reads a text prompt).
        self.start = nn.Parameter(torch.randn(c.prefix_length, c.width) * 0.02)
        self.layers = nn.ModuleList(CrossAttention(c.width, c.clip_dim, c.inner, c.gpt_heads, c.dropout)
                                    for _ in range(c.gpt_layers))
        # False: every row (beam, sample) gets keys and values projected from its own copy of
        # the patch tokens, once per computation, as passing encoder_hidden_states to generate
        # would (it expands them per beam): the same results, for tests and bench/generate.py.
        self.share_kv = True

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """[B, T, clip_dim] -> the prefix [B, prefix_length, width] (the same for every image)."""
        return self.start.unsqueeze(0).expand(tokens.shape[0], -1, -1)

    @contextlib.contextmanager
    def attached(self, gpt: nn.Module, tokens: torch.Tensor):
        """GPT-2 (``GPT2LMHeadModel`` or ``GPT2Model``) attends to ``tokens`` [B, T, clip_dim] inside
        this block: keys and values are computed here, once per image, and forward hooks add each
        block's cross-attention after its self-attention. GPT-2 itself is unchanged outside."""
        blocks = gpt.base_model.h
        if len(blocks) != len(self.layers):
            raise ValueError(f"cross_attention mapper made for {len(self.layers)} GPT-2 blocks, GPT-2 has {len(blocks)}")
        if tokens.dim() != 3:
            raise ValueError(f"cross_attention mapper reads patch tokens [B, T, D], got shape {tuple(tokens.shape)}")
        tokens = tokens.to(self.start.dtype)
        handles = []
        try:
            for block, layer in zip(blocks, self.layers):
                k, v = layer.keys_values(tokens)
                residual: dict = {}
                copies: dict = {}  # rows per image -> keys and values of the copied tokens

                def remember(_block, args, residual=residual):
                    residual["h"] = args[0]  # the block's input: the residual stream before self-attention

                def add_cross(_attn, _args, out, layer=layer, k=k, v=v, residual=residual, copies=copies):
                    attn_out = out[0]
                    kk, vv = k, v
                    if not self.share_kv:
                        rows = attn_out.shape[0] // tokens.shape[0]
                        if rows not in copies:
                            copies[rows] = layer.keys_values(tokens.repeat_interleave(rows, 0))
                        kk, vv = copies[rows]
                    return (attn_out + layer(residual["h"] + attn_out, kk, vv), *out[1:])

                handles.append(block.register_forward_pre_hook(remember))
                handles.append(block.attn.register_forward_hook(add_cross))
            yield
        finally:
            for handle in handles:
                handle.remove()


def cross_attention_parameters(width: int, token_width: int, layers: int, reduce_factor: int,
                               prefix_length: int) -> int:
    """The cross_attention mapper's size (docs/model.md): per GPT-2 block a LayerNorm (2d),
    queries d->i, keys and values e->2i, output i->d (each with biases), plus the start embeddings."""
    d, e, i = width, token_width, width // reduce_factor
    return layers * (2 * d + (d * i + i) + (e * 2 * i + 2 * i) + (i * d + d)) + prefix_length * d


def mapper_types() -> list[str]:
    return sorted(MAPPERS)


def mapper_class(kind: str) -> type[nn.Module]:
    if kind not in MAPPERS:
        raise MapperConfigError(f"mapper.type: {kind!r} is not one of {', '.join(mapper_types())}")
    return MAPPERS[kind]


def make_config(settings: Mapping[str, Any], clip_dim: int, width: int, gpt_config: Any = None) -> Any:
    """The config of the mapper ``settings`` describe (the params' ``mapper`` section or
    a saved ``captioner.json`` entry), for CLIP vectors of ``clip_dim`` and GPT-2 of ``width``.

    Settings the type does not use are ignored (``clip_length`` means nothing to ``mlp``).
    ``gpt_config``: GPT-2's config, for the shapes a mapper takes from GPT-2 itself
    (``cross_attention``: its depth and heads).
    """
    cls = mapper_class(str(settings.get("type")))
    asked = settings.get("width")
    if asked is not None and int(asked) != width:
        raise MapperConfigError(f"mapper.width: {asked} does not match GPT-2's n_embd {width}")
    names = {f.name for f in dataclasses.fields(cls.Config)} - {"clip_dim", "width"}
    values = {k: settings[k] for k in names if settings.get(k) is not None}
    if gpt_config is not None:
        for name, attr in (("gpt_layers", "n_layer"), ("gpt_heads", "n_head")):
            if name in names:
                values[name] = int(getattr(gpt_config, attr))
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
