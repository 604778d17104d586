"""Readers that turn a dataset spec file into a stream of ``Record``s.

Supported: COCO captions JSON (2014/2017) with an optional Karpathy split file,
Karpathy JSON alone (Flickr8k/30k, COCO), CSV/TSV (CC3M: caption<TAB>url, with or
without a header) and JSONL. Keys are a pure function of the input; splits are
chosen per image. Bad input stops with a ``DatasetError`` naming file and line.
"""
from __future__ import annotations

import csv
import json
import re
import sys
from pathlib import Path
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional
from urllib.parse import quote

from pipeline.prepare.errors import DatasetError
from pipeline.core.errors import ParamsError
from pipeline.formats.records import Record, split_for

_BAD_KEY_CHARS = re.compile(r"[^A-Za-z0-9_-]")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_URL_PREFIXES = ("http://", "https://", "file:")

URL_COLUMNS = ("url", "image_url")
CAPTION_COLUMNS = ("caption", "captions", "text")
OPTIONAL_COLUMNS = ("sha256", "key")


def sanitize_key(text: str) -> str:
    """A valid record key from a name: unsupported characters become '_'."""
    key = _BAD_KEY_CHARS.sub("_", text)[:128]
    return key or "_"


def join_url(root: str, name: str) -> str:
    """Join an image root (URL prefix) and a relative file name."""
    return root.rstrip("/") + "/" + quote(name.lstrip("/"), safe="/")


def _karpathy_split(split: str) -> str:
    # Karpathy's "restval" images are the rest of COCO val2014, trained on by convention.
    return "train" if split == "restval" else split


def _load_json(path: Path) -> Any:
    try:
        with open(path, "rb") as f:
            return json.load(f)
    except json.JSONDecodeError as err:
        raise DatasetError(path, f"not valid JSON: {err.msg}", line=err.lineno) from None
    except UnicodeDecodeError as err:
        raise DatasetError(path, f"not UTF-8 text: {err}") from None


def _id_key(image_id: Any) -> str:
    # Zero-padded so that sorting by key sorts by COCO id.
    if isinstance(image_id, int) and not isinstance(image_id, bool) and image_id >= 0:
        return f"{image_id:012d}"
    return sanitize_key(str(image_id))


def _clean_captions(values: list[Any], path: Path, where: str) -> tuple[str, ...]:
    out = []
    for c in values:
        if not isinstance(c, str):
            raise DatasetError(path, f"{where}: caption {c!r} is not a string")
        c = " ".join(c.split())
        if c:
            out.append(c)
    return tuple(out)


# ------------------------------------------------------------------ Karpathy
def _karpathy_images(path: Path) -> list[dict]:
    data = _load_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DatasetError(path, "not a Karpathy split file: expected {'images': [...]}")
    return data["images"]


def _karpathy_splits(path: Path) -> tuple[dict[Any, str], dict[str, str]]:
    """Split by COCO id and by file name, from a Karpathy file (dataset_coco.json)."""
    by_id: dict[Any, str] = {}
    by_name: dict[str, str] = {}
    for i, img in enumerate(_karpathy_images(path)):
        split = img.get("split") if isinstance(img, dict) else None
        if split not in ("train", "val", "test", "restval"):
            raise DatasetError(path, f"images[{i}]: split {split!r} is not train/val/test/restval")
        if "cocoid" in img:
            by_id[img["cocoid"]] = _karpathy_split(split)
        if "filename" in img:
            by_name[str(img["filename"])] = _karpathy_split(split)
    return by_id, by_name


def read_karpathy(path: str | Path, image_root: Optional[str]) -> Iterator[Record]:
    """Karpathy JSON alone (dataset_flickr30k.json, ...): images joined to ``image_root``."""
    path = Path(path)
    if not image_root:
        raise DatasetError(path, "data.image_root is required to locate the images of a Karpathy file")
    for i, img in enumerate(_karpathy_images(path)):
        where = f"images[{i}]"
        if not isinstance(img, dict) or "filename" not in img:
            raise DatasetError(path, f"{where}: missing 'filename'")
        split = img.get("split")
        if split not in ("train", "val", "test", "restval"):
            raise DatasetError(path, f"{where}: split {split!r} is not train/val/test/restval")
        name = str(img["filename"])
        rel = f"{img['filepath']}/{name}" if img.get("filepath") else name
        key = _id_key(img["cocoid"]) if "cocoid" in img else sanitize_key(name.rsplit(".", 1)[0])
        sentences = img.get("sentences", [])
        if not isinstance(sentences, list):
            raise DatasetError(path, f"{where}: 'sentences' is not a list")
        raw = [s.get("raw", "") if isinstance(s, dict) else s for s in sentences]
        yield Record(key, join_url(image_root, rel), _karpathy_split(split), _clean_captions(raw, path, where))


# ---------------------------------------------------------------------- COCO
def read_coco(
    path: str | Path,
    karpathy_split: Optional[str | Path],
    image_root: Optional[str],
    val_fraction: float,
    test_fraction: float,
) -> Iterator[Record]:
    """COCO captions JSON; split from the Karpathy file when given, else by key hash."""
    path = Path(path)
    data = _load_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DatasetError(path, "not a COCO captions file: expected {'images': [...], 'annotations': [...]}")
    captions: dict[Any, list[str]] = {}
    for i, ann in enumerate(data.get("annotations", [])):
        if not isinstance(ann, dict) or "image_id" not in ann or "caption" not in ann:
            raise DatasetError(path, f"annotations[{i}]: needs 'image_id' and 'caption'")
        captions.setdefault(ann["image_id"], []).append(ann["caption"])
    by_id, by_name = _karpathy_splits(Path(karpathy_split)) if karpathy_split else ({}, {})
    for i, img in enumerate(data["images"]):
        where = f"images[{i}]"
        if not isinstance(img, dict) or "id" not in img:
            raise DatasetError(path, f"{where}: missing 'id'")
        key = _id_key(img["id"])
        name = img.get("file_name")
        if image_root and name:
            url = join_url(image_root, str(name))
        else:
            url = img.get("coco_url") or img.get("flickr_url") or img.get("url")
        if not url:
            raise DatasetError(path, f"{where}: no coco_url/url and no data.image_root to join 'file_name' to")
        split = by_id.get(img["id"]) or (by_name.get(str(name)) if name else None)
        if split is None:
            split = split_for(key, val_fraction, test_fraction)
        yield Record(key, str(url), split, _clean_captions(captions.get(img["id"], []), path, where))


# ------------------------------------------------------------- CSV/TSV/JSONL
def _looks_like_url(value: str) -> bool:
    return value.strip().lower().startswith(_URL_PREFIXES)


def _list_record(
    path: Path,
    line: int,
    index: int,
    url: Any,
    captions: Any,
    sha256: Any,
    key: Any,
    val_fraction: float,
    test_fraction: float,
) -> Record:
    if not isinstance(url, str) or not url.strip():
        raise DatasetError(path, "empty or missing url", line)
    url = url.strip()
    if isinstance(captions, str):
        captions = [captions]
    if captions is None:
        captions = []
    if not isinstance(captions, list):
        raise DatasetError(path, f"captions must be a string or a list of strings, got {type(captions).__name__}", line)
    if sha256 in ("", None):
        sha256 = None
    elif not isinstance(sha256, str) or not _SHA256.match(sha256.strip().lower()):
        raise DatasetError(path, f"sha256 {sha256!r} is not 64 hex digits", line)
    else:
        sha256 = sha256.strip().lower()
    if key in ("", None):
        # Position in the list: unique even when a URL repeats, and stable for the same input.
        key = f"{index:09d}"
    else:
        key = str(key)
        if sanitize_key(key) != key:
            raise DatasetError(path, f"key {key!r}: only letters, digits, '_' and '-' are allowed", line)
    # Split by the URL (the image), so a repeated image lands in one split.
    split = split_for(url, val_fraction, test_fraction)
    return Record(key, url, split, _clean_captions(captions, path, f"line {line}"), sha256)


def read_table(
    path: str | Path, delimiter: str, val_fraction: float, test_fraction: float
) -> Iterator[Record]:
    """CSV or TSV list of url + caption (header optional; CC3M is caption<TAB>url)."""
    path = Path(path)
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    with open(path, newline="", encoding="utf-8-sig") as f:
        # TSV files such as CC3M carry bare quotes in captions: no quoting for TSV.
        quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
        reader = csv.reader(f, delimiter=delimiter, quoting=quoting)
        try:
            first = next(reader, None)
        except (csv.Error, UnicodeDecodeError) as err:
            raise DatasetError(path, f"unreadable: {err}", 1) from None
        if first is None:
            return
        if any(_looks_like_url(cell) for cell in first):
            if len(first) != 2:
                raise DatasetError(path, f"a list without a header needs 2 columns (caption, url), got {len(first)}", 1)
            url_col = 0 if _looks_like_url(first[0]) else 1
            columns = ["caption", "caption"]
            columns[url_col] = "url"
            rows = _chain_first(first, reader)
        else:
            columns = [c.strip().lower() for c in first]
            known = URL_COLUMNS + CAPTION_COLUMNS + OPTIONAL_COLUMNS
            for c in columns:
                if c not in known:
                    raise DatasetError(path, f"unknown column {c!r}; known columns: {', '.join(known)}", 1)
            if not any(c in URL_COLUMNS for c in columns):
                raise DatasetError(path, f"no url column (one of {', '.join(URL_COLUMNS)})", 1)
            if len(set(columns)) != len(columns):
                raise DatasetError(path, "a column name appears twice", 1)
            rows = reader
        index = 0
        while True:
            try:
                row = next(rows, None)
            except (csv.Error, UnicodeDecodeError) as err:
                raise DatasetError(path, f"unreadable: {err}", reader.line_num) from None
            if row is None:
                return
            line = reader.line_num
            if not row or row == [""]:
                continue
            if len(row) != len(columns):
                raise DatasetError(path, f"expected {len(columns)} fields, got {len(row)}", line)
            cells = dict(zip(columns, row))
            url = next((cells[c] for c in URL_COLUMNS if c in cells), None)
            caps: Any = [cells[c] for c in ("caption", "text") if c in cells]
            if "captions" in cells:
                try:
                    listed = json.loads(cells["captions"]) if cells["captions"].strip().startswith("[") else [cells["captions"]]
                except json.JSONDecodeError as err:
                    raise DatasetError(path, f"captions is not a JSON list: {err.msg}", line) from None
                caps = caps + (listed if isinstance(listed, list) else [listed])
            yield _list_record(path, line, index, url, caps, cells.get("sha256"), cells.get("key"), val_fraction, test_fraction)
            index += 1


def _chain_first(first: list[str], rest: Iterator[list[str]]) -> Iterator[list[str]]:
    yield first
    yield from rest


def read_jsonl(path: str | Path, val_fraction: float, test_fraction: float) -> Iterator[Record]:
    """JSONL: one object per line with url and caption (string) or captions (list)."""
    path = Path(path)
    known = set(URL_COLUMNS + CAPTION_COLUMNS + OPTIONAL_COLUMNS)
    index = 0
    with open(path, "rb") as f:  # decoded line by line, so a bad byte names its line
        for line_no, raw in enumerate(f, 1):
            try:
                text = raw.decode("utf-8-sig" if line_no == 1 else "utf-8")
            except UnicodeDecodeError as err:
                raise DatasetError(path, f"not UTF-8 text: {err.reason}", line_no) from None
            if not text.strip():
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as err:
                raise DatasetError(path, f"not valid JSON: {err.msg}", line_no) from None
            if not isinstance(obj, dict):
                raise DatasetError(path, "each line must be a JSON object", line_no)
            unknown = sorted(set(obj) - known)
            if unknown:
                raise DatasetError(path, f"unknown field(s) {unknown}; known: {sorted(known)}", line_no)
            url = next((obj[c] for c in URL_COLUMNS if c in obj), None)
            caps: list[Any] = []
            for c in CAPTION_COLUMNS:
                v = obj.get(c)
                if v is None:
                    continue
                caps.extend(v if isinstance(v, list) else [v])
            yield _list_record(path, line_no, index, url, caps, obj.get("sha256"), obj.get("key"), val_fraction, test_fraction)
            index += 1


# ------------------------------------------------------------------ registry
@dataclass(frozen=True)
class SourceFiles:
    """What a reader gets: the prepared annotation file(s) and the split settings."""

    annotations: Path
    karpathy_split: Optional[Path] = None
    image_root: Optional[str] = None
    val_fraction: float = 0.05
    test_fraction: float = 0.1


Reader = Callable[[SourceFiles], Iterator[Record]]
# data.source name -> reader. params' allowed sources, the manifest's kinds and the
# dispatch all come from here: a new source is one registered function + its test.
READERS: dict[str, Reader] = {}


def register(name: str) -> Callable[[Reader], Reader]:
    def add(fn: Reader) -> Reader:
        READERS[name] = fn
        return fn
    return add


@register("coco")
def _coco(s: SourceFiles) -> Iterator[Record]:
    return read_coco(s.annotations, s.karpathy_split, s.image_root, s.val_fraction, s.test_fraction)


@register("karpathy")
def _karpathy(s: SourceFiles) -> Iterator[Record]:
    return read_karpathy(s.annotations, s.image_root)


@register("csv")
def _csv(s: SourceFiles) -> Iterator[Record]:
    return read_table(s.annotations, ",", s.val_fraction, s.test_fraction)


@register("tsv")
def _tsv(s: SourceFiles) -> Iterator[Record]:
    return read_table(s.annotations, "\t", s.val_fraction, s.test_fraction)


@register("jsonl")
def _jsonl(s: SourceFiles) -> Iterator[Record]:
    return read_jsonl(s.annotations, s.val_fraction, s.test_fraction)


def reader_for(source: str, key: str = "data.source") -> Reader:
    """The registered reader of ``source``; an unknown name is a ParamsError naming ``key``."""
    if source not in READERS:
        raise ParamsError(f"{key}: {source!r} is not one of demo, {', '.join(sorted(READERS))}")
    return READERS[source]
