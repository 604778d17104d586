"""What ``capline caption`` accepts as INPUT, turned into a stream of images to caption.

An INPUT is any of:

* an ``http://`` or ``https://`` URL, fetched with the download stage's ``Fetcher``
  (timeouts, retries, size cap, redirects counted and never to ``file:``);
* a folder: every file under it (recursively) with the extension of a format that
  pipeline/formats/imaging.py decodes, sorted by path;
* an image tar shard (``*.tar``: ours or img2dataset's webdataset output): every
  sample, in tar order, named ``SHARD.tar#KEY``;
* any other file: an image (read through the same fetcher, with the same size cap).

Each image becomes an ``Item``; an input that cannot give one (missing file, a
sample without an image, an unreadable shard) becomes a ``Failure`` in its place,
so the caller reports it and goes on with the rest.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence, Union
from urllib.parse import urlsplit

from pipeline.formats.image_shards import ImageShardError, iter_shard
from pipeline.formats.imaging import IMAGE_EXTENSIONS

SHARD_EXT = ".tar"


@dataclass
class Item:
    name: str  # what the user gave (path, URL, SHARD.tar#KEY)
    image_id: str  # the id written to COCO results: the path, the URL, or the shard sample's key
    url: Optional[str] = None  # fetched when the batch is made (files become file: URLs)
    data: Optional[bytes] = None  # already read (shard samples)


@dataclass
class Failure:
    name: str
    image_id: str
    reason: str


Entry = Union[Item, Failure]


def is_url(text: str) -> bool:
    return urlsplit(text).scheme.lower() in ("http", "https")


def folder_images(folder: Path) -> list[Path]:
    """Image files under ``folder``, recursively, sorted by their path (hidden files skipped)."""
    exts = {f".{e}" for e in IMAGE_EXTENSIONS}
    found = []
    for path in folder.rglob("*"):
        rel = path.relative_to(folder)
        if any(part.startswith(".") for part in rel.parts):
            continue
        if path.suffix.lower() in exts and path.is_file():
            found.append(path)
    return sorted(found, key=lambda p: p.relative_to(folder).as_posix())


def count_known(inputs: Sequence[str]) -> tuple[int, bool]:
    """(images known before reading shards, whether any shard is among the inputs): sizes the progress bar."""
    n, shards = 0, False
    for text in inputs:
        path = Path(text).expanduser()
        if is_url(text):
            n += 1
        elif path.is_dir():
            n += len(folder_images(path))
        elif path.suffix.lower() == SHARD_EXT and path.is_file():
            shards = True
        else:
            n += 1
    return n, shards


def iter_inputs(inputs: Sequence[str]) -> Iterator[Entry]:
    """Every image the inputs name, in order; a Failure where an input or sample gives none."""
    for text in inputs:
        if is_url(text):
            yield Item(name=text, image_id=text, url=text)
            continue
        path = Path(text).expanduser()
        if path.is_dir():
            images = folder_images(path)
            if not images:
                yield Failure(text, text, "a folder without image files")
            for image in images:
                yield Item(name=str(image), image_id=str(image), url=image.resolve().as_uri())
        elif path.suffix.lower() == SHARD_EXT and path.is_file():
            yield from _shard_items(path)
        elif path.exists():
            yield Item(name=text, image_id=text, url=path.resolve().as_uri())
        else:
            yield Failure(text, text, "not found (not a file, a folder, or an http(s) URL)")


def _shard_items(path: Path) -> Iterator[Entry]:
    try:
        for sample in iter_shard(path):
            name = f"{path}#{sample.key}"
            if sample.image:
                yield Item(name=name, image_id=sample.key, data=sample.image)
            else:
                yield Failure(name, sample.key, "no image in the sample")
    except ImageShardError as err:
        # The samples read before the damage are captioned; the rest of the shard is reported.
        yield Failure(str(path), str(path), str(err))
