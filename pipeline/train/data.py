"""What training reads: tokenised (image, caption) pairs, image vectors, batch order.

* Captions are tokenised once, up front, into one flat int32 array with offsets
  (about 4 bytes a token: COCO's 600k captions are ~30 MB).
* Image vectors come from a store: ``MemoryVectors`` holds the whole feature set
  (read once) when it fits ``train.max_memory_gb``; otherwise ``ShardVectors``
  reads shards when a batch needs them and keeps at most two windows of shards.
  A store holds one dataset of the shards: ``embeddings`` [N, D] (as float32) or a
  cross-attention mapper's ``patch_tokens`` [N, T, D] (as stored, fp16; batches are
  float32), so patch tokens stream with the same bound on memory.
* The order of an epoch depends only on ``(train.seed, epoch)``: a permutation of
  all pairs in memory; streamed, the shards are shuffled, then the pairs within
  each window of shards. Batches are the global batches (``train.batch_size``);
  the last incomplete one is dropped (as ClipCap does), so every step has the
  same size whatever the number of processes. With ``train.bucket_by_length``
  pairs of similar caption length are batched together (sorted within chunks of
  ``BUCKET_BATCHES`` batches, whose order is then shuffled).
* A global batch is split into ``world_size × grad_accum`` micro-batches after
  sorting it by length, so each micro-batch carries little padding.
"""
from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from pipeline.models.captioner import tokenize_captions
from pipeline.formats.features import (IDENTITY_ATTRS, FeatureShardError, check_same_encoder, list_feature_shards,
                               load_features, patch_tokens_shape, read_feature_array, read_feature_shard)

log = logging.getLogger(__name__)
BUCKET_BATCHES = 50  # length bucketing sorts within chunks of this many batches
GIB = 2**30
TOKENIZE_CHUNK = 65536  # captions per tokenizer call


@dataclass
class Captions:
    """Tokenised captions of one split: pair i is image ``rows[i]`` with tokens
    ``flat[offsets[i]:offsets[i + 1]]`` (ending with EOS)."""

    rows: np.ndarray  # int64 [N], global image row (shard order, then row in shard)
    offsets: np.ndarray  # int64 [N + 1]
    flat: np.ndarray  # int32 [total tokens]

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def tokens(self, i: int) -> np.ndarray:
        return self.flat[self.offsets[i]:self.offsets[i + 1]]


def build_captions(tokenizer: Any, rows: Sequence[int], captions: Sequence[Sequence[str]],
                   max_tokens: int) -> Captions:
    """One pair per non-blank caption of each image ``rows[i]``."""
    pair_rows, texts = [], []
    for row, caps in zip(rows, captions):
        for cap in caps:
            if cap and cap.strip():
                pair_rows.append(row)
                texts.append(cap)
    lengths, parts = [], []
    for c in range(0, len(texts), TOKENIZE_CHUNK):  # bounded temporary lists
        ids = tokenize_captions(tokenizer, texts[c:c + TOKENIZE_CHUNK], max_tokens)
        lengths.append(np.fromiter((len(r) for r in ids), dtype=np.int64, count=len(ids)))
        parts.append(np.fromiter((t for r in ids for t in r), dtype=np.int32, count=int(lengths[-1].sum())))
    lengths_all = np.concatenate(lengths) if lengths else np.zeros(0, np.int64)
    offsets = np.zeros(len(lengths_all) + 1, dtype=np.int64)
    np.cumsum(lengths_all, out=offsets[1:])
    flat = np.concatenate(parts) if parts else np.zeros(0, np.int32)
    return Captions(np.asarray(pair_rows, dtype=np.int64), offsets, flat)


# ----------------------------------------------------------------- vectors
def _held(array: np.ndarray) -> np.ndarray:
    """How a store holds a dataset: vectors as float32, patch tokens as stored (fp16, half the memory)."""
    return np.ascontiguousarray(array, dtype=np.float32 if array.ndim == 2 else array.dtype)


class MemoryVectors:
    """The whole feature set in memory."""

    streamed = False

    def __init__(self, embeddings: np.ndarray) -> None:
        self.vectors = torch.from_numpy(_held(embeddings))

    def get(self, rows: np.ndarray) -> torch.Tensor:
        return self.vectors[torch.from_numpy(np.asarray(rows, dtype=np.int64))].float()


class ShardVectors:
    """Vectors read from shards on demand; at most ``capacity`` shards held (LRU)."""

    streamed = True

    def __init__(self, paths: list[Path], shard_rows: list[int], capacity: int, dataset: str = "embeddings") -> None:
        self.paths = paths
        self.dataset = dataset
        self.starts = np.concatenate([[0], np.cumsum(shard_rows)]).astype(np.int64)
        self.capacity = max(1, capacity)
        self.cache: OrderedDict[int, np.ndarray] = OrderedDict()

    @property
    def held_bytes(self) -> int:
        """Bytes of the shards held now (the streamed working set)."""
        return sum(a.nbytes for a in self.cache.values())

    def shard_of(self, rows: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.starts, rows, side="right") - 1

    def _shard(self, s: int) -> np.ndarray:
        if s in self.cache:
            self.cache.move_to_end(s)
            return self.cache[s]
        while len(self.cache) >= self.capacity:
            self.cache.popitem(last=False)
        self.cache[s] = _held(read_feature_array(self.paths[s], self.dataset))
        return self.cache[s]

    def get(self, rows: np.ndarray) -> torch.Tensor:
        rows = np.asarray(rows, dtype=np.int64)
        shards = self.shard_of(rows)
        out = None
        for s in np.unique(shards):
            sel = np.flatnonzero(shards == s)
            part = self._shard(int(s))[rows[sel] - self.starts[s]]
            if out is None:
                out = np.empty((len(rows), *part.shape[1:]), dtype=np.float32)
            out[sel] = part
        return torch.from_numpy(out if out is not None else np.zeros((0, 0), np.float32))


# ---------------------------------------------------------------- loading
@dataclass
class TrainingData:
    train: Captions
    val: Captions
    vectors: Any  # MemoryVectors | ShardVectors
    attrs: dict  # encoder identity attributes of the shards
    dim: int
    train_images: int
    n_shards: int
    window: int  # shards shuffled together (all of them in memory)
    pair_shard: np.ndarray  # shard of each train pair
    dataset: str  # embeddings | patch_tokens
    feature_bytes: int
    load_seconds: float
    tokenize_seconds: float
    keys: list  # image key of each global row (shard order): how neighbour shards join


def load_training_data(features_dir: Path, tokenizer: Any, max_tokens: int, max_memory_gb: float,
                       dataset: str = "embeddings") -> TrainingData:
    """Read the train and val captions (and, when they fit, all of ``dataset``) of a feature folder."""
    features_dir = Path(features_dir)
    shards = list_feature_shards(features_dir)
    if not shards:
        raise FeatureShardError(f"{features_dir}: no feature shards (*.h5)")
    t0 = time.perf_counter()
    metas = []
    first = None
    for path in shards:
        meta = read_feature_shard(path, embeddings=False)
        if first is None:
            first = (path, meta.attrs)
        else:
            check_same_encoder(path, meta.attrs, first[0], first[1])
            if meta.attrs["dim"] != first[1]["dim"]:
                raise FeatureShardError(f"{path}: embedding width {meta.attrs['dim']} differs from "
                                        f"{first[0].name}'s {first[1]['dim']}")
        metas.append(meta)
    shard_rows = [len(m.keys) for m in metas]
    if dataset == "embeddings":
        dim = int(first[1]["dim"])
        row_bytes = dim * 4
    else:
        shape = patch_token_shape(shards)
        dim = shape[1]
        row_bytes = shape[0] * shape[1] * 2  # held as stored: fp16
    feature_bytes = sum(shard_rows) * row_bytes
    limit = int(max_memory_gb * GIB)
    if feature_bytes <= limit:
        table = load_features(features_dir, dataset=dataset)
        vectors: Any = MemoryVectors(table.embeddings)
        window = len(shards)
        attrs = dict(table.attrs)
    else:
        largest = max(shard_rows) * row_bytes
        window = max(1, limit // (2 * max(largest, 1)))
        vectors = ShardVectors(shards, shard_rows, capacity=2 * window, dataset=dataset)
        attrs = {k: first[1][k] for k in IDENTITY_ATTRS if k in first[1]}
        if 2 * largest > limit:
            log.warning("train.max_memory_gb %.3g holds fewer than two shards (%.3g GB each): two are kept anyway",
                        max_memory_gb, largest / GIB)
        log.info("features (%.3g GB) exceed train.max_memory_gb %.3g: streamed, %d of %d shards shuffled together",
                 feature_bytes / GIB, max_memory_gb, window, len(shards))
    load_seconds = time.perf_counter() - t0

    t0 = time.perf_counter()
    starts = np.concatenate([[0], np.cumsum(shard_rows)])
    splits_rows: dict[str, list[int]] = {"train": [], "val": []}
    splits_caps: dict[str, list[list[str]]] = {"train": [], "val": []}
    for s, meta in enumerate(metas):
        for i, (split, caps) in enumerate(zip(meta.splits, meta.captions)):
            if split in splits_rows:
                splits_rows[split].append(int(starts[s] + i))
                splits_caps[split].append(caps)
    if not splits_rows["train"]:
        raise FeatureShardError(f"{features_dir}: no images in the train split")
    train = build_captions(tokenizer, splits_rows["train"], splits_caps["train"], max_tokens)
    val = build_captions(tokenizer, splits_rows["val"], splits_caps["val"], max_tokens)
    tokenize_seconds = time.perf_counter() - t0
    if len(train) == 0:
        raise FeatureShardError(f"{features_dir}: the train split has no non-empty captions")
    pair_shard = (np.searchsorted(starts, train.rows, side="right") - 1).astype(np.int64)
    return TrainingData(train=train, val=val, vectors=vectors, attrs=attrs, dim=dim,
                        train_images=len(splits_rows["train"]), n_shards=len(shards), window=window,
                        pair_shard=pair_shard, dataset=dataset, feature_bytes=feature_bytes, load_seconds=load_seconds,
                        tokenize_seconds=tokenize_seconds, keys=[key for m in metas for key in m.keys])


def patch_token_shape(shards: list[Path]) -> tuple[int, int]:
    """(tokens, width) of the shards' patch tokens: the same in every shard, or a FeatureShardError."""
    shapes = {patch_tokens_shape(path) for path in shards}
    if len(shapes) > 1:
        raise FeatureShardError(f"{shards[0].parent}: patch tokens of different shapes {sorted(shapes)}")
    return shapes.pop()


# ------------------------------------------------------------------ order
def epoch_batches(data: TrainingData, batch_size: int, seed: int, epoch: int, bucket: bool) -> np.ndarray:
    """The global batches of ``epoch`` as pair indices [batches, batch_size]; a function of
    ``(seed, epoch)`` and the data only (never of the number of processes)."""
    n = len(data.train)
    rng = np.random.default_rng([seed, epoch])
    if data.window >= data.n_shards:
        order = rng.permutation(n)
    else:
        by_shard = [np.flatnonzero(data.pair_shard == s) for s in range(data.n_shards)]
        shard_order = rng.permutation(data.n_shards)
        parts = []
        for w in range(0, data.n_shards, data.window):
            idx = np.concatenate([by_shard[s] for s in shard_order[w:w + data.window]])
            parts.append(idx[rng.permutation(len(idx))])
        order = np.concatenate(parts)
    count = n // batch_size
    batches = order[:count * batch_size].reshape(count, batch_size)
    if bucket and count > 1:
        lengths = data.train.lengths
        out = []
        for c in range(0, count, BUCKET_BATCHES):
            chunk = batches[c:c + BUCKET_BATCHES].reshape(-1)
            chunk = chunk[np.argsort(lengths[chunk], kind="stable")].reshape(-1, batch_size)
            out.append(chunk[rng.permutation(len(chunk))])
        batches = np.concatenate(out)
    return batches


def micro_batches(batch: np.ndarray, lengths: np.ndarray, parts: int) -> list[np.ndarray]:
    """A global batch sorted by caption length (longest first), cut into ``parts`` equal slices."""
    ordered = batch[np.argsort(-lengths[batch], kind="stable")]
    return np.split(ordered, parts)


def collate(captions: Captions, vectors: Any, indices: np.ndarray, pad_id: int
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Vectors, right-padded token ids and attention mask of the pairs ``indices``."""
    indices = np.asarray(indices, dtype=np.int64)
    lengths = captions.lengths[indices]
    t = int(lengths.max()) if len(indices) else 1
    ids = np.full((len(indices), t), pad_id, dtype=np.int64)
    mask = np.zeros((len(indices), t), dtype=np.int64)
    for j, i in enumerate(indices):
        n = int(lengths[j])
        ids[j, :n] = captions.flat[captions.offsets[i]:captions.offsets[i] + n]
        mask[j, :n] = 1
    return vectors.get(captions.rows[indices]), torch.from_numpy(ids), torch.from_numpy(mask)


def validation_batches(captions: Captions, vectors: Any, rank: int, world_size: int, batch_size: int
                       ) -> list[np.ndarray]:
    """This rank's share of the val pairs (every world_size-th), batched by length
    (streamed: by shard first, so each shard is read once)."""
    mine = np.arange(rank, len(captions), world_size)
    if len(mine) == 0:
        return []
    key = captions.lengths[mine]
    if getattr(vectors, "streamed", False):
        order = np.lexsort((key, vectors.shard_of(captions.rows[mine])))
    else:
        order = np.argsort(key, kind="stable")
    mine = mine[order]
    return [mine[b:b + batch_size] for b in range(0, len(mine), batch_size)]

