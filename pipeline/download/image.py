"""Validating and re-encoding one image: untrusted bytes in, a clean RGB JPEG out.

Full decode (a truncated file fails), a pixel cap checked from the header before
decoding (decompression bombs), EXIF orientation applied, every mode (CMYK, L,
P, alpha, 16-bit) turned into RGB, optional resize of the shorter side, JPEG
re-encode (which also drops metadata such as GPS tags).
"""
from __future__ import annotations

import io
import warnings
from typing import Optional

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from pipeline.download.errors import RecordFailure
from pipeline.formats.imaging import open_image

# We check the pixel count ourselves, before decoding; Pillow's global bomb check
# would otherwise warn or raise with its own limit.
Image.MAX_IMAGE_PIXELS = None
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_WHITE = (255, 255, 255)


def _target_size(w: int, h: int, short_side: int) -> tuple[int, int]:
    scale = short_side / min(w, h)
    return max(1, round(w * scale)), max(1, round(h * scale))


def _to_rgb(im: Image.Image) -> Image.Image:
    mode = im.mode
    if mode == "RGB":
        return im
    if mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
        mode = "RGBA"
    if mode in ("PA",):
        im = im.convert("RGBA")
        mode = "RGBA"
    if mode in _ALPHA_MODES:
        # Transparent pixels become white, as a viewer on a white page shows them.
        rgba = im.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, _WHITE + (255,))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    if mode.startswith("I;16") or mode == "I":
        # 16-bit grey: keep the high byte (0..65535 -> 0..255).
        arr = np.asarray(im).astype(np.int64)
        return Image.fromarray((np.clip(arr, 0, 65535) >> 8).astype(np.uint8), "L").convert("RGB")
    if mode == "F":
        arr = np.asarray(im)
        return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "L").convert("RGB")
    return im.convert("RGB")  # CMYK, YCbCr, L, 1, P, LAB, HSV


def process_image(
    data: bytes, max_pixels: int, resize: Optional[int] = None, quality: int = 95
) -> tuple[bytes, int, int]:
    """Decode, check and re-encode ``data``; return (jpeg bytes, width, height)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            im = open_image(data)
    except UnidentifiedImageError:
        raise RecordFailure("not_an_image", f"not an image Pillow reads ({len(data)} bytes)") from None
    except Exception as err:  # broken headers raise all sorts
        raise RecordFailure("decode_error", f"header: {type(err).__name__}: {err}") from None
    w, h = im.size
    if w < 1 or h < 1:
        raise RecordFailure("decode_error", f"image size {w}x{h}")
    if w * h > max_pixels:
        raise RecordFailure("too_many_pixels", f"{w}x{h} = {w * h} pixels > max_pixels {max_pixels}")
    try:
        if resize and im.format == "JPEG":
            # Let libjpeg decode at 1/2, 1/4 or 1/8 scale when that still covers the
            # target: the biggest saving of the whole stage for large photos.
            im.draft("RGB", _target_size(w, h, resize))
        im.load()
        if im.getexif().get(0x0112, 1) != 1:  # exif_transpose copies even when upright
            im = ImageOps.exif_transpose(im)
        im = _to_rgb(im)
        if resize and min(im.size) != resize:
            # Shrinking: area averaging (BOX, as OpenCV's INTER_AREA that img2dataset
            # uses), free of aliasing and the cheapest filter: ~40% of bicubic's time,
            # about as long as the decode itself. Enlarging: bicubic.
            shrink = min(im.size) > resize
            im = im.resize(_target_size(*im.size, resize),
                           Image.Resampling.BOX if shrink else Image.Resampling.BICUBIC)
        out = io.BytesIO()
        im.save(out, "JPEG", quality=quality)
    except RecordFailure:
        raise
    except Exception as err:  # truncated data, corrupt streams, ...
        raise RecordFailure("decode_error", f"{type(err).__name__}: {err}") from None
    return out.getvalue(), im.size[0], im.size[1]
