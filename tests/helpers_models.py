"""Tiny model folders for tests: hub-like CLIP and GPT-2 snapshots saved to a temp dir."""
from __future__ import annotations

from pathlib import Path

from pipeline.params import DemoClip, DemoGpt, Params, parse_params

TINY_CLIP = DemoClip(hidden_size=32, layers=1, heads=2, patch_size=8, projection_dim=16,
                     pretrain_steps=0, pretrain_text_steps=0, pretrain_images=64)
TINY_GPT = DemoGpt(n_embd=32, n_layer=1, n_head=2, n_positions=32)
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
    })


def save_hub_like_clip(folder: Path, image_size: int = 32) -> Path:
    """A CLIP vision tower + processor as a hub snapshot would hold them (seeded)."""
    from pipeline.models.demo import build_demo_clip

    build_demo_clip(folder, TINY_CLIP, image_size)
    return folder


def save_hub_like_gpt(folder: Path) -> Path:
    """A GPT-2 + tokenizer folder; the tokenizer saved WITHOUT a pad token, like gpt2's."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    from pipeline.models.demo import build_demo_tokenizer

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
