"""`capline generate`: caption feature shards with batched beam search."""
from __future__ import annotations

import click

from stages.common import load, params_option


@click.command("generate")
@params_option
@click.option("--model", "model_dir", default="data/model", show_default=True,
              type=click.Path(file_okay=False), help="captioner folder: the final model from `capline scst` (or `capline train`'s data/model_xe)")
@click.option("--features", "features_dir", default="data/features", show_default=True,
              type=click.Path(file_okay=False), help="folder of HDF5 feature shards")
@click.option("--retrieval", "retrieval_dir", default="data/retrieval", show_default=True,
              type=click.Path(file_okay=False),
              help="neighbour shards: a retrieval captioner's prompts (unless generate.datastore names a datastore)")
@click.option("--out", "out_dir", default="data/captions", show_default=True,
              type=click.Path(file_okay=False),
              help="folder for results.json, results_shuffled.json and references.json")
@click.option("--metrics", "metrics_path", default="data/metrics/generate.json", show_default=True,
              type=click.Path(dir_okay=False), help="metrics JSON (captions, captions_per_s, ...)")
@click.option("--progress/--no-progress", default=True, help="show a progress bar")
def generate(params_path: str, model_dir: str, features_dir: str, retrieval_dir: str, out_dir: str, metrics_path: str,
             progress: bool) -> None:
    """Caption the generate.split images with the `generate` params.

    Captions are written in COCO results format (image_id is the record key), with
    a shuffled-features control and the references of exactly those images.
    """
    from pipeline.generate.run import run

    p = load(params_path)
    metrics = run(model_dir, features_dir, out_dir, p.generate, metrics_path=metrics_path,
                           progress=progress, device=p.device, retrieval_dir=retrieval_dir)
    if metrics:  # empty on the other ranks under torchrun
        click.echo(f"{metrics['captions']} captions ({metrics['split']}) at {metrics['captions_per_s']} captions/s")
