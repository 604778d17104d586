"""``capline embed-plan``: whether embed stores patch tokens (``clip.patch_tokens`` resolved)."""
from __future__ import annotations

from pathlib import Path

import click

from stages.common import load, params_option


@click.command("embed-plan")
@params_option
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=Path("data/embed_plan.json"),
              show_default=True, help="the plan file `capline embed --plan` reads")
def embed_plan(params_path: str, out: Path) -> None:
    """Write OUT: {"patch_tokens": true|false}, clip.patch_tokens with auto resolved by
    mapper.type. The file's bytes change only when the answer does, so switching
    between prefix mappers does not rerun embed under DVC.
    """
    from pipeline.embed.plan import write_plan

    plan = write_plan(load(params_path), out)
    click.echo(f"embed plan: patch_tokens {str(plan['patch_tokens']).lower()} -> {out}")
