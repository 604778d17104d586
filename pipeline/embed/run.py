"""embed_shards: this rank's image shards to HDF5 feature shards, resumable.

A feature shard is finished when ``NNNNN.h5`` exists with the attributes this run
would write and the byte size of the image shard it was made from; a rerun keeps
those and computes only the rest. Everything a shard needs is collected in the main
process (vectors, not images) and written when all of its samples have arrived,
sorted by key, so the output does not depend on workers, ranks or timing.
"""
from __future__ import annotations

import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Optional

import numpy as np
from tqdm import tqdm

from pipeline.embed.encoder import Encoder
from pipeline.embed.loader import ShardBatches, SplitRule, make_loader, stripes_for
from pipeline.embed.preprocess import Preprocessor
from pipeline.features import (FORMAT_VERSION, IDENTITY_ATTRS, FeatureShardError, FeatureTable,
                               read_attrs, write_feature_shard)
from pipeline.image_shards import ImageShardError, list_shards
from pipeline.models.pretrained import load_clip, model_identity
from pipeline.files import remove_temporaries, write_jsonl
from pipeline.params import ClipParams, DataParams
from pipeline.runtime import DTYPE_NAMES, Rank, choose_device, choose_precision


def _status_path(h5: Path) -> Path:
    return h5.with_name(h5.stem + ".status.jsonl")


def _is_finished(h5: Path, identity: dict, source_bytes: int) -> bool:
    if not h5.exists():
        return False
    try:
        attrs = read_attrs(h5)
    except FeatureShardError:
        return False  # unreadable: recompute
    if any(attrs.get(k) != v for k, v in identity.items()):
        return False  # made with other settings: recompute
    return attrs.get("source_bytes") == source_bytes and _status_path(h5).exists()


def _write_status(path: Path, failed: list[dict]) -> None:
    write_jsonl(path, ({"key": r["key"], "status": r["status"], "reason": r["reason"]}
                       for r in sorted(failed, key=lambda r: r["key"])))


def _remove_orphans(out_dir: Path, stems: set[str]) -> None:
    """Feature shards whose image shard is gone would otherwise be read as current."""
    for h5 in out_dir.glob("*.h5"):
        if h5.stem not in stems:
            h5.unlink(missing_ok=True)
            _status_path(h5).unlink(missing_ok=True)


class _ShardBuffer:
    """Vectors and labels of one shard while its samples arrive."""

    def __init__(self) -> None:
        self.keys: list[str] = []
        self.splits: list[str] = []
        self.captions: list[list[str]] = []
        self.vectors: list[np.ndarray] = []
        self.failed: list[dict] = []
        self.done = 0


def embed_shards(images_dir: Path, model_dir: Path, out_dir: Path, clip: ClipParams, rank: Rank,
                 data: DataParams, *, progress: bool = True, device: str = "auto") -> dict:
    """Embed this rank's image shards on ``device`` (the ``device`` param); returns a summary
    (counts, speed, timings)."""
    t_start = time.perf_counter()
    device = choose_device(device, rank, key="device")  # a device this machine lacks stops here, before any work
    images_dir, model_dir, out_dir = Path(images_dir), Path(model_dir), Path(out_dir)
    shards = list_shards(images_dir)
    if not shards:
        raise ImageShardError(f"{images_dir}: no image shards (*.tar); run the download stage first")
    out_dir.mkdir(parents=True, exist_ok=True)

    precision = choose_precision(clip.precision, device, key="clip.precision")
    model, processor = load_clip(model_dir)
    model_id, revision = model_identity(model_dir)
    pre = Preprocessor.from_processor(processor, clip.preprocess)
    identity = {
        "model_id": model_id, "model_revision": revision, "output": clip.output,
        "dtype": DTYPE_NAMES[precision], "normalized": bool(clip.normalize),
        "preprocess": pre.describe(), "format_version": FORMAT_VERSION,
    }
    assert set(identity) == set(IDENTITY_ATTRS)

    if rank.is_main:
        _remove_orphans(out_dir, {s.stem for s in shards})
    mine = [(i, s) for i, s in enumerate(shards) if rank.owns(i)]
    todo: list[Path] = []
    kept = 0
    for _, shard in mine:
        h5 = out_dir / (shard.stem + ".h5")
        # Half-written files of a killed run; each rank clears only its own shards'.
        h5.with_name(h5.name + ".tmp").unlink(missing_ok=True)
        remove_temporaries(_status_path(h5))
        if _is_finished(h5, identity, shard.stat().st_size):
            kept += 1
        else:
            todo.append(shard)

    summary: dict[str, Any] = {
        "rank": rank.rank, "world_size": rank.world_size, "device": str(device), "precision": precision,
        "dtype": DTYPE_NAMES[precision], "output": clip.output, "normalized": bool(clip.normalize),
        "preprocess": clip.preprocess, "batch_size": clip.batch_size, "workers": clip.workers,
        "model_id": model_id, "model_revision": revision,
        "shards_total": len(shards), "shards_mine": len(mine), "shards_kept": kept, "shards_written": 0,
        "images": 0, "failed": 0,
        "seconds": {"load": 0.0, "read": 0.0, "decode_preprocess": 0.0, "wait_for_data": 0.0,
                    "model": 0.0, "write": 0.0, "total": 0.0},
    }
    summary["seconds"]["load"] = time.perf_counter() - t_start
    if todo:
        encoder = Encoder.build(model, device, precision, clip.output, clip.normalize)
        _run(todo, out_dir, encoder, pre, clip, data, identity, summary, progress)
    summary["seconds"]["total"] = time.perf_counter() - t_start
    work_s = summary["seconds"]["total"] - summary["seconds"]["load"]
    summary["images_per_s"] = summary["images"] / work_s if summary["images"] and work_s > 0 else 0.0
    return summary


def _run(todo: list[Path], out_dir: Path, encoder: Encoder, pre: Preprocessor, clip: ClipParams,
         data: DataParams, identity: dict, summary: dict, progress: bool) -> None:
    secs = summary["seconds"]
    stripes = stripes_for(len(todo), clip.workers)
    dataset = ShardBatches(todo, pre, clip.batch_size, SplitRule(data.val_fraction, data.test_fraction), stripes)
    on_cuda = encoder.device.type == "cuda"
    loader = make_loader(dataset, clip.workers, pin_memory=on_cuda)
    buffers: dict[int, _ShardBuffer] = defaultdict(_ShardBuffer)
    dim = encoder.dim
    error: Optional[str] = None
    bar = tqdm(total=len(todo), unit="shard", desc="embed", disable=not progress)
    t = time.perf_counter()
    for batch in loader:
        secs["wait_for_data"] += time.perf_counter() - t
        secs["read"] += batch["read_s"]
        secs["decode_preprocess"] += batch["decode_s"]
        n = len(batch["keys"])
        if n:
            t = time.perf_counter()
            pixels = batch["pixels"]
            if on_cuda:
                pixels = pixels.to(encoder.device, non_blocking=True)
            vectors = encoder(pre.normalize(pixels)).cpu().numpy()
            secs["model"] += time.perf_counter() - t
            for row, shard_idx in enumerate(batch["shard"]):
                buf = buffers[shard_idx]
                buf.keys.append(batch["keys"][row])
                buf.splits.append(batch["splits"][row])
                buf.captions.append(batch["captions"][row])
                buf.vectors.append(vectors[row])
        for rec in batch["failed"]:
            buffers[rec["shard"]].failed.append(rec)
        for shard_idx, _stripe in batch["done"]:
            buf = buffers[shard_idx]
            buf.done += 1
            if buf.done == stripes:
                t = time.perf_counter()
                _write_shard(todo[shard_idx], out_dir, buffers.pop(shard_idx), dim, identity)
                secs["write"] += time.perf_counter() - t
                summary["shards_written"] += 1
                bar.update(1)
        summary["images"] += n
        summary["failed"] += len(batch["failed"])
        bar.set_postfix(images=summary["images"], failed=summary["failed"])
        if batch["error"]:
            error = batch["error"]
            break
        t = time.perf_counter()
    bar.close()
    if error is not None:
        # Shards finished so far are on disk; a rerun after fixing the input resumes.
        raise ImageShardError(error)


def _write_shard(shard: Path, out_dir: Path, buf: _ShardBuffer, dim: int, identity: dict) -> None:
    order = sorted(range(len(buf.keys)), key=lambda i: buf.keys[i])
    store = np.float16 if identity["dtype"] == "float16" else np.float32
    emb = (np.stack([buf.vectors[i] for i in order]).astype(store) if order
           else np.zeros((0, dim), dtype=store))
    table = FeatureTable(
        keys=[buf.keys[i] for i in order], embeddings=emb, splits=[buf.splits[i] for i in order],
        captions=[buf.captions[i] for i in order],
        attrs={**identity, "source": shard.name, "source_bytes": shard.stat().st_size,
               "images": len(order), "failed": len(buf.failed)},
    )
    h5 = out_dir / (shard.stem + ".h5")
    # The status file goes first: a shard counts as finished only when both exist.
    _write_status(_status_path(h5), buf.failed)
    write_feature_shard(h5, table)
