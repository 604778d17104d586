"""Tiny real models and feature tables for the model/train/generate tests.

GPT-2s are built from configs, saved to a temporary folder and loaded back with
``from_pretrained``, exactly as the pipeline loads hub models.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np

COLOURS = ["red", "green", "blue", "yellow"]
SHAPES = ["circle", "square", "triangle"]


def scene_captions() -> list[str]:
    return [f"a {c} {s}" for c in COLOURS for s in SHAPES] + [f"one {c} {s} here" for c in COLOURS for s in SHAPES]


def save_tiny_gpt(out_dir: Path, n_embd: int = 32, n_layer: int = 2, n_head: int = 2, n_positions: int = 64, seed: int = 0) -> Path:
    """A word-level tokenizer over the scene words plus a small GPT-2, saved together."""
    from pipeline.models.demo import build_demo_gpt
    from pipeline.params import DemoGpt

    cfg = DemoGpt(n_embd=n_embd, n_layer=n_layer, n_head=n_head, n_positions=n_positions, seed=seed)
    build_demo_gpt(Path(out_dir), cfg, scene_captions())
    return Path(out_dir)


def load_tiny_gpt(gpt_dir: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gpt = AutoModelForCausalLM.from_pretrained(gpt_dir, trust_remote_code=False)
    tok = AutoTokenizer.from_pretrained(gpt_dir, trust_remote_code=False)
    return gpt, tok


FEATURE_ATTRS = {
    "model_id": "test/clip",
    "model_revision": "0" * 64,
    "output": "image_embeds",
    "dtype": "float32",
    "normalized": True,
    "preprocess": "{}",
    "format_version": 1,
}


def scene_table(n_per_class: int = 4, dim: int = 16, seed: int = 0, splits: tuple[str, ...] = ("train", "val", "test")):
    """A learnable synthetic task: each (colour, shape) class has its own direction.

    Every image's vector is its class direction plus a little noise; its captions
    name the colour and the shape in two wordings. Images are spread over ``splits``.
    """
    from pipeline.features import FeatureTable

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
    from pipeline.features import FeatureTable, write_feature_shard

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
        )
        write_feature_shard(feature_dir / f"{s:05d}.h5", part)
    return feature_dir


@contextlib.contextmanager
def torch_threads(n: int):
    """Run tiny models on ``n`` threads: on a shared, busy machine extra threads only wait."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
