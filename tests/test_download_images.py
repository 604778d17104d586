"""Every image kind is decoded to the right RGB pixels (served over loopback HTTP)."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image, features

from pipeline.download.run import download_records
from pipeline.download.image import process_image
from pipeline.download.errors import RecordFailure
from pipeline.formats.imaging import IMAGE_FORMATS
from pipeline.core.params import DownloadParams
from pipeline.formats.records import Record
from tests.helpers.images import EPS, SVG, decoded, encode, exif_rotated_jpeg, jpeg, photo, read_status, read_tar, solid
from tests.helpers.loopback import Reply


def _palette() -> bytes:
    im = Image.new("P", (32, 24), 1)
    im.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    return encode(im, "PNG")


def _alpha() -> bytes:
    arr = np.zeros((24, 32, 4), np.uint8)
    arr[:, :16] = (0, 0, 255, 255)  # opaque blue
    arr[:, 16:] = (255, 0, 0, 0)  # fully transparent (its red must not show)
    return encode(Image.fromarray(arr, "RGBA"), "PNG")


def _gray16() -> bytes:
    return encode(Image.fromarray(np.full((24, 32), 0xC000, np.uint16)), "PNG")


# name -> (bytes, expected colour of the left half, of the right half)
KINDS = {
    "cmyk_jpeg": (encode(solid((0, 255, 255, 0), mode="CMYK"), "JPEG", quality=95), (255, 0, 0), (255, 0, 0)),
    "gray_png": (encode(solid(128, mode="L"), "PNG"), (128, 128, 128), (128, 128, 128)),
    "palette_png": (_palette(), (10, 200, 30), (10, 200, 30)),
    "alpha_png": (_alpha(), (0, 0, 255), (255, 255, 255)),
    "gray16_png": (_gray16(), (192, 192, 192), (192, 192, 192)),
    "progressive_jpeg": (encode(solid((200, 100, 50)), "JPEG", quality=95, progressive=True), (200, 100, 50), (200, 100, 50)),
    "webp": (encode(solid((30, 60, 220)), "WEBP", lossless=True), (30, 60, 220), (30, 60, 220)),
}


def _mean(arr: np.ndarray) -> np.ndarray:
    return arr.reshape(-1, 3).mean(0)


@pytest.fixture(scope="module")
def fetched(tmp_path_factory, module_loopback):
    """All kinds fetched in one run through the image processes; key -> (status, jpeg, meta)."""
    out = tmp_path_factory.mktemp("kinds")
    srv = module_loopback
    recs = [Record(name, srv.route(f"/{name}", Reply(200, data)), "val", (f"a {name}",))
            for name, (data, _, _) in KINDS.items()]
    recs.append(Record("exif_rotated", srv.route("/exif", Reply(200, exif_rotated_jpeg())), "val", ()))
    data = jpeg(64, 48)
    recs.append(Record("truncated", srv.route("/cut", Reply(200, data[: len(data) // 2])), "val", ()))
    download_records(recs, out, DownloadParams(workers=4, records_per_shard=100, decode_processes=1), progress=False)
    members = read_tar(out / "00000.tar")
    status = {s["key"]: s["status"] for s in read_status(out / "00000.status.jsonl")}
    return {k: (status[k], members.get(f"{k}.jpg"), json.loads(members[f"{k}.json"]) if f"{k}.json" in members else None)
            for k in status}


@pytest.mark.parametrize("name", sorted(KINDS))
def test_kind_decodes_to_rgb(fetched, name):
    status, data, meta = fetched[name]
    assert status == "ok"
    arr = decoded(data)
    assert arr.shape == (24, 32, 3) and (meta["width"], meta["height"]) == (32, 24)
    _, left, right = KINDS[name]
    assert np.abs(_mean(arr[:, 2:14]) - left).max() <= 6, _mean(arr[:, 2:14])
    assert np.abs(_mean(arr[:, 18:30]) - right).max() <= 6, _mean(arr[:, 18:30])


def test_exif_orientation_applied(fetched):
    status, data, meta = fetched["exif_rotated"]
    assert status == "ok" and (meta["width"], meta["height"]) == (20, 40)
    arr = decoded(data)
    assert np.abs(_mean(arr[2:18]) - (255, 0, 0)).max() <= 12  # what was left is now on top
    assert np.abs(_mean(arr[22:38]) - (0, 0, 255)).max() <= 12


def test_failure_crosses_the_process_pool(fetched):
    assert fetched["truncated"][0] == "decode_error"
    assert fetched["truncated"][1] is None


@pytest.mark.parametrize("size,short,expected", [((640, 480), 256, (341, 256)), ((100, 300), 50, (50, 150)),
                                                 ((40, 30), 60, (80, 60))])
def test_resize_shorter_side_keeps_ratio(size, short, expected):
    src = photo(*size)
    out, w, h = process_image(encode(src, "JPEG", quality=95), 10**9, short, 90)
    assert (w, h) == expected == Image.open(__import__("io").BytesIO(out)).size
    # Same picture: compare with a plain resize of the source.
    ref = np.asarray(src.resize(expected, Image.Resampling.BICUBIC)).astype(int)
    assert np.abs(decoded(out) - ref).mean() < 8


def test_quality_changes_the_encoding():
    src = encode(photo(200, 150, seed=2), "PNG")
    small = process_image(src, 10**9, None, 20)[0]
    large = process_image(src, 10**9, None, 95)[0]
    assert len(small) < len(large)


def test_pixel_cap_checked_before_decoding():
    with pytest.raises(RecordFailure) as err:
        process_image(encode(photo(50, 40), "PNG"), 50 * 40 - 1)
    assert err.value.status == "too_many_pixels"


@pytest.mark.skipif(not features.check("avif"), reason="this Pillow decodes no AVIF")
def test_avif_is_fetched_and_eps_svg_pdf_are_refused(tmp_path, loopback):
    pdf = encode(solid((0, 0, 0)), "PDF")
    avif = encode(solid((30, 60, 220)), "AVIF", quality=95)
    recs = [Record("avif", loopback.route("/a.avif", Reply(200, avif, content_type="image/avif")), "val", ("a",)),
            Record("eps", loopback.route("/e.eps", Reply(200, EPS, content_type="application/postscript")), "val", ()),
            Record("svg", loopback.route("/s.svg", Reply(200, SVG, content_type="image/svg+xml")), "val", ()),
            Record("pdf", loopback.route("/p.pdf", Reply(200, pdf, content_type="application/pdf")), "val", ())]
    download_records(recs, tmp_path, DownloadParams(workers=2, records_per_shard=10, decode_processes=0),
                     progress=False)
    accepts = {h.get("Accept") for seen in loopback.headers_seen.values() for h in seen}
    status = {s["key"]: s["status"] for s in read_status(tmp_path / "00000.status.jsonl")}
    assert status == {"avif": "ok", "eps": "not_an_image", "svg": "not_an_image", "pdf": "not_an_image"}
    arr = decoded(read_tar(tmp_path / "00000.tar")["avif.jpg"])
    assert arr.shape == (24, 32, 3) and np.abs(_mean(arr) - (30, 60, 220)).max() <= 8
    # The server is asked for exactly the formats that are decoded, AVIF and WebP first.
    [accept] = accepts
    assert accept.split(",")[:3] == ["image/avif", "image/webp", "image/jpeg"]
    assert set(accept.split(",")) == {Image.MIME[f] for f in IMAGE_FORMATS}
