"""The pinned CLIP's text tower, as the datastore encodes captions with it: batches
in fp32 under inference_mode, each vector L2-normalised (cosine = inner product)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch


@dataclass
class TextEncoder:
    model: Any
    tokenizer: Any
    device: torch.device
    max_length: int

    @classmethod
    def load(cls, clip_dir: Path, device: torch.device) -> "TextEncoder":
        from pipeline.models.pretrained import load_clip_text

        model, tokenizer = load_clip_text(clip_dir)
        limit = int(getattr(model.config, "max_position_embeddings", 77))
        return cls(model.to(device), tokenizer, device, limit)

    @property
    def dim(self) -> int:
        return int(self.model.config.projection_dim)

    @torch.inference_mode()
    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        """[N, D] float32, rows of unit length."""
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        enc = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length,
                             return_tensors="pt").to(self.device)
        emb = self.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).text_embeds
        return torch.nn.functional.normalize(emb.float(), dim=-1).cpu().numpy()
