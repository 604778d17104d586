"""--rank/--world-size for the stages that split shards across processes or machines."""
from __future__ import annotations

import click

from pipeline.core.errors import ParamsError


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
    from pipeline.core.runtime import current_rank

    try:
        return current_rank(rank, world_size)
    except ParamsError as err:
        raise click.BadParameter(str(err), param_hint="--rank/--world-size") from None
