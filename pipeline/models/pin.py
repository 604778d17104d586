"""Pinning models: a model name (a hub id, a local folder, or ``demo``) becomes a
local folder that every later stage loads (``pipeline/models/pretrained.py``).

The folder is written by ``save_pretrained`` (safetensors) plus ``pin.json``
recording what it is: ``{"model_id", "revision", "sha256", "kind"}``, where the
revision is the hub commit the name resolved to. Later stages load only pinned
folders, so a run is reproducible even when the hub's ``main`` moves on.
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Optional

from pipeline.files import replace_dir, temp_dir_for
from pipeline.models.pretrained import LOCAL, PIN_FILE, ModelError, image_processor_class, weights_sha256

if TYPE_CHECKING:
    from pipeline.params import Params

log = logging.getLogger(__name__)

Kind = Literal["clip", "gpt"]


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
