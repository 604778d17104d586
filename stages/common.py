"""What every stage command shares: the --params option and params loading."""
from __future__ import annotations

import click

from pipeline.core.params import Params, load_params

params_option = click.option(
    "--params",
    "params_path",
    default="params.yaml",
    show_default=True,
    type=click.Path(dir_okay=False),
    help="params file to read the stage's settings from",
)


def load(params_path: str) -> Params:
    """Load and validate params (a bad value is a ParamsError naming the key)."""
    return load_params(params_path)
