"""Typed, validated pipeline parameters (the schema of params.yaml).

Every section of params.yaml is a pydantic model that forbids unknown keys, so a
typo such as ``mapper.layer`` stops the run before any work starts. ``load_params``
turns pydantic's errors into one ``ParamsError`` whose message names each bad key
(``mapper.layers: Input should be greater than or equal to 1 (got 0)``), formatted by
``pipeline.core.vocabulary.format_errors``.

Each DVC stage reads only its own sections; dvc.yaml lists exactly those, so
``dvc exp run -S mapper.layers=8`` reruns train and what follows, nothing before.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Callable, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipeline.core.errors import ParamsError
from pipeline.core.vocabulary import BEAM_SEARCH, NOT_APPLICABLE, SAMPLING, Precision, format_errors

__all__ = ["ParamsError", "Params", "load_params", "parse_params"]

DEMO = "demo"
# Real-size architectures with random weights (ViT-B/32, GPT-2 small + a byte-level
# BPE tokenizer trained on the captions): the compute of the hub models, no download.
REALSIZE = "realsize"
GPT2_SMALL_WIDTH = 768
# auto | cpu | mps | cuda | cuda:N (checked here without torch; runtime.choose_device
# resolves it on the machine).
DEVICE_PATTERN = r"^(auto|cpu|mps|cuda|cuda:\d+)$"
# clip.model open_clip:NAME/TAG: an open_clip architecture and one of its pretrained
# tags, or ``random`` / ``random-SEED`` for seeded random weights (tests, dry runs).
OPEN_CLIP_PREFIX = "open_clip:"
_OPEN_CLIP_SPEC = re.compile(r"^open_clip:(?P<name>[A-Za-z0-9][A-Za-z0-9_.\-]*)/(?P<tag>[A-Za-z0-9][A-Za-z0-9_.\-]*)$")
_RANDOM_TAG = re.compile(r"^random(?:-(?P<seed>\d+))?$")


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# --------------------------------------------------------------------------- data
class DemoData(Section):
    """The embedded offline dataset: generated scenes with reference captions."""

    images: int = Field(1500, ge=10, description="number of scene images to generate")
    image_size: int = Field(64, ge=16, le=1024, description="side of the square images, pixels (style scenes)")
    style: Literal["scenes", "photo"] = Field(
        "scenes", description="scenes: square PNGs of image_size; photo: 640x480 JPEGs on photo-like backgrounds")
    captions_per_image: int = Field(5, ge=1, le=20, description="reference captions per demo image, in varied wording")
    seed: int = Field(0, description="the demo dataset is a pure function of its params and this seed")


class DataParams(Section):
    """Where the images and reference captions come from."""

    # demo, or a reader registered in pipeline/prepare/readers.py (coco, karpathy,
    # csv, tsv, jsonl); the prepare stage checks the name against that registry.
    source: str = Field("demo", min_length=1, description="demo, or a registered reader: coco (COCO captions JSON), karpathy (a Karpathy dataset_*.json), csv, tsv (CC3M: caption<TAB>url), jsonl")
    # COCO captions json / Karpathy dataset_*.json / CSV / TSV / JSONL list: path or URL.
    annotations: Optional[str] = Field(None, description="the annotation file or list: a path or an http(s)/file URL; ARCHIVE.zip#MEMBER takes one file from a zip. Required unless source is demo")
    # Karpathy split file (dataset_coco.json) to split a COCO annotation file by image.
    karpathy_split: Optional[str] = Field(None, description="Karpathy split file (dataset_coco.json) for source coco; restval counts as train")
    # Base URL or folder that relative image file names are joined to.
    image_root: Optional[str] = Field(None, description="URL prefix or folder that relative image names are joined to")
    # Splits for sources that carry none: chosen per image from a hash of its key.
    val_fraction: float = Field(0.05, ge=0.0, lt=1.0, description="for sources without splits: share of images in val, chosen per image from a hash of its identity (never per caption)")
    test_fraction: float = Field(0.1, ge=0.0, lt=1.0, description="for sources without splits: share of images in test, chosen per image like val_fraction")
    # Stop after this many records (None: all); handy for a quick look at a big list.
    max_records: Optional[int] = Field(None, ge=1, description="stop after this many records; null: all")
    demo: DemoData = DemoData()

    @model_validator(mode="after")
    def _check(self) -> "DataParams":
        if self.source != DEMO and not self.annotations:
            raise ValueError(f"annotations: required when source is {self.source!r}")
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ValueError("val_fraction + test_fraction must be < 1")
        return self


# ----------------------------------------------------------------------- download
class DownloadParams(Section):
    """Fetching images into webdataset tar shards."""

    workers: int = Field(16, ge=1, le=1024, description="concurrent fetches")
    per_host: int = Field(16, ge=1, description="concurrent fetches to one host")
    records_per_shard: int = Field(250, ge=1, description="input records per tar shard; the shard is the unit of resume and of work split")
    connect_timeout: float = Field(5.0, gt=0, description="seconds to connect, per request")
    read_timeout: float = Field(20.0, gt=0, description="seconds without data before a read fails, per request")
    retries: int = Field(3, ge=0, description="retries after a transient failure")
    backoff: float = Field(0.5, ge=0, description="first retry delay, seconds; doubles, with jitter")
    max_redirects: int = Field(5, ge=0, description="longer chains fail as too_many_redirects; a redirect never leads to file:")
    max_bytes: int = Field(20_000_000, ge=1, description="largest accepted response body")
    max_pixels: int = Field(89_478_485, ge=1, description="decompression-bomb cap (PIL's default)")
    resize: Optional[int] = Field(None, ge=8, description="shorter side after resize; None keeps size")
    jpeg_quality: int = Field(95, ge=1, le=100, description="quality of the re-encoded JPEG")
    user_agent: str = Field("capline/0.1 (+https://github.com/capline/capline)", description="sent with every request")
    # Pillow releases the GIL while decoding, resizing and encoding, so the fetch
    # threads already use every core; separate processes only pay off when Python
    # work dominates. 0 = decode in the fetch threads (measured fastest on 2 cores).
    decode_processes: int = Field(0, ge=0, le=256, description="image processing processes; 0 = in the fetch threads")


# ---------------------------------------------------------------------- clip/embed
def parse_open_clip(spec: str) -> Optional[tuple[str, str]]:
    """(model name, pretrained tag) of an ``open_clip:NAME/TAG`` spec; None for any other
    model name; ValueError (naming the expected form) for a malformed one."""
    if not spec.startswith(OPEN_CLIP_PREFIX):
        return None
    m = _OPEN_CLIP_SPEC.match(spec)
    if m is None:
        raise ValueError("expected open_clip:NAME/TAG (e.g. open_clip:RN50x4/openai, "
                         "open_clip:ViT-B-32/laion2b_s34b_b79k; TAG random or random-SEED for random weights)")
    return m.group("name"), m.group("tag")


def random_seed(tag: str) -> Optional[int]:
    """The seed of an open_clip ``random``/``random-SEED`` tag (0 for ``random``); None for a pretrained tag."""
    m = _RANDOM_TAG.match(tag)
    return None if m is None else int(m.group("seed") or 0)


class DemoClip(Section):
    """Size of the small CLIP vision tower built for the offline demo."""

    hidden_size: int = Field(128, ge=8, description="width of the demo CLIP's vision tower")
    layers: int = Field(2, ge=1, description="transformer blocks of the demo CLIP's vision tower")
    heads: int = Field(4, ge=1, description="attention heads of the demo CLIP")
    patch_size: int = Field(8, ge=1, description="ViT patch side, pixels; must divide data.demo.image_size")
    projection_dim: int = Field(128, ge=8, description="size of the demo CLIP's image_embeds")
    seed: int = Field(0, description="seed of the demo CLIP's initialisation and pre-training")
    # Random ViT features lose shape and position; a short seeded pre-training on
    # scenes generated apart from the dataset (never its images) stands in for
    # CLIP's own: the image tower learns the scenes' attributes, then the text tower
    # learns contrastively to match captions with the locked image embeddings.
    pretrain_steps: int = Field(1000, ge=0, description="image tower pre-training steps (batch 64); 0: random weights")
    pretrain_images: int = Field(3000, ge=64, description="scenes generated for pre-training")
    pretrain_lr: float = Field(2e-3, gt=0, description="AdamW learning rate of the demo CLIP's pre-training")
    pretrain_text_steps: int = Field(
        500, ge=0, description="contrastive steps of the text tower against the locked image tower; 0: random text tower")

    @model_validator(mode="after")
    def _check(self) -> "DemoClip":
        if self.hidden_size % self.heads:
            raise ValueError(f"heads: {self.heads} does not divide hidden_size {self.hidden_size}")
        return self


class ClipParams(Section):
    """The CLIP image encoder and how its vectors are computed."""

    model: str = Field(DEMO, description="hub id, local folder, 'demo', 'realsize' or open_clip:NAME/TAG (an open_clip model and pretrained tag, e.g. open_clip:RN50x4/openai; TAG random or random-SEED: seeded random weights)")
    revision: str = Field("main", description="hub branch, tag or 40-hex commit; the resolved commit is recorded (open_clip models: leave at main, the tag names the weights)")
    output: Literal["image_embeds", "pooler_output"] = Field("image_embeds", description="image_embeds (the projected CLIP embedding) or pooler_output (the vision tower's pooled output)")
    normalize: bool = Field(True, description="L2-normalise the vectors")
    precision: Precision = Field("auto", description="auto (bf16 on CUDA with bf16 and on CPUs with avx512_bf16/AMX, fp16 on older CUDA, else fp32), fp32, bf16, fp16")
    batch_size: int = Field(64, ge=1, description="images per model call")
    workers: int = Field(2, ge=0, description="DataLoader decode processes")
    preprocess: Literal["processor", "fast"] = Field("processor", description="processor: exactly CLIPImageProcessor (open_clip models: exactly open_clip's eval transform); fast: JPEG draft decoding (see docs/embed.md)")
    patch_tokens: Literal["auto", "true", "false"] = Field(
        "auto", description="also store the vision tower's last hidden state (fp16, [tokens, width] per image; "
                            "ViT-B/32: 75 KiB an image): true, false, or auto (when mapper.type reads them, "
                            "resolved by the embed_plan stage)")
    demo: DemoClip = DemoClip()

    @field_validator("model")
    @classmethod
    def _model(cls, value: str) -> str:
        parse_open_clip(value)
        return value

    @model_validator(mode="after")
    def _check(self) -> "ClipParams":
        if parse_open_clip(self.model) is None:
            return self
        if self.output != "image_embeds":
            raise ValueError(f"output: {self.output!r} has no open_clip counterpart; open_clip models give "
                             "image_embeds (encode_image, the projected embedding)")
        if self.revision != "main":
            raise ValueError(f"revision: {self.revision!r}: open_clip models are named by their pretrained tag "
                             "(open_clip:NAME/TAG); leave revision at main")
        return self


# --------------------------------------------------------------------------- gpt
class DemoGpt(Section):
    """Size of the small GPT-2 built for the offline demo (vocabulary from the demo captions)."""

    n_embd: int = Field(128, ge=8, description="width of the demo GPT-2")
    n_layer: int = Field(2, ge=1, description="transformer blocks of the demo GPT-2")
    n_head: int = Field(4, ge=1, description="attention heads of the demo GPT-2")
    n_positions: int = Field(192, ge=8, description="positions of the demo GPT-2 (prefix + retrieved captions + caption)")
    seed: int = Field(0, description="seed of the demo GPT-2's initialisation and pre-training")
    pretrain_steps: int = Field(500, ge=0, description="language-model pre-training steps on scene captions apart from the dataset (0: random weights)")
    pretrain_documents: int = Field(3000, ge=1, description="pre-training documents: captions of a scene and of up to 4 similar scenes")
    pretrain_lr: float = Field(0.003, gt=0, description="AdamW learning rate of the pre-training")

    @model_validator(mode="after")
    def _check(self) -> "DemoGpt":
        if self.n_embd % self.n_head:
            raise ValueError(f"n_head: {self.n_head} does not divide n_embd {self.n_embd}")
        return self


class GptParams(Section):
    """The GPT-2 language model that continues the prefix."""

    model: str = Field(DEMO, description="hub id, local folder, 'demo' or 'realsize'")
    revision: str = Field("main", description="hub branch, tag or 40-hex commit; the resolved commit is recorded")
    demo: DemoGpt = DemoGpt()

    @field_validator("model")
    @classmethod
    def _model(cls, value: str) -> str:
        if value.startswith(OPEN_CLIP_PREFIX):
            raise ValueError("open_clip models are CLIPs (clip.model), not GPT-2")
        return value


# ------------------------------------------------------------------------ mapper
class MapperParams(Section):
    """The mapping network from one CLIP vector to prefix_length GPT-2 embeddings."""

    # Checked against the registry in pipeline/models/mapper.py when the train stage starts:
    # a new mapper type is one class there, with no change here.
    type: str = Field("transformer", min_length=1, description="a registered mapper type: transformer, mlp, clipgpt or cross_attention (pipeline/models/mapper.py)")
    prefix_length: int = Field(10, ge=1, le=256, description="GPT-2 input embeddings made from one CLIP vector (K)")
    clip_length: int = Field(10, ge=1, le=256, description="transformer only: tokens made from the CLIP vector")
    layers: int = Field(4, ge=1, le=64, description="transformer and clipgpt: self-attention blocks")
    heads: int = Field(8, ge=1, description="transformer and clipgpt: attention heads; must divide GPT-2's width")
    mlp_ratio: float = Field(2.0, gt=0, description="transformer only: feed-forward width as a multiple of GPT-2's width")
    forward_expansion: int = Field(4, ge=1, le=64, description="clipgpt only: feed-forward width as a multiple of GPT-2's width (the seed's forward_expansion)")
    reduce_factor: int = Field(4, ge=1, le=64, description="cross_attention only: the cross-attention width is GPT-2's n_embd / reduce_factor (SmallCap: 4, 7M parameters with GPT-2 small)")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout inside the mapper")
    # Width of the prefix embeddings; None takes GPT-2's n_embd, a number must equal it.
    width: Optional[int] = Field(None, ge=1, description="prefix width; null takes GPT-2's n_embd, a number must equal it")


# ------------------------------------------------------------------------- train
class TrainParams(Section):
    """Training of the mapper (and GPT-2, when fine-tuned)."""

    epochs: int = Field(10, ge=1, description="passes over the train split's (image, caption) pairs")
    batch_size: int = Field(32, ge=1, description="global batch: all processes and micro-batches together")
    grad_accum: int = Field(1, ge=1, description="micro-batches per step (batch_size / (processes x grad_accum) each)")
    lr: float = Field(1e-3, gt=0, description="AdamW peak learning rate")
    warmup_steps: int = Field(100, ge=0, description="linear warm-up steps, then linear decay to 0")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    grad_clip: Optional[float] = Field(1.0, gt=0, description="gradient norm clip; null: none")
    finetune_gpt: bool = Field(True, description="train GPT-2 too (ClipCap's MLP variant); false keeps it frozen (no gradients for its weights)")
    # The seed (clip-gpt-captioning) trains GPT-2's embeddings, first and last blocks and
    # final LayerNorm: [wte, wpe, 0, -1, ln_f]. Checked against GPT-2's depth when loaded.
    finetune_gpt_layers: Optional[list[int | Literal["wte", "wpe", "ln_f"]]] = Field(
        None, min_length=1, description="with finetune_gpt: train only these parts of GPT-2: block indices (negative "
                                        "counts from the end: [0, -1] = first and last) and wte, wpe, ln_f; "
                                        "null: all of GPT-2")
    max_caption_tokens: int = Field(40, ge=1, description="longer captions are cut (EOS kept)")
    precision: Precision = Field("auto", description="auto (the runtime's policy: bf16 where native), fp32, bf16, fp16 (with loss scaling)")
    log_every: int = Field(10, ge=1, description="steps between loss-curve points")
    seed: int = Field(0, description="seed of the mapper's initialisation and the order of the pairs")
    checkpoint_every: Optional[int] = Field(500, ge=1, description="steps between checkpoints (and at each epoch end)")
    eval_every: Optional[int] = Field(None, ge=1, description="steps between validations (and at each epoch end)")
    keep: Literal["best", "last"] = Field("best", description="model written: lowest validation loss, or the last step")
    early_stopping_patience: Optional[int] = Field(None, ge=1, description="validations without improvement before stopping")
    bucket_by_length: bool = Field(False, description="batch captions of similar length together (less padding)")
    max_memory_gb: float = Field(8.0, gt=0, description="larger feature sets are read shard by shard")

    @model_validator(mode="after")
    def _check(self) -> "TrainParams":
        if self.finetune_gpt_layers is not None and not self.finetune_gpt:
            raise ValueError("finetune_gpt_layers: chooses which parts of GPT-2 train, so it needs finetune_gpt: true")
        return self


# -------------------------------------------------------------------------- scst
class ScstParams(Section):
    """Self-critical sequence training (Rennie et al. 2017) of the cross-entropy model."""

    epochs: int = Field(3, ge=0, description="passes over the training images; 0: off, the cross-entropy model passes through")
    batch_size: int = Field(32, ge=1, description="images per step; each gives `samples` sampled captions")
    lr: float = Field(2e-4, gt=0, description="AdamW learning rate, constant")
    samples: int = Field(5, ge=1, description="captions sampled per image per step")
    baseline: Literal["mean", "greedy"] = Field(
        "mean", description="reward baseline: mean of the image's other samples (Luo 2020) or its greedy caption")
    max_tokens: int = Field(30, ge=2, description="longest sampled caption, tokens (EOS included)")
    finetune_gpt: bool = Field(True, description="update GPT-2 too; applies only when training fine-tuned it")
    grad_clip: Optional[float] = Field(1.0, gt=0, description="gradient norm clip; null: none")
    precision: Precision = Field("auto", description="auto (the runtime's policy), fp32, bf16, fp16")
    log_every: int = Field(5, ge=1, description="steps between reward-curve points")
    checkpoint_every: int = Field(0, ge=0, description="steps between checkpoints besides each epoch's end; 0: epoch ends only")
    seed: int = Field(0, description="seed of the sampling and the order of the images")

    @model_validator(mode="after")
    def _check(self) -> "ScstParams":
        if self.baseline == "mean" and self.samples < 2:
            raise ValueError(f"samples: the mean-of-others baseline needs at least 2 samples per image "
                             f"(got {self.samples}); use baseline: greedy for 1")
        return self


# ---------------------------------------------------------------------- generate
class Decoding(Section):
    """How captions are decoded: every knob of transformers' generate that capline uses.

    All explicit: nothing falls back to a library default. The same fields make the
    model folder's ``generation_config.json`` and the options of ``capline caption``.
    """

    num_beams: int = Field(5, ge=1, description="beam width; 1 = greedy (or plain sampling with do_sample)")
    length_penalty: float = Field(1.0, description="beam search: a caption's score is its summed log-probability "
                                                   "divided by length ** length_penalty")
    no_repeat_ngram_size: int = Field(0, ge=0, description="no n-gram of this size occurs twice in a caption; 0 = off")
    repetition_penalty: float = Field(1.0, gt=0, description="CTRL penalty on tokens already in the caption; 1.0 = off")
    min_new_tokens: int = Field(0, ge=0, description="EOS is forbidden before this many tokens")
    max_new_tokens: int = Field(30, ge=1, description="caption length cap, tokens (EOS included)")
    do_sample: bool = Field(False, description="sample tokens instead of taking the most likely ones")
    temperature: float = Field(1.0, gt=0, description="sampling only: logits are divided by this; 1.0 = off")
    top_k: int = Field(0, ge=0, description="sampling only: keep the k most likely tokens; 0 = off")
    top_p: float = Field(1.0, gt=0, le=1, description="sampling only: keep the smallest set of tokens whose "
                                                      "probability reaches top_p; 1.0 = off")
    num_return_sequences: int = Field(1, ge=1, description="captions per image (the n-best list)")
    seed: int = Field(0, description="seeds sampling (per image) and the shuffled-image control")

    @model_validator(mode="after")
    def _check_decoding(self) -> "Decoding":
        check_decoding(self)
        return self


def check_decoding(d: "Decoding") -> None:
    """Refuse combinations that cannot mean what they say; messages start with the key."""
    if d.min_new_tokens > d.max_new_tokens:
        raise ValueError(f"min_new_tokens: {d.min_new_tokens} is more than max_new_tokens {d.max_new_tokens}")
    if d.num_beams > 1 and d.num_return_sequences > d.num_beams:
        raise ValueError(f"num_return_sequences: {d.num_return_sequences} is more than num_beams {d.num_beams}; "
                         "beam search returns at most num_beams captions per image")
    if d.num_beams == 1 and not d.do_sample and d.num_return_sequences > 1:
        raise ValueError(f"num_return_sequences: {d.num_return_sequences} captions per image need do_sample "
                         "or num_beams >= num_return_sequences; greedy decoding makes one")
    for key, (off, mode) in NOT_APPLICABLE.items():
        value = getattr(d, key)
        if value == off:
            continue
        if mode == SAMPLING and not d.do_sample:
            raise ValueError(f"{key}: {value} applies only when sampling (do_sample); leave it at {off} otherwise")
        if mode == BEAM_SEARCH and d.num_beams == 1:
            raise ValueError(f"{key}: {value} applies only to beam search; num_beams is 1")


class GenerateParams(Decoding):
    """Captioning the feature shards (stage: generate): which images, how many at once, and the decoding."""

    split: Literal["train", "val", "test"] = Field("test", description="which split to caption")
    batch_size: int = Field(32, ge=1, description="images per generate call (the captions do not depend on it)")
    precision: Precision = Field(
        "auto", description="auto: bf16 weights (the LM head stays fp32) where the device runs bf16 fast, else "
                            "fp32; fp16 on a GPU only")
    datastore: Optional[str] = Field(None, description="retrieval models (retrieval.k > 0): a datastore folder whose captions fill the prompts instead of the neighbour shards of the pipeline (data/retrieval); null: those shards")


# ---------------------------------------------------------------------- evaluate
class EvaluateParams(Section):
    """Scoring with pycocoevalcap and the HTML report."""

    spice: bool = Field(False, description="also compute SPICE (needs Stanford CoreNLP jars, see corenlp_dir)")
    corenlp_dir: Optional[str] = Field(None, description="folder with Stanford CoreNLP jars for SPICE")
    baseline_candidates: int = Field(50, ge=1, description="most frequent training captions tried as the constant baseline")
    report_images: int = Field(200, ge=1, description="images shown in the HTML report")
    thumbnail_size: int = Field(128, ge=16, description="longer side of the report's thumbnails, pixels")
    clipscore_model: Optional[str] = Field(
        None, description="folder of a whole CLIP (save_pretrained, or a pinned open_clip folder) for CLIPScore; null: the pinned CLIP")


# --------------------------------------------------------------------- retrieval
# SmallCap's prompt; {captions}: the k retrieved captions joined by a blank line (pipeline/models/prompt.py).
PROMPT_TEMPLATE = "Similar images show\n\n{captions}.\n\nThis image shows "

class RetrievalParams(Section):
    """Retrieval augmentation (SmallCap): a datastore of captions and each image's nearest ones."""

    source: str = Field("train", min_length=1, description="captions of the datastore: train (the training split's captions, from the feature shards) or a caption file: COCO captions .json, .tsv/.csv, .jsonl, .txt (one caption a line)")
    max_caption_tokens: int = Field(25, ge=1, description="longer captions (GPT-2 tokens, as the captioner reads them) are dropped from the datastore and counted")
    batch_size: int = Field(256, ge=1, description="captions per CLIP text tower call while the datastore is encoded")
    index: Literal["auto", "flat", "ivf"] = Field("auto", description="flat: exact inner product (IndexFlatIP); ivf: inverted lists (IndexIVFFlat, or IndexIVFPQ with ivf_pq_m); auto: flat up to flat_max_captions")
    flat_max_captions: int = Field(1_000_000, ge=1, description="auto: the largest datastore searched exactly (docs/retrieval.md has the measurement)")
    ivf_nlist: Optional[int] = Field(None, ge=1, description="ivf: number of inverted lists; null: 4 x sqrt(captions)")
    ivf_nprobe: int = Field(32, ge=1, description="ivf: lists searched per query (more: slower, closer to exact)")
    ivf_pq_m: int = Field(0, ge=0, description="ivf: product-quantiser sub-vectors of 8 bits (must divide the width); 0: no compression (IndexIVFFlat)")
    k: int = Field(0, ge=0, description="captions kept per image and read by the captioner in its prompt; 0: no retrieval (the plain prefix captioner)")
    template: str = Field(PROMPT_TEMPLATE, min_length=1, description="the captioner's prompt: {captions} is replaced by the k captions joined by separator (SmallCap's template by default)")
    separator: str = Field("\n\n", description="between the captions of the prompt (SmallCap's: a blank line)")
    retrieve_candidates: int = Field(15, ge=1, description="nearest captions searched per image before its own are excluded; the k nearest others are kept")

    @model_validator(mode="after")
    def _check(self) -> "RetrievalParams":
        if self.template.count("{captions}") != 1:
            raise ValueError("template: must hold {captions} exactly once")
        if self.retrieve_candidates < self.k:
            raise ValueError(f"retrieve_candidates: {self.retrieve_candidates} is less than k {self.k}")
        return self


class TransferParams(Section):
    """The demo's domain-transfer experiment: a model trained on the demo (domain A) captions a
    second domain B, with A's datastore and with B's, never trained on B (docs/retrieval.md)."""

    domain: Literal["none", "colours"] = Field("none", description="none: no experiment; colours: domain B's captions name the colours with words A's never use (crimson, emerald, navy, golden, violet, amber), and the demo CLIP and GPT-2 pre-train on both wordings, as web-trained models know both")
    images: int = Field(1000, ge=20, description="domain B's images: its training split's captions make B's datastore, its test split is captioned")
    seed: int = Field(1, description="domain B's scene stream (other scenes than the dataset's)")


# ------------------------------------------------------------------------ all
class Params(Section):
    # One device for every stage that runs a model (embed, train, generate): they
    # run on the same machine, and a stage's outputs depend on it (auto precision).
    device: str = Field("auto", description="auto, cpu, cuda, cuda:N or mps: where embed, train and generate run")
    data: DataParams = DataParams()
    download: DownloadParams = DownloadParams()
    clip: ClipParams = ClipParams()
    gpt: GptParams = GptParams()
    mapper: MapperParams = MapperParams()
    train: TrainParams = TrainParams()
    scst: ScstParams = ScstParams()
    generate: GenerateParams = GenerateParams()
    evaluate: EvaluateParams = EvaluateParams()
    retrieval: RetrievalParams = RetrievalParams()
    transfer: TransferParams = TransferParams()

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if not re.match(DEVICE_PATTERN, value):
            raise ValueError("is not one of auto, cpu, cuda, cuda:N, mps")
        return value

    @model_validator(mode="after")
    def _cross_check(self) -> "Params":
        # Only the demo GPT-2's width is known before loading a model; hub models are
        # checked by check_against_gpt() when the train stage has read their config.
        if self.gpt.model == DEMO:
            check_against_gpt(self.mapper, self.gpt.demo.n_embd)
        elif self.gpt.model == REALSIZE:
            check_against_gpt(self.mapper, GPT2_SMALL_WIDTH)
        if self.transfer.domain != "none" and self.data.source != DEMO:
            raise ParamsError(f"transfer.domain: {self.transfer.domain!r} draws domain B from the demo's scenes; "
                              f"data.source is {self.data.source!r} (for your own domain: `capline datastore` "
                              "on its captions, then `capline caption --datastore`); set it to none")
        if self.mapper.type == "cross_attention":
            if self.train.finetune_gpt_layers is not None:
                raise ParamsError("train.finetune_gpt_layers: mapper.type cross_attention keeps GPT-2 frozen "
                                  "(only its cross-attention trains); set it to null")
            if self.clip.patch_tokens == "false":
                raise ParamsError("clip.patch_tokens: mapper.type cross_attention reads patch tokens; set it to "
                                  "auto or true")
        return self


def check_against_gpt(mapper: MapperParams, n_embd: int) -> None:
    """Refuse mapper settings that cannot work with a GPT-2 of width ``n_embd``."""
    if mapper.width is not None and mapper.width != n_embd:
        raise ParamsError(f"mapper.width: {mapper.width} does not match GPT-2's n_embd {n_embd}")
    if mapper.type in ("transformer", "clipgpt") and n_embd % mapper.heads:
        raise ParamsError(f"mapper.heads: {mapper.heads} does not divide GPT-2's n_embd {n_embd}")
    if mapper.type == "cross_attention" and n_embd % mapper.reduce_factor:
        raise ParamsError(f"mapper.reduce_factor: {mapper.reduce_factor} does not divide GPT-2's n_embd {n_embd}")


def validated(model: type[BaseModel], values: dict[str, Any], name: Callable[[str], str] = lambda key: key):
    """``model(**values)``; a bad value or combination is a ParamsError naming each key as ``name(key)``."""
    try:
        return model(**values)
    except ValidationError as err:
        raise ParamsError(format_errors(err, model, name)) from None


def parse_params(raw: dict[str, Any]) -> Params:
    """Validate a params mapping; raise ParamsError naming every bad key."""
    if not isinstance(raw, dict):
        raise ParamsError("invalid params: the top level must be a mapping of sections")
    try:
        return Params.model_validate(raw)
    except ValidationError as err:
        raise ParamsError("invalid params: " + format_errors(err, Params)) from None


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate params.yaml; a missing file, invalid YAML or a bad key is a ParamsError naming the file.

    An empty file gives every default."""
    path = Path(path)
    if not path.exists():
        raise ParamsError(f"params file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ParamsError(f"{path}: not valid YAML: {err}") from None
    try:
        return parse_params(raw)
    except ParamsError as err:
        raise ParamsError(f"{path}: {err}") from None
