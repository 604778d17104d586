"""Typed, validated pipeline parameters (the schema of params.yaml).

Every section of params.yaml is a pydantic model that forbids unknown keys, so a
typo such as ``mapper.layer`` stops the run before any work starts. ``load_params``
turns pydantic's errors into one ``ParamsError`` whose message names each bad key
(``mapper.layers: must be >= 1``).

Each DVC stage reads only its own sections; dvc.yaml lists exactly those, so
``dvc exp run -S mapper.layers=8`` reruns train and what follows, nothing before.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from pipeline.errors import ParamsError

__all__ = ["ParamsError", "Params", "load_params", "parse_params"]

DEMO = "demo"


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# --------------------------------------------------------------------------- data
class DemoData(Section):
    """The embedded offline dataset: generated scenes with reference captions."""

    images: int = Field(1500, ge=10, description="number of scene images to generate")
    image_size: int = Field(64, ge=16, le=1024, description="side of the square images, pixels")
    captions_per_image: int = Field(5, ge=1, le=20)
    seed: int = 0


class DataParams(Section):
    """Where the images and reference captions come from."""

    # demo, or a reader registered in pipeline/datasets/readers.py (coco, karpathy,
    # csv, tsv, jsonl); the prepare stage checks the name against that registry.
    source: str = Field("demo", min_length=1)
    # COCO captions json / Karpathy dataset_*.json / CSV / TSV / JSONL list: path or URL.
    annotations: Optional[str] = None
    # Karpathy split file (dataset_coco.json) to split a COCO annotation file by image.
    karpathy_split: Optional[str] = None
    # Base URL or folder that relative image file names are joined to.
    image_root: Optional[str] = None
    # Splits for sources that carry none: chosen per image from a hash of its key.
    val_fraction: float = Field(0.05, ge=0.0, lt=1.0)
    test_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    # Stop after this many records (None: all); handy for a quick look at a big list.
    max_records: Optional[int] = Field(None, ge=1)
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
    records_per_shard: int = Field(1000, ge=1)
    connect_timeout: float = Field(5.0, gt=0)
    read_timeout: float = Field(20.0, gt=0)
    retries: int = Field(3, ge=0, description="retries after a transient failure")
    backoff: float = Field(0.5, ge=0, description="first retry delay, seconds; doubles, with jitter")
    max_redirects: int = Field(5, ge=0)
    max_bytes: int = Field(20_000_000, ge=1, description="largest accepted response body")
    max_pixels: int = Field(89_478_485, ge=1, description="decompression-bomb cap (PIL's default)")
    resize: Optional[int] = Field(None, ge=8, description="shorter side after resize; None keeps size")
    jpeg_quality: int = Field(95, ge=1, le=100)
    user_agent: str = "capline/0.1 (+https://github.com/capline/capline)"
    # Pillow releases the GIL while decoding, resizing and encoding, so the fetch
    # threads already use every core; separate processes only pay off when Python
    # work dominates. 0 = decode in the fetch threads (measured fastest on 2 cores).
    decode_processes: int = Field(0, ge=0, le=256, description="image processing processes; 0 = in the fetch threads")


# ---------------------------------------------------------------------- clip/embed
class DemoClip(Section):
    """Size of the small CLIP vision tower built for the offline demo."""

    hidden_size: int = Field(128, ge=8)
    layers: int = Field(2, ge=1)
    heads: int = Field(4, ge=1)
    patch_size: int = Field(8, ge=1)
    projection_dim: int = Field(128, ge=8)
    seed: int = 0
    # Random ViT features lose shape and position; a short seeded pre-training on
    # scenes generated apart from the dataset (never its images) stands in for
    # CLIP's own: the image tower learns the scenes' attributes, then the text tower
    # learns contrastively to match captions with the locked image embeddings.
    pretrain_steps: int = Field(500, ge=0, description="image tower pre-training steps (batch 64); 0: random weights")
    pretrain_images: int = Field(3000, ge=64, description="scenes generated for pre-training")
    pretrain_lr: float = Field(2e-3, gt=0)
    pretrain_text_steps: int = Field(
        500, ge=0, description="contrastive steps of the text tower against the locked image tower; 0: random text tower")

    @model_validator(mode="after")
    def _check(self) -> "DemoClip":
        if self.hidden_size % self.heads:
            raise ValueError(f"heads: {self.heads} does not divide hidden_size {self.hidden_size}")
        return self


class ClipParams(Section):
    """The CLIP image encoder and how its vectors are computed."""

    model: str = Field(DEMO, description="hub id, local folder, or 'demo'")
    revision: str = "main"
    output: Literal["image_embeds", "pooler_output"] = "image_embeds"
    normalize: bool = True
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    batch_size: int = Field(64, ge=1)
    workers: int = Field(2, ge=0, description="DataLoader decode processes")
    preprocess: Literal["processor", "fast"] = "processor"
    demo: DemoClip = DemoClip()


# --------------------------------------------------------------------------- gpt
class DemoGpt(Section):
    """Size of the small GPT-2 built for the offline demo (vocabulary from the demo captions)."""

    n_embd: int = Field(128, ge=8)
    n_layer: int = Field(2, ge=1)
    n_head: int = Field(4, ge=1)
    n_positions: int = Field(64, ge=8)
    seed: int = 0

    @model_validator(mode="after")
    def _check(self) -> "DemoGpt":
        if self.n_embd % self.n_head:
            raise ValueError(f"n_head: {self.n_head} does not divide n_embd {self.n_embd}")
        return self


class GptParams(Section):
    """The GPT-2 language model that continues the prefix."""

    model: str = Field(DEMO, description="hub id, local folder, or 'demo'")
    revision: str = "main"
    demo: DemoGpt = DemoGpt()


# ------------------------------------------------------------------------ mapper
class MapperParams(Section):
    """The mapping network from one CLIP vector to prefix_length GPT-2 embeddings."""

    type: Literal["transformer", "mlp"] = "transformer"
    prefix_length: int = Field(10, ge=1, le=256)
    clip_length: int = Field(10, ge=1, le=256, description="transformer only: tokens made from the CLIP vector")
    layers: int = Field(8, ge=1, le=64, description="transformer only: self-attention blocks")
    heads: int = Field(8, ge=1)
    mlp_ratio: float = Field(2.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    # Width of the prefix embeddings; None takes GPT-2's n_embd, a number must equal it.
    width: Optional[int] = Field(None, ge=1)


# ------------------------------------------------------------------------- train
class TrainParams(Section):
    """Training of the mapper (and GPT-2, when fine-tuned)."""

    epochs: int = Field(10, ge=1)
    batch_size: int = Field(40, ge=1)
    lr: float = Field(2e-5, gt=0)
    warmup_steps: int = Field(5000, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: Optional[float] = Field(1.0, gt=0)
    finetune_gpt: bool = False
    max_caption_tokens: int = Field(40, ge=1, description="longer captions are cut (EOS kept)")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    log_every: int = Field(10, ge=1, description="steps between loss-curve points")
    seed: int = 0


# -------------------------------------------------------------------------- scst
class ScstParams(Section):
    """Self-critical sequence training (Rennie et al. 2017) of the cross-entropy model."""

    epochs: int = Field(3, ge=0, description="passes over the training images; 0: off, the cross-entropy model passes through")
    batch_size: int = Field(32, ge=1, description="images per step; each gives `samples` sampled captions")
    lr: float = Field(1e-4, gt=0, description="AdamW learning rate, constant")
    samples: int = Field(5, ge=1, description="captions sampled per image per step")
    baseline: Literal["mean", "greedy"] = Field(
        "mean", description="reward baseline: mean of the image's other samples (Luo 2020) or its greedy caption")
    max_tokens: int = Field(30, ge=2, description="longest sampled caption, tokens (EOS included)")
    finetune_gpt: bool = Field(True, description="update GPT-2 too; applies only when training fine-tuned it")
    grad_clip: Optional[float] = Field(1.0, gt=0, description="gradient norm clip; null: none")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    log_every: int = Field(5, ge=1, description="steps between reward-curve points")
    checkpoint_every: int = Field(0, ge=0, description="steps between checkpoints besides each epoch's end; 0: epoch ends only")
    seed: int = 0

    @model_validator(mode="after")
    def _check(self) -> "ScstParams":
        if self.baseline == "mean" and self.samples < 2:
            raise ValueError(f"samples: the mean-of-others baseline needs at least 2 samples per image "
                             f"(got {self.samples}); use baseline: greedy for 1")
        return self


# ---------------------------------------------------------------------- generate
class GenerateParams(Section):
    """Caption generation with GPT-2 beam search (transformers' generate, KV cache)."""

    split: Literal["train", "val", "test"] = "test"
    batch_size: int = Field(32, ge=1)
    num_beams: int = Field(5, ge=1)
    max_new_tokens: int = Field(67, ge=1)
    length_penalty: float = 1.0
    no_repeat_ngram_size: int = Field(0, ge=0)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    seed: int = 0


# ---------------------------------------------------------------------- evaluate
class EvaluateParams(Section):
    """Scoring with pycocoevalcap and the HTML report."""

    spice: bool = False
    corenlp_dir: Optional[str] = Field(None, description="folder with Stanford CoreNLP jars for SPICE")
    baseline_candidates: int = Field(50, ge=1, description="most frequent training captions tried as the constant baseline")
    report_images: int = Field(200, ge=1, description="images shown in the HTML report")
    thumbnail_size: int = Field(128, ge=16)
    clipscore_model: Optional[str] = Field(
        None, description="folder of a whole CLIP (save_pretrained) for CLIPScore; null: the pinned CLIP")


# ------------------------------------------------------------------------ all
class Params(Section):
    data: DataParams = DataParams()
    download: DownloadParams = DownloadParams()
    clip: ClipParams = ClipParams()
    gpt: GptParams = GptParams()
    mapper: MapperParams = MapperParams()
    train: TrainParams = TrainParams()
    scst: ScstParams = ScstParams()
    generate: GenerateParams = GenerateParams()
    evaluate: EvaluateParams = EvaluateParams()

    @model_validator(mode="after")
    def _cross_check(self) -> "Params":
        # Only the demo GPT-2's width is known before loading a model; hub models are
        # checked by check_against_gpt() when the train stage has read their config.
        if self.gpt.model == DEMO:
            check_against_gpt(self.mapper, self.gpt.demo.n_embd)
        return self


def check_against_gpt(mapper: MapperParams, n_embd: int) -> None:
    """Refuse mapper settings that cannot work with a GPT-2 of width ``n_embd``."""
    if mapper.width is not None and mapper.width != n_embd:
        raise ParamsError(f"mapper.width: {mapper.width} does not match GPT-2's n_embd {n_embd}")
    if mapper.type == "transformer" and n_embd % mapper.heads:
        raise ParamsError(f"mapper.heads: {mapper.heads} does not divide GPT-2's n_embd {n_embd}")


def _format_errors(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"])
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        elif msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
            # A section validator names a key inside its message ("heads: ...").
            if ":" in msg.split(" ")[0]:
                key = f"{key}.{msg.split(':', 1)[0]}" if key else msg.split(":", 1)[0]
                msg = msg.split(":", 1)[1].strip()
        if isinstance(e.get("input"), (str, int, float, bool)) and e["type"] != "extra_forbidden":
            msg += f" (got {e['input']!r})"
        lines.append(f"{key or '<root>'}: {msg}")
    return "invalid params: " + "; ".join(lines)


def parse_params(raw: dict[str, Any]) -> Params:
    """Validate a params mapping; raise ParamsError naming every bad key."""
    if not isinstance(raw, dict):
        raise ParamsError("invalid params: the top level must be a mapping of sections")
    try:
        return Params.model_validate(raw)
    except ValidationError as err:
        raise ParamsError(_format_errors(err)) from None


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate params.yaml (a missing file gives every default)."""
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
