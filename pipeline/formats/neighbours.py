"""Neighbour shards: the retrieved captions of each image, one file per feature shard.

Layout (``NNNNN.h5``, the feature shard's stem): datasets ``keys`` and ``splits`` [N]
(utf-8, the feature shard's order), ``ids`` [N, k] (int64 rows of the datastore's
``captions.jsonl``), ``scores`` [N, k] (float32 cosine of image and caption),
``captions`` [N, k] (utf-8, the caption texts), nearest first. Attributes:
``made_from`` (JSON: what the shard was made from, compared on resume), ``k``,
``model_id``, ``model_revision`` (the CLIP of datastore and features), ``source``
(the feature shard's name), ``format_version``.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from pipeline.core.errors import CaplineError
from pipeline.formats.features import attr_value

FORMAT_VERSION = 1


class NeighbourShardError(CaplineError):
    """A neighbour shard that is unreadable or malformed."""


@dataclass
class NeighbourTable:
    keys: list[str]
    splits: list[str]
    ids: np.ndarray  # [N, k] int64
    scores: np.ndarray  # [N, k] float32
    captions: list[list[str]]
    attrs: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.keys)


def write_neighbour_shard(path: Path, table: NeighbourTable) -> None:
    """Write under a temporary name and rename when whole."""
    path = Path(path)
    n = len(table.keys)
    k = table.ids.shape[1] if table.ids.ndim == 2 else 0
    if table.ids.shape != (n, k) or table.scores.shape != (n, k) or len(table.captions) != n \
            or any(len(c) != k for c in table.captions) or len(table.splits) != n:
        raise NeighbourShardError(f"{path}: inconsistent table: {n} keys, ids {table.ids.shape}, "
                                  f"scores {table.scores.shape}")
    tmp = path.with_name(path.name + ".tmp")
    text = h5py.string_dtype("utf-8")
    try:
        with h5py.File(tmp, "w") as f:
            f.create_dataset("keys", data=np.array(table.keys, dtype=object), dtype=text)
            f.create_dataset("splits", data=np.array(table.splits, dtype=object), dtype=text)
            f.create_dataset("ids", data=table.ids.astype(np.int64))
            f.create_dataset("scores", data=table.scores.astype(np.float32))
            caps = np.array([list(c) for c in table.captions] if n else np.zeros((0, k)), dtype=object)
            f.create_dataset("captions", data=caps.reshape(n, k), dtype=text)
            for name, value in table.attrs.items():
                f.attrs[name] = value
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _text(values) -> list:
    return [v.decode("utf-8") if isinstance(v, bytes) else v for v in values]


def read_neighbour_attrs(path: Path) -> dict:
    try:
        with h5py.File(path, "r") as f:
            return {k: attr_value(v) for k, v in f.attrs.items()}
    except OSError as err:
        raise NeighbourShardError(f"{path}: not a readable neighbour shard ({err})") from None


def read_neighbour_shard(path: Path) -> NeighbourTable:
    path = Path(path)
    try:
        with h5py.File(path, "r") as f:
            attrs = {k: attr_value(v) for k, v in f.attrs.items()}
            keys, splits = _text(f["keys"][()]), _text(f["splits"][()])
            ids, scores = f["ids"][()], f["scores"][()]
            captions = [_text(row) for row in f["captions"][()]]
    except (OSError, KeyError) as err:
        raise NeighbourShardError(f"{path}: not a readable neighbour shard ({err})") from None
    return NeighbourTable(keys=keys, splits=splits, ids=ids, scores=scores, captions=captions, attrs=attrs)


def made_from(attrs: dict) -> object:
    """The ``made_from`` attribute as JSON (None when absent or unreadable)."""
    try:
        return json.loads(attrs.get("made_from", "null"))
    except (TypeError, ValueError):
        return None
