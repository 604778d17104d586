"""Pinning models: a model name (a hub id, a local folder, ``demo``, ``realsize`` or an
open_clip model ``open_clip:NAME/TAG``) becomes a local folder that every later stage
loads (``pipeline/models/pretrained.py``).

The folder is written by ``save_pretrained`` (safetensors) plus ``pin.json``
recording what it is: ``{"model_id", "revision", "sha256", "kind"}``, where the
revision is the hub commit the name resolved to (for open_clip models, which name no
commit, the sha256 of the weights; ``open_clip`` then records the architecture, tag,
open_clip version and tokenizer). Later stages load only pinned
folders, so a run is reproducible even when the hub's ``main`` moves on.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Optional

from pipeline.core.files import written_whole
from pipeline.models.pretrained import LOCAL, PIN_FILE, ModelError, image_processor_class, weights_sha256

if TYPE_CHECKING:
    from pipeline.core.params import Params

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


def check_hub_model(kind: Kind, model_id: str, revision: str) -> Optional[str]:
    """Fail at once, in one line, when a hub model can be neither found in the local
    cache nor fetched; return the cached snapshot's commit when there is one.

    Runs before any other work of the stage, so an unreachable name (a typo, no
    network, offline mode with an empty cache) costs nothing and says which model,
    revision and offline setting are involved.
    """
    from huggingface_hub import constants, try_to_load_from_cache
    from huggingface_hub.utils import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    what = f"{kind}.model {model_id!r} (revision {revision!r})"
    offline = bool(constants.HF_HUB_OFFLINE)
    setting = "HF_HUB_OFFLINE=1" if offline else "HF_HUB_OFFLINE not set"
    try:
        cached = try_to_load_from_cache(model_id, "config.json", revision=revision)
    except ValueError as err:  # not a valid repo id or revision
        raise ModelError(f"{what}: not a local folder and not a valid hub name ({err}) [{setting}]") from None
    if isinstance(cached, str):
        return Path(cached).parent.name  # .../snapshots/<commit>/config.json
    if offline:
        raise ModelError(f"{what}: not in the local Hugging Face cache ({constants.HF_HUB_CACHE}) and "
                         f"{setting} forbids downloading it; fetch it once with network "
                         f"(`capline models {kind}`), or name a local folder in {kind}.model")
    from huggingface_hub import HfApi

    try:
        info = HfApi().model_info(model_id, revision=revision, timeout=30)
    except GatedRepoError:
        raise ModelError(f"{what}: gated on the Hugging Face hub; log in (`hf auth login`) with an account "
                         f"that has access [{setting}]") from None
    except RevisionNotFoundError:
        raise ModelError(f"{what}: the hub has no such revision (branch, tag or full 40-hex commit) "
                         f"[{setting}]") from None
    except RepositoryNotFoundError:
        raise ModelError(f"{what}: no such model on the Hugging Face hub (or it is private) [{setting}]") from None
    except Exception as err:  # the HTTP stack raises many kinds for a network that is down
        raise ModelError(f"{what}: cannot reach the Hugging Face hub ({type(err).__name__}: {err}) and it is "
                         f"not in the local cache ({constants.HF_HUB_CACHE}) [{setting}]; with no network, "
                         "fill the cache elsewhere and set HF_HUB_OFFLINE=1") from None
    return getattr(info, "sha", None)


def _cached_commit(model_id: str, revision: str) -> Optional[str]:
    """The commit the cache holds for ``revision`` (after a load, the one just used):
    the snapshot folder's name, which is the commit hash."""
    from huggingface_hub import try_to_load_from_cache

    path = try_to_load_from_cache(model_id, "config.json", revision=revision)
    return Path(path).parent.name if isinstance(path, str) else None


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


def run(kind: Kind, params: "Params", out_dir: Path, source_dir: Optional[Path]) -> dict[str, Any]:
    """Pin (or build, for ``demo``) the CLIP or GPT-2 of ``params`` into ``out_dir``.

    The folder is written under a temporary name and renamed when whole, with
    ``pin.json`` = ``{"model_id", "revision", "sha256", "kind"}``, which is returned.
    ``source_dir`` is the prepared dataset: the vocabularies of the demo GPT-2 and of
    both realsize tokenizers come from its ``captions.json``.
    """
    from pipeline.pin.demo import build_demo_clip, build_demo_gpt
    from pipeline.pin.realsize import build_realsize_clip, build_realsize_gpt
    from pipeline.core.params import DEMO, REALSIZE, parse_open_clip

    if kind not in ("clip", "gpt"):
        raise ModelError(f"model kind {kind!r}: expected 'clip' or 'gpt'")
    section = params.clip if kind == "clip" else params.gpt
    model_id, revision = section.model, section.revision
    open_clip = parse_open_clip(model_id) if kind == "clip" else None
    if model_id not in (DEMO, REALSIZE) and open_clip is None and not _is_local(model_id):
        check_hub_model(kind, model_id, revision)  # before any other work
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with written_whole(out_dir) as tmp:
        extra: dict[str, Any] = {}
        if model_id == DEMO:
            resolved = LOCAL
            second = second_wording(params)
            if kind == "clip":
                build_demo_clip(tmp, params.clip.demo, params.data.demo.image_size, second)
                extra["demo"] = params.clip.demo.model_dump()
            else:
                build_demo_gpt(tmp, params.gpt.demo, _demo_captions(source_dir), second)
                extra["demo"] = params.gpt.demo.model_dump()
            if second is not None:
                extra["second_wording"] = params.transfer.domain
        elif open_clip is not None:
            from pipeline.pin.openclip import pin_open_clip

            extra["open_clip"] = pin_open_clip(*open_clip, tmp)
            resolved = weights_sha256(tmp)  # open_clip names no commit: the weights' content stands for one
        elif model_id == REALSIZE:
            resolved = LOCAL
            if kind == "clip":  # both tokenizers learn the dataset's captions
                build_realsize_clip(tmp, _demo_captions(source_dir, model_id, kind))
            else:
                build_realsize_gpt(tmp, _demo_captions(source_dir, model_id))
        else:
            save = _save_hub_clip if kind == "clip" else _save_hub_gpt
            try:
                commit = save(model_id, revision, tmp)
            except ModelError:
                raise
            except (OSError, ValueError, KeyError) as err:
                raise ModelError(f"{kind}.model {model_id!r} (revision {revision!r}): cannot load: {err}") from err
            resolved = LOCAL if _is_local(model_id) else (commit or _cached_commit(model_id, revision) or revision)
        pin = {"model_id": model_id, "revision": resolved, "sha256": weights_sha256(tmp), "kind": kind, **extra}
        (tmp / PIN_FILE).write_text(json.dumps(pin, indent=2, sort_keys=True) + "\n")
    return pin


def second_wording(params: "Params") -> Optional[dict[str, str]]:
    """The transfer experiment's domain B wording the demo models also learn (None: none)."""
    from pipeline.prepare.scenes import COLOUR_WORDS_B

    return COLOUR_WORDS_B if params.transfer.domain == "colours" else None


def _demo_captions(source_dir: Optional[Path], model_id: str = "demo", kind: Kind = "gpt") -> list[str]:
    if source_dir is None:
        raise ModelError(f"{kind}.model {model_id!r}: needs the prepared demo dataset (source folder) "
                         "for its vocabulary")
    path = Path(source_dir) / "captions.json"
    try:
        data = json.loads(path.read_text())
        return [str(a["caption"]) for a in data["annotations"]]
    except FileNotFoundError:
        raise ModelError(f"{path}: not found; {kind}.model {model_id!r} takes its vocabulary from the demo's "
                         "captions: run the prepare stage first (data.source: demo)") from None
    except (ValueError, KeyError, TypeError) as err:
        raise ModelError(f"{path}: not a COCO captions file ({err!r})") from None
