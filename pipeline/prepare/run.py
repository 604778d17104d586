"""The prepare stage: fetch and checksum the dataset spec, or generate the demo.

Writes ``data/source/``: the annotation file(s), ``manifest.json`` (spec kind,
files, sha256, origin, image root, split fractions) and, for the demo, the images.
The folder is built under a temporary name and renamed when whole. The spec is
read through once here, so a malformed line stops the pipeline before any image
is fetched.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Optional

from tqdm import tqdm

from pipeline.prepare.errors import DatasetError
from pipeline.prepare.fetch import materialize
from pipeline.prepare.manifest import MANIFEST, Manifest, write_manifest
from pipeline.prepare.readers import reader_for
from pipeline.prepare.source import records_from_manifest, shown_name
from pipeline.core.params import DEMO, DataParams

DEFAULT_USER_AGENT = "capline/0.1 (+https://github.com/capline/capline)"
DEMO_ANNOTATIONS = "captions.json"
DEMO_SPLIT = "dataset_demo.json"


def normalize_image_root(root: Optional[str]) -> Optional[str]:
    """URL prefixes stay; a local folder becomes an absolute file:// URL."""
    if not root:
        return None
    if root.lower().startswith(("http://", "https://", "file:")):
        return root.rstrip("/")
    return Path(root).resolve().as_uri()


def _count(folder: Path, manifest: Manifest) -> int:
    keys: set[str] = set()
    n = 0
    for rec in tqdm(records_from_manifest(folder, manifest), desc="checking records", unit="rec", leave=False):
        n += 1
        # Duplicate keys would collide in the shards; keys are short, so this set is small
        # next to the spec itself (COCO json is loaded whole anyway).
        if rec.key in keys:
            raise DatasetError(shown_name(folder, manifest, "annotations"), f"record key {rec.key!r} appears twice")
        keys.add(rec.key)
    return n


def prepare(
    out_dir: str | Path,
    data: DataParams,
    cache_dir: str | Path = "data/cache/annotations",
    user_agent: str = DEFAULT_USER_AGENT,
) -> Manifest:
    """Build ``out_dir`` (data/source) from the ``data`` params; return its manifest."""
    if data.source != DEMO:
        reader_for(data.source)  # an unknown source stops here, before anything is fetched
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        common = dict(val_fraction=data.val_fraction, test_fraction=data.test_fraction, max_records=data.max_records)
        if data.source == DEMO:
            from pipeline.prepare.scenes import generate_demo

            generate_demo(tmp, data.demo)
            files = {"annotations": DEMO_ANNOTATIONS, "karpathy_split": DEMO_SPLIT}
            sha = {role: _sha256(tmp / name) for role, name in files.items()}
            manifest = Manifest(kind="coco", files=files, sha256=sha, origin={role: "demo" for role in files},
                                image_root="file:images", demo=True, **common)
        else:
            files, sha, origin = {}, {}, {}
            for role, src in (("annotations", data.annotations), ("karpathy_split", data.karpathy_split)):
                if not src:
                    continue
                name, digest = materialize(src, tmp, None, Path(cache_dir), user_agent)
                if name in files.values() or name == MANIFEST:  # keep both files, and the manifest
                    os.replace(tmp / name, tmp / f"{role}-{name}")
                    name = f"{role}-{name}"
                files[role], sha[role], origin[role] = name, digest, src
            manifest = Manifest(kind=data.source, files=files, sha256=sha, origin=origin,
                                image_root=normalize_image_root(data.image_root), **common)
        manifest = Manifest(**{**manifest.__dict__, "records": _count(tmp, manifest)})
        write_manifest(tmp, manifest)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
        return manifest
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _sha256(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()
