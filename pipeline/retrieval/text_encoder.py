"""The pinned CLIP's text tower, as the datastore encodes captions with it: batches
in fp32 under inference_mode, each vector L2-normalised (cosine = inner product).
A transformers CLIP folder or an open_clip one (both loaded by ``load_clip_text``,
as CLIPScore loads them)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch


@dataclass
class TextEncoder:
    model: Any  # CLIPTextModelWithProjection, or pipeline.models.openclip.OpenClip
    tokenizer: Any
    device: torch.device
    open_clip: bool

    @classmethod
    def load(cls, clip_dir: Path, device: torch.device) -> "TextEncoder":
        from pipeline.models.openclip import OpenClip
        from pipeline.models.pretrained import load_clip_text

        model, tokenizer = load_clip_text(clip_dir)
        return cls(model.to(device), tokenizer, device, isinstance(model, OpenClip))

    @property
    def dim(self) -> int:
        return self.model.embed_dim if self.open_clip else int(self.model.config.projection_dim)

    @torch.inference_mode()
    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        """[N, D] float32, rows of unit length."""
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        if self.open_clip:  # open_clip's tokenizer pads and cuts at the context length itself
            emb = self.model.model.encode_text(self.tokenizer(list(texts)).to(self.device))
        else:
            limit = int(getattr(self.model.config, "max_position_embeddings", 77))
            enc = self.tokenizer(list(texts), padding=True, truncation=True, max_length=limit,
                                 return_tensors="pt").to(self.device)
            emb = self.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).text_embeds
        return torch.nn.functional.normalize(emb.float(), dim=-1).cpu().numpy()
