"""embed_shards: this rank's image shards to HDF5 feature shards, resumable.

A feature shard is finished when ``NNNNN.h5`` and its status file exist; a rerun
keeps it only when what it was made from equals what this run would use: the
encoder attributes (model, revision, output, dtype, normalization, preprocessing,
format), the sha256 of its image shard, and ``made_with`` (batch size, which fixes
the batches and so the last bits of the vectors, the split fractions for samples
without a split, whether patch tokens are stored, the device type, the code the
stage runs and the versions of torch, transformers, Pillow, h5py and numpy). Any other feature shard is computed
again, with a log line naming what differs. Everything a shard needs is collected
in the main process (vectors, not images) and written when all of its samples have
arrived, sorted by key, so the output does not depend on workers, ranks or timing.
"""
from __future__ import annotations

import json
import logging
import re
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Optional

import numpy as np
from tqdm import tqdm

from pipeline.embed.encoder import Encoder
from pipeline.embed.loader import ShardBatches, SplitRule, make_loader, stripes_for
from pipeline.embed.preprocess import Preprocessor
from pipeline.formats.features import (FORMAT_VERSION, IDENTITY_ATTRS, FeatureShardError, FeatureTable,
                               read_attrs, write_feature_shard)
from pipeline.core.fingerprint import RedoLog, code_sha256, describe_difference, digest, file_sha256, library_versions
from pipeline.formats.image_shards import ImageShardError, list_shards
from pipeline.models.openclip import is_open_clip_folder
from pipeline.models.pretrained import load_clip, model_identity
from pipeline.core.files import remove_temporaries, write_jsonl
from pipeline.core.partial import PartialShards
from pipeline.core.params import ClipParams, DataParams
from pipeline.core.runtime import DTYPE_NAMES, Rank, choose_device, choose_precision

log = logging.getLogger(__name__)

# Libraries whose versions can change the vectors or the file's bytes (and
# open_clip_torch for open_clip models).
LIBRARIES = ("torch", "transformers", "pillow", "h5py", "numpy")


def _status_path(h5: Path) -> Path:
    return h5.with_name(h5.stem + ".status.jsonl")


def _made_from(attrs: dict) -> dict:
    """What a feature shard records about how it was made, as compared on resume."""
    made = {k: attrs.get(k) for k in (*IDENTITY_ATTRS, "source_sha256")}
    try:
        made["made_with"] = json.loads(attrs.get("made_with", "null"))
    except (TypeError, ValueError):
        made["made_with"] = None
    return made


def _why_not_reusable(h5: Path, expected: dict) -> Optional[str]:
    """None when the finished feature shard ``h5`` was made from exactly ``expected``, else why not."""
    try:
        attrs = read_attrs(h5)
    except FeatureShardError:
        return "it is not a readable feature shard"
    if not _status_path(h5).exists():
        return "its status file is missing"
    made = _made_from(attrs)
    if made != expected:
        return describe_difference(made, expected)
    return None


def _write_status(path: Path, failed: list[dict]) -> None:
    write_jsonl(path, ({"key": r["key"], "status": r["status"], "reason": r["reason"]}
                       for r in sorted(failed, key=lambda r: r["key"])))


# A feature shard's files: NNNNN.h5, NNNNN.status.jsonl, and the temporaries of a
# killed writer (NNNNN.h5.tmp, .NNNNN.status.jsonl.XXXX.tmp).
_FEATURE_FILE = re.compile(r"^(?:\.(?P<tmp>.+?)\.status\.jsonl\..+\.tmp|(?P<stem>.+?)\.(?:h5|h5\.tmp|status\.jsonl))$")


def _remove_orphans(out_dir: Path, stems: set[str]) -> None:
    """Files of feature shards whose image shard is gone would otherwise be read as current."""
    for path in out_dir.iterdir():
        m = _FEATURE_FILE.match(path.name)
        stem = m and (m.group("stem") or m.group("tmp"))
        if stem and stem not in stems and path.is_file():
            log.warning("embed: removing %s: there is no image shard %s.tar", path.name, stem)
            path.unlink(missing_ok=True)


class _ShardBuffer:
    """Vectors and labels of one shard while its samples arrive."""

    def __init__(self) -> None:
        self.keys: list[str] = []
        self.splits: list[str] = []
        self.captions: list[list[str]] = []
        self.vectors: list[np.ndarray] = []
        self.tokens: list[np.ndarray] = []  # patch tokens, when stored
        self.failed: list[dict] = []
        self.done = 0


def embed_shards(images_dir: Path, model_dir: Path, out_dir: Path, clip: ClipParams, rank: Rank,
                 data: DataParams, *, progress: bool = True, device: str = "auto", patch_tokens: bool = False) -> dict:
    """Embed this rank's image shards on ``device`` (the ``device`` param); returns a summary
    (counts, speed, timings). ``patch_tokens``: also store the vision tower's last hidden state
    (``clip.patch_tokens`` resolved, pipeline/embed/plan.py)."""
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
    made_with = {
        "batch_size": clip.batch_size, "val_fraction": data.val_fraction, "test_fraction": data.test_fraction,
        "patch_tokens": bool(patch_tokens), "device": device.type, "code_sha256": code_sha256("pipeline.embed.shards"),
        "libraries": library_versions(*LIBRARIES, *(("open_clip_torch",) if is_open_clip_folder(model_dir) else ())),
    }

    partial = PartialShards(out_dir)
    partial.sweep()
    if rank.is_main:
        _remove_orphans(out_dir, {s.stem for s in shards})
        partial.forget_others(s.stem for s in shards)
    mine = [(i, s) for i, s in enumerate(shards) if rank.owns(i)]
    todo: list[tuple[Path, dict]] = []
    kept = restored = 0
    redo = RedoLog(log, "embed")
    for _, shard in mine:
        h5 = out_dir / (shard.stem + ".h5")
        # Half-written files of a killed run; each rank clears only its own shards'.
        h5.with_name(h5.name + ".tmp").unlink(missing_ok=True)
        remove_temporaries(_status_path(h5))
        expected = {**identity, "source_sha256": file_sha256(shard), "made_with": made_with}
        key = digest(expected)
        partial.keep_only(shard.stem, key)
        why = _why_not_reusable(h5, expected) if h5.exists() else None
        if h5.exists() and why is None:
            kept += 1
            continue
        # The finished mark goes first: a kill while it is remade never leaves the
        # old vectors beside a new status file.
        h5.unlink(missing_ok=True)
        if partial.restore(shard.stem, key, [_status_path(h5), h5]):
            kept += 1
            restored += 1
            continue
        if why is not None:
            redo.note(h5.name, why)
        todo.append((shard, expected))
    redo.close()
    if restored:
        log.warning("embed: put back %d feature shards finished by a run that did not complete (from %s)",
                    restored, partial.root)

    summary: dict[str, Any] = {
        "rank": rank.rank, "world_size": rank.world_size, "device": str(device), "precision": precision,
        "dtype": DTYPE_NAMES[precision], "output": clip.output, "normalized": bool(clip.normalize),
        "preprocess": clip.preprocess, "batch_size": clip.batch_size, "workers": clip.workers,
        "patch_tokens": bool(patch_tokens),
        "model_id": model_id, "model_revision": revision,
        "shards_total": len(shards), "shards_mine": len(mine), "shards_kept": kept, "shards_written": 0,
        "images": 0, "failed": 0,
        "seconds": {"load": 0.0, "read": 0.0, "decode_preprocess": 0.0, "wait_for_data": 0.0,
                    "model": 0.0, "write": 0.0, "total": 0.0},
    }
    summary["seconds"]["load"] = time.perf_counter() - t_start
    if todo:
        encoder = Encoder.build(model, device, precision, clip.output, clip.normalize)
        _run(todo, out_dir, encoder, pre, clip, data, summary, progress, partial)
    # Every shard of this rank is in the output folder, where DVC records it: nothing to keep.
    partial.forget(s.stem for _, s in mine)
    partial.remove_if_empty()
    summary["seconds"]["total"] = time.perf_counter() - t_start
    work_s = summary["seconds"]["total"] - summary["seconds"]["load"]
    summary["images_per_s"] = summary["images"] / work_s if summary["images"] and work_s > 0 else 0.0
    return summary


def _run(todo: list[tuple[Path, dict]], out_dir: Path, encoder: Encoder, pre: Preprocessor, clip: ClipParams,
         data: DataParams, summary: dict, progress: bool, partial: PartialShards) -> None:
    secs = summary["seconds"]
    stripes = stripes_for(len(todo), clip.workers)
    dataset = ShardBatches([shard for shard, _ in todo], pre, clip.batch_size, SplitRule(data.val_fraction, data.test_fraction), stripes)
    on_cuda = encoder.device.type == "cuda"
    loader = make_loader(dataset, clip.workers, pin_memory=on_cuda)
    buffers: dict[int, _ShardBuffer] = defaultdict(_ShardBuffer)
    dim = encoder.dim
    patch_tokens = bool(todo[0][1]["made_with"]["patch_tokens"])
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
            vectors, tokens = encoder.encode(pre.normalize(pixels), patch_tokens=patch_tokens)
            vectors = vectors.cpu().numpy()
            tokens = tokens.cpu().numpy() if tokens is not None else None
            secs["model"] += time.perf_counter() - t
            for row, shard_idx in enumerate(batch["shard"]):
                buf = buffers[shard_idx]
                buf.keys.append(batch["keys"][row])
                buf.splits.append(batch["splits"][row])
                buf.captions.append(batch["captions"][row])
                buf.vectors.append(vectors[row])
                if tokens is not None:
                    buf.tokens.append(tokens[row])
        for rec in batch["failed"]:
            buffers[rec["shard"]].failed.append(rec)
        for shard_idx, _stripe in batch["done"]:
            buf = buffers[shard_idx]
            buf.done += 1
            if buf.done == stripes:
                t = time.perf_counter()
                shard, made_from = todo[shard_idx]
                h5 = _write_shard(shard, made_from, out_dir, buffers.pop(shard_idx), dim,
                                  encoder.token_shape if patch_tokens else None)
                # Out of DVC's reach until the run completes (see pipeline/core/partial.py).
                partial.save(shard.stem, digest(made_from), [_status_path(h5), h5])
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


def _write_shard(shard: Path, made_from: dict, out_dir: Path, buf: _ShardBuffer, dim: int,
                 token_shape: Optional[tuple[int, int]] = None) -> Path:
    """``made_from``: the encoder attributes, ``source_sha256`` and ``made_with`` (stored as JSON);
    ``token_shape``: (tokens, width) when patch tokens are stored."""
    order = sorted(range(len(buf.keys)), key=lambda i: buf.keys[i])
    store = np.float16 if made_from["dtype"] == "float16" else np.float32
    emb = (np.stack([buf.vectors[i] for i in order]).astype(store) if order
           else np.zeros((0, dim), dtype=store))
    tokens = None
    if token_shape is not None:
        tokens = (np.stack([buf.tokens[i] for i in order]) if order
                  else np.zeros((0, *token_shape), dtype=np.float16))
    table = FeatureTable(
        keys=[buf.keys[i] for i in order], embeddings=emb, splits=[buf.splits[i] for i in order],
        captions=[buf.captions[i] for i in order], patch_tokens=tokens,
        attrs={**made_from, "made_with": json.dumps(made_from["made_with"], sort_keys=True),
               "source": shard.name, "source_bytes": shard.stat().st_size,
               "images": len(order), "failed": len(buf.failed)},
    )
    h5 = out_dir / (shard.stem + ".h5")
    # The status file goes first: a shard counts as finished only when both exist.
    _write_status(_status_path(h5), buf.failed)
    write_feature_shard(h5, table)
    return h5
