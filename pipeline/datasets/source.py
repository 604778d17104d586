"""Read a prepared ``data/source/`` folder back as a stream of records."""
from __future__ import annotations

from itertools import islice
from pathlib import Path
from typing import Iterator

from pipeline.datasets.manifest import Manifest, read_manifest
from pipeline.datasets.readers import SourceFiles, reader_for
from pipeline.records import Record


def records_from_manifest(folder: str | Path, m: Manifest) -> Iterator[Record]:
    """The records of a prepared folder, through the reader registered for its kind."""
    folder = Path(folder)
    split_file = m.files.get("karpathy_split")
    files = SourceFiles(annotations=folder / m.files["annotations"],
                        karpathy_split=folder / split_file if split_file else None,
                        image_root=m.image_root, val_fraction=m.val_fraction, test_fraction=m.test_fraction)
    records = reader_for(m.kind, key=f"{folder / 'manifest.json'}: kind")(files)
    return islice(records, m.max_records) if m.max_records else records


def iter_records(folder: str | Path) -> Iterator[Record]:
    """Stream the records of a prepared source folder (see ``prepare``)."""
    return records_from_manifest(folder, read_manifest(folder))
