"""Untrusted image bytes to a decoded PIL image, or ImageDecodeError naming why not.

Shared by both preprocessors (CLIP's, pipeline/embed/preprocess.py, and open_clip's,
pipeline/embed/openclip.py): the size cap is checked before any pixel is decoded.
"""
from __future__ import annotations

from typing import Callable, Optional

from PIL import Image

from pipeline.core.errors import CaplineError
from pipeline.formats.imaging import open_image


class ImageDecodeError(CaplineError):
    """One image that cannot be used; recorded in the status file, never embedded."""


class TooManyPixels(ImageDecodeError):
    """An image claiming more pixels than the cap (a decompression bomb), refused before decoding."""


def load_image(data: bytes, max_pixels: int,
               draft_to: Optional[Callable[[int, int], tuple[int, int]]] = None) -> Image.Image:
    """Untrusted bytes to a decoded PIL image in its own mode; any failure is ImageDecodeError.

    ``draft_to(w, h)``: the (width, height) the image will be resized to; a JPEG is then
    decoded at the smallest 1/2, 1/4 or 1/8 scale that stays at least that large.
    """
    if not data:
        raise ImageDecodeError("no image in the sample")
    try:
        im = open_image(data)
        w, h = im.size
        # Checked before decoding: a small file can claim billions of pixels.
        if w * h > max_pixels:
            raise TooManyPixels(f"{w}x{h} pixels exceeds the limit of {max_pixels}")
        if w < 1 or h < 1:
            raise ImageDecodeError(f"empty image {w}x{h}")
        if draft_to is not None and im.format == "JPEG":
            # draft keeps the result >= the requested size, so the resize after it
            # still only shrinks.
            im.draft("RGB", draft_to(w, h))
        im.load()
        return im
    except ImageDecodeError:
        raise
    except Image.DecompressionBombError as err:  # Pillow's own check, at twice its pixel limit
        raise TooManyPixels(str(err)) from None
    except Exception as err:
        # Pillow's plugins raise whatever their parsers meet on hostile bytes
        # (TypeError, OverflowError, struct.error, ...): none of it may stop the run.
        raise ImageDecodeError(f"cannot decode image: {type(err).__name__}: {err}") from None
