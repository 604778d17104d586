"""Caption collections for the datastore: the training split of the feature shards, or
a caption file (COCO captions JSON, TSV/CSV, JSONL, plain text lines).

Each caption comes with the key of the image it describes, where the input names
one: the feature shards' keys, a COCO ``image_id`` (made into a key exactly as the
prepare stage does), a ``key`` column or field. Captions of a file that names no
images get no key; retrieve excludes a caption from an image's neighbours by key
only (docs/retrieval.md).
"""
from __future__ import annotations

import csv
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

from pipeline.core.errors import CaplineError
from pipeline.formats.features import list_feature_shards, read_feature_shard
# The prepare stage's own rule (zero-padded COCO ids), so keys from a COCO file are the
# record keys of the same images.
from pipeline.prepare.readers import _id_key, sanitize_key

TRAIN = "train"
FILE_FORMATS = (".json", ".tsv", ".csv", ".jsonl", ".txt")
TEXT_FIELDS = ("caption", "captions", "text")


class CaptionFileError(CaplineError):
    """A caption file that cannot be read; the message names the file (and line)."""


@dataclass(frozen=True)
class Caption:
    key: Optional[str]  # the image the caption describes, None where the input names none
    text: str


def clean(text: str) -> str:
    """Whitespace runs become one space; ends stripped (an all-space caption becomes empty)."""
    return " ".join(text.split())


def read_collection(source: str, features: Path) -> list[Caption]:
    """The captions of ``retrieval.source``: ``train`` or a caption file's path."""
    if source == TRAIN:
        return list(training_captions(features))
    return list(read_caption_file(Path(source)))


def training_captions(features: Path) -> Iterator[Caption]:
    """Every caption of every training image, in shard and row order."""
    for shard in list_feature_shards(features):
        table = read_feature_shard(shard, embeddings=False)
        for key, split, caps in zip(table.keys, table.splits, table.captions):
            if split == TRAIN:
                for text in caps:
                    yield Caption(key, clean(text))


def read_caption_file(path: Path) -> Iterator[Caption]:
    """The captions of a file; its format is its suffix."""
    if not path.is_file():
        raise CaptionFileError(f"caption file not found: {path} (retrieval.source is train or a file)")
    suffix = path.suffix.lower()
    if suffix == ".json":
        return _coco(path)
    if suffix in (".tsv", ".csv"):
        return _table(path, "\t" if suffix == ".tsv" else ",")
    if suffix == ".jsonl":
        return _jsonl(path)
    if suffix == ".txt":
        return _lines(path)
    raise CaptionFileError(f"{path}: unknown caption file type {suffix!r}; one of {', '.join(FILE_FORMATS)}")


def _key(value: Any, path: Path, where: str) -> Optional[str]:
    if value in (None, ""):
        return None
    key = str(value)
    if sanitize_key(key) != key:
        raise CaptionFileError(f"{path}: {where}: key {key!r}: only letters, digits, '_' and '-' are allowed")
    return key


def _texts(value: Any, path: Path, where: str) -> list[str]:
    values = value if isinstance(value, list) else [value]
    if not all(isinstance(v, str) for v in values):
        raise CaptionFileError(f"{path}: {where}: captions must be strings")
    return [clean(v) for v in values]


def _coco(path: Path) -> Iterator[Caption]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise CaptionFileError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
        raise CaptionFileError(f"{path}: not a COCO captions file: expected {{'annotations': [...]}}")
    for i, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict) or "caption" not in ann:
            raise CaptionFileError(f"{path}: annotations[{i}]: needs 'caption'")
        key = _id_key(ann["image_id"]) if ann.get("image_id") is not None else None
        for text in _texts(ann["caption"], path, f"annotations[{i}]"):
            yield Caption(key, text)


def _looks_like_url(cell: str) -> bool:
    return cell.strip().lower().startswith(("http://", "https://", "file:"))


def _table(path: Path, delimiter: str) -> Iterator[Caption]:
    """A header naming caption/captions/text (and optionally key); without one, the
    cell that is not a URL (CC3M: caption<TAB>url) or the only cell."""
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL  # TSV captions carry bare quotes
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f, delimiter=delimiter, quoting=quoting)
        header: Optional[list[str]] = None
        try:
            for row in reader:
                where = f"line {reader.line_num}"
                if not row or row == [""]:
                    continue
                if header is None and reader.line_num == 1 and any(c.strip().lower() in TEXT_FIELDS for c in row):
                    header = [c.strip().lower() for c in row]
                    continue
                if header is not None:
                    if len(row) != len(header):
                        raise CaptionFileError(f"{path}: {where}: expected {len(header)} fields, got {len(row)}")
                    cells = dict(zip(header, row))
                    key = _key(cells.get("key"), path, where)
                    for name in TEXT_FIELDS:
                        if name in cells:
                            yield Caption(key, clean(cells[name]))
                    continue
                texts = [c for c in row if not _looks_like_url(c)]
                if len(texts) != 1:
                    raise CaptionFileError(f"{path}: {where}: without a header a row is a caption, or a caption "
                                           f"and a URL; got {len(row)} fields")
                yield Caption(None, clean(texts[0]))
        except csv.Error as err:
            raise CaptionFileError(f"{path}: line {reader.line_num}: unreadable ({err})") from None


def _jsonl(path: Path) -> Iterator[Caption]:
    with open(path, encoding="utf-8-sig") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"line {line_no}"
            try:
                obj = json.loads(line)
            except ValueError as err:
                raise CaptionFileError(f"{path}: {where}: not valid JSON ({err})") from None
            if not isinstance(obj, dict) or not any(name in obj for name in TEXT_FIELDS):
                raise CaptionFileError(f"{path}: {where}: expected an object with one of {', '.join(TEXT_FIELDS)}")
            key = _key(obj.get("key"), path, where)
            for name in TEXT_FIELDS:
                if name in obj:
                    for text in _texts(obj[name], path, where):
                        yield Caption(key, text)


def _lines(path: Path) -> Iterator[Caption]:
    """One caption a line; a blank line is an empty caption (dropped and counted)."""
    with open(path, encoding="utf-8-sig") as f:
        for line in f:
            yield Caption(None, clean(line))
