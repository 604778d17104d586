"""The one place that loads and pins the pipeline's pretrained models.

``pin_model`` turns a model name (a hub id, a local folder, or ``demo``) into a
folder written by ``save_pretrained`` (safetensors) plus ``pin.json`` recording what
it is: ``{"model_id", "revision", "sha256", "kind"}``. Later stages load only
pinned folders, with ``trust_remote_code=False`` and never through pickle, so a run
is reproducible even when the hub's ``main`` moves on.
"""
from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Optional

from pipeline.errors import CaplineError
from pipeline.files import replace_dir, temp_dir_for

if TYPE_CHECKING:
    from pipeline.params import Params

log = logging.getLogger(__name__)

Kind = Literal["clip", "gpt"]
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


# ------------------------------------------------------------------------ pinning
def _is_local(model_id: str) -> bool:
    return Path(model_id).expanduser().is_dir()


def _from_pretrained(cls: Any, model_id: str, revision: str, **kwargs: Any) -> Any:
    """from_pretrained with remote code off, preferring safetensors over pickled weights."""
    common = dict(revision=revision, trust_remote_code=False, **kwargs)
    try:
        return cls.from_pretrained(model_id, use_safetensors=True, **common)
    except OSError as err:
        if "safetensors" not in str(err).lower():
            raise
        # Some older hub snapshots hold only pytorch_model.bin; transformers reads it
        # with torch.load(weights_only=True), and we re-save it as safetensors.
        log.warning("%s@%s has no safetensors weights; reading the .bin file (weights only)", model_id, revision)
        return cls.from_pretrained(model_id, use_safetensors=False, **common)


def _commit_hash(obj: Any) -> Optional[str]:
    config = getattr(obj, "config", obj)
    value = getattr(config, "_commit_hash", None)
    return value if isinstance(value, str) and value else None


def _save_hub_clip(model_id: str, revision: str, out: Path) -> Optional[str]:
    """The whole CLIP (both towers, image processor, tokenizer), or the vision tower alone
    when that is all the folder or hub repository holds."""
    from transformers import AutoConfig, AutoTokenizer, CLIPModel, CLIPVisionModelWithProjection

    from pipeline.models.demo import image_processor_class

    config = AutoConfig.from_pretrained(model_id, revision=revision, trust_remote_code=False)
    whole = getattr(config, "model_type", None) == "clip"
    model = _from_pretrained(CLIPModel if whole else CLIPVisionModelWithProjection, model_id, revision)
    processor = image_processor_class().from_pretrained(model_id, revision=revision, trust_remote_code=False)
    model.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    if whole:
        tokenizer = AutoTokenizer.from_pretrained(model_id, revision=revision, trust_remote_code=False)
        tokenizer.save_pretrained(out)
    return _commit_hash(model)


def save_clip(model_id: str, revision: str, out: Path) -> Optional[str]:
    """Save a hub or local CLIP into ``out`` as the models stage pins it; returns the hub commit."""
    try:
        return _save_hub_clip(model_id, revision, Path(out))
    except ModelError:
        raise
    except (OSError, ValueError, KeyError) as err:
        raise ModelError(f"clip model {model_id!r} (revision {revision!r}): cannot load: {err}") from err


def _save_hub_gpt(model_id: str, revision: str, out: Path) -> Optional[str]:
    from transformers import AutoTokenizer, GPT2LMHeadModel

    model = _from_pretrained(GPT2LMHeadModel, model_id, revision)
    tokenizer = AutoTokenizer.from_pretrained(model_id, revision=revision, trust_remote_code=False)
    if tokenizer.eos_token is None:
        raise ModelError(f"gpt.model {model_id!r}: its tokenizer has no EOS token")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # GPT-2 has no pad token; pads are masked anyway
    model.config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return _commit_hash(model)


def pin_model(kind: Kind, params: "Params", out_dir: Path, source_dir: Optional[Path]) -> dict[str, Any]:
    """Pin (or build, for ``demo``) the CLIP or GPT-2 of ``params`` into ``out_dir``.

    The folder is written under a temporary name and renamed when whole, with
    ``pin.json`` = ``{"model_id", "revision", "sha256", "kind"}``, which is returned.
    ``source_dir`` is the prepared dataset: the demo GPT-2's vocabulary comes from
    its ``captions.json``.
    """
    from pipeline.models.demo import build_demo_clip, build_demo_gpt
    from pipeline.params import DEMO

    if kind not in ("clip", "gpt"):
        raise ModelError(f"model kind {kind!r}: expected 'clip' or 'gpt'")
    section = params.clip if kind == "clip" else params.gpt
    model_id, revision = section.model, section.revision
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_dir_for(out_dir)
    try:
        extra: dict[str, Any] = {}
        if model_id == DEMO:
            resolved = LOCAL
            if kind == "clip":
                build_demo_clip(tmp, params.clip.demo, params.data.demo.image_size)
                extra["demo"] = params.clip.demo.model_dump()
            else:
                build_demo_gpt(tmp, params.gpt.demo, _demo_captions(source_dir))
                extra["demo"] = params.gpt.demo.model_dump()
        else:
            save = _save_hub_clip if kind == "clip" else _save_hub_gpt
            try:
                commit = save(model_id, revision, tmp)
            except ModelError:
                raise
            except (OSError, ValueError, KeyError) as err:
                raise ModelError(f"{kind}.model {model_id!r} (revision {revision!r}): cannot load: {err}") from err
            resolved = LOCAL if _is_local(model_id) else (commit or revision)
        pin = {"model_id": model_id, "revision": resolved, "sha256": weights_sha256(tmp), "kind": kind, **extra}
        (tmp / PIN_FILE).write_text(json.dumps(pin, indent=2, sort_keys=True) + "\n")
        replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return pin


def _demo_captions(source_dir: Optional[Path]) -> list[str]:
    if source_dir is None:
        raise ModelError("gpt.model 'demo': needs the prepared demo dataset (source folder) for its vocabulary")
    path = Path(source_dir) / "captions.json"
    try:
        data = json.loads(path.read_text())
        return [str(a["caption"]) for a in data["annotations"]]
    except FileNotFoundError:
        raise ModelError(f"{path}: not found; run the prepare stage first (data.source: demo)") from None
    except (ValueError, KeyError, TypeError) as err:
        raise ModelError(f"{path}: not a COCO captions file ({err!r})") from None


# ------------------------------------------------------------------------ loading
def _check_dir(model_dir: Path, what: str) -> Path:
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise ModelError(
            f"{what} model folder {model_dir}: no config.json (missing or not a save_pretrained folder; "
            f"run `capline models {what}`)"
        )
    return model_dir


# The other tower's weights are expected in a whole-CLIP folder; anything else is not.
_TOWER_PREFIXES = {"vision": ("vision_model.", "visual_projection."),
                   "text": ("text_model.", "text_projection.")}


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
    """(CLIPVisionModelWithProjection in eval mode, image processor) from a pinned folder.

    The folder may hold the whole CLIP or its vision tower alone; this is the one
    loader of the vision side (embedding, captioning, CLIPScore's images).
    """
    from transformers import CLIPVisionModelWithProjection

    from pipeline.models.demo import image_processor_class

    model_dir = _check_dir(model_dir, "clip")
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
    model_dir = Path(model_dir)
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
    """(CLIPTextModelWithProjection in eval mode, tokenizer) from a whole-CLIP folder."""
    from transformers import AutoTokenizer, CLIPTextModelWithProjection

    model_dir = _check_dir(model_dir, "clip")
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
