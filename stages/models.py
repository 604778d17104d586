"""``capline models KIND``: pin CLIP or GPT-2 from the hub, or build the demo's small models."""
from __future__ import annotations

from typing import Optional

import click

from stages.common import load, params_option


@click.command("models")
@click.argument("kind", type=click.Choice(["clip", "gpt"]), metavar="KIND")
@params_option
@click.option("--out", "out_dir", default=None, type=click.Path(file_okay=False),
              help="folder to write the pinned model into  [default: data/models/KIND]")
@click.option("--source", "source_dir", default="data/source", show_default=True,
              type=click.Path(file_okay=False),
              help="prepared dataset folder; the demo GPT-2 and the realsize tokenizers take their vocabulary "
                   "from captions.json there")
def models(kind: str, params_path: str, out_dir: Optional[str], source_dir: str) -> None:
    """Pin the KIND model (clip or gpt) that params name into a local folder.

    `clip.model` / `gpt.model` is a hub id (at `revision`), a local folder, or
    `demo`. Hub and local models are loaded with from_pretrained
    (trust_remote_code off, safetensors preferred) and saved with save_pretrained:
    for clip the whole CLIP (or its vision tower alone, when that is all there is),
    its image processor and tokenizer, for gpt GPT-2 and its tokenizer (pad = EOS).
    `demo` builds small seeded models from `clip.demo` / `gpt.demo` instead, and
    `realsize` the hub models' shapes with random weights. The folder gets pin.json
    with the model id, resolved revision and the sha256 of the weights.
    """
    from pipeline.pin.run import pin_model

    params = load(params_path)
    pin = pin_model(kind, params, out_dir or f"data/models/{kind}", source_dir)
    click.echo(f"{kind}: {pin['model_id']} @ {pin['revision']} sha256 {pin['sha256'][:12]} -> "
               f"{out_dir or f'data/models/{kind}'}")
