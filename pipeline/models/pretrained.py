"""The one place that loads the pipeline's pretrained models from local folders.

Folders are written by ``save_pretrained`` (safetensors) with a ``pin.json``
recording what they are (``{"model_id", "revision", "sha256", "kind"}``; see
``pipeline/models/pin.py``, which makes them). Every stage loads CLIP and GPT-2
through ``load_clip`` and ``load_gpt``: ``trust_remote_code=False`` and never
through pickle.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from pipeline.errors import CaplineError

PIN_FILE = "pin.json"
LOCAL = "local"  # revision recorded for models that do not come from the hub


class ModelError(CaplineError):
    """A model could not be pinned or loaded; the message names the model or folder."""


# ------------------------------------------------------------------------ hashing
def weights_sha256(model_dir: Path) -> str:
    """sha256 of the saved weights: the safetensors file(s), in name order."""
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise ModelError(f"{model_dir}: no *.safetensors weights file")
    h = hashlib.sha256()
    for path in files:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def read_pin(model_dir: Path) -> dict[str, Any]:
    """pin.json of a model folder; a plain save_pretrained folder gets one made up from its weights."""
    model_dir = Path(model_dir)
    path = model_dir / PIN_FILE
    if not path.exists():
        return {"model_id": model_dir.resolve().name, "revision": LOCAL, "sha256": weights_sha256(model_dir)}
    try:
        pin = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ModelError(f"{path}: not valid JSON ({err})") from None
    missing = {"model_id", "revision", "sha256"} - set(pin) if isinstance(pin, dict) else {"all keys"}
    if missing:
        raise ModelError(f"{path}: missing {sorted(missing)}")
    return pin


def model_identity(model_dir: Path) -> tuple[str, str]:
    """(model_id, revision) that feature shards record: the hub commit when the model
    came from the hub, else the sha256 of its weights (so two local or demo models
    never pass for one another)."""
    pin = read_pin(Path(model_dir))
    revision = pin["revision"] if pin["revision"] != LOCAL else pin["sha256"]
    return str(pin["model_id"]), str(revision)


# ------------------------------------------------------------------------ loading
def _check_dir(model_dir: Path, what: str) -> Path:
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise ModelError(
            f"{what} model folder {model_dir}: no config.json (missing or not a save_pretrained folder; "
            f"run `capline models {what}`)"
        )
    return model_dir


def load_clip(model_dir: Path):
    """(CLIPVisionModelWithProjection in eval mode, image processor) from a pinned folder."""
    from transformers import CLIPVisionModelWithProjection

    model_dir = _check_dir(model_dir, "clip")
    try:
        model = CLIPVisionModelWithProjection.from_pretrained(
            model_dir, use_safetensors=True, trust_remote_code=False
        ).eval()
        processor = image_processor_class().from_pretrained(model_dir, trust_remote_code=False)
    except Exception as err:  # transformers raises many kinds for a damaged folder
        raise ModelError(f"clip model folder {model_dir}: cannot load ({type(err).__name__}: {err})") from err
    return model, processor


def load_gpt(model_dir: Path):
    """(GPT2LMHeadModel in eval mode, tokenizer with a pad token) from a GPT-2 folder.

    The one way GPT-2 is loaded: pinned folders, the training stage's input and the
    ``gpt/`` folder of a trained captioner all go through here.
    """
    from transformers import AutoTokenizer, GPT2LMHeadModel

    model_dir = _check_dir(model_dir, "gpt")
    try:
        model = GPT2LMHeadModel.from_pretrained(model_dir, use_safetensors=True, trust_remote_code=False).eval()
        tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
    except Exception as err:
        raise ModelError(f"gpt model folder {model_dir}: cannot load ({type(err).__name__}: {err})") from err
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.eos_token_id != model.config.eos_token_id:
        raise ModelError(
            f"gpt model folder {model_dir}: tokenizer EOS id {tokenizer.eos_token_id} "
            f"differs from the model's eos_token_id {model.config.eos_token_id}"
        )
    return model, tokenizer


def image_processor_class() -> type:
    """CLIPImageProcessor, or its PIL twin where transformers would fall back anyway.

    transformers 5 backs CLIPImageProcessor with torchvision; without it, it falls
    back to CLIPImageProcessorPil with a warning. Asking for that class directly
    gives the same processing without the noise.
    """
    import transformers

    try:
        import torchvision  # noqa: F401
    except ImportError:
        if hasattr(transformers, "CLIPImageProcessorPil"):
            return transformers.CLIPImageProcessorPil
    return transformers.CLIPImageProcessor
