"""A small trained captioner folder and its test images, for the export tests.

``trained_captioner``: the hub-like tiny CLIP (``hub_clip_dir``), the scene-word GPT-2
(``tiny_gpt_dir``) and a one-block transformer mapper, trained for a few steps so
that each of ``TRAINED`` random images gets its own scene caption; the other
images of ``make_images`` are new to it. Saved with its CLIP, as ``capline train``
saves a model.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from tests.helpers.features import COLOURS, SHAPES

TRAINED = 12  # images the model was taught a caption for
IMAGES = 24  # test images: the trained ones, then as many it never saw


def make_images(folder: Path, n: int = IMAGES) -> list[Path]:
    """``n`` random RGB PNGs of varied sizes and colours (seeded)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        w, h = int(rng.integers(24, 64)), int(rng.integers(24, 64))
        path = folder / f"img{i:02d}.png"
        # A colour of its own under the noise, so that CLIP's vectors differ from image to image.
        base = rng.integers(0, 255, size=3)
        noise = rng.integers(-60, 60, size=(h, w, 3))
        Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8)).save(path)
        paths.append(path)
    return paths


def trained_captioner(out: Path, clip_dir: Path, gpt_dir: Path, images: list[Path], steps: int = 200) -> Path:
    import torch

    from pipeline.caption.run import ImageEmbedder
    from pipeline.core.params import MapperParams
    from pipeline.models.captioner import ClipCaptioner
    from tests.helpers.models import clip_feature_attrs, fit_captions, load_tiny_gpt

    features = clip_feature_attrs(clip_dir, 16)
    gpt, tok = load_tiny_gpt(gpt_dir)
    torch.manual_seed(0)
    mapper = MapperParams(type="transformer", prefix_length=3, clip_length=2, layers=1, heads=2).model_dump()
    model = ClipCaptioner.from_settings(mapper, 16, gpt, tok, features=features, finetune_gpt=True)
    embedder = ImageEmbedder(clip_dir, features, torch.device("cpu"), "fp32")
    vectors = embedder([embedder.pre.to_uint8(p.read_bytes()) for p in images[:TRAINED]]).clone()  # not an inference tensor
    captions = [f"{'a' if i % 2 else 'one'} {COLOURS[i % len(COLOURS)]} {SHAPES[i % len(SHAPES)]}"
                for i in range(TRAINED)]
    fit_captions(model, vectors, captions, steps)
    return model.save(out, clip_dir=clip_dir)
