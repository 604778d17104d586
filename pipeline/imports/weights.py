"""Reading a released ``.pt`` file as tensors only."""
from __future__ import annotations

import pickle
from pathlib import Path

import torch

from pipeline.core.errors import CaplineError


class ImportFailed(CaplineError):
    """A checkpoint that cannot become a capline model folder; the message says why."""


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The flat ``{key: tensor}`` state dict in ``path``, loaded with ``weights_only=True``:
    a file whose unpickling would run code (a custom class, a whole pickled model) is
    refused, never executed."""
    path = Path(path)
    if not path.is_file():
        raise ImportFailed(f"{path}: no such file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ImportFailed(f"{path}: refused: loading it needs pickle to run code that is not plain tensors "
                           f"(torch.load weights_only=True said: {first}). capline never unpickles "
                           "code from a checkpoint; re-save its state_dict() where you trust the file") from None
    except (RuntimeError, OSError, EOFError) as err:
        raise ImportFailed(f"{path}: not a torch checkpoint ({type(err).__name__}: {err})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ImportFailed(f"{path}: not a flat state dict of tensors (got {type(state).__name__})")
    return state
