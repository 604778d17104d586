"""The embed stage as the CLI runs it: embed this rank's shards, then write metrics.

Under torchrun the ranks share nothing but the shard index rule; at the very end
they gather their summaries over the process group so that rank 0 can write one
metrics file. Started by hand with --rank/--world-size (no torchrun rendezvous),
each rank writes its own ``<metrics>.rank<R>.json`` instead.
"""
from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Optional

from pipeline.embed.plan import patch_tokens_wanted, read_plan
from pipeline.embed.shards import embed_shards
from pipeline.core.params import Params, ParamsError
from pipeline.core.runtime import Rank, choose_device, write_gathered_metrics

# Ranks may finish hours apart on uneven shards; only the final gather waits.
GATHER_TIMEOUT = timedelta(hours=12)


def combine(summaries: list[dict]) -> dict:
    """One flat metrics object from the ranks' summaries."""
    first = summaries[0]
    wall = max(s["seconds"]["total"] for s in summaries)
    images = sum(s["images"] for s in summaries)
    out = {k: first[k] for k in ("device", "precision", "dtype", "output", "normalized", "preprocess",
                                 "batch_size", "workers", "patch_tokens", "model_id", "model_revision", "world_size")}
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


def run(params: Params, images: Path, model: Path, out: Path, metrics: Path, rank: Rank,
        plan: Optional[Path] = None) -> dict:
    """Embed, then write the metrics file (rank 0, or one per rank without torchrun).

    ``plan``: the embed_plan stage's file saying whether to store patch tokens; when it
    is missing, ``clip.patch_tokens`` is resolved from the params."""
    patch_tokens = patch_tokens_wanted(params)
    if plan is not None and Path(plan).exists() and read_plan(plan) != patch_tokens:
        raise ParamsError(f"{plan} says patch_tokens {str(read_plan(plan)).lower()} but clip.patch_tokens and "
                          f"mapper.type say {str(patch_tokens).lower()}; run `capline embed-plan` (dvc repro does)")
    summary = embed_shards(images, model, out, params.clip, rank, params.data, device=params.device,
                           patch_tokens=patch_tokens)
    write_gathered_metrics(summary, combine, metrics, rank, choose_device(params.device, rank, key="device"),
                           GATHER_TIMEOUT)
    return summary
