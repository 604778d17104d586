"""Pinning ``clip.model: open_clip:NAME/TAG``: open_clip builds the model and fetches
the tag's weights by its own mechanism (``create_model_and_transforms``, weights from
the Hugging Face hub), and the result is written as a pinned folder
(``pipeline/models/openclip.py``). Tag ``random`` / ``random-SEED`` builds seeded
random weights instead, with no download.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch

from pipeline.core.params import random_seed
from pipeline.models.openclip import import_open_clip, unsupported, write_folder
from pipeline.models.pretrained import ModelError


def pin_open_clip(name: str, tag: str, out: Path) -> dict[str, Any]:
    """Build ``name`` with ``tag``'s weights into ``out``; returns what pin.json records
    under ``open_clip`` (name, tag, open_clip version, tokenizer)."""
    open_clip = import_open_clip()
    what = f"clip.model 'open_clip:{name}/{tag}'"
    if name not in open_clip.list_models():
        close = [m for m in open_clip.list_models() if m.lower().startswith(name.lower()[:4])][:8]
        raise ModelError(f"{what}: open_clip has no model {name!r}" + (f" (close: {', '.join(close)})" if close else ""))
    seed = random_seed(tag)
    tags = open_clip.list_pretrained_tags_by_model(name)
    if seed is None and tag not in tags:
        raise ModelError(f"{what}: open_clip has no pretrained tag {tag!r} for {name} "
                         f"(tags: {', '.join(tags) or 'none'}; or random, random-SEED)")
    model_cfg = copy.deepcopy(open_clip.get_model_config(name))
    # OpenAI's weights were trained with QuickGELU, which the plain configs (RN50x4,
    # ViT-B-32, ...) lack: build what the tag's weights were trained with.
    quick_gelu = seed is None and bool(open_clip.get_pretrained_cfg(name, tag).get("quick_gelu"))
    if quick_gelu:
        model_cfg["quick_gelu"] = True
    reason = unsupported(model_cfg)
    if reason is not None:
        raise ModelError(f"{what}: not supported: {reason}")
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed or 0)
            model, _, _ = open_clip.create_model_and_transforms(
                name, pretrained=None if seed is not None else tag, force_quick_gelu=quick_gelu)
    except Exception as err:  # download and checkpoint failures come in many kinds
        raise ModelError(f"{what}: open_clip could not build or fetch it ({type(err).__name__}: {err}); "
                         "open_clip fetches the weights from the Hugging Face hub: check the network, or fill "
                         "the cache elsewhere and set HF_HUB_OFFLINE=1") from err
    tokenizer = write_folder(out, model.eval(), model_cfg, dict(model.visual.preprocess_cfg))
    return {"model": name, "pretrained": tag, "version": open_clip.__version__, "tokenizer": tokenizer}
