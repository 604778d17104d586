"""Images that are one picture under several keys: their vectors are the same up to the
last bits (which the batch an image was embedded in may change). Each such image's
captions are the others' own captions too, so retrieve excludes them alike.

Found without comparing every pair: each unit vector gets sign codes against random
hyperplanes (TABLES codes of BITS bits; identical pictures share a code in some table
with near certainty), and only images sharing a code are compared, by cosine. A
re-encoded or resized copy is farther apart than ``SAME_COSINE`` and is not found.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from pipeline.formats.features import read_feature_shard

SAME_COSINE = 1 - 1e-5  # identical pictures differ in float rounding only (about 1e-7)
TABLES, BITS = 4, 32
SEED = 0


def _unit(vectors: np.ndarray) -> np.ndarray:
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.where(norms > 0, norms, 1.0)


def _codes(vectors: np.ndarray, planes: np.ndarray) -> np.ndarray:
    """[N, TABLES] uint64 sign codes."""
    bits = ((vectors @ planes) > 0).reshape(len(vectors), TABLES, BITS).astype(np.uint64)
    return (bits << np.arange(BITS, dtype=np.uint64)).sum(axis=2, dtype=np.uint64)


def _buckets(codes: np.ndarray) -> list[np.ndarray]:
    """Row indices that share a code, per table; only groups of two or more."""
    out = []
    for t in range(codes.shape[1]):
        order = np.argsort(codes[:, t], kind="stable")
        starts = np.flatnonzero(np.diff(codes[order, t])) + 1
        out += [g for g in np.split(order, starts) if len(g) > 1]
    return out


def duplicate_images(shards: Sequence[Path]) -> dict[str, str]:
    """key -> the first key (in shard and row order) of the same picture, for every later copy."""
    keys: list[str] = []
    codes, where = [], []  # codes per shard; (shard, index of its first row, rows) of each shard
    planes = None
    for shard in shards:  # first pass: codes only, shard by shard
        table = read_feature_shard(shard)
        if planes is None:
            planes = np.random.default_rng(SEED).standard_normal(
                (table.embeddings.shape[1], TABLES * BITS)).astype(np.float32)
        where.append((shard, len(keys), len(table.keys)))
        keys += table.keys
        codes.append(_codes(_unit(table.embeddings), planes))
    if not keys:
        return {}
    buckets = _buckets(np.concatenate(codes))
    if not buckets:
        return {}
    wanted = np.unique(np.concatenate(buckets))
    vectors: dict[int, np.ndarray] = {}
    for shard, first, count in where:  # second pass: the vectors of images that share a code
        rows = wanted[(wanted >= first) & (wanted < first + count)]
        if len(rows):
            emb = _unit(read_feature_shard(shard).embeddings)
            vectors.update(zip(rows.tolist(), emb[rows - first]))
    parent = list(range(len(keys)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for group in buckets:
        sims = np.stack([vectors[i] for i in group]) @ np.stack([vectors[i] for i in group]).T
        for a, b in zip(*np.nonzero(np.triu(sims >= SAME_COSINE, k=1))):
            ra, rb = root(int(group[a])), root(int(group[b]))
            if ra != rb:
                parent[max(ra, rb)] = min(ra, rb)  # the earliest image names the picture
    return {keys[i]: keys[root(i)] for i in range(len(keys)) if root(i) != i}

