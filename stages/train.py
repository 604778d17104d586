"""`capline train`: train the ClipCap mapper on feature shards."""
from __future__ import annotations

import click

from stages.common import load, params_option


@click.command("train")
@params_option
@click.option("--features", "features_dir", default="data/features", show_default=True,
              type=click.Path(file_okay=False), help="folder of HDF5 feature shards (train and val splits are used)")
@click.option("--gpt", "gpt_dir", default="data/models/gpt", show_default=True,
              type=click.Path(file_okay=False), help="GPT-2 + tokenizer folder (save_pretrained layout)")
@click.option("--out", "out_dir", default="data/model", show_default=True,
              type=click.Path(file_okay=False), help="trained captioner folder to write (replaced when whole)")
@click.option("--curve", "curve_path", default="data/train/loss.csv", show_default=True,
              type=click.Path(dir_okay=False), help="loss curve CSV (step, epoch, train_loss, val_loss, lr)")
@click.option("--metrics", "metrics_path", default="data/metrics/train.json", show_default=True,
              type=click.Path(dir_okay=False), help="final metrics JSON (train_loss, val_loss, params, seconds)")
@click.option("--progress/--no-progress", default=True, help="show a progress bar")
def train(params_path: str, features_dir: str, gpt_dir: str, out_dir: str, curve_path: str,
          metrics_path: str, progress: bool) -> None:
    """Train a captioner from the `mapper` and `train` params.

    GPT-2 stays frozen unless train.finetune_gpt is set. Under torchrun
    (e.g. `torchrun --nproc-per-node 2 -m stages.cli train`) it trains with
    DistributedDataParallel and only rank 0 writes.
    """
    from pipeline.train import train as run_train

    p = load(params_path)
    metrics = run_train(features_dir, gpt_dir, out_dir, curve_path, metrics_path, p.mapper, p.train,
                        progress=progress, device=p.device)
    click.echo(f"train_loss {metrics['train_loss']}  val_loss {metrics['val_loss']}  "
               f"{metrics['params_trainable']} trainable parameters  {metrics['seconds']} s")
