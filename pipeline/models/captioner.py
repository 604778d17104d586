"""The ClipCap captioner: a mapper that turns a CLIP vector into a GPT-2 prefix.

GPT-2 reads ``cat(prefix, wte(caption tokens))`` and is trained with next-token
cross-entropy on the caption positions only. Captions end with EOS (so generation
learns to stop) and padding is excluded from the loss by label -100 and the
attention mask, never by a token id that also means a real word.

The saved folder is self-sufficient (see docs/model.md, "The model folder"):
``captioner.json`` (the mapper's type and config, and the encoder attributes it
was trained on), ``mapper.safetensors``, ``gpt/`` (GPT-2 + tokenizer via
save_pretrained), ``generation_config.json`` (the decoding defaults, transformers'
format) and ``clip/`` (a copy of the pinned CLIP folder that made the features),
so ``capline caption --model DIR`` needs nothing else. Loading it needs the mapper
registry, not the params schema.
"""
from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.formats.features import attr_value
from pipeline.core.files import written_whole
from pipeline.models import mapper as mappers
from pipeline.models.mapper import count_parameters
from pipeline.models.pretrained import PIN_FILE, ModelError
from pipeline.models.prompt import RetrievalSettings, left_pack, positions

CONFIG_NAME = "captioner.json"
MAPPER_WEIGHTS = "mapper.safetensors"
GPT_SUBDIR = "gpt"
CLIP_SUBDIR = "clip"
FORMAT_VERSION = 2
# Feature attributes a model must be fed again at generate/caption time.
FEATURE_KEYS = ("model_id", "model_revision", "output", "normalized")


class TokenLimits:
    """What decoding reads of a captioner besides its tensors: EOS and pad ids, GPT-2's
    positions and the caption room after the prefix. Shared by ``ClipCaptioner`` and
    the ONNX Runtime captioner; needs ``tokenizer``, ``gpt.config`` and ``prefix_length``."""

    tokenizer: Any
    gpt: Any
    prefix_length: int

    @property
    def eos_token_id(self) -> int:
        return int(self.tokenizer.eos_token_id)

    @property
    def pad_token_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return int(pad if pad is not None else self.tokenizer.eos_token_id)

    @property
    def max_positions(self) -> int:
        return gpt_positions(self.gpt.config)

    @property
    def prompt_room(self) -> int:
        """Positions reserved for a retrieval prompt (0 without retrieval)."""
        return 0

    @property
    def caption_room(self) -> int:
        """Caption tokens that fit GPT-2's positions after the prefix (and the longest prompt)."""
        return room_after_prefix(self.gpt.config, self.prefix_length) - self.prompt_room


class ClipCaptioner(TokenLimits, nn.Module):
    def __init__(
        self,
        mapper: nn.Module,
        gpt: nn.Module,
        tokenizer: Any,
        features: Optional[dict] = None,
        finetune_gpt: bool = False,
        gpt_source: Optional[dict] = None,
        retrieval: Optional[RetrievalSettings] = None,
    ) -> None:
        super().__init__()
        eos_id(tokenizer)
        if mapper.config.width != int(gpt.config.hidden_size):
            raise ModelError(f"mapper width {mapper.config.width} does not match GPT-2's n_embd "
                             f"{gpt.config.hidden_size}")
        self.clip_dim = int(mapper.config.clip_dim)
        self.prefix_length = int(mapper.config.prefix_length)
        self.mapper = mapper
        self.gpt = gpt
        self.tokenizer = tokenizer
        self.features = dict(features or {})
        # Where GPT-2 came from: the pin of its folder (model id, resolved revision, sha256).
        self.gpt_source = dict(gpt_source or {})
        if finetune_gpt and mapper.freezes_gpt:
            raise ModelError(f"mapper type {mapper.kind} keeps GPT-2 frozen; it cannot be fine-tuned")
        self.finetune_gpt = finetune_gpt
        # The prompt of retrieved captions it reads (k=0: none, the plain captioner).
        self.retrieval = retrieval or RetrievalSettings()
        self._prompt_room = self.retrieval.max_tokens(tokenizer)
        if self.retrieval.k > 0 and self.caption_room < 2:
            raise ModelError(f"GPT-2's {self.max_positions} positions leave {self.caption_room} for the caption after "
                             f"the prefix ({self.prefix_length}) and the longest prompt of {self.retrieval.k} "
                             f"captions ({self._prompt_room}); lower retrieval.k or retrieval.max_caption_tokens")
        # A frozen GPT-2 gets no gradients and stays in eval mode (no dropout).
        self.gpt.requires_grad_(finetune_gpt)
        self.train(self.training)

    @classmethod
    def from_settings(cls, mapper_settings: Mapping[str, Any], clip_dim: int, gpt: nn.Module, tokenizer: Any,
                      features: Optional[dict] = None, finetune_gpt: bool = False,
                      gpt_source: Optional[dict] = None,
                      retrieval: Optional[RetrievalSettings] = None) -> "ClipCaptioner":
        """A new captioner (random mapper) from the params' ``mapper`` section as a mapping."""
        config = mappers.make_config(mapper_settings, clip_dim, int(gpt.config.hidden_size), gpt.config)
        mapper = mappers.build_mapper(str(mapper_settings["type"]), config)
        return cls(mapper, gpt, tokenizer, features=features, finetune_gpt=finetune_gpt, gpt_source=gpt_source,
                   retrieval=retrieval)

    # ----------------------------------------------------------------- properties
    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def train(self, mode: bool = True) -> "ClipCaptioner":
        super().train(mode)
        if not self.finetune_gpt:
            self.gpt.eval()
        return self

    @property
    def prompt_room(self) -> int:
        return self._prompt_room

    @property
    def feature_dataset(self) -> str:
        """The feature shards' dataset this model reads: ``patch_tokens`` [N, T, D] or ``embeddings`` [N, D]."""
        return "patch_tokens" if self.mapper.patch_tokens else "embeddings"

    # -------------------------------------------------------------------- compute
    def attending(self, features: torch.Tensor):
        """A context in which GPT-2 attends to ``features`` (a cross-attention mapper's patch
        tokens, one row per image); nothing for prefix mappers."""
        if not self.mapper.patch_tokens:
            return contextlib.nullcontext()
        return self.mapper.attached(self.gpt, features.to(self.device))

    def prefix(self, clip_vectors: torch.Tensor) -> torch.Tensor:
        """[B, clip_dim] -> [B, prefix_length, n_embd] in GPT-2's dtype."""
        dtype = self.gpt.get_input_embeddings().weight.dtype
        return self.mapper(clip_vectors.to(next(self.mapper.parameters()).dtype)).to(dtype)

    def prompt_ids(self, captions: Sequence[Sequence[str]]) -> list[list[int]]:
        """Each image's prompt ids from its retrieved captions."""
        return self.retrieval.token_ids(self.tokenizer, captions)

    def context(self, clip_vectors: torch.Tensor, prompt: Optional[tuple[torch.Tensor, torch.Tensor]] = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """What GPT-2 reads before the caption: the prefix and, when given, the prompt ([B, L] ids and
        mask, left-padded), left-padded as a whole: embeddings [B, C, width] and mask [B, C]."""
        prefix = self.prefix(clip_vectors)
        mask = torch.ones(prefix.shape[:2], dtype=torch.long, device=prefix.device)
        if prompt is None:
            return prefix, mask
        ids, prompt_mask = (t.to(prefix.device) for t in prompt)
        embeds = torch.cat([prefix, self.gpt.get_input_embeddings()(ids).to(prefix.dtype)], dim=1)
        return left_pack(embeds, torch.cat([mask, prompt_mask.long()], dim=1))

    def forward(
        self,
        clip_vectors: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        reduction: str = "mean",
        prompt: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
    ) -> torch.Tensor:
        """Cross-entropy of the caption tokens (EOS included) given the prefix.

        ``input_ids`` [B, T] are right-padded; positions where ``attention_mask`` is 0
        are ignored whatever their ids. ``reduction="sum"`` gives the summed token loss
        (for token-weighted means across batches and processes); ``"tokens"`` gives
        ``token_logprobs`` instead (SCST: through ``forward``, so DDP sees the call).
        ``prompt``: a retrieval captioner's prompt ids and mask [B, L] (left-padded); they are
        read, never predicted: the loss covers the caption tokens only.
        """
        if reduction == "tokens":
            return self.token_logprobs(clip_vectors, input_ids, attention_mask, prompt)
        real = attention_mask.bool()
        logits = self._real_token_logits(clip_vectors, input_ids, attention_mask, prompt)
        return F.cross_entropy(logits.float(), input_ids[real], reduction=reduction)

    def token_logprobs(self, clip_vectors: torch.Tensor, input_ids: torch.Tensor,
                       attention_mask: torch.Tensor,
                       prompt: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
        """[B, T] log-probability of each caption token given the prefix and the tokens before
        it (0 where ``attention_mask`` is 0): what self-critical training weighs by the reward."""
        real = attention_mask.bool()
        logits = self._real_token_logits(clip_vectors, input_ids, attention_mask, prompt).float()
        picked = logits.gather(-1, input_ids[real].unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)
        return torch.zeros(input_ids.shape, dtype=picked.dtype, device=picked.device).masked_scatter(real, picked)

    def _real_token_logits(self, clip_vectors: torch.Tensor, input_ids: torch.Tensor,
                           attention_mask: torch.Tensor,
                           prompt: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
        """[N, vocab] logits predicting the N real caption tokens, GPT-2 reading ``cat(context, tokens)``
        (the context: the prefix, or the left-padded prefix and prompt)."""
        context, context_mask = self.context(clip_vectors, prompt)
        tokens = self.gpt.get_input_embeddings()(input_ids)
        k = context.shape[1]
        embeds = torch.cat([context.to(tokens.dtype), tokens], dim=1)
        mask = torch.cat([context_mask.to(attention_mask.dtype), attention_mask], dim=1)
        # Without a prompt there is no padding before the caption: GPT-2's own positions (today's model).
        position_ids = None if prompt is None else positions(mask)
        with self.attending(clip_vectors):
            hidden = self.gpt.base_model(inputs_embeds=embeds, attention_mask=mask,
                                         position_ids=position_ids).last_hidden_state
        # Position K-1+i predicts caption token i (K: the context's width). Only the real tokens' states go through
        # the LM head, packed into one contiguous [N, width] matrix: padding costs nothing,
        # and a strided slice would send GPT-2's 50,257-row head down torch's slow
        # batched-matmul path (6x slower at real size on a CPU).
        return self.gpt.get_output_embeddings()(hidden[:, k - 1:-1][attention_mask.bool()])

    def decode(self, ids: torch.Tensor) -> list[str]:
        """Token ids -> caption strings, cut at the first EOS, stripped."""
        texts = []
        for row in ids.tolist():
            if self.eos_token_id in row:
                row = row[: row.index(self.eos_token_id)]
            texts.append(self.tokenizer.decode(row, skip_special_tokens=True).strip())
        return texts

    # ---------------------------------------------------------------- tokenizing
    def encode_caption(self, caption: str, max_tokens: int) -> list[int]:
        """Caption -> token ids ending with EOS, at most ``max_tokens`` long (EOS kept)."""
        return tokenize_captions(self.tokenizer, [caption], max_tokens)[0]

    # -------------------------------------------------------------------- saving
    def config_dict(self) -> dict:
        return {
            "format_version": FORMAT_VERSION,
            "mapper": mappers.config_dict(self.mapper),
            "clip_dim": self.clip_dim,
            "prefix_length": self.prefix_length,
            "finetune_gpt": self.finetune_gpt,
            "features": self.features,
            "gpt_source": self.gpt_source,
            "retrieval": self.retrieval.to_dict(),
            "params_trainable": count_parameters(self, trainable_only=True),
            "params_total": count_parameters(self),
        }

    def save(self, model_dir: str | Path, clip_dir: str | Path | None = None) -> Path:
        """Write the self-sufficient model folder (temporary name, renamed when whole).

        ``clip_dir``: the pinned CLIP folder that made the training features; it is
        checked against the recorded encoder and copied into ``clip/``.
        """
        from safetensors.torch import save_file

        model_dir = Path(model_dir)
        if model_dir.exists() and any(model_dir.iterdir()) and not (model_dir / CONFIG_NAME).exists():
            raise ModelError(f"{model_dir}: exists and is not a captioner folder; refusing to replace it")
        config = self.config_dict()
        if clip_dir is not None:
            config["clip"] = {"dir": CLIP_SUBDIR, **check_clip_folder(Path(clip_dir), self.features)}
        with written_whole(model_dir) as tmp:
            state = {k: v.detach().float().cpu().contiguous() for k, v in self.mapper.state_dict().items()}
            save_file(state, str(tmp / MAPPER_WEIGHTS), metadata={"format": "pt"})
            # (imported here: the decoding settings need the params schema, hence pydantic, which
            # building and training a captioner do not; the GPU check's model-only part runs without)
            from pipeline.models.decoding_config import generation_config, model_defaults, save_generation_config

            # GPT-2's own generation_config.json says the same as the folder's.
            decoding = model_defaults(self.caption_room)
            self.gpt.generation_config = generation_config(decoding, self.eos_token_id, self.pad_token_id)
            self.gpt.save_pretrained(tmp / GPT_SUBDIR, safe_serialization=True)
            self.tokenizer.save_pretrained(tmp / GPT_SUBDIR)
            save_generation_config(decoding, tmp, self.eos_token_id, self.pad_token_id)
            if clip_dir is not None:
                # A copy, not a path: the folder must caption after being moved or shipped alone.
                shutil.copytree(clip_dir, tmp / CLIP_SUBDIR, ignore=shutil.ignore_patterns(".*"))
                # The pin travels with the copy, so the copy keeps the identity the features recorded.
                pin = {k: v for k, v in config["clip"].items() if k != "dir"}
                if not (tmp / CLIP_SUBDIR / PIN_FILE).exists():
                    (tmp / CLIP_SUBDIR / PIN_FILE).write_text(json.dumps(pin, indent=2, sort_keys=True) + "\n")
            (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        return model_dir

    @classmethod
    def load(cls, model_dir: str | Path, device: str | torch.device = "cpu") -> "ClipCaptioner":
        """Load a folder written by ``save`` (safetensors only, no remote code)."""
        from safetensors.torch import load_file

        from pipeline.models.pretrained import load_gpt

        model_dir = Path(model_dir)
        cfg_path = model_dir / CONFIG_NAME
        if not cfg_path.is_file():
            raise ModelError(f"{model_dir}: not a trained captioner folder (no {CONFIG_NAME}); `capline train` "
                             "writes one (data/model_xe), `capline scst` the final one (data/model)")
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
                    finetune_gpt=bool(cfg.get("finetune_gpt", False)), gpt_source=cfg.get("gpt_source"),
                    retrieval=RetrievalSettings.from_dict(cfg.get("retrieval")))
        model.model_dir = model_dir
        from pipeline.models.decoding_config import generation_config, load_decoding, model_defaults

        # Decoding defaults come from the captioner's folder, never from GPT-2's own file.
        decoding = load_decoding(model_dir) or model_defaults(model.caption_room)
        model.gpt.generation_config = generation_config(decoding, model.eos_token_id, model.pad_token_id)
        return model.to(device).eval()

    @property
    def clip_dir(self) -> Optional[Path]:
        """The CLIP folder saved with this model (None for a model trained without one)."""
        folder = getattr(self, "model_dir", None)
        return folder / CLIP_SUBDIR if folder is not None and (folder / CLIP_SUBDIR).is_dir() else None

    def check_features(self, attrs: dict, dim: int, source: str) -> None:
        """Refuse features from another encoder than the one this model was trained on."""
        from pipeline.formats.features import FeatureShardError

        if dim != self.clip_dim:
            if self.mapper.patch_tokens:
                raise FeatureShardError(f"{source}: patch tokens {dim} wide but the model was trained on "
                                        f"{self.clip_dim}")
            raise FeatureShardError(f"{source}: feature dim {dim} but the model was trained on dim {self.clip_dim}")
        for key in FEATURE_KEYS:
            want, got = self.features.get(key), attrs.get(key)
            if want is not None and got is not None and attr_value(want) != attr_value(got):
                raise FeatureShardError(f"{source}: feature attribute {key} is {got!r} but the model was trained on {want!r}")

    def feature_expectation(self) -> dict:
        """The ``expect`` mapping for ``load_features``."""
        return {k: self.features[k] for k in FEATURE_KEYS if self.features.get(k) is not None}


def retrieval_k(model_dir: str | Path) -> int:
    """The retrieved captions per image a model folder reads (0: none, or no captioner folder)."""
    try:
        return int(json.loads((Path(model_dir) / CONFIG_NAME).read_text()).get("retrieval", {}).get("k", 0))
    except (OSError, ValueError, AttributeError, TypeError):
        return 0


def gpt_positions(config: Any) -> int:
    """GPT-2's positions (prefix + caption) from its config: the one place that reads them."""
    return int(getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", 1024))


def room_after_prefix(config: Any, prefix_length: int) -> int:
    """Caption tokens that fit GPT-2's positions after a prefix of ``prefix_length``."""
    return gpt_positions(config) - prefix_length


def eos_id(tokenizer: Any) -> int:
    """The tokenizer's EOS id; a ModelError when it has none (captions could never end)."""
    if tokenizer.eos_token_id is None:
        raise ModelError("the GPT-2 tokenizer has no EOS token; captions could never end")
    return int(tokenizer.eos_token_id)


def tokenize_captions(tokenizer: Any, captions: Sequence[str], max_tokens: int) -> list[list[int]]:
    """The one caption tokeniser: ids of each (stripped) caption ending with EOS, at most
    ``max_tokens`` long (EOS kept), in one batched tokenizer call."""
    if not captions:
        return []
    eos = eos_id(tokenizer)
    ids = tokenizer([c.strip() for c in captions], add_special_tokens=False)["input_ids"]
    keep = max(0, max_tokens - 1)
    return [list(row[:keep]) + [eos] for row in ids]


def check_clip_folder(clip_dir: Path, features: Mapping[str, Any]) -> dict:
    """The pin of ``clip_dir`` if it is the encoder that made ``features``; else a ModelError naming both."""
    from pipeline.models.openclip import is_open_clip_folder
    from pipeline.models.pretrained import model_identity, read_pin

    if not (clip_dir / "config.json").is_file() and not is_open_clip_folder(clip_dir):
        raise ModelError(f"clip folder {clip_dir}: no config.json (missing or not a pinned model folder; "
                         "run `capline models clip`)")
    model_id, revision = model_identity(clip_dir)
    for key, got in (("model_id", model_id), ("model_revision", revision)):
        want = features.get(key)
        if want is not None and attr_value(want) != got:
            raise ModelError(f"clip folder {clip_dir}: {key} is {got!r} but the features were made by {want!r}")
    pin = read_pin(clip_dir)
    return {k: pin[k] for k in ("model_id", "revision", "sha256")}
