"""open_clip models (``clip.model: open_clip:NAME/TAG``) as pinned folders.

A pinned open_clip folder is open_clip's own ``local-dir:`` layout:
``open_clip_config.json`` (``model_cfg``: the architecture as built, ``preprocess_cfg``:
its eval transform) and ``open_clip_model.safetensors`` (the state dict), beside our
``pin.json``. Loading builds the architecture from the saved config with no weights
(``load_weights=False``, so no network) and loads the state dict strictly.

open_clip (and with it torchvision) is imported only here and only when an open_clip
model is used.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from pipeline.core.errors import ModelError

CONFIG_FILE = "open_clip_config.json"
WEIGHTS_FILE = "open_clip_model.safetensors"
RESAMPLE = {"bicubic": 3, "bilinear": 2}  # PIL's Image.Resampling values, as torchvision maps them


def import_open_clip() -> Any:
    """The ``open_clip`` module, imported on first use only. It imports torchvision, which
    ``pipeline/core/torchvision_compat.py`` lets import beside a CPU torch."""
    import open_clip

    return open_clip


def is_open_clip_folder(model_dir: Path) -> bool:
    return (Path(model_dir) / CONFIG_FILE).is_file()


def unsupported(model_cfg: dict, preprocess_cfg: Optional[dict] = None) -> Optional[str]:
    """Why capline cannot use this architecture (or transform, when given), or None."""
    if "hf_model_name" in model_cfg.get("text_cfg", {}) or "hf_tokenizer_name" in model_cfg.get("text_cfg", {}):
        return "its text tower or tokenizer comes from Hugging Face transformers (built from the network at load)"
    if "timm_model_name" in model_cfg.get("vision_cfg", {}):
        return "its image tower is a timm model"
    if "multimodal_cfg" in model_cfg:
        return "it is a CoCa (captioning) model"
    if preprocess_cfg is None:
        return None
    size = preprocess_cfg.get("size")
    if not isinstance(size, int) and not (isinstance(size, (list, tuple)) and len(set(size)) == 1):
        return f"its eval transform's size {size} is not square"
    if preprocess_cfg.get("resize_mode", "shortest") != "shortest":
        return f"its eval transform's resize_mode {preprocess_cfg.get('resize_mode')!r} is not 'shortest'"
    if preprocess_cfg.get("interpolation", "bicubic") not in RESAMPLE:
        return f"its eval transform's interpolation {preprocess_cfg.get('interpolation')!r} is not bicubic or bilinear"
    return None


@dataclass(frozen=True)
class OpenClipTransform:
    """open_clip's eval transform (resize_mode shortest): Resize(size) of the shorter side,
    CenterCrop(size), convert('RGB'), ToTensor, Normalize(mean, std)."""

    size: int
    interpolation: str  # bicubic | bilinear
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def from_cfg(cls, cfg: dict) -> "OpenClipTransform":
        size = cfg["size"]
        mean, std = cfg["mean"], cfg["std"]
        return cls(size=int(size if isinstance(size, int) else size[0]),
                   interpolation=str(cfg.get("interpolation", "bicubic")),
                   mean=tuple(float(v) for v in (mean if isinstance(mean, (list, tuple)) else [mean] * 3)),
                   std=tuple(float(v) for v in (std if isinstance(std, (list, tuple)) else [std] * 3)))


@dataclass
class OpenClip:
    """A loaded open_clip CLIP (both towers, eval mode) with its folder's settings."""

    model: Any  # open_clip.CLIP
    folder: Path
    model_cfg: dict
    transform: OpenClipTransform

    @property
    def embed_dim(self) -> int:
        return int(self.model_cfg["embed_dim"])

    @property
    def context_length(self) -> int:
        return int(self.model_cfg.get("text_cfg", {}).get("context_length", 77))

    def to(self, device: Any = None, dtype: Optional[torch.dtype] = None) -> "OpenClip":
        self.model.to(device=device, dtype=dtype)
        return self

    def tokenizer(self) -> Any:
        """open_clip's tokenizer for this architecture (its own BPE vocabulary; no network)."""
        return import_open_clip().get_tokenizer(f"local-dir:{self.folder}")


def read_config(model_dir: Path) -> dict:
    path = Path(model_dir) / CONFIG_FILE
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ModelError(f"clip model folder {model_dir}: unreadable {CONFIG_FILE} ({err})") from None
    if not isinstance(config, dict) or not isinstance(config.get("model_cfg"), dict):
        raise ModelError(f"clip model folder {model_dir}: {CONFIG_FILE} has no model_cfg")
    return config


def write_folder(out: Path, model: Any, model_cfg: dict, preprocess_cfg: dict) -> dict:
    """Write an open_clip model into ``out`` (config + safetensors weights); returns the
    tokenizer facts that pin.json records. Pinning and the tests' tiny models use this."""
    from safetensors.torch import save_file

    reason = unsupported(model_cfg, preprocess_cfg)
    if reason is not None:
        raise ModelError(f"open_clip model: not supported: {reason}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config = {"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    # Tied or shared tensors are saved as copies: load_state_dict restores them alike.
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    save_file(state, str(out / WEIGHTS_FILE))
    tokenizer = import_open_clip().get_tokenizer(f"local-dir:{out}")
    return {"class": type(tokenizer).__name__, "context_length": int(tokenizer.context_length)}


class _DropRandomInit(logging.Filter):
    # open_clip warns "Model initialized randomly" when built without weights; ours follow.
    def filter(self, record: logging.LogRecord) -> bool:
        return "initialized randomly" not in str(record.msg)


def load_open_clip(model_dir: Path) -> OpenClip:
    """The pinned open_clip folder, built from its config and weights (no network)."""
    from safetensors.torch import load_file

    model_dir = Path(model_dir)
    config = read_config(model_dir)
    preprocess_cfg = {**_default_preprocess(config["model_cfg"]), **(config.get("preprocess_cfg") or {})}
    reason = unsupported(config["model_cfg"], preprocess_cfg)
    if reason is not None:
        raise ModelError(f"clip model folder {model_dir}: not supported: {reason}")
    open_clip = import_open_clip()
    quiet = _DropRandomInit()
    logging.getLogger().addFilter(quiet)
    try:
        model = open_clip.create_model(f"local-dir:{model_dir}", load_weights=False)
        state = load_file(str(model_dir / WEIGHTS_FILE))
        result = model.load_state_dict(state, strict=False)
        missing, unexpected = list(result.missing_keys), list(result.unexpected_keys)
    except Exception as err:  # open_clip and safetensors raise many kinds for a damaged folder
        raise ModelError(f"clip model folder {model_dir}: cannot load the open_clip model "
                         f"({type(err).__name__}: {' '.join(str(err).split())})") from err
    finally:
        logging.getLogger().removeFilter(quiet)
    problems = [f"missing {k}" for k in missing] + [f"unexpected {k}" for k in unexpected]
    if problems:
        raise ModelError(f"clip model folder {model_dir}: weights do not fit the open_clip config "
                         f"({', '.join(sorted(problems)[:5])}{' ...' if len(problems) > 5 else ''})")
    return OpenClip(model=model.eval(), folder=model_dir, model_cfg=config["model_cfg"],
                    transform=OpenClipTransform.from_cfg(preprocess_cfg))


def _default_preprocess(model_cfg: dict) -> dict:
    # What open_clip's local-dir loader uses for keys a config omits: PreprocessCfg's
    # defaults (OpenAI's mean and std) at the image tower's size.
    return {"size": model_cfg.get("vision_cfg", {}).get("image_size", 224), "interpolation": "bicubic",
            "resize_mode": "shortest", "mean": (0.48145466, 0.4578275, 0.40821073),
            "std": (0.26862954, 0.26130258, 0.27577711)}
