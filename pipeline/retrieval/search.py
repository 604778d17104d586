"""A datastore searched for images it has not seen: the captions of a retrieval captioner's
prompt for ``capline caption`` and for generate with ``generate.datastore`` (another
datastore than the one the model was trained with, without retraining)."""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from pipeline.retrieval.index import for_search
from pipeline.retrieval.retrieve import Owners, nearest_others, unit_rows
from pipeline.retrieval.store import Datastore, DatastoreError, clip_name

DEFAULT_CANDIDATES = 15  # SmallCap's, as retrieve searches


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
