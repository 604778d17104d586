"""``capline embed``: CLIP vectors of image shards into HDF5 feature shards."""
from __future__ import annotations

from pathlib import Path

import click

from stages.common import load, params_option
from stages.ranks import rank_options, resolve_rank


@click.command("embed")
@params_option
@click.option("--images", type=click.Path(file_okay=False, path_type=Path), default=Path("data/images"),
              show_default=True, help="folder of image tar shards (ours or img2dataset's webdataset output)")
@click.option("--model", type=click.Path(file_okay=False, path_type=Path), default=Path("data/models/clip"),
              show_default=True, help="CLIP folder written by the models stage (save_pretrained + pin.json)")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("data/features"),
              show_default=True, help="folder for the HDF5 feature shards (one per image shard)")
@click.option("--metrics", type=click.Path(dir_okay=False, path_type=Path), default=Path("data/metrics/embed.json"),
              show_default=True, help="metrics JSON: images/s, counts, precision, device, time per part")
@click.option("--plan", type=click.Path(dir_okay=False, path_type=Path), default=Path("data/embed_plan.json"),
              show_default=True, help="`capline embed-plan`'s file: whether to store patch tokens; when it is "
                                      "missing, clip.patch_tokens is resolved here")
@rank_options
def embed(params_path: str, images: Path, model: Path, out: Path, metrics: Path, plan: Path,
          rank: int | None, world_size: int | None) -> None:
    """Embed every image of IMAGES with the CLIP vision tower in MODEL into OUT.

    Reads the `clip` section (output, normalize, precision, batch_size, workers,
    preprocess, patch_tokens) and `data.val_fraction`/`data.test_fraction` (splits
    for shards without one). With patch tokens, each feature shard also holds the
    vision tower's last hidden state (fp16), which cross-attention mappers read. Finished feature shards made from the same image shard,
    settings and code are kept, so a rerun after a kill only computes the rest;
    others are computed again, with a log line saying why. Under `torchrun --nproc-per-node N capline embed`, or with
    --rank/--world-size on each machine, rank r embeds shards r, r+N, r+2N, ...
    """
    from pipeline.embed.run import run

    params = load(params_path)
    who = resolve_rank(rank, world_size)
    run(params, images, model, out, metrics, who, plan=plan)
