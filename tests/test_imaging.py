"""Untrusted bytes are opened only as the raster formats Pillow decodes by itself."""
import io

import pytest
from PIL import Image, UnidentifiedImageError, features

from pipeline.download.errors import RecordFailure
from pipeline.download.image import process_image
from pipeline.formats.image_shards import IMAGE_EXTENSIONS
from pipeline.formats.imaging import ACCEPT, IMAGE_FORMATS, IMAGE_MIME_TYPES, open_image
from tests.helpers.images import EPS, SVG, tiff_raising_type_error



def encode(fmt: str, mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (6, 4), 1 if mode == "1" else (200, 10, 10)).save(buf, format=fmt)
    return buf.getvalue()


def test_eps_is_refused_everywhere():
    # Unrestricted, Pillow accepts it; that is what open_image must not do.
    assert Image.open(io.BytesIO(EPS)).format == "EPS"
    with pytest.raises(UnidentifiedImageError):
        open_image(EPS)
    with pytest.raises(RecordFailure) as err:
        process_image(EPS, max_pixels=10_000)
    assert err.value.status == "not_an_image"


@pytest.mark.parametrize("name", ["svg", "pdf", "tga"])
def test_non_raster_and_unsigned_formats_are_refused(name):
    data = {"svg": SVG, "pdf": encode("PDF"), "tga": encode("TGA")}[name]
    if name == "tga":  # no signature: Pillow would try it on any bytes
        assert Image.open(io.BytesIO(data)).format == "TGA"
    with pytest.raises(UnidentifiedImageError):
        open_image(data)


# Every allowed format that Pillow can also write (PSD and XPM it only reads).
WRITABLE = [(f, "1" if f == "XBM" else "RGB") for f in IMAGE_FORMATS if f in Image.SAVE]


@pytest.mark.parametrize("fmt,mode", WRITABLE)
def test_allowed_formats_open(fmt, mode):
    with open_image(encode(fmt, mode)) as im:
        assert im.format == fmt
        assert im.size == (6, 4) or fmt == "ICNS"  # icons come in fixed sizes
        im.load()


def test_avif_is_allowed_where_pillow_decodes_it():
    assert ("AVIF" in IMAGE_FORMATS) == features.check("avif")
    assert {"JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF"} <= set(IMAGE_FORMATS)
    assert "avif" in IMAGE_EXTENSIONS or not features.check("avif")
    assert IMAGE_EXTENSIONS[0] == "jpg"


def test_accept_header_lists_exactly_the_decoded_formats():
    listed = ACCEPT.split(",")
    assert listed == list(IMAGE_MIME_TYPES)
    assert set(listed) == {Image.MIME[f] for f in IMAGE_FORMATS}
    assert all(t.startswith("image/") and ";" not in t for t in listed)  # no */*, no q-values
    assert {"image/jpeg", "image/png", "image/webp"} <= set(listed)
    assert ("image/avif" in listed) == features.check("avif")
    assert "application/postscript" not in listed and "image/svg+xml" not in listed


def test_report_thumbnail_of_an_image_raising_anything_is_left_out():
    from pipeline.evaluate.report import thumbnail_uri

    assert thumbnail_uri(tiff_raising_type_error(), 32) is None  # Pillow raises TypeError on it
    assert thumbnail_uri(encode("PNG"), 32).startswith("data:image/jpeg;base64,")
