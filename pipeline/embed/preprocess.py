"""CLIP preprocessing split in two: decode+resize+crop to uint8 in the DataLoader
workers, rescale+normalize of whole batches on the model's device.

``processor`` mode repeats the model's own CLIPImageProcessor (PIL backend: white
background under transparency, PIL bicubic resize of the shorter edge, center crop
with zero padding, rescale, normalize) step for step, so its fp32 embeddings equal
the reference path's. Sending uint8 instead of float32 moves 4x fewer bytes through
shared memory, pinned buffers and the host-to-device copy.

``fast`` mode lets libjpeg decode at 1/2, 1/4 or 1/8 scale (PIL draft mode) when the
image is at least twice the target size, which skips most of the decode and resize
work; its agreement with ``processor`` is measured in docs/embed.md.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch
from PIL import Image

from pipeline.embed.decode import ImageDecodeError, TooManyPixels, load_image  # noqa: F401  (re-exported)
from pipeline.models.openclip import OpenClipTransform
from pipeline.models.pretrained import ModelError
from pipeline.core.errors import ParamsError


def _size_of(value: Any) -> dict:
    if isinstance(value, int):
        return {"height": value, "width": value}
    return dict(value or {})


@dataclass(frozen=True)
class Preprocessor:
    mode: str  # "processor" | "fast"
    shortest_edge: Optional[int]
    resize_hw: Optional[tuple[int, int]]  # fixed (height, width) resize, when shortest_edge is None
    crop_hw: Optional[tuple[int, int]]
    resample: int
    rescale: Optional[float]
    mean: Optional[tuple[float, ...]]
    std: Optional[tuple[float, ...]]
    max_pixels: int

    @classmethod
    def from_processor(cls, processor: Any, mode: str = "processor",
                       max_pixels: Optional[int] = None) -> "Preprocessor":
        """Read a CLIPImageProcessor's settings; refuse settings this path cannot repeat.
        An open_clip folder's transform gives its own twin (pipeline/embed/openclip.py)."""
        if mode not in ("processor", "fast"):
            raise ParamsError(f"clip.preprocess: {mode!r} is not one of processor, fast")
        if isinstance(processor, OpenClipTransform):
            from pipeline.embed.openclip import OpenClipPreprocessor

            return OpenClipPreprocessor.from_transform(processor, mode, max_pixels)  # type: ignore[return-value]
        size = _size_of(getattr(processor, "size", None))
        shortest = hw = None
        if getattr(processor, "do_resize", True):
            if size.get("shortest_edge") and not size.get("longest_edge"):
                shortest = int(size["shortest_edge"])
            elif size.get("height") and size.get("width"):
                hw = (int(size["height"]), int(size["width"]))
            else:
                raise ModelError(f"clip model: its image processor size {size} is not supported")
        crop = None
        if getattr(processor, "do_center_crop", False):
            c = _size_of(processor.crop_size)
            crop = (int(c["height"]), int(c["width"]))
        if not getattr(processor, "do_convert_rgb", True):
            raise ModelError("clip model: image processors with do_convert_rgb=False are not supported")
        resample = getattr(processor, "resample", None)
        resample = int(resample) if resample is not None else int(Image.Resampling.BILINEAR)
        mean = std = None
        if getattr(processor, "do_normalize", True):
            mean, std = tuple(map(float, processor.image_mean)), tuple(map(float, processor.image_std))
        rescale = float(processor.rescale_factor) if getattr(processor, "do_rescale", True) else None
        return cls(mode=mode, shortest_edge=shortest, resize_hw=hw, crop_hw=crop, resample=resample,
                   rescale=rescale, mean=mean, std=std,
                   max_pixels=int(max_pixels or Image.MAX_IMAGE_PIXELS or 89_478_485))

    def describe(self) -> str:
        """The settings as JSON, for the feature shards' ``preprocess`` attribute."""
        return json.dumps({
            "mode": self.mode, "shortest_edge": self.shortest_edge,
            "resize": list(self.resize_hw) if self.resize_hw else None,
            "crop": list(self.crop_hw) if self.crop_hw else None, "resample": self.resample,
            "rescale": self.rescale, "mean": list(self.mean) if self.mean else None,
            "std": list(self.std) if self.std else None,
        }, sort_keys=True)

    # ---------------------------------------------------------------- in workers
    def _target(self, w: int, h: int) -> tuple[int, int]:
        """(width, height) after resize, as transformers' get_resize_output_image_size."""
        if self.shortest_edge is None:
            if self.resize_hw is None:
                return w, h
            return self.resize_hw[1], self.resize_hw[0]
        s = self.shortest_edge
        if w <= h:
            return s, int(s * h / w)
        return int(s * w / h), s

    def decode(self, data: bytes) -> Image.Image:
        """Bytes to an RGB PIL image; any failure becomes ImageDecodeError."""
        im = load_image(data, self.max_pixels, self._target if self.mode == "fast" else None)
        try:
            if "A" in im.getbands() or im.info.get("transparency") is not None:
                im = im.convert("RGBA")
                white = Image.new("RGBA", im.size, (255, 255, 255, 255))
                return Image.alpha_composite(white, im).convert("RGB")
            return im.convert("RGB")
        except Exception as err:
            raise ImageDecodeError(f"cannot decode image: {type(err).__name__}: {err}") from None

    def to_uint8(self, data: bytes) -> torch.Tensor:
        """Decode, resize and center-crop to a [3, H, W] uint8 tensor; any failure is ImageDecodeError."""
        im = self.decode(data)
        try:
            if self.shortest_edge is not None or self.resize_hw is not None:
                tw, th = self._target(*im.size)
                if (tw, th) != im.size:
                    im = im.resize((tw, th), resample=self.resample)
            arr = np.asarray(im)
            if self.crop_hw is not None:
                arr = _center_crop(arr, *self.crop_hw)
            return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))
        except Exception as err:  # one image's failure is its status line, never the run's end
            raise ImageDecodeError(f"cannot preprocess image: {type(err).__name__}: {err}") from None

    # ---------------------------------------------------------- on the device
    def normalize(self, batch: torch.Tensor) -> torch.Tensor:
        """uint8 [B, 3, H, W] to float32 pixel values, on whatever device batch is on."""
        x = batch.to(torch.float32)
        if self.rescale is not None:
            x = x * self.rescale
        if self.mean is not None and self.std is not None:
            mean = torch.tensor(self.mean, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
            std = torch.tensor(self.std, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
            x = (x - mean) / std
        return x


def _center_crop(arr: np.ndarray, ch: int, cw: int) -> np.ndarray:
    """Center crop [H, W, C], zero-padding an image smaller than the crop (as HF does)."""
    h, w = arr.shape[:2]
    top, left = (h - ch) // 2, (w - cw) // 2
    if top >= 0 and left >= 0 and top + ch <= h and left + cw <= w:
        return arr[top:top + ch, left:left + cw]
    nh, nw = max(ch, h), max(cw, w)
    padded = np.zeros((nh, nw, arr.shape[2]), dtype=arr.dtype)
    tp, lp = -(-(nh - h) // 2), -(-(nw - w) // 2)
    padded[tp:tp + h, lp:lp + w] = arr
    top, left = (nh - ch) // 2, (nw - cw) // 2
    return padded[top:top + ch, left:left + cw]
