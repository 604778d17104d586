"""retrieve_shards: the k nearest datastore captions of every image, one neighbour
shard per feature shard (pipeline/formats/neighbours.py), resumable.

An image never gets its own captions: every datastore caption recorded under the
image's key is excluded (by key, not by text: the same words under another key are
another image's caption and a fair neighbour, while a copy of the image's caption
under its own key is still its own). SmallCap needs this for training images,
whose captions are the targets; it is applied to every split, because a datastore
made from a caption file may hold the val and test references too. Images whose
vectors are the same up to rounding (one picture under two keys, duplicates.py)
count as one image. The search
takes ``retrieve_candidates`` nearest captions; an image whose own captions crowd
out the k others is searched again with room for all of them.

A finished neighbour shard is kept when its ``made_from`` (the feature shard's
sha256, the datastore's fingerprint, k, candidates, nprobe, the code and faiss)
equals this run's. Rank r of N handles feature shards r, r+N, ... as embed does.
"""
from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
from tqdm import tqdm

from pipeline.core.errors import CaplineError
from pipeline.core.fingerprint import RedoLog, code_sha256, describe_difference, digest, file_sha256, library_versions
from pipeline.core.params import RetrievalParams
from pipeline.core.runtime import Rank
from pipeline.formats.features import FeatureShardError, list_feature_shards, read_feature_shard
from pipeline.formats.neighbours import (FORMAT_VERSION, NeighbourShardError, NeighbourTable, made_from,
                                         read_neighbour_attrs, write_neighbour_shard)
from pipeline.retrieval.duplicates import duplicate_images
from pipeline.retrieval.index import for_search, search
from pipeline.retrieval.store import Datastore, check_same_clip

log = logging.getLogger(__name__)
NO_KEY = -1  # datastore captions that name no image
UNKNOWN_KEY = -2  # query keys with no caption in the datastore: never equal to a caption's code


@dataclass
class Owners:
    """Datastore captions by image key, as integer codes for vectorised comparisons."""

    codes: np.ndarray  # [captions] code of each caption's key (NO_KEY where none)
    code_of: dict[str, int]
    counts: np.ndarray  # [keys] captions per key

    alias: dict[str, str]  # key of a duplicate image -> the key it duplicates

    @classmethod
    def of(cls, keys: Sequence[Optional[str]], alias: Optional[dict[str, str]] = None) -> "Owners":
        alias = alias or {}
        code_of: dict[str, int] = {}
        codes = np.array([NO_KEY if k is None else code_of.setdefault(alias.get(k, k), len(code_of)) for k in keys],
                         np.int64)
        counts = np.bincount(codes[codes >= 0], minlength=len(code_of))
        return cls(codes, code_of, counts, alias)

    def code(self, key: str) -> int:
        return self.code_of.get(self.alias.get(key, key), UNKNOWN_KEY)

    def own_count(self, code: int) -> int:
        return int(self.counts[code]) if code >= 0 else 0


def nearest_others(index: Any, queries: np.ndarray, query_keys: Sequence[str], owners: Owners, k: int,
                   candidates: int) -> tuple[np.ndarray, np.ndarray, dict]:
    """(ids, scores) [Q, k] of each query's k nearest captions that are not its own, best first."""
    total = int(index.ntotal)
    codes = np.array([owners.code(key) for key in query_keys], np.int64)
    for key, code in zip(query_keys, codes):
        if total - owners.own_count(code) < k:
            raise CaplineError(f"the datastore holds {total} captions, {owners.own_count(code)} of them image "
                               f"{key}'s own: fewer than retrieval.k={k} others are left to retrieve")
    scores, ids = search(index, queries, min(candidates, total))
    own = (ids >= 0) & (owners.codes[np.maximum(ids, 0)] == codes[:, None])
    usable = (ids >= 0) & ~own
    out_ids = np.full((len(queries), k), -1, np.int64)
    out_scores = np.zeros((len(queries), k), np.float32)
    stats = {"excluded_own": int(own.sum()), "searched_again": 0}
    for row in range(len(queries)):
        cols = np.flatnonzero(usable[row])[:k]
        if len(cols) < k:
            # Own captions crowded the candidates: search with room for all of them.
            stats["searched_again"] += 1
            wide = min(total, k + owners.own_count(codes[row]))
            s, i = search(index, queries[row:row + 1], wide)
            s, i = s[0], i[0]
            keep = (i >= 0) & (owners.codes[np.maximum(i, 0)] != codes[row])
            cols_s, cols_i = s[keep][:k], i[keep][:k]
            if len(cols_i) < k:
                raise CaplineError(f"image {query_keys[row]}: the index returned {len(cols_i)} captions other than "
                                   f"its own, fewer than retrieval.k={k}; raise retrieval.ivf_nprobe")
            out_ids[row], out_scores[row] = cols_i, cols_s
        else:
            out_ids[row], out_scores[row] = ids[row, cols], scores[row, cols]
    return out_ids, out_scores, stats


def unit_rows(vectors: np.ndarray) -> np.ndarray:
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.where(norms > 0, norms, 1.0)


_NEIGHBOUR_FILE = re.compile(r"^(?P<stem>.+?)\.h5(?:\.tmp)?$")


def _remove_orphans(out_dir: Path, stems: set[str]) -> None:
    """Neighbour shards of feature shards that are gone would otherwise be read as current."""
    for path in out_dir.iterdir():
        m = _NEIGHBOUR_FILE.match(path.name)
        if m and m.group("stem") not in stems and path.is_file():
            log.warning("retrieve: removing %s: there is no feature shard %s.h5", path.name, m.group("stem"))
            path.unlink(missing_ok=True)


def retrieve_shards(params: RetrievalParams, features: Path, datastore: Path, out: Path, rank: Rank,
                    *, progress: bool = True) -> dict[str, Any]:
    """Write this rank's neighbour shards; returns a summary (counts, speed)."""
    t0 = time.perf_counter()
    features, out = Path(features), Path(out)
    store = Datastore.load(datastore)
    if len(store) < params.k:
        raise CaplineError(f"the datastore {datastore} holds {len(store)} captions, fewer than "
                           f"retrieval.k={params.k}; use a larger caption collection or a smaller k")
    shards = list_feature_shards(features)
    if not shards:
        raise FeatureShardError(f"{features}: no feature shards (*.h5); run the embed stage first")
    mine = [s for i, s in enumerate(shards) if rank.owns(i)]
    # Every shard is checked before any work (all are read for duplicates): features of another CLIP stop here.
    for shard in shards:
        head = read_feature_shard(shard, embeddings=False)
        check_same_clip(store.folder, store.manifest, shard, head.attrs, head.attrs["dim"])
    out.mkdir(parents=True, exist_ok=True)
    if rank.is_main:
        _remove_orphans(out, {s.stem for s in shards})

    # Every shard, not only this rank's: a duplicate may sit in any of them.
    alias = duplicate_images(shards)
    is_ivf = store.manifest["index"]["kind"] != "flat"
    base = {"datastore": store.manifest["fingerprint"], "duplicates_sha256": digest(sorted(alias.items())),
            "k": params.k, "candidates": params.retrieve_candidates,
            "nprobe": params.ivf_nprobe if is_ivf else None, "format_version": FORMAT_VERSION,
            "code_sha256": code_sha256("pipeline.retrieval.retrieve"),
            "libraries": library_versions("faiss-cpu", "faiss-gpu", "numpy")}
    owners = Owners.of(store.keys, alias)
    index = for_search(store.index, params.ivf_nprobe)
    summary: dict[str, Any] = {
        "rank": rank.rank, "world_size": rank.world_size, "datastore_captions": len(store),
        "index": store.manifest["index"]["type"], "k": params.k, "candidates": params.retrieve_candidates,
        "shards_total": len(shards), "shards_mine": len(mine), "shards_kept": 0, "shards_written": 0,
        "images": 0, "duplicate_images": len(alias), "excluded_own": 0, "searched_again": 0,
        "images_with_own_text_neighbour": 0, "seconds_search": 0.0,
    }
    redo = RedoLog(log, "retrieve")
    for shard in tqdm(mine, unit="shard", desc="retrieve", disable=not progress):
        target = out / (shard.stem + ".h5")
        target.with_name(target.name + ".tmp").unlink(missing_ok=True)
        expected = {**base, "source_sha256": file_sha256(shard)}
        if target.exists():
            why = _why_not_reusable(target, expected)
            if why is None:
                summary["shards_kept"] += 1
                continue
            redo.note(target.name, why)
        table = read_feature_shard(shard)
        t = time.perf_counter()
        ids, scores, stats = nearest_others(index, unit_rows(table.embeddings), table.keys, owners, params.k,
                                            params.retrieve_candidates)
        summary["seconds_search"] += time.perf_counter() - t
        texts = [[store.texts[i] for i in row] for row in ids]
        # The same words as one of the image's own captions under another key: most
        # likely a duplicate of the image under another key (docs/retrieval.md).
        summary["images_with_own_text_neighbour"] += sum(
            bool(set(row) & set(own)) for row, own in zip(texts, table.captions))
        write_neighbour_shard(target, NeighbourTable(
            keys=table.keys, splits=table.splits, ids=ids, scores=scores, captions=texts,
            attrs={"made_from": json.dumps(expected, sort_keys=True), "k": params.k,
                   "model_id": store.manifest["model_id"], "model_revision": store.manifest["model_revision"],
                   "source": shard.name, "format_version": FORMAT_VERSION}))
        summary["shards_written"] += 1
        summary["images"] += len(table)
        summary["excluded_own"] += stats["excluded_own"]
        summary["searched_again"] += stats["searched_again"]
    redo.close()
    summary["seconds"] = time.perf_counter() - t0
    summary["images_per_s"] = summary["images"] / summary["seconds_search"] if summary["seconds_search"] else 0.0
    return summary


def _why_not_reusable(target: Path, expected: dict) -> Optional[str]:
    try:
        saved = made_from(read_neighbour_attrs(target))
    except NeighbourShardError:
        return "it is not a readable neighbour shard"
    if saved != expected:
        return describe_difference(saved if isinstance(saved, dict) else {}, expected)
    return None
