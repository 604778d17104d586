"""``capline transfer``: the demo's domain-transfer experiment (docs/retrieval.md#domain-transfer)."""
from __future__ import annotations

from pathlib import Path

import click

from stages.common import load, params_option

_dir = click.Path(file_okay=False, path_type=Path)


@click.command("transfer")
@params_option
@click.option("--model", "model_dir", type=_dir, default=Path("data/model"), show_default=True,
              help="the captioner trained on the demo (domain A)")
@click.option("--datastore", type=_dir, default=Path("data/datastore"), show_default=True,
              help="the datastore the model was trained with (A's)")
@click.option("--clip", type=_dir, default=Path("data/models/clip"), show_default=True,
              help="the pinned whole CLIP; its text tower encodes B's datastore")
@click.option("--gpt", type=_dir, default=Path("data/models/gpt"), show_default=True,
              help="GPT-2 folder whose tokenizer measures B's caption lengths")
@click.option("--out", type=_dir, default=Path("data/transfer"), show_default=True,
              help="folder for transfer.json, both results files, B's references and B's datastore")
@click.option("--progress/--no-progress", default=True, help="show progress bars")
def transfer(params_path: str, model_dir: Path, datastore: Path, clip: Path, gpt: Path, out: Path,
             progress: bool) -> None:
    """Caption domain B's test images with A's datastore and with B's; score both (CIDEr).

    Reads the `transfer`, `retrieval`, `generate` and `data.demo` sections and `device`.
    With transfer.domain none it writes only transfer.json, which says so.
    """
    from pipeline.transfer.run import run

    summary = run(load(params_path), model_dir, datastore, clip, gpt, out, progress=progress)
    if summary.get("skipped"):
        click.echo(f"transfer: skipped ({summary['skipped']})")
    else:
        click.echo(f"domain B test CIDEr: {summary['transfer_cider']:.4f} with B's datastore, "
                   f"{summary['transfer_cider_source_datastore']:.4f} with A's (ratio {summary['transfer_ratio']:.3f})")
