"""``capline params``: apply a recipe from configs/ to params.yaml, or check a params file."""
from __future__ import annotations

import click
import yaml

from stages.common import params_option


@click.group("params")
def params() -> None:
    """Recipes (override files in configs/) and params validation."""


@params.command("apply")
@click.argument("recipes", nargs=-1, required=True, type=click.Path(dir_okay=False))
@params_option
@click.option("--dry-run", is_flag=True, help="print what would change; leave the params file as it is")
def apply(recipes: tuple[str, ...], params_path: str, dry_run: bool) -> None:
    """Merge RECIPES (in order) into the params file and validate the result.

    Only the values of the keys a recipe lists are rewritten, in place: comments
    and layout stay, and `dvc params diff` shows exactly what changed. The merged
    params are validated as every stage validates them; nothing is written if
    they are invalid. `git checkout params.yaml` goes back.
    """
    from pipeline.core.recipes import apply_recipes

    changes = apply_recipes(params_path, recipes, write=not dry_run)
    verb = "would change" if dry_run else "changed"
    click.echo(f"{params_path}: {verb} {len(changes)} key{'s' if len(changes) != 1 else ''}")
    for c in changes:
        click.echo(f"  {c.key}: {_show(c.old)} -> {_show(c.new)}")


@params.command("show")
@click.argument("recipes", nargs=-1, type=click.Path(dir_okay=False))
@params_option
def show(recipes: tuple[str, ...], params_path: str) -> None:
    """Print the params file merged with RECIPES (validated), as YAML; writes nothing."""
    from pipeline.core.recipes import merged_params

    merged, _, _ = merged_params(params_path, recipes)
    click.echo(yaml.safe_dump(merged, sort_keys=False, width=10_000), nl=False)


@params.command("check")
@params_option
def check(params_path: str) -> None:
    """Validate the params file as the stages do; print OK or the keys that are wrong."""
    from pipeline.core.params import load_params

    load_params(params_path)
    click.echo(f"{params_path}: OK")


def _show(value) -> str:
    return yaml.safe_dump(value, default_flow_style=True, width=10_000).strip().removesuffix("...").strip()


@params.command("doc")
def doc() -> None:
    """Print the parameter reference (docs/params.md) generated from the schema and dvc.yaml."""
    from pathlib import Path

    from pipeline.core.params_doc import markdown

    click.echo(markdown(Path("dvc.yaml")), nl=False)
