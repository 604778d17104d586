"""The one place that loads the pipeline's pretrained models from local folders.

Folders are written by ``save_pretrained`` (safetensors) with a ``pin.json``
recording what they are (``{"model_id", "revision", "sha256", "kind"}``; see
``pipeline/pin/run.py``, which makes them). Every stage loads CLIP and GPT-2
through ``load_clip`` (CLIP's vision side), ``load_clip_text`` (its text side, for
CLIPScore) and ``load_gpt``: ``trust_remote_code=False`` and never through pickle,
and without transformers' "Loading weights" progress bars (the stages' own bars stay).
A pinned open_clip folder (``pipeline/models/openclip.py``) loads through the same
three CLIP functions, as an ``OpenClip`` and its ``OpenClipTransform``.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Iterator, Optional

from pipeline.core.errors import ModelError  # noqa: F401  (also re-exported for callers)

PIN_FILE = "pin.json"
LOCAL = "local"  # revision recorded for models that do not come from the hub


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
    from pipeline.models.openclip import is_open_clip_folder

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file() and not (what == "clip" and is_open_clip_folder(model_dir)):
        raise ModelError(
            f"{what} model folder {model_dir}: no config.json (missing or not a save_pretrained folder; "
            f"run `capline models {what}`)"
        )
    return model_dir


# The other tower's weights are expected in a whole-CLIP folder; anything else is not.
_TOWER_PREFIXES = {"vision": ("vision_model.", "visual_projection."),
                   "text": ("text_model.", "text_projection.")}


@contextlib.contextmanager
def _no_load_bars() -> Iterator[None]:
    """transformers' progress bars off while a local folder loads (a bar per load says nothing to a user)."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


class _DropLoadReport(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "LOAD REPORT" not in str(record.msg)


def _load_tower(cls: Any, model_dir: Path, tower: str) -> Any:
    """One tower of a CLIP folder; refuses missing or mismatched weights of that tower."""
    # transformers logs a load report listing the other tower's weights as unexpected;
    # the same facts come back in loading_info and are checked here instead. (A filter,
    # not a log level: transformers runs extra checks when its logger's level is raised.)
    hf_log = logging.getLogger("transformers.modeling_utils")
    report_filter = _DropLoadReport()
    hf_log.addFilter(report_filter)
    try:
        with _no_load_bars():
            model, info = cls.from_pretrained(model_dir, use_safetensors=True, trust_remote_code=False,
                                              output_loading_info=True)
    finally:
        hf_log.removeFilter(report_filter)
    foreign = tuple(p for t, ps in _TOWER_PREFIXES.items() if t != tower for p in ps) + ("logit_scale",)
    problems = [f"missing {k}" for k in info.get("missing_keys", [])]
    problems += [f"unexpected {k}" for k in info.get("unexpected_keys", []) if not k.startswith(foreign)]
    problems += [f"mismatched {k}" for k in info.get("mismatched_keys", [])]
    if problems:
        raise ModelError(f"clip model folder {model_dir}: {tower} tower weights do not fit "
                         f"({', '.join(sorted(problems)[:5])}{' ...' if len(problems) > 5 else ''})")
    return model.eval()


def load_clip(model_dir: Path):
    """(CLIPVisionModelWithProjection in eval mode, image processor) from a pinned folder;
    (OpenClip, OpenClipTransform) from an open_clip folder.

    The folder may hold the whole CLIP or its vision tower alone; this is the one
    loader of the vision side (embedding, captioning, CLIPScore's images).
    """
    from transformers import CLIPVisionModelWithProjection

    from pipeline.models.openclip import is_open_clip_folder, load_open_clip

    model_dir = _check_dir(model_dir, "clip")
    if is_open_clip_folder(model_dir):
        clip = load_open_clip(model_dir)
        return clip, clip.transform
    try:
        model = _load_tower(CLIPVisionModelWithProjection, model_dir, "vision")
        processor = image_processor_class().from_pretrained(model_dir, trust_remote_code=False)
    except ModelError:
        raise
    except Exception as err:  # transformers raises many kinds for a damaged folder
        raise ModelError(f"clip model folder {model_dir}: cannot load ({type(err).__name__}: {err})") from err
    return model, processor


def clip_text_missing(model_dir: Path) -> Optional[str]:
    """Why ``model_dir`` has no usable CLIP text tower, or None when it has one."""
    from pipeline.models.openclip import is_open_clip_folder

    model_dir = Path(model_dir)
    if is_open_clip_folder(model_dir):
        return None  # both towers, and open_clip's tokenizer comes with the package
    try:
        config = json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError) as err:
        return f"{model_dir}: no readable config.json ({err})"
    if config.get("model_type") != "clip" or "text_config" not in config:
        return (f"{model_dir} holds a CLIP vision tower only (model_type {config.get('model_type')!r}); "
                "CLIPScore needs the text tower too")
    if not any((model_dir / name).is_file() for name in ("tokenizer.json", "vocab.json")):
        return f"{model_dir} has no tokenizer files; CLIPScore needs CLIP's tokenizer"
    return None


def load_clip_text(model_dir: Path):
    """(CLIPTextModelWithProjection in eval mode, tokenizer) from a whole-CLIP folder;
    (OpenClip, its open_clip tokenizer) from an open_clip folder."""
    from transformers import AutoTokenizer, CLIPTextModelWithProjection

    from pipeline.models.openclip import is_open_clip_folder, load_open_clip

    model_dir = _check_dir(model_dir, "clip")
    if is_open_clip_folder(model_dir):
        clip = load_open_clip(model_dir)
        return clip, clip.tokenizer()
    reason = clip_text_missing(model_dir)
    if reason is not None:
        raise ModelError(reason)
    try:
        model = _load_tower(CLIPTextModelWithProjection, model_dir, "text")
        tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
    except ModelError:
        raise
    except Exception as err:
        raise ModelError(f"clip model folder {model_dir}: cannot load the text tower "
                         f"({type(err).__name__}: {err})") from err
    return model, tokenizer


def load_gpt(model_dir: Path):
    """(GPT2LMHeadModel in eval mode, tokenizer with a pad token) from a GPT-2 folder.

    The one way GPT-2 is loaded: pinned folders, the training stage's input and the
    ``gpt/`` folder of a trained captioner all go through here.
    """
    from transformers import AutoTokenizer, GPT2LMHeadModel

    model_dir = _check_dir(model_dir, "gpt")
    try:
        with _no_load_bars():
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
    """CLIP's image processor on its PIL backend, whatever else is installed.

    transformers 5 backs CLIPImageProcessor with torchvision where torchvision is
    installed (open_clip brings it) and with PIL (CLIPImageProcessorPil) where not;
    the two resize differently in the last bits. The PIL one is what transformers 4
    and CLIP's own preprocessing use, so features and pinned folders are the same on
    every machine.
    """
    import transformers

    return getattr(transformers, "CLIPImageProcessorPil", transformers.CLIPImageProcessor)
