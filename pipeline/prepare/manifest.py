"""``data/source/manifest.json``: what the prepare stage fetched and how to read it.

The download stage reads only this folder, so the manifest carries everything the
readers need (spec kind, file names relative to the folder, image root, split
fractions, record cap) plus the sha256 and origin of every fetched file.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

from pipeline.prepare.errors import DatasetError
from pipeline.core.files import write_json

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class Manifest:
    kind: str
    # Role ("annotations", "karpathy_split") -> file name inside the source folder.
    files: dict[str, str]
    # Role -> sha256 of that file, and role -> where it came from (path or URL).
    sha256: dict[str, str] = field(default_factory=dict)
    origin: dict[str, str] = field(default_factory=dict)
    # URL prefix that relative image names are joined to ("file:images" is
    # relative to the source folder, so outputs do not depend on where it lives).
    image_root: Optional[str] = None
    val_fraction: float = 0.05
    test_fraction: float = 0.1
    max_records: Optional[int] = None
    demo: bool = False
    # Number of records (after max_records), counted when prepare validated the spec.
    records: Optional[int] = None
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        # The kind is checked against the reader registry when the folder is read.
        if "annotations" not in self.files:
            raise DatasetError(MANIFEST, "files: 'annotations' is required")


def write_manifest(folder: str | Path, manifest: Manifest) -> Path:
    path = Path(folder) / MANIFEST
    write_json(path, asdict(manifest), indent=2, sort_keys=True)
    return path


def read_manifest(folder: str | Path) -> Manifest:
    path = Path(folder) / MANIFEST
    if not path.exists():
        raise DatasetError(path, "not found; run the prepare stage first (capline prepare)")
    try:
        raw = json.loads(path.read_text())
        if raw.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"format_version {raw.get('format_version')!r}, expected {FORMAT_VERSION}")
        return Manifest(**raw)
    except (ValueError, TypeError, DatasetError) as err:
        raise DatasetError(path, f"not a valid manifest: {err}") from None
