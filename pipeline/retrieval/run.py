"""Stages ``datastore`` and ``retrieve`` as the CLI runs them: the work, then one metrics
file (rank 0 under torchrun, with the ranks' summaries gathered; one per rank when
ranks are started by hand)."""
from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from pipeline.core.files import write_metrics
from pipeline.core.params import Params
from pipeline.core.runtime import Rank, choose_device, write_gathered_metrics

GATHER_TIMEOUT = timedelta(hours=12)
SUMMED = ("shards_kept", "shards_written", "images", "excluded_own", "searched_again",
          "images_with_own_text_neighbour")


def run_datastore(params: Params, features: Path, clip: Path, gpt: Path, out: Path, metrics: Path,
                  rank: Rank) -> dict:
    from pipeline.retrieval.datastore import build_datastore

    summary = build_datastore(params, features, clip, gpt, out, rank)
    if rank.is_main:  # the other ranks only encode their chunks
        write_metrics(metrics, {k: (round(v, 3) if isinstance(v, float) else v) for k, v in summary.items()})
    return summary


def combine(summaries: list[dict]) -> dict:
    first = summaries[0]
    out = {k: first[k] for k in ("datastore_captions", "index", "k", "candidates", "world_size", "duplicate_images")}
    out["shards"] = first["shards_total"]
    out.update({k: sum(s[k] for s in summaries) for k in SUMMED})
    out["seconds"] = round(max(s["seconds"] for s in summaries), 3)
    out["images_per_s"] = round(sum(s["images_per_s"] for s in summaries), 3)
    return out


def run_retrieve(params: Params, features: Path, datastore: Path, out: Path, metrics: Path, rank: Rank) -> dict:
    from pipeline.retrieval.retrieve import retrieve_shards

    summary = retrieve_shards(params.retrieval, features, datastore, out, rank)
    write_gathered_metrics(summary, combine, metrics, rank, choose_device(params.device, rank, key="device"),
                           GATHER_TIMEOUT)
    return summary
