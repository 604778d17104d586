"""``capline download``: fetch images into webdataset tar shards with a status per record."""
from __future__ import annotations

from typing import Optional

import click

from stages.common import load, params_option
from stages.ranks import rank_options, resolve_rank


@click.command("download")
@params_option
@click.option("--source", "source_dir", default="data/source", show_default=True, type=click.Path(file_okay=False),
              help="prepared dataset folder (written by `capline prepare`)")
@click.option("--out", "out_dir", default="data/images", show_default=True, type=click.Path(file_okay=False),
              help="folder for NNNNN.tar shards and NNNNN.status.jsonl files")
@click.option("--metrics", "metrics_path", default="data/metrics/download.json", show_default=True,
              type=click.Path(dir_okay=False), help="summary JSON (counts per status, images/s)")
@rank_options
@click.option("--progress/--no-progress", default=True, show_default=True, help="show a progress bar")
def download(params_path: str, source_dir: str, out_dir: str, metrics_path: str,
             rank: Optional[int], world_size: Optional[int], progress: bool) -> None:
    """Fetch every record's image into shards, with params `download`.

    Shard i holds records i*records_per_shard onwards and belongs to the rank
    with i % world_size == rank. Finished shards made from the same records,
    byte-changing params and code (NNNNN.fingerprint.json) are kept, so a rerun
    after a kill resumes; others are remade, with a log line saying why. The
    result is byte-identical to an uninterrupted run. Every record gets a status
    line: ok or a named failure.
    """
    from pipeline.download.run import run

    params = load(params_path)
    who = resolve_rank(rank, world_size)
    s = run(source_dir, out_dir, params.download, who, metrics_path=metrics_path, progress=progress)
    m = s.as_metrics()
    click.echo(f"{m['ok']}/{m['records']} ok in {m['shards']} shards ({m['shards_resumed']} resumed), "
               f"{m['images_per_s']} images/s")
