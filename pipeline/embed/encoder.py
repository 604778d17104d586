"""The CLIP vision encoder as the embed stage uses it: a model loaded from a pinned
folder (pipeline.models.pretrained), run batched in the chosen precision under
inference_mode."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from pipeline.core.runtime import dtype_of


@dataclass
class Encoder:
    """Pixel batches (already normalized, on device) to one vector per image."""

    model: Any
    device: torch.device
    precision: str
    output: str  # "image_embeds" | "pooler_output"
    normalize: bool

    @classmethod
    def build(cls, model: Any, device: torch.device, precision: str, output: str, normalize: bool) -> "Encoder":
        from pipeline.models.openclip import OpenClip

        if isinstance(model, OpenClip):  # an open_clip folder: its own encode_image
            from pipeline.embed.openclip import OpenClipEncoder

            return OpenClipEncoder.build(model, device, precision, output, normalize)  # type: ignore[return-value]
        model = model.to(device=device, dtype=dtype_of(precision)).eval()
        return cls(model=model, device=device, precision=precision, output=output, normalize=normalize)

    @property
    def dim(self) -> int:
        cfg = self.model.config
        return int(cfg.projection_dim if self.output == "image_embeds" else cfg.hidden_size)

    @torch.inference_mode()
    def __call__(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = pixel_values.to(self.device, dtype=dtype_of(self.precision), non_blocking=True)
        pooled = self.model.vision_model(pixel_values=x).pooler_output
        out = self.model.visual_projection(pooled) if self.output == "image_embeds" else pooled
        out = out.float()
        if self.normalize:
            out = torch.nn.functional.normalize(out, dim=-1)
        return out
