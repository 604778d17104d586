"""Reading image tar shards: ours (download stage) and img2dataset's webdataset output.

A shard is a tar whose members are grouped into samples by the member name before
the first dot of its base name (``dir/KEY.jpg``, ``dir/KEY.json`` -> sample
``dir/KEY``), the webdataset rule. Members of one sample are adjacent. Reading
streams member by member, so a shard of any size costs one sample of memory.
"""
from __future__ import annotations

import json
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

from pipeline.core.errors import CaplineError
from pipeline.formats.imaging import IMAGE_EXTENSIONS

# A member larger than this is not an image a captioner needs; refusing it keeps a
# hostile shard from making a worker allocate gigabytes.
MAX_MEMBER_BYTES = 64 * 2**20


class ImageShardError(CaplineError):
    """An image shard that cannot be read or is not in the webdataset layout."""


@dataclass
class Sample:
    key: str
    image: bytes  # empty when the sample has no image member
    ext: str  # "jpg", "png", ...; "" when there is no image
    meta: dict = field(default_factory=dict)


def list_shards(images_dir: Path) -> list[Path]:
    """The image shards of a folder, sorted by name (shard order = index order)."""
    images_dir = Path(images_dir)
    if not images_dir.is_dir():
        raise ImageShardError(f"image shard folder not found: {images_dir}")
    return sorted(p for p in images_dir.glob("*.tar") if p.is_file())


def _split_name(name: str) -> tuple[str, str]:
    """``a/b/KEY.x.y`` -> (``a/b/KEY``, ``x.y``), as webdataset groups members."""
    head, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{head}/{stem}" if head else stem), ext.lower()


def _captions(meta: dict, txt: Optional[str]) -> list[str]:
    """Normalise the caption fields of ours and img2dataset's to one list."""
    caps = meta.get("captions")
    if caps is None and meta.get("caption") is not None:
        caps = [meta["caption"]]
    if caps is None and txt is not None:
        caps = [txt]
    if caps is None:
        return []
    if isinstance(caps, str):
        caps = [caps]
    if not isinstance(caps, list):
        raise TypeError("captions is not a list")
    # Captions are untrusted text: kept verbatim as strings, never interpreted.
    return [str(c) for c in caps if c is not None]


def _build(tar_path: Path, key: str, members: dict[str, bytes]) -> Sample:
    meta: dict = {}
    if "json" in members:
        try:
            meta = json.loads(members["json"].decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ImageShardError(f"{tar_path}: sample {key!r}: {key}.json is not valid JSON ({err})") from None
        except RecursionError:  # json recurses once per level of nesting
            raise ImageShardError(f"{tar_path}: sample {key!r}: {key}.json is nested too deeply") from None
        if not isinstance(meta, dict):
            raise ImageShardError(f"{tar_path}: sample {key!r}: {key}.json is not a JSON object")
        inner = meta.get("key")
        base = key.rpartition("/")[2]
        if inner is not None and str(inner) not in (key, base):
            raise ImageShardError(
                f"{tar_path}: sample {key!r}: its json names key {inner!r}; the shard does not match its metadata")
    txt = None
    if "txt" in members:
        txt = members["txt"].decode("utf-8", errors="replace").strip()
    try:
        meta["captions"] = _captions(meta, txt)
    except TypeError:
        raise ImageShardError(f"{tar_path}: sample {key!r}: 'captions' is not a list of strings") from None
    except RecursionError:  # str() of a caption nested just under json's own limit
        raise ImageShardError(f"{tar_path}: sample {key!r}: 'captions' is nested too deeply") from None
    for ext in IMAGE_EXTENSIONS:  # the formats open_image decodes, nothing else
        if ext in members:
            return Sample(key=key, image=members[ext], ext=ext, meta=meta)
    return Sample(key=key, image=b"", ext="", meta=meta)


def iter_shard(tar_path: Path) -> Iterator[Sample]:
    """Stream the samples of one shard in tar order.

    A sample without an image member is yielded with ``image=b""`` so that the
    caller can record it instead of losing it. A corrupt or truncated tar, invalid
    metadata or a key seen twice raises ``ImageShardError`` naming the file.
    """
    tar_path = Path(tar_path)
    seen: set[str] = set()
    key: Optional[str] = None
    members: dict[str, bytes] = {}
    try:
        # "r|" streams: no seeking, no member index kept, constant memory.
        with tarfile.open(tar_path, mode="r|") as tar:
            for info in tar:
                if not info.isfile():
                    continue  # directories, links: never followed
                name_key, ext = _split_name(info.name)
                if not name_key or not ext:
                    continue  # stray files such as a README without extension
                if info.size > MAX_MEMBER_BYTES:
                    raise ImageShardError(
                        f"{tar_path}: member {info.name!r} is {info.size} bytes (limit {MAX_MEMBER_BYTES})")
                if name_key != key:
                    if key is not None:
                        yield _build(tar_path, key, members)
                    if name_key in seen:
                        raise ImageShardError(
                            f"{tar_path}: sample {name_key!r} appears twice (members of a sample must be adjacent)")
                    seen.add(name_key)
                    key, members = name_key, {}
                f = tar.extractfile(info)
                data = f.read() if f is not None else b""
                if len(data) != info.size:
                    raise ImageShardError(f"{tar_path}: member {info.name!r} is truncated")
                members[ext] = data
            if key is not None:
                yield _build(tar_path, key, members)
    except (tarfile.TarError, EOFError, OSError) as err:
        raise ImageShardError(f"{tar_path}: not a readable tar shard ({type(err).__name__}: {err})") from None

