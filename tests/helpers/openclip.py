"""Tiny open_clip architectures registered with open_clip, pinned through the real pin
stage with random weights (``open_clip:NAME/random-SEED``), and open_clip's own plain
path (its ``local-dir:`` loader and eval transform) as the reference."""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np

# Small but real towers: a ViT and a ModifiedResNet (attention pooling), each with
# open_clip's text transformer and its 49408-token BPE vocabulary.
_TEXT = {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}
TINY_VIT = "capline-tiny-vit"
TINY_RN = "capline-tiny-rn"
CONFIGS = {
    TINY_VIT: {"embed_dim": 16, "text_cfg": _TEXT,
               "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8,
                              "mlp_ratio": 2.0}},
    TINY_RN: {"embed_dim": 24, "text_cfg": _TEXT,
              "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 8, "head_width": 16,
                             "patch_size": None}},
}


def register_tiny_models(folder: Path) -> None:
    """Write the tiny configs to ``folder`` and add them to open_clip's model registry."""
    from pipeline.models.openclip import import_open_clip

    folder.mkdir(parents=True, exist_ok=True)
    for name, cfg in CONFIGS.items():
        (folder / f"{name}.json").write_text(json.dumps(cfg))
    import_open_clip().add_model_config(folder)


def pin_open_clip_folder(out: Path, spec: str) -> Path:
    """``spec`` (``open_clip:NAME/TAG``) pinned into ``out`` by the pin stage's own code."""
    from pipeline.core.params import parse_params
    from pipeline.pin.run import run

    run("clip", parse_params({"clip": {"model": spec}}), out, None)
    return out


def reference_open_clip(model_dir: Path):
    """(model, preprocess, tokenizer) as open_clip itself loads the folder (``local-dir:``)."""
    from pipeline.models.openclip import import_open_clip

    open_clip = import_open_clip()
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{model_dir}")
    return model.eval(), preprocess, open_clip.get_tokenizer(f"local-dir:{model_dir}")


def reference_image_vectors(model_dir: Path, images: list[bytes]) -> np.ndarray:
    """open_clip's plain path, one image at a time: Image.open -> preprocess -> encode_image,
    L2-normalised."""
    import torch
    from PIL import Image

    model, preprocess, _ = reference_open_clip(model_dir)
    rows = []
    with torch.no_grad():
        for data in images:
            vec = model.encode_image(preprocess(Image.open(io.BytesIO(data)))[None])
            rows.append(torch.nn.functional.normalize(vec, dim=-1)[0].numpy())
    return np.stack(rows)
