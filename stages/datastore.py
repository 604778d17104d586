"""``capline datastore``: caption collection -> CLIP text vectors -> FAISS index."""
from __future__ import annotations

from pathlib import Path

import click

from stages.common import load, params_option
from stages.ranks import rank_options, resolve_rank


@click.command("datastore")
@params_option
@click.option("--features", type=click.Path(file_okay=False, path_type=Path), default=Path("data/features"),
              show_default=True, help="feature shards whose training captions make the datastore (retrieval.source: train)")
@click.option("--clip", type=click.Path(file_okay=False, path_type=Path), default=Path("data/models/clip"),
              show_default=True, help="the pinned whole CLIP; its text tower encodes the captions")
@click.option("--gpt", type=click.Path(file_okay=False, path_type=Path), default=Path("data/models/gpt"),
              show_default=True, help="GPT-2 folder whose tokenizer measures caption length")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("data/datastore"),
              show_default=True, help="datastore folder: index.faiss, captions.jsonl, manifest.json")
@click.option("--metrics", type=click.Path(dir_okay=False, path_type=Path),
              default=Path("data/metrics/datastore.json"), show_default=True,
              help="metrics JSON: captions read, dropped (empty, too long), kept, index, speed")
@rank_options
def datastore(params_path: str, features: Path, clip: Path, gpt: Path, out: Path, metrics: Path,
              rank: int | None, world_size: int | None) -> None:
    """Encode the captions of retrieval.source with CLIP's text tower into a FAISS index in OUT.

    Reads the `retrieval` section and `device`. Captions that are empty or longer than
    retrieval.max_caption_tokens GPT-2 tokens are dropped and counted. A datastore made
    from the same captions, CLIP, settings and code is kept; a killed build resumes from
    its encoded chunks. Under `torchrun --nproc-per-node N capline datastore` rank r
    encodes chunks r, r+N, ... and rank 0 builds the index.
    """
    from pipeline.retrieval.run import run_datastore

    params = load(params_path)
    run_datastore(params, features, clip, gpt, out, metrics, resolve_rank(rank, world_size))
