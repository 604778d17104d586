"""The offline demo's small models, built from configs and saved with save_pretrained.

They are written in exactly the layout of a hub snapshot (config.json,
model.safetensors, processor/tokenizer files), so the rest of the pipeline loads
them with the same ``from_pretrained`` calls as ``openai/clip-vit-base-patch32``
and ``gpt2``. Initialisation is seeded: the same config gives the same weights
file, byte for byte.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Optional

from pipeline.core.errors import ParamsError

if TYPE_CHECKING:  # loading a model folder needs no params schema (nor pydantic)
    from pipeline.core.params import DemoClip, DemoGpt

EOS = "<|endoftext|>"  # GPT-2's only special token: end of text, also bos and pad
UNK = "<unk>"
# OpenAI CLIP's normalisation constants (the hub processors use the same).
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


# The demo CLIP's text side: word-level like the demo GPT-2, with CLIP's markers.
CLIP_BOS = "<|startoftext|>"
CLIP_EOS = "<|endoftext|>"  # also the pad token, as in OpenAI CLIP's tokenizer
CLIP_TEXT_POSITIONS = 48  # the longest demo caption with its prompt is about 30 tokens
PROMPT = "A photo depicts "  # CLIPScore's prompt (Hessel et al. 2021)
PRETRAIN_SEED_OFFSET = 1_000_003  # a scene stream apart from any dataset seed
PRETRAIN_CAPTIONS = 6  # captions per pre-training scene: every template once
GPT_PRETRAIN_SEED_OFFSET = 2_000_003  # the demo GPT-2's own scene stream, apart from CLIP's
# The demo GPT-2's vocabulary holds the words of SmallCap's prompt (the default
# retrieval.template) and a token for its blank lines.
TEMPLATE_WORDS = "similar images show this image shows ."
PARAGRAPH = "¶"


def build_demo_clip_tokenizer(texts: Iterable[str], max_length: int):
    """A word-level tokenizer in CLIP's layout: BOS + words + EOS, EOS padding, lower case."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    pre = pre_tokenizers.Whitespace()
    words = {piece for t in texts for piece, _ in pre.pre_tokenize_str(normalizer.normalize_str(t))}
    words -= {CLIP_BOS, CLIP_EOS, UNK}
    # EOS must not get id 2: CLIP's text model reads id 2 as the legacy "pool at the highest id" rule.
    vocab = {tok: i for i, tok in enumerate([CLIP_BOS, CLIP_EOS, UNK, *sorted(words)])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre
    tok.post_processor = processors.TemplateProcessing(
        single=f"{CLIP_BOS} $A {CLIP_EOS}", special_tokens=[(CLIP_BOS, vocab[CLIP_BOS]), (CLIP_EOS, vocab[CLIP_EOS])]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=CLIP_BOS, eos_token=CLIP_EOS, pad_token=CLIP_EOS,
                                   unk_token=UNK, model_max_length=max_length, clean_up_tokenization_spaces=False)


def twin_scene(scene, rng):
    """The scene with one thing changed: a shape's colour, kind or size, or a shape
    moved to an empty slot, removed or added. Drawn with the same per-image random
    stream, the twin's picture and captions differ from the scene's only there."""
    import dataclasses

    from pipeline.prepare.scenes import COLOURS, SHAPES, SIZES, SLOTS, Shape

    shapes = list(scene.shapes)
    free = [s for s in SLOTS if all(x.slot != s for x in shapes)]
    changes = ["colour", "kind", "size"] + (["move", "add"] if free else []) + (["remove"] if len(shapes) > 1 else [])
    change = changes[int(rng.integers(len(changes)))]
    k = int(rng.integers(len(shapes)))
    if change in ("colour", "kind", "size"):
        options = {"colour": list(COLOURS), "kind": list(SHAPES), "size": list(SIZES)}[change]
        now = getattr(shapes[k], change)
        shapes[k] = dataclasses.replace(shapes[k], **{change: [o for o in options if o != now][
            int(rng.integers(len(options) - 1))]})
    elif change == "move":
        shapes[k] = dataclasses.replace(shapes[k], slot=free[int(rng.integers(len(free)))])
    elif change == "remove":
        shapes.pop(k)
    else:
        shapes.append(Shape(kind=SHAPES[int(rng.integers(len(SHAPES)))], colour=list(COLOURS)[int(rng.integers(len(COLOURS)))],
                            size=SIZES[int(rng.integers(len(SIZES)))], slot=free[int(rng.integers(len(free)))]))
    shapes.sort(key=lambda x: SLOTS.index(x.slot))
    return dataclasses.replace(scene, shapes=tuple(shapes))


def _pretrain_scenes(cfg: DemoClip, second_wording: Optional[dict[str, str]] = None):
    """Scenes of a stream apart from the dataset, each followed by its twin (a hard negative).

    With ``second_wording`` (colour -> word), every other pair is captioned with it."""
    import numpy as np

    from pipeline.prepare.scenes import captions_for, scene_for

    seed = PRETRAIN_SEED_OFFSET + cfg.seed
    scenes, captions = [], []
    for i in range(cfg.pretrain_images // 2):
        scene = scene_for(i, seed)
        pair = [scene, twin_scene(scene, np.random.default_rng([seed, i, 7]))]
        colours = second_wording if i % 2 else None
        scenes += pair
        captions += [captions_for(s, PRETRAIN_CAPTIONS, seed, colours) for s in pair]
    return seed, scenes, captions


def _scene_targets(scene) -> list[int]:
    """Per slot (left, middle, right): colour, shape and size class (0: empty); then count."""
    from pipeline.prepare.scenes import COLOURS, SHAPES, SIZES, SLOTS

    out: list[int] = []
    for slot in SLOTS:
        shape = next((s for s in scene.shapes if s.slot == slot), None)
        if shape is None:
            out += [0, 0, 0]
        else:
            out += [list(COLOURS).index(shape.colour) + 1, SHAPES.index(shape.kind) + 1, SIZES.index(shape.size) + 1]
    return out + [len(scene.shapes) - 1]


ATTRIBUTE_CLASSES = [7, 4, 3] * 3 + [3]  # colour+empty, kind+empty, size+empty per slot; count


def build_demo_clip(out_dir: Path, cfg: DemoClip, image_size: int,
                    second_wording: Optional[dict[str, str]] = None) -> None:
    """Save a small, seeded CLIPModel (vision and text towers), its processor and tokenizer.

    Both towers have the sizes of ``cfg``; the text tower reads the demo's words.
    ``pretrain_clip`` teaches it to see the scenes and to match them with their
    captions; with ``second_wording`` (the transfer experiment's domain B), half of
    those captions name the colours with its words.
    """
    import torch
    from transformers import CLIPConfig, CLIPModel

    if image_size % cfg.patch_size:
        raise ParamsError(
            f"clip.demo.patch_size: {cfg.patch_size} does not divide data.demo.image_size {image_size}"
        )
    seed, scenes, captions = _pretrain_scenes(cfg, second_wording)
    tokenizer = build_demo_clip_tokenizer([PROMPT, *(c for caps in captions for c in caps)], CLIP_TEXT_POSITIONS)
    tower = dict(hidden_size=cfg.hidden_size, intermediate_size=4 * cfg.hidden_size, num_hidden_layers=cfg.layers,
                 num_attention_heads=cfg.heads, projection_dim=cfg.projection_dim)
    config = CLIPConfig(
        vision_config=dict(**tower, image_size=image_size, patch_size=cfg.patch_size),
        text_config=dict(**tower, vocab_size=len(tokenizer), max_position_embeddings=CLIP_TEXT_POSITIONS,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id),
        projection_dim=cfg.projection_dim,
    )
    torch.manual_seed(cfg.seed)
    model = CLIPModel(config)
    if cfg.pretrain_steps or cfg.pretrain_text_steps:
        pretrain_clip(model, tokenizer, cfg, image_size, seed, scenes, captions)
    model.eval()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
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


def pretrain_clip(model, tokenizer, cfg: DemoClip, image_size: int, seed: int, scenes, captions) -> None:
    """A short, seeded stand-in for CLIP's own pre-training, in two phases.

    A pretrained CLIP has learned to see, and to match pictures with words, before it
    meets a captioning dataset; a random one has not (linear probes on its embeddings
    read shape and position barely above chance). Both are taught here on scenes
    drawn with a seed of their own (never the dataset's images):

    1. the image tower (``pretrain_steps``): linear heads on the L2-normalised image
       embeddings learn each slot's colour, kind and size and the number of shapes
       (the heads are discarded);
    2. the text tower (``pretrain_text_steps``): CLIP's contrastive loss between
       caption and image embeddings, with the image tower locked (LiT, Zhai et al.
       2022), on captions from the same generator, half of them behind CLIPScore's
       prompt. Each scene comes with a twin that differs in one thing
       (``twin_scene``), a hard negative in the same batch.

    Training the image tower contrastively as well (measured: docs/demo.md) gave the
    captioner clearly worse features for the same time.
    """
    import numpy as np
    import torch

    from pipeline.prepare.scenes import render

    pixels = np.stack([np.asarray(render(s, image_size, seed)) for s in scenes]).astype(np.float32) / 255
    pixels = (pixels - np.array(CLIP_MEAN, np.float32)) / np.array(CLIP_STD, np.float32)
    x = torch.from_numpy(np.ascontiguousarray(pixels.transpose(0, 3, 1, 2)))
    gen = torch.Generator().manual_seed(seed)
    if cfg.pretrain_steps:
        _pretrain_image_tower(model, cfg, x, torch.tensor([_scene_targets(s) for s in scenes]), gen)
    if cfg.pretrain_text_steps:
        _pretrain_text_tower(model, tokenizer, cfg, x, captions, gen)


def _linear_schedule(opt, steps: int):
    import torch

    warm = max(1, steps // 20)
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm) * (1 - s / steps))


def _image_embeds(model, pixel_values):
    """Projected, L2-normalised image embeddings (what the embed stage computes)."""
    import torch.nn.functional as F

    return F.normalize(model.visual_projection(model.vision_model(pixel_values=pixel_values).pooler_output), dim=-1)


def _pretrain_image_tower(model, cfg: DemoClip, x, targets, gen) -> None:
    import torch
    import torch.nn.functional as F
    from tqdm import tqdm

    head = torch.nn.Linear(model.config.projection_dim, sum(ATTRIBUTE_CLASSES))
    tower = [*model.vision_model.parameters(), *model.visual_projection.parameters()]
    opt = torch.optim.AdamW([*tower, *head.parameters()], lr=cfg.pretrain_lr, weight_decay=0.0)
    sched = _linear_schedule(opt, cfg.pretrain_steps)
    model.train()
    bar = tqdm(range(cfg.pretrain_steps), desc="demo clip pre-training: image tower", unit="step")
    for _ in bar:
        idx = torch.randint(0, len(x), (64,), generator=gen)
        logits = head(10.0 * _image_embeds(model, x[idx])).split(ATTRIBUTE_CLASSES, dim=1)  # fixed temperature
        loss = sum(F.cross_entropy(lg, targets[idx, k]) for k, lg in enumerate(logits))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)


def _pretrain_text_tower(model, tokenizer, cfg: DemoClip, x, captions, gen) -> None:
    import torch
    import torch.nn.functional as F
    from tqdm import tqdm

    model.eval()
    with torch.no_grad():  # the image tower is locked: its embeddings are computed once
        images = torch.cat([_image_embeds(model, x[i:i + 256]) for i in range(0, len(x), 256)])
    text = [*model.text_model.parameters(), *model.text_projection.parameters(), model.logit_scale]
    opt = torch.optim.AdamW(text, lr=cfg.pretrain_lr, weight_decay=0.0)
    sched = _linear_schedule(opt, cfg.pretrain_text_steps)
    model.text_model.train()
    pairs = len(captions) // 2
    batch = min(32, pairs)  # scene + twin pairs: 64 captions
    bar = tqdm(range(cfg.pretrain_text_steps), desc="demo clip pre-training: text tower (contrastive)", unit="step")
    for _ in bar:
        # Distinct pairs per batch (a repeated scene would be its own negative).
        first = 2 * torch.randperm(pairs, generator=gen)[:batch]
        idx = torch.stack([first, first + 1], dim=1).reshape(-1)
        which = torch.randint(0, PRETRAIN_CAPTIONS, (len(idx),), generator=gen).tolist()
        prompt = (torch.rand(len(idx), generator=gen) < 0.5).tolist()
        texts = [(PROMPT if p else "") + captions[i][w] for i, w, p in zip(idx.tolist(), which, prompt)]
        enc = tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
        pooled = model.text_model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).pooler_output
        emb = F.normalize(model.text_projection(pooled), dim=-1)
        logits = model.logit_scale.exp() * emb @ images[idx].T  # CLIP's symmetric InfoNCE
        target = torch.arange(len(idx))
        loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    model.eval()


def build_demo_tokenizer(captions: Iterable[str], max_length: int):
    """A word-level tokenizer over the captions' vocabulary, as PreTrainedTokenizerFast.

    Lower-cased, split on whitespace and punctuation; ids are the special tokens
    then the words in sorted order, so the same captions give the same ids. The
    words of SmallCap's prompt (``TEMPLATE_WORDS``) are always in it, and a blank
    line is a token of its own (``PARAGRAPH``), so the default retrieval prompt
    keeps its captions apart.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase(),
                                       normalizers.Replace(Regex(r"\n\s*\n"), f" {PARAGRAPH} ")])
    pre = pre_tokenizers.Whitespace()  # \w+ | [^\w\s]+ : words and punctuation apart
    words: set[str] = {PARAGRAPH, *TEMPLATE_WORDS.split()}
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
        [decoders.WordPiece(prefix="##", cleanup=True), decoders.Replace(" :", ":"), decoders.Replace(" ;", ";"),
         decoders.Replace(PARAGRAPH, "\n\n")]
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


def build_demo_gpt(out_dir: Path, cfg: DemoGpt, captions: Iterable[str],
                   second_wording: Optional[dict[str, str]] = None) -> None:
    """Save a word-level tokenizer and a small, seeded GPT2LMHeadModel together in ``out_dir``,
    pre-trained as a language model (``pretrain_gpt``) unless ``cfg.pretrain_steps`` is 0.

    ``second_wording``: see ``gpt_pretrain_documents``; its words join the vocabulary."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    documents = gpt_pretrain_documents(cfg, second_wording) if cfg.pretrain_steps else []
    if second_wording and not cfg.pretrain_steps:
        documents = [" ".join(second_wording.values())]  # the words at least, for the tokenizer
    tokenizer = build_demo_tokenizer([*captions, *documents], cfg.n_positions)
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
    if cfg.pretrain_steps:
        pretrain_gpt(model, tokenizer, cfg, documents)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


def gpt_pretrain_documents(cfg: DemoGpt, second_wording: Optional[dict[str, str]] = None) -> list[str]:
    """Text for the demo GPT-2's pre-training, from a scene stream apart from the dataset.

    A document is one caption of a scene, then one caption each of up to four
    similar scenes (each a ``twin_scene`` of the one before), a blank line between
    them: the language of captions, and that text nearby tends to repeat, are what a
    web-trained GPT-2 brings to captioning and to a prompt of retrieved captions. The
    prompt's own words are never in it (GPT-2 never saw SmallCap's template either).
    With ``second_wording`` (colour -> word), every other document names the colours
    with its words throughout, as a web document keeps to one wording.
    """
    import numpy as np

    from pipeline.prepare.scenes import captions_for, scene_for

    seed = GPT_PRETRAIN_SEED_OFFSET + cfg.seed
    documents = []
    for i in range(cfg.pretrain_documents):
        rng = np.random.default_rng([seed, i, 11])
        scene = scene_for(i, seed)
        parts = []
        for _ in range(1 + int(rng.integers(5))):
            colours = second_wording if i % 2 else None
            parts.append(captions_for(scene, PRETRAIN_CAPTIONS, seed, colours)[int(rng.integers(PRETRAIN_CAPTIONS))])
            scene = twin_scene(scene, rng)
        documents.append("\n\n".join(parts))
    return documents


def pretrain_gpt(model, tokenizer, cfg: DemoGpt, documents: list[str]) -> None:
    """A short, seeded stand-in for GPT-2's own pre-training: next-token prediction on
    ``documents`` (each ending in EOS, padding excluded from the loss), batch 32."""
    import torch
    from tqdm import tqdm

    eos = tokenizer.eos_token_id
    rows = [tokenizer(d, truncation=True, max_length=cfg.n_positions - 1)["input_ids"] + [eos] for d in documents]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), eos, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, :len(row)] = torch.tensor(row)
        labels[i, :len(row)] = ids[i, :len(row)]
    gen = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.pretrain_lr, weight_decay=0.0)
    sched = _linear_schedule(opt, cfg.pretrain_steps)
    model.train()
    bar = tqdm(range(cfg.pretrain_steps), desc="demo gpt-2 pre-training", unit="step")
    for _ in bar:
        idx = torch.randint(0, len(rows), (32,), generator=gen)
        used = int((labels[idx] != -100).sum(1).max())  # trim the batch's common padding
        loss = model(input_ids=ids[idx, :used], attention_mask=(labels[idx, :used] != -100).long(),
                     labels=labels[idx, :used]).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    model.eval()
