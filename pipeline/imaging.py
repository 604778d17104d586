"""Opening untrusted image bytes: only the raster formats a caption dataset holds.

Pillow identifies dozens of formats, some of which hand the file to an external
program (EPS runs Ghostscript when installed) or parse rarely exercised code. Every
place that decodes data from users (download, embed, the report's thumbnails) opens
images through here.
"""
from __future__ import annotations

import io

from PIL import Image

# Formats of photos on the web and in datasets (JPEG covers cameras' multi-picture MPO).
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")


def open_image(data: bytes) -> Image.Image:
    """Lazily open ``data``; raises PIL.UnidentifiedImageError for any other format."""
    return Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
