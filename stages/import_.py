"""`capline import`: released checkpoints of ClipCap and clip-gpt-captioning as model folders.

(The module is import_.py: `import` is a Python keyword; stages/cli.py maps the name.)
"""
from __future__ import annotations

import click

_gpt = click.option("--gpt", "gpt_dir", default="data/models/gpt", show_default=True,
                    type=click.Path(file_okay=False), help="pinned GPT-2 folder the checkpoint was trained from "
                                                           "(its config and tokenizer; the weights come from the checkpoint)")
_clip = click.option("--clip", "clip_dir", default=None, type=click.Path(file_okay=False),
                     help="pinned CLIP folder whose vectors the mapper reads; copied into the model folder's clip/")
_out = click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
                    help="the capline model folder to write")


@click.group("import")
def import_() -> None:
    """Turn a released checkpoint into a capline model folder (generate, caption and evaluate use it)."""


@import_.command("clipcap")
@click.argument("weights", type=click.Path(dir_okay=False))
@click.option("--mapper", type=click.Choice(["mlp", "transformer"]), required=True, help="the checkpoint's mapping network")
@click.option("--prefix-length", type=int, required=True, help="ClipCap's prefix_length (10 for COCO/CC MLP, 40 for the COCO transformer)")
@click.option("--clip-length", type=int, default=None, help="transformer: ClipCap's clip_length (checked against the shapes)")
@_clip
@_gpt
@_out
def clipcap(weights: str, mapper: str, prefix_length: int, clip_length: int | None, clip_dir: str | None,
            gpt_dir: str, out_dir: str) -> None:
    """ClipCap's released COCO / Conceptual Captions weights (rmokady/CLIP_prefix_caption)."""
    from pipeline.imports.run import import_clipcap

    out = import_clipcap(weights, mapper, prefix_length, clip_length, gpt_dir, out_dir, clip_dir=clip_dir)
    click.echo(f"wrote {out}")


@import_.command("clip-gpt-captioning")
@click.argument("weights", type=click.Path(dir_okay=False))
@click.option("--size", type=click.Choice(["small", "large"]), required=True,
              help="small: ViT-B/32 + gpt2; large: ViT-L/14 + gpt2-medium")
@_clip
@_gpt
@_out
def clip_gpt_captioning(weights: str, size: str, clip_dir: str | None, gpt_dir: str, out_dir: str) -> None:
    """jmisilo/clip-gpt-captioning's released model.pt."""
    from pipeline.imports.run import import_clip_gpt_captioning

    out = import_clip_gpt_captioning(weights, size, gpt_dir, out_dir, clip_dir=clip_dir)
    click.echo(f"wrote {out}")
