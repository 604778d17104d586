"""What every stage command shares: the --params option and params loading."""
from __future__ import annotations

import click

from pipeline.params import Params, ParamsError, load_params

params_option = click.option(
    "--params",
    "params_path",
    default="params.yaml",
    show_default=True,
    type=click.Path(dir_okay=False),
    help="params file to read the stage's settings from",
)


def load(params_path: str) -> Params:
    """Load and validate params, turning a bad value into a clean CLI error."""
    try:
        return load_params(params_path)
    except ParamsError as err:
        raise click.ClickException(str(err)) from None


def rank_options(command):
    """--rank/--world-size: split shards across processes or machines by index."""
    command = click.option(
        "--world-size", type=int, default=None, help="number of processes (default: torchrun's WORLD_SIZE, else 1)"
    )(command)
    return click.option(
        "--rank", type=int, default=None, help="this process's rank (default: torchrun's RANK, else 0)"
    )(command)


def resolve_rank(rank, world_size):
    """The Rank to work as: explicit options win over torchrun's environment."""
    from pipeline.runtime import current_rank

    try:
        return current_rank(rank, world_size)
    except ParamsError as err:
        raise click.BadParameter(str(err), param_hint="--rank/--world-size") from None
