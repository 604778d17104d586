"""The synthetic scene task and its feature tables, for the train/generate/mapper tests.

Each (colour, shape) class has its own direction; an image's vector is its class
direction plus a little noise, and its captions name the colour and the shape in two
wordings (the words the tiny GPT-2 of ``tests.helpers.models`` knows).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

COLOURS = ["red", "green", "blue", "yellow"]
SHAPES = ["circle", "square", "triangle"]

FEATURE_ATTRS = {
    "model_id": "test/clip",
    "model_revision": "0" * 64,
    "output": "image_embeds",
    "dtype": "float32",
    "normalized": True,
    "preprocess": "{}",
    "format_version": 1,
}


def scene_captions() -> list[str]:
    return [f"a {c} {s}" for c in COLOURS for s in SHAPES] + [f"one {c} {s} here" for c in COLOURS for s in SHAPES]


def scene_table(n_per_class: int = 4, dim: int = 16, seed: int = 0, splits: tuple[str, ...] = ("train", "val", "test")):
    """A learnable synthetic task: each (colour, shape) class has its own direction.

    Every image's vector is its class direction plus a little noise; its captions
    name the colour and the shape in two wordings. Images are spread over ``splits``.
    """
    from pipeline.formats.features import FeatureTable

    rng = np.random.default_rng(seed)
    classes = [(c, s) for c in COLOURS for s in SHAPES]
    directions = rng.normal(size=(len(classes), dim)).astype(np.float32)
    keys, vecs, split_list, caps = [], [], [], []
    for i, (c, s) in enumerate(classes):
        for j in range(n_per_class):
            v = directions[i] + 0.05 * rng.normal(size=dim).astype(np.float32)
            keys.append(f"img_{i:02d}_{j:02d}")
            vecs.append(v / np.linalg.norm(v))
            split_list.append(splits[j % len(splits)])
            caps.append([f"a {c} {s}", f"one {c} {s} here"])
    return FeatureTable(
        keys=keys,
        embeddings=np.stack(vecs).astype(np.float32),
        splits=split_list,
        captions=caps,
        attrs=dict(FEATURE_ATTRS),
    )


def write_features(feature_dir: Path, table, shards: int = 2) -> Path:
    """Write ``table`` as ``shards`` HDF5 feature shards in ``feature_dir``."""
    from pipeline.formats.features import FeatureTable, write_feature_shard

    feature_dir = Path(feature_dir)
    feature_dir.mkdir(parents=True, exist_ok=True)
    n = len(table.keys)
    bounds = np.linspace(0, n, shards + 1).astype(int)
    for s in range(shards):
        lo, hi = bounds[s], bounds[s + 1]
        part = FeatureTable(
            keys=table.keys[lo:hi],
            embeddings=table.embeddings[lo:hi],
            splits=table.splits[lo:hi],
            captions=table.captions[lo:hi],
            attrs=dict(table.attrs),
            patch_tokens=None if table.patch_tokens is None else table.patch_tokens[lo:hi],
        )
        write_feature_shard(feature_dir / f"{s:05d}.h5", part)
    return feature_dir


def with_patch_tokens(table, tokens: int = 5, seed: int = 0):
    """``table`` with patch tokens [N, tokens, D] (fp16): each image's vector plus noise per
    token, so a cross-attention mapper can read the class from them."""
    rng = np.random.default_rng(seed)
    noise = 0.1 * rng.normal(size=(len(table.keys), tokens, table.embeddings.shape[1]))
    table.patch_tokens = (table.embeddings[:, None, :] + noise).astype(np.float16)
    return table
