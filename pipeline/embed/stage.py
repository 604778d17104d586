"""The embed stage as the CLI runs it: embed this rank's shards, then write metrics.

Under torchrun the ranks share nothing but the shard index rule; at the very end
they gather their summaries over a process group (gloo or nccl) so that rank 0 can
write one metrics file. Started by hand with --rank/--world-size (no torchrun
rendezvous), each rank writes its own ``<metrics>.rank<R>.json`` instead.
"""
from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path
from typing import Optional

from pipeline.distributed import Rank
from pipeline.embed.run import embed_shards
from pipeline.files import write_json
from pipeline.params import Params


def combine(summaries: list[dict]) -> dict:
    """One flat metrics object from the ranks' summaries."""
    first = summaries[0]
    wall = max(s["seconds"]["total"] for s in summaries)
    images = sum(s["images"] for s in summaries)
    out = {k: first[k] for k in ("device", "precision", "dtype", "output", "normalized", "preprocess",
                                 "batch_size", "workers", "model_id", "model_revision", "world_size")}
    out.update({
        "images": images,
        "failed": sum(s["failed"] for s in summaries),
        "shards": first["shards_total"],
        "shards_written": sum(s["shards_written"] for s in summaries),
        "shards_kept": sum(s["shards_kept"] for s in summaries),
        "seconds": round(wall, 3),
        "images_per_s": round(sum(s["images_per_s"] for s in summaries), 3),
    })
    for part in ("read", "decode_preprocess", "wait_for_data", "model", "write"):
        out[f"seconds_{part}"] = round(sum(s["seconds"][part] for s in summaries), 3)
    return out


def _gather(summary: dict) -> Optional[list[dict]]:
    """All ranks' summaries on every rank when torchrun set up a rendezvous, else None."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or "MASTER_ADDR" not in os.environ:
        return None
    import torch
    import torch.distributed as dist

    created = False
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            # all_gather_object sends through torch.cuda.current_device(): without this
            # every rank would use GPU 0 and NCCL refuses (or hangs on) duplicate GPUs.
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
        # Ranks may finish hours apart on uneven shards; only this gather waits.
        dist.init_process_group(backend=backend, timeout=timedelta(hours=12))
        created = True
    try:
        out: list = [None] * dist.get_world_size()
        dist.all_gather_object(out, summary)
        return out
    finally:
        if created:
            dist.destroy_process_group()


def run_embed(params: Params, images: Path, model: Path, out: Path, metrics: Path, rank: Rank) -> dict:
    """Embed, then write the metrics file (rank 0, or one per rank without torchrun)."""
    summary = embed_shards(images, model, out, params.clip, rank, params.data)
    gathered = _gather(summary) if rank.world_size > 1 else [summary]
    metrics = Path(metrics)
    if gathered is None:
        write_json(metrics.with_name(f"{metrics.stem}.rank{rank.rank}{metrics.suffix}"), combine([summary]),
                   indent=2, sort_keys=True)
    elif rank.is_main:
        write_json(metrics, combine(gathered), indent=2, sort_keys=True)
    return summary
