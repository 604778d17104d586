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


def check_exportable(model, model_dir: Path) -> None:
    """Refuse a captioner the exports cannot express: a cross-attention mapper's GPT-2 is no
    plain GPT-2 (its blocks attend to the patch tokens), so the decoder graph and the Hugging
    Face folder's GPT-2 would caption without the image."""
    if model.retrieval.k > 0:
        raise ModelError(f"{model_dir}: it reads {model.retrieval.k} retrieved captions per image (retrieval.k); "
                         "the exports have no datastore search or prompt yet: caption it with the torch backend "
                         "(`capline caption --datastore`)")
    if model.mapper.patch_tokens:
        raise ModelError(f"{model_dir}: mapper.type {model.mapper.kind} cannot be exported yet (GPT-2 with "
                         "cross-attention to patch tokens); caption and serve it with the torch backend")
