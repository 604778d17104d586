"""Real-size models with random weights: CLIP ViT-B/32 and GPT-2 small, no download.

``clip.model: realsize`` / ``gpt.model: realsize`` build the hub models'
architectures from transformers' default configs (which are exactly
openai/clip-vit-base-patch32, both towers, and gpt2), seeded, and save them in a
hub snapshot's layout, so that every later stage loads them with the same
``from_pretrained`` calls as the hub models. GPT-2 keeps its real 50,257-row
embedding and LM head, CLIP's text tower its 49,408 rows: the compute of every step
is the real model's. Their tokenizers are byte-level BPE, as the hub's: trained on
the dataset's captions (as many merges as the corpus gives), written as
``vocab.json`` + ``merges.txt`` and loaded through ``GPT2TokenizerFast`` /
``CLIPTokenizerFast.from_pretrained``, exactly as gpt2's and CLIP's files are.

They exist to prove shapes, memory and speed at real size, not quality.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any, Iterable, Optional

from pipeline.core.errors import ParamsError

EOS = "<|endoftext|>"  # GPT-2's only special token (end of text, also bos and unk)
SEED = 0
GPT2_VOCAB = 50_257
GPT2_POSITIONS = 1024
VIT_B32_PROJECTION = 512
CLIP_VOCAB = 49_408  # CLIPTextConfig's defaults: openai/clip-vit-base-patch32's text tower
CLIP_POSITIONS = 77
CLIP_BOS, CLIP_EOS = "<|startoftext|>", "<|endoftext|>"  # CLIP's last two ids; EOS pads
END_OF_WORD = "</w>"  # CLIP's BPE marks the last symbol of each word
# CLIP's pre-tokenizer: contractions, runs of letters, single digits, runs of other symbols.
CLIP_SPLIT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
# openai/clip-vit-large-patch14's vision tower, as overrides of the ViT-B/32 defaults.
VIT_L14 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
               patch_size=14, projection_dim=768)


def vit_config(**overrides):
    """openai/clip-vit-base-patch32's vision tower (transformers' defaults, projection 512),
    with ``overrides`` (``VIT_L14``, or small sizes for tests)."""
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(**{"projection_dim": VIT_B32_PROJECTION, **overrides})


def clip_config(tokenizer: Any, text: Optional[dict] = None, **overrides):
    """openai/clip-vit-base-patch32's whole CLIP: the vision tower of ``vit_config`` (with
    ``overrides``) and CLIPTextConfig's defaults (hidden 512, 12 layers, 8 heads,
    49,408 rows, 77 positions) with ``text`` overrides; one projection size for both
    towers, and the special token ids of ``tokenizer``."""
    from transformers import CLIPConfig

    projection = overrides.get("projection_dim", VIT_B32_PROJECTION)
    text_config = {**(text or {}), "projection_dim": projection, "bos_token_id": tokenizer.bos_token_id,
                   "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    config = CLIPConfig(text_config=text_config, vision_config={**overrides, "projection_dim": projection},
                        projection_dim=projection)
    assert config.text_config.vocab_size >= len(tokenizer), "every tokenizer id needs an embedding row"
    return config


def build_realsize_clip(out_dir: Path, captions: Iterable[str] = (), seed: int = SEED,
                        text: Optional[dict] = None, **overrides) -> None:
    """A seeded CLIPModel in openai/clip-vit-base-patch32's shape (``clip_config``), a CLIP
    BPE tokenizer trained on ``captions`` and CLIPScore's prompt, and the hub's image
    processor settings. ``overrides`` size the vision tower, ``text`` the text tower."""
    import torch
    from transformers import CLIPModel, CLIPTokenizerFast

    from pipeline.pin.demo import CLIP_MEAN, CLIP_STD, PROMPT
    from pipeline.models.pretrained import image_processor_class

    positions = (text or {}).get("max_position_embeddings", CLIP_POSITIONS)
    with tempfile.TemporaryDirectory() as files:
        train_clip_bpe([PROMPT, *captions], Path(files))
        tokenizer = CLIPTokenizerFast.from_pretrained(files, model_max_length=positions)
    config = clip_config(tokenizer, text, **overrides)
    torch.manual_seed(seed)
    model = CLIPModel(config).eval()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    size = config.vision_config.image_size  # 224: bicubic resize of the shorter side, centre crop, as the hub's
    image_processor_class()(
        do_resize=True, size={"shortest_edge": size}, resample=3,
        do_center_crop=True, crop_size={"height": size, "width": size},
        do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
        image_mean=CLIP_MEAN, image_std=CLIP_STD, do_convert_rgb=True,
    ).save_pretrained(out_dir)


def _train(texts: Iterable[str], what: str, vocab_size: int, pre_tokenizer: Any, special_tokens: list[str],
           normalizer: Any = None, end_of_word: Optional[str] = None):
    """A byte-level BPE ``tokenizers.Tokenizer`` trained on ``texts``: the 256 byte symbols
    to start from, then as many merges as the corpus gives, up to ``vocab_size``."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    texts = [c.strip() for c in texts if c and c.strip()]
    if not texts:
        raise ParamsError(f"{what}: 'realsize' trains its tokenizer on the dataset's captions, and there are none")
    suffix = {"end_of_word_suffix": end_of_word} if end_of_word else {}
    tok = Tokenizer(models.BPE(**suffix))
    if normalizer is not None:
        tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tokenizer
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False, **suffix,
    )
    tok.train_from_iterator(texts, trainer)
    return tok


def train_bpe(captions: Iterable[str], folder: Path, vocab_size: int = GPT2_VOCAB) -> Path:
    """Byte-level BPE over ``captions`` (GPT-2's pre-tokenizer), saved as vocab.json + merges.txt.

    ``<|endoftext|>`` is id 0; the 256 byte symbols follow, then the merges, as many
    as the corpus gives up to ``vocab_size``. Any text encodes (bytes never miss).
    """
    from tokenizers import decoders, pre_tokenizers

    tok = _train(captions, "gpt.model", vocab_size, pre_tokenizers.ByteLevel(add_prefix_space=False), [EOS])
    tok.decoder = decoders.ByteLevel()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok.model.save(str(folder))  # vocab.json, merges.txt: the files gpt2's tokenizer is made of
    return folder


def byte_symbols() -> list[str]:
    """The 256 byte symbols of byte-level BPE in GPT-2's and CLIP's order (printable
    bytes as themselves, the others shifted past 255)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(shifted))]


def train_clip_bpe(captions: Iterable[str], folder: Path, vocab_size: int = CLIP_VOCAB) -> Path:
    """Byte-level BPE over ``captions`` with CLIP's normaliser (NFC, one space, lower case)
    and pre-tokenizer, saved in CLIP's layout: vocab.json + merges.txt.

    As openai/clip-vit-base-patch32's files: the 256 byte symbols, the same with
    ``</w>`` (word ends), the merges in order (as many as the corpus gives, up to
    ``vocab_size``), then ``<|startoftext|>`` and ``<|endoftext|>``. Any text encodes.
    """
    from tokenizers import Regex, normalizers, pre_tokenizers

    normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "),
                                       normalizers.Lowercase()])
    pre = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(CLIP_SPLIT), behavior="removed", invert=True),
                                   pre_tokenizers.ByteLevel(add_prefix_space=False)])
    base = byte_symbols()
    # The word-end symbols given ids up front: the trainer would number them in hash-map
    # order, and its ties between equally frequent pairs go by id.
    tok = _train(captions, "clip.model", vocab_size, pre, [b + END_OF_WORD for b in base], normalizer, END_OF_WORD)
    merges = [m.split(" ") if isinstance(m, str) else m for m in json.loads(tok.to_str())["model"]["merges"]]
    specials = [CLIP_BOS, CLIP_EOS]
    merges = merges[:vocab_size - 2 * len(base) - len(specials)]
    tokens = [*base, *(b + END_OF_WORD for b in base), *("".join(m) for m in merges), *specials]
    vocab = {t: i for i, t in enumerate(tokens)}
    assert len(vocab) == len(tokens) <= vocab_size, "CLIP's vocabulary: distinct tokens, capped"
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges),
                                       encoding="utf-8")
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
