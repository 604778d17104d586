"""Captioning image files with a trained captioner (``capline caption``).

Images are embedded exactly as the embed stage did for the training features: the
same CLIP folder (checked against the model id and revision in captioner.json),
the same preprocessing (checked against the recorded settings), output kind,
normalisation and precision. A bad image gets an error line; the others are still
captioned.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from pipeline.errors import CaplineError
from pipeline.models.captioner import ClipCaptioner
from pipeline.runtime import PRECISION_OF_DTYPE_NAME, choose_device, choose_precision


class CaptionInputError(CaplineError):
    """The CLIP folder given to caption does not match what the model was trained on."""


@dataclass
class CaptionResult:
    path: str
    captions: list[str] = field(default_factory=list)
    error: Optional[str] = None

    def as_dict(self) -> dict:
        return {"path": self.path, "captions": self.captions} if self.error is None else \
            {"path": self.path, "error": self.error}


@dataclass(frozen=True)
class CaptionOptions:
    num_beams: int = 5
    max_new_tokens: int = 30
    length_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    num_captions: int = 1
    sample: bool = False  # sampling (temperature, top_p) instead of beam search
    temperature: float = 1.0
    top_p: float = 0.9
    batch_size: int = 16
    seed: int = 0

    def generate_kwargs(self) -> dict:
        if self.sample or self.num_captions > 1:
            # Several captions of one image come from sampling: beams would be near-copies.
            return {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p, "num_beams": 1,
                    "num_return_sequences": self.num_captions, "max_new_tokens": self.max_new_tokens}
        return {"num_beams": self.num_beams, "max_new_tokens": self.max_new_tokens, "early_stopping": True,
                "length_penalty": self.length_penalty, "no_repeat_ngram_size": self.no_repeat_ngram_size}


class ImageEmbedder:
    """CLIP as the training features were made, from the recorded settings."""

    def __init__(self, clip_dir: Path, features: dict, device: torch.device) -> None:
        from pipeline.embed.encoder import Encoder
        from pipeline.embed.preprocess import Preprocessor
        from pipeline.models.pretrained import load_clip, model_identity

        clip_dir = Path(clip_dir)
        model_id, revision = model_identity(clip_dir)
        for key, got in (("model_id", model_id), ("model_revision", revision)):
            want = features.get(key)
            if want is not None and want != got:
                raise CaptionInputError(f"--clip {clip_dir}: {key} is {got!r} but the captioner was trained on "
                                 f"features of {want!r}")
        model, processor = load_clip(clip_dir)
        recorded = _json_or_none(features.get("preprocess"))
        mode = (recorded or {}).get("mode", "processor")
        self.pre = Preprocessor.from_processor(processor, mode)
        if recorded is not None and json.loads(self.pre.describe()) != recorded:
            raise CaptionInputError(f"--clip {clip_dir}: its preprocessing {self.pre.describe()} differs from the one the "
                             f"training features recorded {features.get('preprocess')}")
        # The precision the features were made in, where this device runs it.
        precision = PRECISION_OF_DTYPE_NAME.get(str(features.get("dtype")), "auto")
        if precision == "fp16" and device.type not in ("cuda", "mps"):
            precision = "fp32"
        self.encoder = Encoder.build(model, device, choose_precision(precision, device),
                                     str(features.get("output", "image_embeds")),
                                     bool(features.get("normalized", True)))

    @property
    def dim(self) -> int:
        return self.encoder.dim

    def __call__(self, pixels_uint8: list[torch.Tensor]) -> torch.Tensor:
        batch = self.pre.normalize(torch.stack(pixels_uint8).to(self.encoder.device))
        return self.encoder(batch)


def caption_images(model_dir: str | Path, clip_dir: str | Path, images: list[str | Path],
                   options: CaptionOptions = CaptionOptions(), progress: bool = False,
                   device: str = "auto") -> list[CaptionResult]:
    """Captions for image files, in input order; unreadable images carry an error instead."""
    from tqdm import tqdm

    from pipeline.embed.preprocess import ImageDecodeError

    device = choose_device(device, key="--device")
    model = ClipCaptioner.load(model_dir, device=device)
    embedder = ImageEmbedder(Path(clip_dir), model.features, device)
    if embedder.dim != model.clip_dim:
        raise CaptionInputError(f"--clip {clip_dir}: gives {embedder.dim}-wide vectors, the model expects {model.clip_dim}")
    torch.manual_seed(options.seed)
    results = [CaptionResult(str(p)) for p in images]
    kwargs = options.generate_kwargs()
    per_image = kwargs.get("num_return_sequences", 1)
    for lo in tqdm(range(0, len(results), options.batch_size), desc="caption", unit="batch", disable=not progress):
        chunk = results[lo:lo + options.batch_size]
        ok, pixels = [], []
        for r in chunk:
            try:
                pixels.append(embedder.pre.to_uint8(Path(r.path).read_bytes()))
                ok.append(r)
            except (OSError, ImageDecodeError) as err:
                r.error = str(err) if isinstance(err, ImageDecodeError) else f"cannot read: {err.strerror or err}"
        if not ok:
            continue
        with torch.inference_mode():
            vectors = embedder(pixels)
            texts = model.caption(vectors, **kwargs)
        for i, r in enumerate(ok):
            r.captions = texts[i * per_image:(i + 1) * per_image]
    return results


def _json_or_none(text) -> Optional[dict]:
    if not text:
        return None
    try:
        value = json.loads(text)
    except (TypeError, json.JSONDecodeError):
        return None
    return value if isinstance(value, dict) and value else None
