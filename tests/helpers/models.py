"""Tiny real model folders for tests, saved with ``save_pretrained`` and loaded back with
``from_pretrained``, exactly as the pipeline loads hub models.

- ``save_tiny_gpt``: a word-level tokenizer over the scene words plus a small GPT-2
  (``pipeline.pin.demo.build_demo_gpt``), for the mapper/train/generate/caption tests.
- ``make_tiny_clip``: a random CLIP vision tower + ``CLIPImageProcessor``, sized freely
  (image size, crop, projection), for the embed tests.
- ``save_hub_like_clip`` / ``save_hub_like_gpt``: what a hub snapshot holds (the demo
  CLIP builder at ``TINY_CLIP``; a GPT-2 whose tokenizer has no pad token, like gpt2's),
  for the pinning and offline tests; ``tiny_params`` names them in a Params.

``tests/conftest.py`` builds the default folders once per session; ``copy_model``
gives a test its own copy when it changes the folder or needs it at a given path.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
from pathlib import Path
from typing import Optional

import numpy as np

from pipeline.core.params import DemoClip, DemoGpt, Params, parse_params
from tests.helpers.features import scene_captions

# ------------------------------------------------------------------ hub-like models
TINY_CLIP = DemoClip(hidden_size=32, layers=1, heads=2, patch_size=8, projection_dim=16,
                     pretrain_steps=0, pretrain_text_steps=0, pretrain_images=64)
TINY_GPT = DemoGpt(n_embd=32, n_layer=1, n_head=2, n_positions=32, pretrain_steps=0)
CAPTIONS = ["A red circle on the left.", "two shapes: a blue square and a green triangle",
            "a big yellow disc, in the middle"]


def tiny_params(clip_model: str = "demo", gpt_model: str = "demo", image_size: int = 32,
                clip_demo: DemoClip = TINY_CLIP, gpt_demo: DemoGpt = TINY_GPT) -> Params:
    """Params naming the given models, with tiny demo sizes (mapper made to fit GPT-2's width)."""
    return parse_params({
        "data": {"demo": {"images": 10, "image_size": image_size}},
        "clip": {"model": clip_model, "demo": clip_demo.model_dump()},
        "gpt": {"model": gpt_model, "demo": gpt_demo.model_dump()},
        "mapper": {"heads": 2},
        "retrieval": {"k": 0},  # the plain prefix captioner; retrieval tests ask for k
    })


def save_hub_like_clip(folder: Path, image_size: int = 32) -> Path:
    """A CLIP vision tower + processor as a hub snapshot would hold them (seeded)."""
    from pipeline.pin.demo import build_demo_clip

    build_demo_clip(folder, TINY_CLIP, image_size)
    return folder


def save_hub_like_gpt(folder: Path) -> Path:
    """A GPT-2 + tokenizer folder; the tokenizer saved WITHOUT a pad token, like gpt2's."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    from pipeline.pin.demo import build_demo_tokenizer

    tok = build_demo_tokenizer(CAPTIONS, 32)
    plain = PreTrainedTokenizerFast(tokenizer_object=tok.backend_tokenizer, eos_token="<|endoftext|>",
                                    bos_token="<|endoftext|>", unk_token="<unk>")
    eos = plain.eos_token_id
    torch.manual_seed(1)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(plain), n_positions=32, n_embd=32, n_layer=1,
                                       n_head=2, bos_token_id=eos, eos_token_id=eos))
    model.save_pretrained(folder, safe_serialization=True)
    plain.save_pretrained(folder)
    return folder


# --------------------------------------------------------------- scene-word GPT-2
def save_tiny_gpt(out_dir: Path, n_embd: int = 32, n_layer: int = 2, n_head: int = 2, n_positions: int = 64, seed: int = 0) -> Path:
    """A word-level tokenizer over the scene words plus a small GPT-2, saved together."""
    from pipeline.pin.demo import build_demo_gpt

    cfg = DemoGpt(n_embd=n_embd, n_layer=n_layer, n_head=n_head, n_positions=n_positions, seed=seed, pretrain_steps=0)
    build_demo_gpt(Path(out_dir), cfg, scene_captions())
    return Path(out_dir)


def load_tiny_gpt(gpt_dir: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gpt = AutoModelForCausalLM.from_pretrained(gpt_dir, trust_remote_code=False)
    tok = AutoTokenizer.from_pretrained(gpt_dir, trust_remote_code=False)
    return gpt, tok


# ------------------------------------------------------------ embed-test CLIP towers
def make_tiny_clip(folder: Path, image_size: int = 32, patch_size: int = 8, hidden: int = 32, layers: int = 2,
                   projection_dim: int = 16, seed: int = 0, pin: Optional[dict] = None,
                   crop: Optional[int] = None) -> Path:
    """A random-weight CLIP vision tower + processor saved as the models stage would."""
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection
    from pipeline.models.pretrained import image_processor_class

    torch.manual_seed(seed)
    cfg = CLIPVisionConfig(hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
                           num_attention_heads=4, image_size=image_size, patch_size=patch_size,
                           projection_dim=projection_dim)
    model = CLIPVisionModelWithProjection(cfg).eval()
    model.save_pretrained(folder)
    c = crop or image_size
    image_processor_class()(size={"shortest_edge": image_size}, crop_size={"height": c, "width": c}).save_pretrained(folder)
    if pin is not None:
        write_pin(folder, pin)
    return Path(folder)


def reference_embeddings(model_dir: Path, images: list[bytes], output: str = "image_embeds",
                         normalize: bool = True) -> np.ndarray:
    """The plain reference path: open -> CLIPImageProcessor -> model in fp32, one image at a time."""
    import io

    import torch
    from PIL import Image
    from transformers import CLIPVisionModelWithProjection
    from pipeline.models.pretrained import image_processor_class

    model = CLIPVisionModelWithProjection.from_pretrained(model_dir).eval()
    proc = image_processor_class().from_pretrained(model_dir)
    rows = []
    with torch.no_grad():
        for data in images:
            px = proc(images=Image.open(io.BytesIO(data)), return_tensors="pt")["pixel_values"]
            out = model(pixel_values=px)
            vec = out.image_embeds if output == "image_embeds" else model.vision_model(pixel_values=px).pooler_output
            if normalize:
                vec = torch.nn.functional.normalize(vec, dim=-1)
            rows.append(vec[0].numpy())
    return np.stack(rows)


def reference_patch_tokens(model_dir: Path, images: list[bytes]) -> np.ndarray:
    """The vision tower's last hidden state [N, tokens, width] by the plain path, fp32, one image at a time."""
    import io

    import torch
    from PIL import Image
    from transformers import CLIPVisionModelWithProjection
    from pipeline.models.pretrained import image_processor_class

    model = CLIPVisionModelWithProjection.from_pretrained(model_dir).eval()
    proc = image_processor_class().from_pretrained(model_dir)
    with torch.no_grad():
        return np.stack([model.vision_model(pixel_values=proc(images=Image.open(io.BytesIO(data)),
                                                              return_tensors="pt")["pixel_values"])
                         .last_hidden_state[0].numpy() for data in images])


# ------------------------------------------------------------- shared model folders
def clip_feature_attrs(clip_dir: Path, dim: int) -> dict:
    """The feature attributes embed records for ``clip_dir``'s ``image_embeds`` (processor
    preprocessing, normalized fp32), as a model trained on them holds them."""
    from pipeline.embed.preprocess import Preprocessor
    from pipeline.models.pretrained import image_processor_class, model_identity

    model_id, revision = model_identity(clip_dir)
    pre = Preprocessor.from_processor(image_processor_class().from_pretrained(clip_dir), "processor")
    return {"model_id": model_id, "model_revision": revision, "output": "image_embeds", "dtype": "float32",
            "normalized": True, "preprocess": pre.describe(), "format_version": 1, "dim": dim}


def fit_captions(model, vectors, captions: list[str], steps: int, lr: float = 1e-2) -> None:
    """Teach ``model`` one caption per vector (Adam, whole batch), so that its captions depend
    on the image; it ends in eval mode."""
    import torch

    rows = [model.encode_caption(c, 10) for c in captions]
    t = max(map(len, rows))
    ids = torch.tensor([r + [model.pad_token_id] * (t - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (t - len(r)) for r in rows])
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        model(vectors, ids, mask).backward()
        opt.step()
    model.eval()


def write_pin(folder: Path, pin: dict) -> None:
    """pin.json, as the models stage writes it for a hub model."""
    (Path(folder) / "pin.json").write_text(json.dumps(pin))


def copy_model(src: Path, dest: Path, pin: Optional[dict] = None) -> Path:
    """A copy of the model folder ``src`` at ``dest`` (the same files, byte for byte), with
    ``pin`` written as its pin.json: for a test that changes the folder, renames it, or
    needs it at a path of its own (a folder's name is its model id when it has no pin)."""
    shutil.copytree(src, dest)
    if pin is not None:
        write_pin(dest, pin)
    return Path(dest)


def folder_digest(folder: Path) -> str:
    """sha256 over the relative paths and bytes of every file in ``folder``."""
    h = hashlib.sha256()
    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        h.update(path.relative_to(folder).as_posix().encode() + b"\0")
        h.update(path.read_bytes())
    return h.hexdigest()


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
