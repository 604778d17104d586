"""Where an export may be written: a new or empty folder, or an earlier export of the same kind."""
from __future__ import annotations

from pathlib import Path

from pipeline.models.pretrained import ModelError


def check_target(out: Path, model_dir: Path, marker: str) -> None:
    """Refuse to replace anything but an earlier export (recognised by its ``marker`` file)."""
    out, model_dir = Path(out), Path(model_dir)
    if out.resolve() == model_dir.resolve():
        raise ModelError(f"--out {out}: is the model folder itself")
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / marker).is_file())):
        raise ModelError(f"--out {out}: exists and is not an earlier export (no {marker}); refusing to replace it")
