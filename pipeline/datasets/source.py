"""Read a prepared ``data/source/`` folder back as a stream of records."""
from __future__ import annotations

from itertools import islice
from pathlib import Path
from typing import Iterator

from pipeline.datasets.manifest import Manifest, read_manifest
from pipeline.datasets.readers import read_coco, read_jsonl, read_karpathy, read_table
from pipeline.records import Record


def records_from_manifest(folder: str | Path, m: Manifest) -> Iterator[Record]:
    folder = Path(folder)
    ann = folder / m.files["annotations"]
    if m.kind == "coco":
        split_file = folder / m.files["karpathy_split"] if m.files.get("karpathy_split") else None
        it = read_coco(ann, split_file, m.image_root, m.val_fraction, m.test_fraction)
    elif m.kind == "karpathy":
        it = read_karpathy(ann, m.image_root)
    elif m.kind == "csv":
        it = read_table(ann, ",", m.val_fraction, m.test_fraction)
    elif m.kind == "tsv":
        it = read_table(ann, "\t", m.val_fraction, m.test_fraction)
    else:
        it = read_jsonl(ann, m.val_fraction, m.test_fraction)
    return islice(it, m.max_records) if m.max_records else it


def iter_records(folder: str | Path) -> Iterator[Record]:
    """Stream the records of a prepared source folder (see ``prepare``)."""
    return records_from_manifest(folder, read_manifest(folder))
