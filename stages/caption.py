"""`capline caption`: caption image files with a trained captioner."""
from __future__ import annotations

import json
import sys

import click


@click.command("caption")
@click.argument("images", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--model", "model_dir", default="data/model", show_default=True, type=click.Path(file_okay=False),
              help="trained captioner folder (from `capline train`)")
@click.option("--clip", "clip_dir", default="data/models/clip", show_default=True,
              type=click.Path(file_okay=False), help="the CLIP folder the training features were made with")
@click.option("--beams", "num_beams", default=5, show_default=True, type=click.IntRange(min=1),
              help="beam width (one caption per image)")
@click.option("--max-new-tokens", default=30, show_default=True, type=click.IntRange(min=1))
@click.option("--num-captions", default=1, show_default=True, type=click.IntRange(min=1),
              help="captions per image; more than one samples them (see --temperature, --top-p)")
@click.option("--sample", is_flag=True, help="sample instead of beam search, even for one caption")
@click.option("--temperature", default=1.0, show_default=True, type=click.FloatRange(min=0, min_open=True))
@click.option("--top-p", default=0.9, show_default=True, type=click.FloatRange(0, 1, min_open=True))
@click.option("--batch-size", default=16, show_default=True, type=click.IntRange(min=1))
@click.option("--seed", default=0, show_default=True, type=int, help="seed for sampling")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object per image instead of path<TAB>caption")
@click.option("--device", default="auto", show_default=True, help="auto | cpu | cuda | cuda:N | mps")
def caption(images: tuple[str, ...], model_dir: str, clip_dir: str, num_beams: int, max_new_tokens: int,
            num_captions: int, sample: bool, temperature: float, top_p: float, batch_size: int, seed: int,
            as_json: bool, device: str) -> None:
    """Caption IMAGES (files) with a trained model.

    Prints `path<TAB>caption` per caption (or JSON lines with --json). Images that
    cannot be read are reported on stderr and make the exit status 1; the others
    are still captioned.
    """
    from pipeline.caption import CaptionOptions, caption_images

    options = CaptionOptions(num_beams=num_beams, max_new_tokens=max_new_tokens, num_captions=num_captions,
                             sample=sample, temperature=temperature, top_p=top_p, batch_size=batch_size, seed=seed)
    results = caption_images(model_dir, clip_dir, list(images), options, device=device)
    failed = 0
    for r in results:
        if r.error is not None:
            failed += 1
            click.echo(f"{r.path}\terror: {r.error}", err=True)
            if as_json:
                click.echo(json.dumps(r.as_dict(), ensure_ascii=False))
            continue
        if as_json:
            click.echo(json.dumps(r.as_dict(), ensure_ascii=False))
        else:
            for text in r.captions:
                click.echo(f"{r.path}\t{' '.join(text.split())}")  # one line per caption, whatever it holds
    if failed:
        sys.exit(1)
