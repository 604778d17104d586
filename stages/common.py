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
