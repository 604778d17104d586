"""Read a prepared ``data/source/`` folder back as a stream of records."""
from __future__ import annotations

from itertools import islice
from pathlib import Path
from typing import Iterable, Iterator

from pipeline.datasets.errors import DatasetError
from pipeline.datasets.manifest import Manifest, read_manifest
from pipeline.datasets.readers import read_coco, read_jsonl, read_karpathy, read_table
from pipeline.records import Record


def shown_name(folder: Path, m: Manifest, role: str) -> str:
    """How errors name the file of ``role``: where the user's copy came from (their path
    or URL, as params gave it), else the file in ``folder`` (the demo's own files)."""
    origin = m.origin.get(role)
    return origin if origin and origin != "demo" else str(Path(folder) / m.files[role])


def _naming_origins(records: Iterable[Record], shown: dict[str, str]) -> Iterator[Record]:
    try:
        yield from records
    except DatasetError as err:
        # The readers read a copy (a temporary folder during prepare, data/source after);
        # the message names the file the user gave, with the same line.
        if err.path not in shown:
            raise
        raise err.naming(shown[err.path]) from None


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
    it = _naming_origins(it, {str(folder / name): shown_name(folder, m, role) for role, name in m.files.items()})
    return islice(it, m.max_records) if m.max_records else it


def iter_records(folder: str | Path) -> Iterator[Record]:
    """Stream the records of a prepared source folder (see ``prepare``)."""
    return records_from_manifest(folder, read_manifest(folder))
