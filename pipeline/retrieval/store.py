"""The datastore folder (``data/datastore/``): what datastore writes and retrieve reads.

- ``index.faiss``: the FAISS index (``faiss.write_index``); row i is caption i.
- ``captions.jsonl``: one line per indexed caption, ``{"key": KEY | null, "text": str}``.
- ``manifest.json``: the CLIP that encoded the captions (``model_id``, ``model_revision``
  as feature shards record them, ``dim``), the index, the caption counts (read,
  dropped empty, dropped too long, kept), the source and the build ``fingerprint``.

Written whole into a temporary folder and renamed, so a kill never leaves half a
datastore under the real name.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from pipeline.core.errors import CaplineError
from pipeline.core.files import write_json, write_jsonl, written_whole
from pipeline.retrieval.captions import Caption
from pipeline.retrieval.index import read_index, write_index

FORMAT_VERSION = 1
INDEX_FILE = "index.faiss"
CAPTIONS_FILE = "captions.jsonl"
MANIFEST_FILE = "manifest.json"


class DatastoreError(CaplineError):
    """A datastore that is missing, malformed, or made for other features."""


def write_datastore(out: Path, index: Any, captions: Sequence[Caption], manifest: dict) -> None:
    with written_whole(out) as tmp:
        write_index(index, tmp / INDEX_FILE)
        write_jsonl(tmp / CAPTIONS_FILE, ({"key": c.key, "text": c.text} for c in captions))
        write_json(tmp / MANIFEST_FILE, manifest, indent=2, sort_keys=True, ensure_ascii=False)


def read_manifest(folder: Path) -> Optional[dict]:
    """The manifest, or None when the folder holds no (readable) datastore."""
    try:
        return json.loads((Path(folder) / MANIFEST_FILE).read_text())
    except (OSError, ValueError):
        return None


@dataclass
class Datastore:
    folder: Path
    manifest: dict
    keys: list[Optional[str]]
    texts: list[str]
    index: Any

    @classmethod
    def load(cls, folder: Path) -> "Datastore":
        folder = Path(folder)
        manifest = read_manifest(folder)
        if manifest is None:
            raise DatastoreError(f"{folder}: no datastore ({MANIFEST_FILE} missing or unreadable); "
                                 "run `capline datastore` first")
        keys, texts = [], []
        with open(folder / CAPTIONS_FILE, encoding="utf-8") as f:
            for line in f:
                row = json.loads(line)
                keys.append(row["key"])
                texts.append(row["text"])
        index = read_index(folder / INDEX_FILE)
        if index.ntotal != len(texts) or index.d != manifest["dim"]:
            raise DatastoreError(f"{folder}: the index holds {index.ntotal} vectors of width {index.d}, "
                                 f"the captions file {len(texts)} captions and the manifest width {manifest['dim']}")
        return cls(folder, manifest, keys, texts, index)

    def __len__(self) -> int:
        return len(self.texts)


def clip_name(model_id: Any, revision: Any, dim: Any) -> str:
    return f"{model_id} (revision {revision}, width {dim})"


def check_same_clip(folder: Path, manifest: dict, shard: Path, attrs: dict, dim: int) -> None:
    """Refuse features made by another CLIP than the datastore's captions, naming both."""
    mine = (manifest.get("model_id"), manifest.get("model_revision"), manifest.get("dim"))
    theirs = (attrs.get("model_id"), attrs.get("model_revision"), dim)
    if mine != theirs:
        raise DatastoreError(
            f"the datastore {folder} was made with CLIP {clip_name(*mine)}, but the feature shard {shard} holds "
            f"vectors of CLIP {clip_name(*theirs)}; rebuild the datastore with the CLIP that made the features")
    if attrs.get("output") != "image_embeds":
        raise DatastoreError(f"{shard}: its vectors are {attrs.get('output')!r}; retrieval compares CLIP's "
                             "image_embeds with its text embeddings (set clip.output: image_embeds)")
