"""``capline prepare``: fetch the dataset spec, or generate the offline demo."""
from __future__ import annotations

import click

from stages.common import load, params_option


@click.command("prepare")
@params_option
@click.option("--out", "out_dir", default="data/source", show_default=True, type=click.Path(file_okay=False),
              help="folder to write the annotation files and manifest.json into")
@click.option("--cache", "cache_dir", default="data/cache/annotations", show_default=True,
              type=click.Path(file_okay=False), help="where annotation files fetched from URLs are kept")
def prepare(params_path: str, out_dir: str, cache_dir: str) -> None:
    """Fetch the annotation files that params `data` names, or generate the demo.

    For `data.source: demo` the scene generator writes images, a COCO captions
    file and a Karpathy split. Otherwise `data.annotations` (and
    `data.karpathy_split`) are read from paths or URLs (zip archives too:
    ARCHIVE#MEMBER), cached, checksummed into manifest.json and checked record
    by record, so a malformed spec stops here, before any image is fetched.
    """
    from pipeline.prepare.run import prepare as run

    params = load(params_path)
    m = run(out_dir, params.data, cache_dir=cache_dir, user_agent=params.download.user_agent)
    click.echo(f"prepared {m.records} records ({m.kind}) in {out_dir}")
