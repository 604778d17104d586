"""Untrusted bytes are opened only as the raster formats datasets hold."""
import io

import pytest
from PIL import Image, UnidentifiedImageError

from pipeline.download.errors import RecordFailure
from pipeline.download.image import process_image
from pipeline.imaging import open_image

# A minimal EPS file: Pillow's EPS plugin would hand it to Ghostscript to render.
EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n%%EndComments\nshowpage\n"


def test_eps_is_refused_everywhere():
    # Unrestricted, Pillow accepts it; that is what open_image must not do.
    assert Image.open(io.BytesIO(EPS)).format == "EPS"
    with pytest.raises(UnidentifiedImageError):
        open_image(EPS)
    with pytest.raises(RecordFailure) as err:
        process_image(EPS, max_pixels=10_000)
    assert err.value.status == "not_an_image"


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF"])
def test_dataset_formats_open(fmt):
    buf = io.BytesIO()
    Image.new("RGB", (6, 4), (200, 10, 10)).save(buf, format=fmt)
    with open_image(buf.getvalue()) as im:
        assert im.format == fmt and im.size == (6, 4)
