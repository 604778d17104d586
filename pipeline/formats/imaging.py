"""Opening untrusted image bytes: only raster formats that Pillow decodes by itself.

Pillow identifies dozens of formats. Some hand the file to an external program
(EPS runs Ghostscript when installed), some are stubs that need a handler, some
claim any bytes because they have no signature to check (TGA). Every place that
decodes data from users (download, embed, the report's thumbnails, `capline
caption`) opens images through here, and the fetcher's ``Accept`` header lists
exactly the MIME types of ``IMAGE_FORMATS``: this module is the one allow-list.
"""
from __future__ import annotations

import io

from PIL import Image, features

Image.init()  # registers every plugin, so OPEN, MIME and EXTENSION below are complete

# Raster formats that Pillow decodes in-process, whose opener checks a signature
# before parsing and that have an image/* MIME type (so the fetcher can ask for them).
# Left out: EPS (Ghostscript), TGA and DIB (no or weak signature), MPEG (not an image),
# the stub formats (BUFR, GRIB, HDF5, WMF) and those with no MIME type (QOI, DDS, BLP,
# FITS, ...). Order: most common on the web first (the order of the Accept header).
_CANDIDATES = ("AVIF", "WEBP", "JPEG", "PNG", "GIF", "BMP", "TIFF", "JPEG2000", "ICO", "ICNS", "PSD",
               "PPM", "PCX", "SGI", "XBM", "XPM")
# Formats decoded by a library Pillow may have been built without.
_CODECS = {"AVIF": "avif", "WEBP": "webp", "JPEG": "jpg", "JPEG2000": "jpg_2000"}


def _decodable(fmt: str) -> bool:
    return fmt in Image.OPEN and (fmt not in _CODECS or bool(features.check(_CODECS[fmt])))


# JPEG covers cameras' multi-picture MPO, PNG covers APNG (first frame is used).
IMAGE_FORMATS: tuple[str, ...] = tuple(f for f in _CANDIDATES if _decodable(f))
IMAGE_MIME_TYPES: tuple[str, ...] = tuple(dict.fromkeys(Image.MIME[f] for f in IMAGE_FORMATS))
# The fetcher's Accept header: what a server may send that we can use, nothing else.
ACCEPT = ",".join(IMAGE_MIME_TYPES)
# Member names an image shard may hold images under (extension without the dot), in
# the order a sample with several is read: "jpg" (ours, img2dataset's) first.
_EXTENSIONS = {ext[1:]: f for ext, f in Image.registered_extensions().items() if f in IMAGE_FORMATS}
IMAGE_EXTENSIONS: tuple[str, ...] = tuple(
    sorted(_EXTENSIONS, key=lambda e: (e != "jpg", IMAGE_FORMATS.index(_EXTENSIONS[e]), e)))


def open_image(data: bytes) -> Image.Image:
    """Lazily open ``data``; raises PIL.UnidentifiedImageError for any other format."""
    return Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
