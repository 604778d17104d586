"""The offline demo's small models, built from configs and saved with save_pretrained.

They are written in exactly the layout of a hub snapshot (config.json,
model.safetensors, processor/tokenizer files), so the rest of the pipeline loads
them with the same ``from_pretrained`` calls as ``openai/clip-vit-base-patch32``
and ``gpt2``. Initialisation is seeded: the same config gives the same weights
file, byte for byte.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Iterable

from pipeline.errors import ParamsError

if TYPE_CHECKING:  # loading a model folder needs no params schema (nor pydantic)
    from pipeline.params import DemoClip, DemoGpt

EOS = "<|endoftext|>"  # GPT-2's only special token: end of text, also bos and pad
UNK = "<unk>"
# OpenAI CLIP's normalisation constants (the hub processors use the same).
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def build_demo_clip(out_dir: Path, cfg: DemoClip, image_size: int) -> None:
    """Save a small, seeded CLIPVisionModelWithProjection and its processor in ``out_dir``."""
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    if image_size % cfg.patch_size:
        raise ParamsError(
            f"clip.demo.patch_size: {cfg.patch_size} does not divide data.demo.image_size {image_size}"
        )
    config = CLIPVisionConfig(
        hidden_size=cfg.hidden_size,
        intermediate_size=4 * cfg.hidden_size,
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads,
        image_size=image_size,
        patch_size=cfg.patch_size,
        projection_dim=cfg.projection_dim,
    )
    torch.manual_seed(cfg.seed)
    model = CLIPVisionModelWithProjection(config)
    if cfg.pretrain_steps:
        pretrain_clip(model, cfg, image_size)
    model.eval()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    from pipeline.models.pretrained import image_processor_class

    processor = image_processor_class()(
        do_resize=True,
        size={"shortest_edge": image_size},
        do_center_crop=True,
        crop_size={"height": image_size, "width": image_size},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
        do_convert_rgb=True,
    )
    processor.save_pretrained(out_dir)


def _scene_targets(scene) -> list[int]:
    """Per slot (left, middle, right): colour, shape and size class (0: empty); then count."""
    from pipeline.demo.scenes import COLOURS, SHAPES, SIZES, SLOTS

    out: list[int] = []
    for slot in SLOTS:
        shape = next((s for s in scene.shapes if s.slot == slot), None)
        if shape is None:
            out += [0, 0, 0]
        else:
            out += [list(COLOURS).index(shape.colour) + 1, SHAPES.index(shape.kind) + 1, SIZES.index(shape.size) + 1]
    return out + [len(scene.shapes) - 1]


def pretrain_clip(model, cfg: DemoClip, image_size: int) -> None:
    """Teach the demo tower to see the scenes: a short, seeded supervised pre-training.

    A pretrained CLIP has learned to see before it meets a captioning dataset; a
    random one has not (linear probes on its embeddings read shape and position
    barely above chance). So linear heads on the L2-normalised ``image_embeds``
    learn each slot's colour, shape and size and the count from scenes generated
    with a seed of their own (never the dataset's images), and are then dropped.
    """
    import numpy as np
    import torch
    import torch.nn.functional as F
    from tqdm import tqdm

    from pipeline.demo.scenes import render, scene_for

    seed = 1_000_003 + cfg.seed  # a generator stream apart from any dataset seed
    scenes = [scene_for(i, seed) for i in range(cfg.pretrain_images)]
    pixels = np.stack([np.asarray(render(s, image_size, seed)) for s in scenes]).astype(np.float32) / 255
    pixels = (pixels - np.array(CLIP_MEAN, np.float32)) / np.array(CLIP_STD, np.float32)
    x = torch.from_numpy(np.ascontiguousarray(pixels.transpose(0, 3, 1, 2)))
    y = torch.tensor([_scene_targets(s) for s in scenes])
    classes = [7, 4, 3] * 3 + [3]  # colour+empty, shape+empty, size+empty per slot; count

    gen = torch.Generator().manual_seed(seed)
    head = torch.nn.Linear(model.config.projection_dim, sum(classes))
    opt = torch.optim.AdamW([*model.parameters(), *head.parameters()], lr=cfg.pretrain_lr, weight_decay=0.0)
    steps = cfg.pretrain_steps
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm) * (1 - s / steps))
    model.train()
    bar = tqdm(range(steps), desc="demo clip pre-training", unit="step")
    for _ in bar:
        idx = torch.randint(0, len(scenes), (64,), generator=gen)
        emb = F.normalize(model(pixel_values=x[idx]).image_embeds, dim=-1)
        logits = head(10.0 * emb).split(classes, dim=1)  # fixed temperature, like CLIP's logit scale
        loss = sum(F.cross_entropy(lg, y[idx, k]) for k, lg in enumerate(logits))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)


def build_demo_tokenizer(captions: Iterable[str], max_length: int):
    """A word-level tokenizer over the captions' vocabulary, as PreTrainedTokenizerFast.

    Lower-cased, split on whitespace and punctuation; ids are the special tokens
    then the words in sorted order, so the same captions give the same ids.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    pre = pre_tokenizers.Whitespace()  # \w+ | [^\w\s]+ : words and punctuation apart
    words: set[str] = set()
    for caption in captions:
        text = normalizer.normalize_str(caption)
        words.update(piece for piece, _ in pre.pre_tokenize_str(text))
    words.discard(EOS)
    words.discard(UNK)
    if not words:
        raise ParamsError("gpt.model: 'demo' builds its vocabulary from the demo captions, and there are none")
    vocab = {tok: i for i, tok in enumerate([EOS, UNK, *sorted(words)])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre
    # Join words with spaces; no space before punctuation (WordPiece's cleanup covers
    # . , ! ? but not the colons and semicolons of the demo's captions).
    tok.decoder = decoders.Sequence(
        [decoders.WordPiece(prefix="##", cleanup=True), decoders.Replace(" :", ":"), decoders.Replace(" ;", ";")]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS,
        bos_token=EOS,
        pad_token=EOS,
        unk_token=UNK,
        model_max_length=max_length,
        clean_up_tokenization_spaces=False,
    )


def build_demo_gpt(out_dir: Path, cfg: DemoGpt, captions: Iterable[str]) -> None:
    """Save a word-level tokenizer and a small, seeded GPT2LMHeadModel together in ``out_dir``."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = build_demo_tokenizer(captions, cfg.n_positions)
    eos_id = tokenizer.convert_tokens_to_ids(EOS)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=cfg.n_positions,
        n_embd=cfg.n_embd,
        n_layer=cfg.n_layer,
        n_head=cfg.n_head,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
    )
    torch.manual_seed(cfg.seed)
    model = GPT2LMHeadModel(config).eval()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
