"""`capline train`: train the ClipCap mapper on feature shards."""
from __future__ import annotations

from pathlib import Path

import click

from stages.common import load, params_option


@click.command("train")
@params_option
@click.option("--features", "features_dir", default="data/features", show_default=True,
              type=click.Path(file_okay=False), help="folder of HDF5 feature shards (train and val splits are used)")
@click.option("--gpt", "gpt_dir", default="data/models/gpt", show_default=True,
              type=click.Path(file_okay=False), help="GPT-2 + tokenizer folder (save_pretrained layout)")
@click.option("--clip", "clip_dir", default="data/models/clip", show_default=True,
              type=click.Path(file_okay=False),
              help="the pinned CLIP folder that made the features; copied into the model folder (without it, "
                   "`capline caption` needs --clip)")
@click.option("--retrieval", "retrieval_dir", default="data/retrieval", show_default=True,
              type=click.Path(file_okay=False),
              help="neighbour shards (`capline retrieve`): read when retrieval.k > 0, the captions of each "
                   "image's prompt")
@click.option("--out", "out_dir", default="data/model_xe", show_default=True,
              type=click.Path(file_okay=False),
              help="cross-entropy captioner folder to write (replaced when whole); `capline scst` reads it")
@click.option("--curve", "curve_path", default="data/train/loss.csv", show_default=True,
              type=click.Path(dir_okay=False), help="training curve CSV (step, epoch, train_loss, lr)")
@click.option("--val-curve", "val_curve_path", default="data/train/val.csv", show_default=True,
              type=click.Path(dir_okay=False), help="validation curve CSV (step, epoch, val_loss)")
@click.option("--checkpoints", "checkpoint_dir", default="data/checkpoints/train", show_default=True,
              type=click.Path(file_okay=False),
              help="checkpoint folder: a rerun with the same inputs and params resumes from it")
@click.option("--metrics", "metrics_path", default="data/metrics/train.json", show_default=True,
              type=click.Path(dir_okay=False), help="final metrics JSON (train_loss, val_loss, params, seconds)")
@click.option("--progress/--no-progress", default=True, help="show a progress bar")
def train(params_path: str, features_dir: str, gpt_dir: str, clip_dir: str, retrieval_dir: str, out_dir: str, curve_path: str,
          val_curve_path: str, checkpoint_dir: str, metrics_path: str, progress: bool) -> None:
    """Train a captioner from the `mapper` and `train` params.

    GPT-2 stays frozen unless train.finetune_gpt is set. Checkpoints are written
    every train.checkpoint_every steps and at each epoch end; run the same command
    again after a kill and it resumes. Under torchrun
    (e.g. `torchrun --nproc-per-node 2 -m stages.cli train`) it trains with
    DistributedDataParallel and only rank 0 writes.
    """
    from pipeline.train.run import train as run_train

    p = load(params_path)
    source = click.get_current_context().get_parameter_source("clip_dir")
    if source is click.core.ParameterSource.DEFAULT and not Path(clip_dir).is_dir():
        click.echo(f"warning: no CLIP folder at {clip_dir}; the model folder will not hold its CLIP "
                   "(`capline caption` will need --clip)", err=True)
        clip_dir = None
    metrics = run_train(features_dir, gpt_dir, out_dir, curve_path, metrics_path, p.mapper, p.train,
                        progress=progress, val_curve_path=val_curve_path, checkpoint_dir=checkpoint_dir,
                        clip_dir=clip_dir, device=p.device, retrieval=p.retrieval, retrieval_dir=retrieval_dir)
    click.echo(f"train_loss {metrics['train_loss']}  val_loss {metrics['val_loss']}  "
               f"best step {metrics['best_step']} (val_loss {metrics['best_val_loss']}, kept: {metrics['kept']})  "
               f"{metrics['params_trainable']} trainable parameters  {metrics['samples_per_s']} samples/s  "
               f"{metrics['seconds']} s")
