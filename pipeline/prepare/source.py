"""Read a prepared ``data/source/`` folder back as a stream of records."""
from __future__ import annotations

from itertools import islice
from pathlib import Path
from typing import Iterable, Iterator

from pipeline.prepare.errors import DatasetError
from pipeline.prepare.manifest import Manifest, read_manifest
from pipeline.prepare.readers import SourceFiles, reader_for
from pipeline.formats.records import Record


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
    """The records of a prepared folder, through the reader registered for its kind."""
    folder = Path(folder)
    split_file = m.files.get("karpathy_split")
    files = SourceFiles(annotations=folder / m.files["annotations"],
                        karpathy_split=folder / split_file if split_file else None,
                        image_root=m.image_root, val_fraction=m.val_fraction, test_fraction=m.test_fraction)
    records = reader_for(m.kind, key=f"{folder / 'manifest.json'}: kind")(files)
    records = _naming_origins(records, {str(folder / name): shown_name(folder, m, role)
                                        for role, name in m.files.items()})
    return islice(records, m.max_records) if m.max_records else records


def iter_records(folder: str | Path) -> Iterator[Record]:
    """Stream the records of a prepared source folder (see ``prepare``)."""
    return records_from_manifest(folder, read_manifest(folder))
