"""HDF5 feature shards: one per image shard, CLIP vectors plus keys, splits, captions.

Layout (``NNNNN.h5``): datasets ``embeddings`` [N, D] (explicit ~1 MiB chunks, no
compression), ``keys``/``splits``/``captions`` [N] utf-8 strings (captions as a JSON
list per image), and with ``clip.patch_tokens`` ``patch_tokens`` [N, T, W] (the vision
tower's last hidden state, fp16, one chunk per image) for cross-attention mappers. Attributes name the encoder that made the vectors; a reader given
``expect`` refuses a shard whose attributes differ, so a model trained on one
encoder is never fed another's vectors.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import h5py
import numpy as np

from pipeline.core.errors import CaplineError

FORMAT_VERSION = 1
CHUNK_BYTES = 2**20
# The attributes that describe the encoder; they must agree across the shards of one
# feature folder. Other attributes (source, counts) are per shard.
IDENTITY_ATTRS = ("model_id", "model_revision", "output", "dtype", "normalized", "preprocess", "format_version")
PATCH_TOKENS = "patch_tokens"
NO_PATCH_TOKENS = ("has no patch tokens (dataset 'patch_tokens'), which mapper.type cross_attention reads; "
                   "embed them with clip.patch_tokens: auto or true (then rerun embed)")


class FeatureShardError(CaplineError):
    """A feature shard that is unreadable, malformed or made by another encoder."""


@dataclass
class FeatureTable:
    keys: list[str]
    embeddings: np.ndarray  # [N, D]
    splits: list[str]
    captions: list[list[str]]
    attrs: dict = field(default_factory=dict)
    patch_tokens: Optional[np.ndarray] = None  # [N, T, W] float16, written when given

    def __len__(self) -> int:
        return len(self.keys)


def list_feature_shards(feature_dir: Path) -> list[Path]:
    """The feature shards of a folder, in shard (name) order."""
    feature_dir = Path(feature_dir)
    if not feature_dir.is_dir():
        raise FeatureShardError(f"feature folder not found: {feature_dir}")
    return sorted(p for p in feature_dir.glob("*.h5") if p.is_file())


def _chunk_rows(dim: int, itemsize: int, n: int) -> int:
    return max(1, min(max(n, 1), CHUNK_BYTES // max(1, dim * itemsize)))


def write_feature_shard(path: Path, table: FeatureTable) -> None:
    """Write a shard under a temporary name and rename it when whole."""
    path = Path(path)
    emb = np.asarray(table.embeddings)
    n = len(table.keys)
    if emb.ndim != 2 or emb.shape[0] != n or len(table.splits) != n or len(table.captions) != n:
        raise FeatureShardError(
            f"{path}: inconsistent table: {n} keys, embeddings {emb.shape}, "
            f"{len(table.splits)} splits, {len(table.captions)} caption lists")
    tmp = path.with_name(path.name + ".tmp")
    text = h5py.string_dtype("utf-8")
    try:
        with h5py.File(tmp, "w") as f:
            rows = _chunk_rows(emb.shape[1], emb.dtype.itemsize, n)
            # An empty shard (every image failed) still needs a chunked [0, D] dataset,
            # which HDF5 allows only with an unlimited first dimension.
            f.create_dataset("embeddings", data=emb, chunks=(rows, emb.shape[1]),
                             maxshape=(None, emb.shape[1]) if n == 0 else None)
            f.create_dataset("keys", data=np.array(table.keys, dtype=object), dtype=text)
            f.create_dataset("splits", data=np.array(table.splits, dtype=object), dtype=text)
            caps = [json.dumps(list(c), ensure_ascii=False) for c in table.captions]
            f.create_dataset("captions", data=np.array(caps, dtype=object), dtype=text)
            if table.patch_tokens is not None:
                tokens = np.asarray(table.patch_tokens, dtype=np.float16)
                if tokens.ndim != 3 or tokens.shape[0] != n:
                    raise FeatureShardError(f"{path}: patch tokens {tokens.shape} for {n} keys")
                # One chunk per image: a reader gathering a batch's rows reads only theirs.
                f.create_dataset(PATCH_TOKENS, data=tokens, chunks=(1, *tokens.shape[1:]),
                                 maxshape=(None, *tokens.shape[1:]) if n == 0 else None)
            for k, v in table.attrs.items():
                f.attrs[k] = v
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def attr_value(value: Any) -> Any:
    """An HDF5 attribute value as plain Python (numpy scalars and arrays, bytes): the
    one conversion used wherever attributes are compared with JSON values."""
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value


def read_attrs(path: Path) -> dict:
    """Only the attributes of a shard (cheap: no data is read)."""
    path = Path(path)
    try:
        with h5py.File(path, "r") as f:
            return {k: attr_value(v) for k, v in f.attrs.items()}
    except (OSError, KeyError) as err:
        raise FeatureShardError(f"{path}: not a readable feature shard ({err})") from None


def check_attrs(path: Path, attrs: dict, expect: Optional[dict]) -> None:
    """Refuse a shard whose attributes differ from ``expect``, naming which."""
    for k, want in (expect or {}).items():
        got = attrs.get(k)
        if got != want:
            raise FeatureShardError(
                f"{path}: attribute {k!r} is {got!r}, expected {want!r} (made by another encoder or settings)")


def read_feature_shard(path: Path, expect: Optional[dict] = None, embeddings: bool = True) -> FeatureTable:
    """Read one shard whole; ``expect`` maps attribute names to required values.

    ``embeddings=False`` reads everything but the vectors (cheap): the table's
    ``embeddings`` is then a zero-width [N, 0] array and ``attrs["dim"]`` the width.
    """
    path = Path(path)
    try:
        with h5py.File(path, "r") as f:
            attrs = {k: attr_value(v) for k, v in f.attrs.items()}
            check_attrs(path, attrs, expect)
            for name in ("embeddings", "keys", "splits", "captions"):
                if name not in f:
                    raise FeatureShardError(f"{path}: dataset {name!r} is missing")
            if embeddings:
                emb = f["embeddings"][()]
            else:
                shape = f["embeddings"].shape
                emb = np.zeros((shape[0], 0), dtype=f["embeddings"].dtype)
                attrs["dim"] = int(shape[1]) if len(shape) == 2 else 0
            keys = [k.decode("utf-8") if isinstance(k, bytes) else k for k in f["keys"][()]]
            splits = [s.decode("utf-8") if isinstance(s, bytes) else s for s in f["splits"][()]]
            caps_raw = [c.decode("utf-8") if isinstance(c, bytes) else c for c in f["captions"][()]]
    except FeatureShardError:
        raise
    except (OSError, KeyError) as err:
        raise FeatureShardError(f"{path}: not a readable feature shard ({err})") from None
    if emb.ndim != 2 or not (emb.shape[0] == len(keys) == len(splits) == len(caps_raw)):
        raise FeatureShardError(f"{path}: datasets disagree in length (embeddings {emb.shape}, {len(keys)} keys)")
    try:
        captions = [json.loads(c) for c in caps_raw]
    except json.JSONDecodeError as err:
        raise FeatureShardError(f"{path}: captions are not JSON lists ({err})") from None
    return FeatureTable(keys=keys, embeddings=emb, splits=splits, captions=captions, attrs=attrs)


def read_feature_array(path: Path, dataset: str = "embeddings") -> np.ndarray:
    """One dataset of a shard whole: ``embeddings`` [N, D] or ``patch_tokens`` [N, T, W]."""
    path = Path(path)
    try:
        with h5py.File(path, "r") as f:
            if dataset not in f:
                raise FeatureShardError(f"{path}: {NO_PATCH_TOKENS}" if dataset == PATCH_TOKENS
                                        else f"{path}: dataset {dataset!r} is missing")
            return f[dataset][()]
    except FeatureShardError:
        raise
    except (OSError, KeyError) as err:
        raise FeatureShardError(f"{path}: not a readable feature shard ({err})") from None


def patch_tokens_shape(path: Path) -> tuple[int, int]:
    """(tokens, width) of a shard's patch tokens (cheap: no data is read)."""
    path = Path(path)
    try:
        with h5py.File(path, "r") as f:
            if PATCH_TOKENS not in f:
                raise FeatureShardError(f"{path}: {NO_PATCH_TOKENS}")
            shape = f[PATCH_TOKENS].shape
    except FeatureShardError:
        raise
    except (OSError, KeyError) as err:
        raise FeatureShardError(f"{path}: not a readable feature shard ({err})") from None
    return int(shape[1]), int(shape[2])


def check_same_encoder(shard: Path, attrs: dict, first: Path, first_attrs: dict) -> None:
    """Refuse a shard whose encoder attributes differ from the folder's first shard's."""
    for k in IDENTITY_ATTRS:
        if attrs.get(k) != first_attrs.get(k):
            raise FeatureShardError(
                f"{shard}: attribute {k!r} is {attrs.get(k)!r}, but {first.name} has "
                f"{first_attrs.get(k)!r}; the feature folder mixes encoders or settings")


def load_features(feature_dir: Path, split: Optional[str] = None, expect: Optional[dict] = None,
                  dataset: str = "embeddings") -> FeatureTable:
    """All shards of a folder concatenated in shard order, optionally one split only.

    Every shard must carry the same encoder attributes as the first (and as
    ``expect``); the returned ``attrs`` are those identity attributes. With
    ``dataset="patch_tokens"`` the table's ``embeddings`` are the patch tokens [N, T, W]
    (what a cross-attention model reads), as stored (fp16).
    """
    shards = list_feature_shards(feature_dir)
    if not shards:
        raise FeatureShardError(f"{feature_dir}: no feature shards (*.h5)")
    keys: list[str] = []
    splits: list[str] = []
    captions: list[list[str]] = []
    parts: list[np.ndarray] = []
    first: Optional[tuple[Path, dict]] = None
    for shard in shards:
        table = read_feature_shard(shard, expect, embeddings=dataset == "embeddings")
        if dataset != "embeddings":
            table.embeddings = read_feature_array(shard, dataset)
        if first is None:
            first = (shard, table.attrs)
        else:
            check_same_encoder(shard, table.attrs, first[0], first[1])
            if table.embeddings.shape[1:] != parts[0].shape[1:]:
                raise FeatureShardError(
                    f"{shard}: {dataset} shape {table.embeddings.shape[1:]} differs from {first[0].name}'s "
                    f"{parts[0].shape[1:]}")
        idx = [i for i, s in enumerate(table.splits) if split is None or s == split]
        keys += [table.keys[i] for i in idx]
        splits += [table.splits[i] for i in idx]
        captions += [table.captions[i] for i in idx]
        parts.append(table.embeddings[idx] if split is not None else table.embeddings)
    assert first is not None
    attrs = {k: first[1][k] for k in IDENTITY_ATTRS if k in first[1]}
    return FeatureTable(keys=keys, embeddings=np.concatenate(parts, axis=0), splits=splits,
                        captions=captions, attrs=attrs)
