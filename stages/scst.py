"""`capline scst`: self-critical training of the cross-entropy captioner (CIDEr-D reward)."""
from __future__ import annotations

import click

from stages.common import load, params_option


@click.command("scst")
@params_option
@click.option("--model", "model_dir", default="data/model_xe", show_default=True,
              type=click.Path(file_okay=False), help="cross-entropy captioner folder (from `capline train --out`)")
@click.option("--features", "features_dir", default="data/features", show_default=True,
              type=click.Path(file_okay=False), help="folder of HDF5 feature shards (train and val splits are used)")
@click.option("--out", "out_dir", default="data/model", show_default=True,
              type=click.Path(file_okay=False), help="final captioner folder to write: the epoch with the best validation CIDEr-D (epoch 0: --model)")
@click.option("--curve", "curve_path", default="data/scst/reward.csv", show_default=True,
              type=click.Path(dir_okay=False), help="reward curve CSV (step, epoch, reward, baseline_reward, loss)")
@click.option("--val-curve", "val_curve_path", default="data/scst/val_cider.csv", show_default=True,
              type=click.Path(dir_okay=False), help="validation CIDEr-D per epoch CSV (epoch 0: the input model)")
@click.option("--metrics", "metrics_path", default="data/metrics/scst.json", show_default=True,
              type=click.Path(dir_okay=False), help="metrics JSON (val CIDEr before/after, best epoch, seconds)")
@click.option("--retrieval", "retrieval_dir", default="data/retrieval", show_default=True,
              type=click.Path(file_okay=False),
              help="neighbour shards: a retrieval captioner's prompts (read when the model's retrieval k > 0)")
@click.option("--checkpoints", "checkpoint_dir", default="data/checkpoints/scst", show_default=True,
              type=click.Path(file_okay=False),
              help="checkpoint folder (no DVC output): a rerun with the same inputs and params resumes from it")
@click.option("--progress/--no-progress", default=True, help="show a progress bar")
def scst(params_path: str, model_dir: str, features_dir: str, out_dir: str, curve_path: str,
         val_curve_path: str, metrics_path: str, retrieval_dir: str, checkpoint_dir: str, progress: bool) -> None:
    """Fine-tune a captioner with self-critical sequence training (the `scst` params).

    Each step samples scst.samples captions per training image; the reward is
    their CIDEr-D against the image's references, the baseline the mean of the
    other samples (or the greedy caption's reward). The epoch with the best
    validation CIDEr-D is written to --out. scst.epochs 0 copies --model through.
    Checkpoints at each epoch's end (and every scst.checkpoint_every steps): run the
    same command again after a kill and it resumes where the last one was taken.
    Under torchrun (e.g. `torchrun --nproc-per-node 2 -m stages.cli scst`) it trains
    with DistributedDataParallel, scst.batch_size images per step in all, and only
    rank 0 writes.
    """
    from pipeline.scst.run import scst as run_scst

    p = load(params_path)
    metrics = run_scst(model_dir, features_dir, out_dir, curve_path, val_curve_path, metrics_path, p.scst,
                       progress=progress, checkpoint_dir=checkpoint_dir, device=p.device, retrieval_dir=retrieval_dir)
    if metrics.get("passed_through"):
        click.echo(f"scst.epochs is 0: {model_dir} copied to {out_dir}")
    else:
        click.echo(f"val CIDEr-D {metrics['val_cider_xe']} -> {metrics['val_cider_best']} "
                   f"(best epoch {metrics['best_epoch']})  {metrics['seconds']} s")
