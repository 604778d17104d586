"""``capline retrieve``: each image's nearest datastore captions, per feature shard."""
from __future__ import annotations

from pathlib import Path

import click

from stages.common import load, params_option
from stages.ranks import rank_options, resolve_rank


@click.command("retrieve")
@params_option
@click.option("--features", type=click.Path(file_okay=False, path_type=Path), default=Path("data/features"),
              show_default=True, help="feature shards: their image vectors are the queries")
@click.option("--datastore", type=click.Path(file_okay=False, path_type=Path), default=Path("data/datastore"),
              show_default=True, help="datastore folder written by `capline datastore`")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("data/retrieval"),
              show_default=True, help="folder for the neighbour shards (one per feature shard, same stem)")
@click.option("--metrics", type=click.Path(dir_okay=False, path_type=Path),
              default=Path("data/metrics/retrieve.json"), show_default=True,
              help="metrics JSON: images, own captions excluded, shards written and kept, speed")
@rank_options
def retrieve(params_path: str, features: Path, datastore: Path, out: Path, metrics: Path,
             rank: int | None, world_size: int | None) -> None:
    """Find the retrieval.k nearest captions of every image of FEATURES in DATASTORE.

    An image's own captions (datastore captions under its key) are never among them.
    Finished neighbour shards made from the same feature shard, datastore, settings and
    code are kept. Under `torchrun --nproc-per-node N capline retrieve`, or with
    --rank/--world-size, rank r handles feature shards r, r+N, ...
    """
    from pipeline.retrieval.run import run_retrieve

    params = load(params_path)
    run_retrieve(params, features, datastore, out, metrics, resolve_rank(rank, world_size))
