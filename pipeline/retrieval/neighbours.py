"""The retrieved captions a retrieval captioner reads, by image key.

Two sources: the neighbour shards of ``capline retrieve`` (training, generate), and a
datastore searched here for images it has not seen (``capline caption``, generate
with ``generate.datastore``). Both say which datastore they come from (its manifest
``fingerprint`` and CLIP), which the model folder records.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from pipeline.core.errors import CaplineError
from pipeline.formats.neighbours import made_from, read_neighbour_shard
from pipeline.retrieval.index import for_search
from pipeline.retrieval.retrieve import Owners, nearest_others, unit_rows
from pipeline.retrieval.store import Datastore, DatastoreError, clip_name

DEFAULT_CANDIDATES = 15  # SmallCap's, as retrieve searches


def shard_neighbours(folder: Path, keys: Sequence[str], k: int) -> tuple[list[list[str]], dict]:
    """The k nearest captions of each of ``keys`` from the neighbour shards in ``folder``, and
    the identity of their datastore."""
    folder = Path(folder)
    paths = sorted(folder.glob("*.h5")) if folder.is_dir() else []
    if not paths:
        raise CaplineError(f"{folder}: no neighbour shards (*.h5); run `capline retrieve` (retrieval.k > 0)")
    by_key: dict[str, list[str]] = {}
    identity: dict = {}
    for path in paths:
        table = read_neighbour_shard(path)
        got_k = table.ids.shape[1] if table.ids.ndim == 2 else 0
        if got_k < k:
            raise CaplineError(f"{path}: holds {got_k} neighbours per image, the captioner reads {k} "
                               "(rerun `capline retrieve` with this retrieval.k)")
        source = made_from(table.attrs) or {}
        identity = {"fingerprint": source.get("datastore"), "model_id": table.attrs.get("model_id"),
                    "model_revision": table.attrs.get("model_revision")}
        by_key.update(zip(table.keys, (caps[:k] for caps in table.captions)))
    missing = [key for key in keys if key not in by_key]
    if missing:
        raise CaplineError(f"{folder}: no neighbours for {len(missing)} images (first: {missing[0]}); "
                           "rerun `capline retrieve` on these features")
    return [by_key[key] for key in keys], identity


def identity_of(store: Datastore) -> dict:
    m = store.manifest
    return {"fingerprint": m.get("fingerprint"), "model_id": m.get("model_id"),
            "model_revision": m.get("model_revision")}


def check_clip(store: Datastore, features: dict) -> None:
    """Refuse a datastore made with another CLIP than the model's features, naming both."""
    m = store.manifest
    mine = (m.get("model_id"), m.get("model_revision"))
    theirs = (features.get("model_id"), features.get("model_revision"))
    if mine != theirs:
        raise DatastoreError(
            f"the datastore {store.folder} was made with CLIP {clip_name(*mine, m.get('dim'))}, but the model "
            f"reads vectors of CLIP {theirs[0]} (revision {theirs[1]}); use a datastore made with the model's CLIP")


def datastore_neighbours(store: Datastore, vectors: np.ndarray, k: int, keys: Optional[Sequence[str]] = None,
                         nprobe: int = 32) -> list[list[str]]:
    """The k nearest captions of each of ``vectors`` [N, D] (CLIP image embeddings) in ``store``;
    captions recorded under an image's own key (``keys``) are never its neighbours."""
    if vectors.shape[-1] != store.index.d:
        raise DatastoreError(f"the datastore {store.folder} holds vectors of width {store.index.d}, the images "
                             f"{vectors.shape[-1]}")
    if len(store) < k:
        raise DatastoreError(f"the datastore {store.folder} holds {len(store)} captions, the model reads {k}")
    keys = list(keys) if keys is not None else [f"\0image {i}" for i in range(len(vectors))]
    index = for_search(store.index, nprobe)
    ids, _, _ = nearest_others(index, unit_rows(vectors), keys, Owners.of(store.keys), k,
                               max(k, DEFAULT_CANDIDATES))
    return [[store.texts[i] for i in row] for row in ids]
