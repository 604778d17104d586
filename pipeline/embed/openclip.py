"""open_clip models in the embed path: their preprocessing and their encoder, with the
interfaces of ``Preprocessor`` and ``Encoder``, which hand open_clip folders to them.

``OpenClipPreprocessor`` repeats open_clip's eval transform (Resize of the shorter side
as torchvision computes it, PIL resize with the transform's interpolation, CenterCrop
with torchvision's rounding, ``convert('RGB')``, ToTensor, Normalize) in PIL and numpy,
so decode workers never import torchvision: uint8 crops in the workers, ``/255`` and
Normalize of whole batches on the device, which equals ``preprocess(image)`` exactly.
``fast`` mode adds JPEG draft decoding before the resize, as for Hugging Face CLIPs.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch
from PIL import Image

from pipeline.core.runtime import dtype_of
from pipeline.embed.decode import ImageDecodeError, load_image
from pipeline.models.openclip import RESAMPLE, OpenClip, OpenClipTransform
from pipeline.models.pretrained import ModelError


@dataclass(frozen=True)
class OpenClipPreprocessor:
    mode: str  # "processor" | "fast"
    size: int
    interpolation: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    max_pixels: int

    @classmethod
    def from_transform(cls, transform: OpenClipTransform, mode: str = "processor",
                       max_pixels: Optional[int] = None) -> "OpenClipPreprocessor":
        return cls(mode=mode, size=transform.size, interpolation=transform.interpolation, mean=transform.mean,
                   std=transform.std, max_pixels=int(max_pixels or Image.MAX_IMAGE_PIXELS or 89_478_485))

    def describe(self) -> str:
        """The settings as JSON, for the feature shards' ``preprocess`` attribute."""
        return json.dumps({"library": "open_clip", "mode": self.mode, "resize_mode": "shortest",
                           "size": self.size, "crop": [self.size, self.size], "interpolation": self.interpolation,
                           "mean": list(self.mean), "std": list(self.std)}, sort_keys=True)

    # ---------------------------------------------------------------- in workers
    def _target(self, w: int, h: int) -> tuple[int, int]:
        """(width, height) after torchvision's Resize(size) of the shorter side."""
        short, long = (w, h) if w <= h else (h, w)
        new_long = int(self.size * long / short)
        return (self.size, new_long) if w <= h else (new_long, self.size)

    def decode(self, data: bytes) -> Image.Image:
        """Bytes to a decoded PIL image in its own mode (open_clip converts to RGB after the crop)."""
        return load_image(data, self.max_pixels, self._target if self.mode == "fast" else None)

    def to_uint8(self, data: bytes) -> torch.Tensor:
        """Decode, resize, center-crop and convert to a [3, size, size] uint8 tensor."""
        im = self.decode(data)
        try:
            target = self._target(*im.size)
            if target != im.size:
                im = im.resize(target, resample=RESAMPLE[self.interpolation])
            w, h = im.size  # both >= size after the resize
            top, left = int(round((h - self.size) / 2.0)), int(round((w - self.size) / 2.0))
            im = im.crop((left, top, left + self.size, top + self.size)).convert("RGB")
            arr = np.asarray(im)
            return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))
        except Exception as err:  # one image's failure is its status line, never the run's end
            raise ImageDecodeError(f"cannot preprocess image: {type(err).__name__}: {err}") from None

    # ---------------------------------------------------------- on the device
    def normalize(self, batch: torch.Tensor) -> torch.Tensor:
        """uint8 [B, 3, H, W] to float32 pixel values: ToTensor's /255, then Normalize."""
        x = batch.to(torch.float32).div(255)
        mean = torch.tensor(self.mean, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
        return x.sub(mean).div(std)


@dataclass
class OpenClipEncoder:
    """Pixel batches to ``encode_image`` vectors (image_embeds: the projected embedding)."""

    model: Any  # open_clip.CLIP
    device: torch.device
    precision: str
    output: str
    normalize: bool
    dim: int

    @classmethod
    def build(cls, clip: OpenClip, device: torch.device, precision: str, output: str,
              normalize: bool) -> "OpenClipEncoder":
        if output != "image_embeds":
            raise ModelError(f"clip folder {clip.folder}: output {output!r}: open_clip models give image_embeds "
                             "(encode_image) only")
        model = clip.model.to(device=device, dtype=dtype_of(precision)).eval()
        return cls(model=model, device=device, precision=precision, output=output, normalize=normalize,
                   dim=clip.embed_dim)

    @torch.inference_mode()
    def __call__(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = pixel_values.to(self.device, dtype=dtype_of(self.precision), non_blocking=True)
        out = self.model.encode_image(x).float()
        if self.normalize:
            out = torch.nn.functional.normalize(out, dim=-1)
        return out

    def encode(self, pixel_values: torch.Tensor, patch_tokens: bool = False
               ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """As ``Encoder.encode``; open_clip's towers give no patch tokens here."""
        if patch_tokens:
            raise ModelError("clip.patch_tokens: open_clip models give no patch tokens here; only transformers "
                             "CLIP models do (set clip.patch_tokens: false and use a prefix mapper)")
        return self(pixel_values), None
