"""Real-size models with random weights: ViT-B/32 and GPT-2 small, no download.

``clip.model: realsize`` / ``gpt.model: realsize`` build the hub models'
architectures from transformers' default configs (which are exactly
openai/clip-vit-base-patch32's vision tower and gpt2), seeded, and save them in a
hub snapshot's layout, so that every later stage loads them with the same
``from_pretrained`` calls as the hub models. GPT-2 keeps its real 50,257-row
embedding and LM head: the compute of every step is the real model's. Its
tokenizer is byte-level BPE, as gpt2's: trained on the dataset's captions (as
many merges as the corpus gives), written as ``vocab.json`` + ``merges.txt`` and
loaded through ``GPT2TokenizerFast.from_pretrained``, exactly as gpt2's files are.

They exist to prove shapes, memory and speed at real size, not quality.
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Iterable

from pipeline.errors import ParamsError

EOS = "<|endoftext|>"  # GPT-2's only special token (end of text, also bos and unk)
SEED = 0
GPT2_VOCAB = 50_257
GPT2_POSITIONS = 1024
VIT_B32_PROJECTION = 512
# openai/clip-vit-large-patch14's vision tower, as overrides of the ViT-B/32 defaults.
VIT_L14 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
               patch_size=14, projection_dim=768)


def vit_config(**overrides):
    """openai/clip-vit-base-patch32's vision tower (transformers' defaults, projection 512),
    with ``overrides`` (``VIT_L14``, or small sizes for tests)."""
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(**{"projection_dim": VIT_B32_PROJECTION, **overrides})


def build_realsize_clip(out_dir: Path, seed: int = SEED, **overrides) -> None:
    """A seeded ViT-B/32 (CLIPVisionModelWithProjection) and the hub's image processor settings."""
    import torch
    from transformers import CLIPVisionModelWithProjection

    from pipeline.models.demo import CLIP_MEAN, CLIP_STD
    from pipeline.models.pretrained import image_processor_class

    config = vit_config(**overrides)
    torch.manual_seed(seed)
    model = CLIPVisionModelWithProjection(config).eval()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    size = config.image_size  # 224: bicubic resize of the shorter side, centre crop, as the hub's processor
    image_processor_class()(
        do_resize=True, size={"shortest_edge": size}, resample=3,
        do_center_crop=True, crop_size={"height": size, "width": size},
        do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
        image_mean=CLIP_MEAN, image_std=CLIP_STD, do_convert_rgb=True,
    ).save_pretrained(out_dir)


def train_bpe(captions: Iterable[str], folder: Path, vocab_size: int = GPT2_VOCAB) -> Path:
    """Byte-level BPE over ``captions`` (GPT-2's pre-tokenizer), saved as vocab.json + merges.txt.

    ``<|endoftext|>`` is id 0; the 256 byte symbols follow, then the merges, as many
    as the corpus gives up to ``vocab_size``. Any text encodes (bytes never miss).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    texts = [c.strip() for c in captions if c and c.strip()]
    if not texts:
        raise ParamsError("gpt.model: 'realsize' trains its tokenizer on the dataset's captions, and there are none")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok.model.save(str(folder))  # vocab.json, merges.txt: the files gpt2's tokenizer is made of
    return folder


def build_realsize_gpt(out_dir: Path, captions: Iterable[str], seed: int = SEED, **overrides) -> None:
    """A seeded GPT-2 small (GPT2LMHeadModel, default config; ``overrides`` for tests) and a
    BPE tokenizer trained on ``captions``, saved together."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

    with tempfile.TemporaryDirectory() as files:
        train_bpe(captions, Path(files))
        tokenizer = GPT2TokenizerFast.from_pretrained(files, model_max_length=GPT2_POSITIONS)
    eos = tokenizer.convert_tokens_to_ids(EOS)
    assert len(tokenizer) <= GPT2_VOCAB, "the BPE vocabulary is capped at GPT-2's"
    # Default config = gpt2 (124M): 50,257-row embedding tied to the LM head, 1024 positions.
    config = GPT2Config(bos_token_id=eos, eos_token_id=eos, **overrides)
    assert config.vocab_size >= len(tokenizer), "every tokenizer id needs an embedding row"
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(config).eval()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)  # like gpt2's folder: no pad token (load_gpt pads with EOS)
