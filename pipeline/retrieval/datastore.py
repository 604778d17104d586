"""build_datastore: a caption collection, filtered by length, encoded by the pinned
CLIP's text tower, indexed with FAISS (see store.py for the folder it writes).

A finished datastore is kept when its fingerprint (the captions, the CLIP, the
tokenizer limit, the batch size, the index settings, the code and the libraries)
equals what this run would build. Encoding, the long part, is saved chunk by chunk
(chunks.py), so a killed build resumes; under torchrun the ranks encode alternate
chunks and rank 0 builds the index once every chunk is there.
"""
from __future__ import annotations

import logging
import math
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from pipeline.core.errors import CaplineError
from pipeline.core.fingerprint import code_sha256, digest, library_versions
from pipeline.core.params import Params
from pipeline.core.runtime import Rank, barrier, choose_device, process_group
from pipeline.models.pretrained import clip_text_missing, model_identity
from pipeline.retrieval.captions import read_collection
from pipeline.retrieval.chunks import EncodedChunks
from pipeline.retrieval.index import FLAT, build_index, choose_kind, nlist_for
from pipeline.retrieval.lengths import keep_short, load_tokenizer
from pipeline.retrieval.store import FORMAT_VERSION, read_manifest, write_datastore

log = logging.getLogger(__name__)

BATCHES_PER_CHUNK = 16
# Ranks wait for each other only after encoding, which may take hours on uneven machines.
GATHER_TIMEOUT = timedelta(hours=12)


def build_datastore(params: Params, features: Path, clip_dir: Path, gpt_dir: Path, out: Path, rank: Rank,
                    *, progress: bool = True) -> dict[str, Any]:
    """Build (or keep) the datastore at ``out``; returns the summary its metrics are made of."""
    t0 = time.perf_counter()
    r = params.retrieval
    device = choose_device(params.device, rank, key="device")
    missing = clip_text_missing(Path(clip_dir))
    if missing is not None:  # before any work: a vision-only CLIP folder cannot encode captions
        raise CaplineError(f"the datastore encodes captions with CLIP's text tower, and {clip_dir} has none "
                           f"usable ({missing}); pin a whole CLIP (`capline models clip`)")
    collection = read_collection(r.source, Path(features))
    kept = keep_short(collection, load_tokenizer(gpt_dir), r.max_caption_tokens)
    captions = kept.captions
    if len(captions) < r.k:
        raise CaplineError(f"retrieval.source {r.source!r}: {len(captions)} captions left after dropping "
                           f"{kept.dropped_empty} empty and {kept.dropped_too_long} over "
                           f"{r.max_caption_tokens} tokens; retrieval.k needs at least {r.k}")
    model_id, revision = model_identity(clip_dir)
    encoded_from = {
        "captions_sha256": digest([[c.key, c.text] for c in captions]),
        "model_id": model_id, "model_revision": revision, "batch_size": r.batch_size, "device": device.type,
        "code_sha256": code_sha256("pipeline.retrieval.text_encoder"),
        "libraries": library_versions("torch", "transformers", "numpy"),
    }
    kind = choose_kind(len(captions), r)
    index_settings = {"kind": kind} if kind == FLAT else {
        "kind": kind, "nlist": nlist_for(len(captions), r), "pq_m": r.ivf_pq_m}
    fingerprint = digest({"encoded": encoded_from, "index": index_settings,
                          "max_caption_tokens": r.max_caption_tokens, "format_version": FORMAT_VERSION,
                          "code_sha256": code_sha256("pipeline.retrieval.datastore"),
                          "libraries": library_versions("faiss-cpu", "faiss-gpu")})
    summary: dict[str, Any] = {
        "source": r.source, "captions_read": kept.read, "dropped_empty": kept.dropped_empty,
        "dropped_too_long": kept.dropped_too_long, "captions": len(captions), "max_caption_tokens": r.max_caption_tokens,
        "model_id": model_id, "model_revision": revision, "device": str(device), "world_size": rank.world_size,
        "kept": False, "built": False, "chunks_encoded": 0, "captions_encoded": 0, "seconds_encode": 0.0,
        "seconds_index": 0.0,
    }
    manifest = read_manifest(out)
    if manifest is not None and manifest.get("fingerprint") == fingerprint:
        log.info("datastore: %s is current (same captions, CLIP, settings and code); kept", out)
        summary.update(kept=True, built=True, dim=manifest["dim"], index=manifest["index"]["type"])
        return _finish(summary, t0)

    chunks = EncodedChunks(out, digest(encoded_from))
    chunk_rows = r.batch_size * BATCHES_PER_CHUNK
    n_chunks = math.ceil(len(captions) / chunk_rows)
    mine = [i for i in chunks.missing(n_chunks) if rank.owns(i)]
    summary["chunks"] = n_chunks
    if mine:
        t = time.perf_counter()
        _encode(captions, mine, chunk_rows, chunks, clip_dir, device, r.batch_size, progress and rank.is_main)
        summary["seconds_encode"] = time.perf_counter() - t
        summary["chunks_encoded"] = len(mine)
        summary["captions_encoded"] = sum(len(captions[i * chunk_rows:(i + 1) * chunk_rows]) for i in mine)
    with process_group(rank, device, timeout=GATHER_TIMEOUT):
        barrier()
    if not rank.is_main:
        return _finish(summary, t0)
    missing = chunks.missing(n_chunks)
    if missing:
        # Ranks started by hand share no process group: the last one to finish (or a
        # rerun with world size 1) builds the index.
        log.warning("datastore: %d of %d chunks are not encoded yet (other ranks); rerun when they are done",
                    len(missing), n_chunks)
        return _finish(summary, t0)

    t = time.perf_counter()
    vectors = np.concatenate([chunks.load(i) for i in range(n_chunks)])
    index, info = build_index(vectors, kind, r)
    manifest = {
        "format_version": FORMAT_VERSION, "fingerprint": fingerprint, "model_id": model_id,
        "model_revision": revision, "dim": int(vectors.shape[1]), "normalized": True,
        "index": {"kind": kind, **info}, "source": r.source, "captions": len(captions),
        "captions_with_key": sum(c.key is not None for c in captions), "captions_read": kept.read,
        "dropped_empty": kept.dropped_empty, "dropped_too_long": kept.dropped_too_long,
        "max_caption_tokens": r.max_caption_tokens, "tokenizer": "GPT-2 (gpt model folder)",
        "encoded_from": encoded_from,
    }
    write_datastore(out, index, captions, manifest)
    chunks.remove()
    summary["seconds_index"] = time.perf_counter() - t
    summary.update(built=True, dim=int(vectors.shape[1]), index=info["type"], nlist=info.get("nlist"))
    return _finish(summary, t0)


def _encode(captions: list, todo: list[int], chunk_rows: int, chunks: EncodedChunks, clip_dir: Path,
            device: Any, batch_size: int, progress: bool) -> None:
    from pipeline.retrieval.text_encoder import TextEncoder

    encoder = TextEncoder.load(clip_dir, device)
    total = sum(len(captions[i * chunk_rows:(i + 1) * chunk_rows]) for i in todo)
    bar = tqdm(total=total, unit="caption", desc="datastore", disable=not progress)
    for i in todo:
        part = captions[i * chunk_rows:(i + 1) * chunk_rows]
        vectors = []
        for lo in range(0, len(part), batch_size):
            batch = part[lo:lo + batch_size]
            vectors.append(encoder([c.text for c in batch]))
            bar.update(len(batch))
        chunks.save(i, np.concatenate(vectors))
    bar.close()


def _finish(summary: dict, t0: float) -> dict:
    summary["seconds"] = time.perf_counter() - t0
    seconds = summary["seconds_encode"]
    summary["captions_per_s"] = summary["captions_encoded"] / seconds if seconds else 0.0
    return summary
