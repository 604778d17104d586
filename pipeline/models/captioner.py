"""The ClipCap captioner: a mapper that turns a CLIP vector into a GPT-2 prefix.

GPT-2 reads ``cat(prefix, wte(caption tokens))`` and is trained with next-token
cross-entropy on the caption positions only. Captions end with EOS (so generation
learns to stop) and padding is excluded from the loss by label -100 and the
attention mask, never by a token id that also means a real word.

The saved folder is self-contained (see docs/architecture.md, "Models"):
``captioner.json`` (the mapper's type and config, and the encoder attributes it
was trained on), ``mapper.safetensors`` and ``gpt/`` (GPT-2 + tokenizer via
save_pretrained). Loading it needs the mapper registry, not the params schema.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.features import attr_value
from pipeline.files import replace_dir, temp_dir_for
from pipeline.models import mapper as mappers
from pipeline.models.mapper import count_parameters
from pipeline.models.pretrained import ModelError

CONFIG_NAME = "captioner.json"
MAPPER_WEIGHTS = "mapper.safetensors"
GPT_SUBDIR = "gpt"
FORMAT_VERSION = 2
# Feature attributes a model must be fed again at generate/caption time.
FEATURE_KEYS = ("model_id", "model_revision", "output", "normalized")


class ClipCaptioner(nn.Module):
    def __init__(
        self,
        mapper: nn.Module,
        gpt: nn.Module,
        tokenizer: Any,
        features: Optional[dict] = None,
        finetune_gpt: bool = False,
    ) -> None:
        super().__init__()
        if tokenizer.eos_token_id is None:
            raise ModelError("the GPT-2 tokenizer has no EOS token; captions could never end")
        if mapper.config.width != int(gpt.config.hidden_size):
            raise ModelError(f"mapper width {mapper.config.width} does not match GPT-2's n_embd "
                             f"{gpt.config.hidden_size}")
        self.clip_dim = int(mapper.config.clip_dim)
        self.prefix_length = int(mapper.config.prefix_length)
        self.mapper = mapper
        self.gpt = gpt
        self.tokenizer = tokenizer
        self.features = dict(features or {})
        self.finetune_gpt = finetune_gpt
        # A frozen GPT-2 gets no gradients and stays in eval mode (no dropout).
        self.gpt.requires_grad_(finetune_gpt)
        self.train(self.training)

    @classmethod
    def from_settings(cls, mapper_settings: Mapping[str, Any], clip_dim: int, gpt: nn.Module, tokenizer: Any,
                      features: Optional[dict] = None, finetune_gpt: bool = False) -> "ClipCaptioner":
        """A new captioner (random mapper) from the params' ``mapper`` section as a mapping."""
        config = mappers.make_config(mapper_settings, clip_dim, int(gpt.config.hidden_size))
        mapper = mappers.build_mapper(str(mapper_settings["type"]), config)
        return cls(mapper, gpt, tokenizer, features=features, finetune_gpt=finetune_gpt)

    @property
    def mapper_type(self) -> str:
        return self.mapper.kind

    # ----------------------------------------------------------------- properties
    @property
    def eos_token_id(self) -> int:
        return int(self.tokenizer.eos_token_id)

    @property
    def pad_token_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return int(pad if pad is not None else self.tokenizer.eos_token_id)

    @property
    def max_positions(self) -> int:
        cfg = self.gpt.config
        return int(getattr(cfg, "n_positions", None) or getattr(cfg, "max_position_embeddings", 1024))

    def train(self, mode: bool = True) -> "ClipCaptioner":
        super().train(mode)
        if not self.finetune_gpt:
            self.gpt.eval()
        return self

    # -------------------------------------------------------------------- compute
    def prefix(self, clip_vectors: torch.Tensor) -> torch.Tensor:
        """[B, clip_dim] -> [B, prefix_length, n_embd] in GPT-2's dtype."""
        dtype = self.gpt.get_input_embeddings().weight.dtype
        return self.mapper(clip_vectors.to(next(self.mapper.parameters()).dtype)).to(dtype)

    def forward(
        self,
        clip_vectors: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        reduction: str = "mean",
    ) -> torch.Tensor:
        """Cross-entropy of the caption tokens (EOS included) given the prefix.

        ``input_ids`` [B, T] are right-padded; positions where ``attention_mask`` is 0
        are ignored whatever their ids. ``reduction="sum"`` gives the summed token loss
        (for token-weighted means across batches and processes).
        """
        logits = self._caption_logits(clip_vectors, input_ids, attention_mask)
        labels = input_ids.masked_fill(attention_mask == 0, -100)
        return F.cross_entropy(
            logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction=reduction
        )

    def token_logprobs(self, clip_vectors: torch.Tensor, input_ids: torch.Tensor,
                       attention_mask: torch.Tensor) -> torch.Tensor:
        """[B, T] log-probability of each caption token given the prefix and the tokens before
        it (0 where ``attention_mask`` is 0): what self-critical training weighs by the reward."""
        logits = self._caption_logits(clip_vectors, input_ids, attention_mask).float()
        picked = logits.gather(-1, input_ids.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)
        return picked * attention_mask.to(picked.dtype)

    def _caption_logits(self, clip_vectors: torch.Tensor, input_ids: torch.Tensor,
                        attention_mask: torch.Tensor) -> torch.Tensor:
        """[B, T, vocab] logits predicting each caption token, GPT-2 reading ``cat(prefix, tokens)``."""
        prefix = self.prefix(clip_vectors)
        tokens = self.gpt.get_input_embeddings()(input_ids)
        b, k, t = prefix.shape[0], prefix.shape[1], input_ids.shape[1]
        embeds = torch.cat([prefix.to(tokens.dtype), tokens], dim=1)
        mask = torch.cat([attention_mask.new_ones(b, k), attention_mask], dim=1)
        # Only positions K-1 .. K+T-2 predict caption tokens; skip the LM head elsewhere.
        return self.gpt(inputs_embeds=embeds, attention_mask=mask, logits_to_keep=t + 1).logits[:, :-1]

    @torch.no_grad()
    def generate_ids(self, clip_vectors: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """Token ids continuing each prefix (transformers' generate, KV cache).

        Extra keyword arguments go to ``generate`` (num_beams, max_new_tokens,
        length_penalty, no_repeat_ngram_size, do_sample, temperature, top_p,
        num_return_sequences). ``max_new_tokens`` is capped by GPT-2's positions.
        """
        prefix = self.prefix(clip_vectors)
        mask = torch.ones(prefix.shape[:2], dtype=torch.long, device=prefix.device)
        room = self.max_positions - self.prefix_length
        kwargs["max_new_tokens"] = max(1, min(int(kwargs.get("max_new_tokens", 30)), room))
        kwargs.setdefault("eos_token_id", self.eos_token_id)
        kwargs.setdefault("pad_token_id", self.pad_token_id)
        if not kwargs.get("do_sample"):
            # Explicit, so a model's own generation_config cannot switch on sampling.
            kwargs["do_sample"] = False
            kwargs.pop("temperature", None)
            kwargs.pop("top_p", None)
        # Decoder-only generate with inputs_embeds returns only the new tokens.
        return self.gpt.generate(inputs_embeds=prefix, attention_mask=mask, **kwargs)

    def decode(self, ids: torch.Tensor) -> list[str]:
        """Token ids -> caption strings, cut at the first EOS, stripped."""
        texts = []
        for row in ids.tolist():
            if self.eos_token_id in row:
                row = row[: row.index(self.eos_token_id)]
            texts.append(self.tokenizer.decode(row, skip_special_tokens=True).strip())
        return texts

    def caption(self, clip_vectors: torch.Tensor, **kwargs: Any) -> list[str]:
        """Captions for a batch of CLIP vectors (``num_return_sequences`` per vector)."""
        return self.decode(self.generate_ids(clip_vectors, **kwargs))

    # ---------------------------------------------------------------- tokenizing
    def encode_caption(self, caption: str, max_tokens: int) -> list[int]:
        """Caption -> token ids ending with EOS, at most ``max_tokens`` long (EOS kept)."""
        ids = self.tokenizer(caption.strip(), add_special_tokens=False)["input_ids"]
        return list(ids[: max(0, max_tokens - 1)]) + [self.eos_token_id]

    # -------------------------------------------------------------------- saving
    def config_dict(self) -> dict:
        return {
            "format_version": FORMAT_VERSION,
            "mapper": mappers.config_dict(self.mapper),
            "clip_dim": self.clip_dim,
            "prefix_length": self.prefix_length,
            "finetune_gpt": self.finetune_gpt,
            "features": self.features,
            "params_trainable": count_parameters(self, trainable_only=True),
            "params_total": count_parameters(self),
        }

    def save(self, model_dir: str | Path) -> Path:
        """Write the self-contained model folder (temporary name, renamed when whole)."""
        from safetensors.torch import save_file

        model_dir = Path(model_dir)
        if model_dir.exists() and any(model_dir.iterdir()) and not (model_dir / CONFIG_NAME).exists():
            raise ModelError(f"{model_dir}: exists and is not a captioner folder; refusing to replace it")
        tmp = temp_dir_for(model_dir)
        state = {k: v.detach().float().cpu().contiguous() for k, v in self.mapper.state_dict().items()}
        save_file(state, str(tmp / MAPPER_WEIGHTS), metadata={"format": "pt"})
        self.gpt.save_pretrained(tmp / GPT_SUBDIR, safe_serialization=True)
        self.tokenizer.save_pretrained(tmp / GPT_SUBDIR)
        (tmp / CONFIG_NAME).write_text(json.dumps(self.config_dict(), indent=2, sort_keys=True) + "\n")
        replace_dir(tmp, model_dir)
        return model_dir

    @classmethod
    def load(cls, model_dir: str | Path, device: str | torch.device = "cpu") -> "ClipCaptioner":
        """Load a folder written by ``save`` (safetensors only, no remote code)."""
        from safetensors.torch import load_file

        from pipeline.models.pretrained import load_gpt

        model_dir = Path(model_dir)
        cfg_path = model_dir / CONFIG_NAME
        if not cfg_path.is_file():
            raise ModelError(f"{model_dir}: not a trained captioner folder (no {CONFIG_NAME}); run `capline train`")
        try:
            cfg = json.loads(cfg_path.read_text())
        except (OSError, ValueError) as err:
            raise ModelError(f"{cfg_path}: not valid JSON ({err})") from None
        if not isinstance(cfg, dict) or cfg.get("format_version") != FORMAT_VERSION:
            got = cfg.get("format_version") if isinstance(cfg, dict) else None
            raise ModelError(f"{cfg_path}: format_version {got!r}, expected {FORMAT_VERSION}; retrain with "
                             "this version of capline")
        gpt, tokenizer = load_gpt(model_dir / GPT_SUBDIR)
        try:
            mapper = mappers.from_config_dict(cfg["mapper"])
            mapper.load_state_dict(load_file(str(model_dir / MAPPER_WEIGHTS)), strict=True)
        except (KeyError, TypeError, RuntimeError, OSError) as err:
            raise ModelError(f"{model_dir}: mapper config or {MAPPER_WEIGHTS} unusable "
                             f"({type(err).__name__}: {err})") from None
        model = cls(mapper, gpt, tokenizer, features=cfg.get("features"),
                    finetune_gpt=bool(cfg.get("finetune_gpt", False)))
        return model.to(device).eval()

    def check_features(self, attrs: dict, dim: int, source: str) -> None:
        """Refuse features from another encoder than the one this model was trained on."""
        from pipeline.features import FeatureShardError

        if dim != self.clip_dim:
            raise FeatureShardError(f"{source}: feature dim {dim} but the model was trained on dim {self.clip_dim}")
        for key in FEATURE_KEYS:
            want, got = self.features.get(key), attrs.get(key)
            if want is not None and got is not None and attr_value(want) != attr_value(got):
                raise FeatureShardError(f"{source}: feature attribute {key} is {got!r} but the model was trained on {want!r}")

    def feature_expectation(self) -> dict:
        """The ``expect`` mapping for ``load_features``."""
        return {k: self.features[k] for k in FEATURE_KEYS if self.features.get(k) is not None}

