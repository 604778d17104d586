"""Images and image shards: encoded images of every kind the download and embed code
meet (photo-like JPEGs, EPS/SVG, a PNG bomb, a TIFF that makes Pillow raise TypeError),
tar shards in our layout and img2dataset's, folders of shards, and shard readers."""
from __future__ import annotations

import io
import json
import struct
import tarfile
import zlib
from pathlib import Path
from typing import Iterable, Optional

import numpy as np
from PIL import Image


# A minimal EPS file: Pillow's EPS plugin would hand it to Ghostscript to render.
EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n%%EndComments\nshowpage\n"
SVG = b'<svg xmlns="http://www.w3.org/2000/svg" width="8" height="8"><rect width="8" height="8"/></svg>'


def encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def solid(color, size=(32, 24), mode="RGB") -> Image.Image:
    return Image.new(mode, size, color)


def photo(w: int = 64, h: int = 48, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    arr = np.stack([x * 255 // max(1, w - 1), y * 255 // max(1, h - 1), np.full_like(x, 90)], -1)
    arr = np.clip(arr + rng.integers(-5, 6, arr.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(arr, "RGB")


def jpeg(w: int = 64, h: int = 48, seed: int = 0, **kw) -> bytes:
    return encode(photo(w, h, seed), "JPEG", quality=90, **kw)


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_bomb(width: int = 100_000, height: int = 100_000) -> bytes:
    """A PNG whose header claims width x height 1-bit pixels, with a tiny body."""
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    idat = zlib.compress(b"\0" * 64)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def exif_rotated_jpeg() -> bytes:
    """40x20 stored (left red, right blue) with EXIF orientation 6 (rotate 90° clockwise to view)."""
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:, :20] = (255, 0, 0)
    arr[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(Image.fromarray(arr), "JPEG", quality=95, exif=exif.tobytes())


def tiff_raising_type_error() -> bytes:
    """A TIFF whose StripOffsets tag is typed ASCII: Pillow's TIFF plugin raises TypeError
    on it, an exception outside the usual OSError/ValueError of a corrupt file."""
    buf = io.BytesIO()
    Image.new("RGB", (8, 6), (10, 200, 30)).save(buf, "TIFF")
    data = bytearray(buf.getvalue())
    ifd = struct.unpack_from("<I", data, 4)[0]
    for i in range(struct.unpack_from("<H", data, ifd)[0]):
        entry = ifd + 2 + 12 * i
        if struct.unpack_from("<H", data, entry)[0] == 0x0111:  # StripOffsets: LONG -> ASCII
            struct.pack_into("<H", data, entry + 2, 2)
    return bytes(data)


def read_tar(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def read_status(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def decoded(data: bytes) -> np.ndarray:
    im = Image.open(io.BytesIO(data))
    assert im.format == "JPEG" and im.mode == "RGB"
    return np.asarray(im).astype(int)


def photo_jpeg(seed: int, width: int = 96, height: int = 72, quality: int = 90) -> bytes:
    """A smooth, noisy, photo-like JPEG (gradients + texture), different per seed."""
    rng = np.random.default_rng(seed)
    x = np.linspace(0, 1, width)[None, :, None]
    y = np.linspace(0, 1, height)[:, None, None]
    base = (np.sin(rng.uniform(2, 9) * x + rng.uniform(0, 6)) * 0.5 + 0.5) * \
           (np.cos(rng.uniform(2, 9) * y + rng.uniform(0, 6)) * 0.5 + 0.5)
    img = base * rng.uniform(60, 255, 3)[None, None, :] + rng.normal(0, 12, (height, width, 3))
    buf = io.BytesIO()
    Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    """Add ``data`` to ``tar`` as the member ``name`` (mtime 0, so shards are reproducible)."""
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    tar.addfile(info, io.BytesIO(data))


def write_our_shard(path: Path, samples: Iterable[tuple[str, bytes, str, list[str]]]) -> list[str]:
    """Our layout: KEY.jpg + KEY.json {key, url, split, captions, width, height}; sorted by key."""
    keys = []
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for key, image, split, captions in sorted(samples):
            meta = {"key": key, "url": f"file:///{key}.jpg", "split": split, "captions": captions,
                    "width": 0, "height": 0}
            add_member(tar, f"{key}.jpg", image)
            add_member(tar, f"{key}.json", json.dumps(meta).encode())
            keys.append(key)
    return keys


def write_img2dataset_shard(path: Path, samples: Iterable[tuple[str, bytes, Optional[str]]]) -> list[str]:
    """img2dataset's webdataset output: KEY.jpg, KEY.txt, KEY.json with `caption`, no split."""
    keys = []
    with tarfile.open(path, "w") as tar:
        for key, image, caption in samples:
            meta = {"url": f"http://example.com/{key}.jpg", "key": key, "status": "success",
                    "caption": caption, "width": 96, "height": 72}
            add_member(tar, f"{key}.jpg", image)
            if caption is not None:
                add_member(tar, f"{key}.txt", caption.encode())
            add_member(tar, f"{key}.json", json.dumps(meta).encode())
            keys.append(key)
    return keys


def make_image_dir(root: Path, shards: int, per_shard: int, seed: int = 0, size: tuple[int, int] = (96, 72),
                   corrupt: Iterable[str] = ()) -> dict[str, list[str]]:
    """``shards`` of our shards in root; keys named in ``corrupt`` get broken JPEG bytes."""
    root.mkdir(parents=True, exist_ok=True)
    corrupt = set(corrupt)
    out = {}
    n = 0
    for s in range(shards):
        samples = []
        for _ in range(per_shard):
            key = f"img{n:04d}"
            image = photo_jpeg(seed * 10_000 + n, *size)
            if key in corrupt:
                image = image[: len(image) // 3]  # truncated JPEG
            split = ("train", "val", "test")[n % 3]
            samples.append((key, image, split, [f"a <b>photo</b> number {n}", f"picture {n}"]))
            n += 1
        out[f"{s:05d}"] = write_our_shard(root / f"{s:05d}.tar", samples)
    return out
