"""CLIPScore and RefCLIPScore (Hessel et al. 2021): how well a caption fits its image.

- CLIP-S(c, v) = 2.5 * max(cos(E_img(v), E_txt("A photo depicts " + c)), 0)
- RefCLIP-S(c, R, v) = harmonic mean of CLIP-S(c, v) and
  max(max over r in R of cos(E_txt(prompt + c), E_txt(prompt + r)), 0)

as in the authors' code: both texts of the text-text cosine carry the prompt, every
embedding is L2-normalised, texts are cut at CLIP's context length. CLIP-S needs
no references, so it tells whether a caption is about *this* image even where the
references word things differently.

Images are read from the image tar shards and embedded with the embed stage's own
preprocessing and encoder (``pipeline.embed``), so they see exactly what the
features were made from; texts go through CLIP's text tower
(``pipeline.models.pretrained.load_clip_text``; for an open_clip folder, its
``encode_text`` and open_clip's tokenizer). A blank caption says nothing
about its image: it scores 0 (scoring the bare prompt would reward silence).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Hashable, Mapping, Optional, Sequence

import numpy as np
import torch
from tqdm import tqdm

log = logging.getLogger(__name__)
PROMPT = "A photo depicts "
WEIGHT = 2.5


# ---------------------------------------------------------------------- formulas
def clip_s(image: np.ndarray, caption: np.ndarray) -> np.ndarray:
    """Per row: 2.5 * max(cos, 0) of L2-normalised image and caption embeddings [N, D]."""
    return WEIGHT * np.clip(np.sum(image * caption, axis=1), 0.0, None)


def refclip_s(clip_scores: np.ndarray, caption: np.ndarray, references: Sequence[np.ndarray]) -> np.ndarray:
    """Harmonic mean of CLIP-S and the best clipped cosine of each caption to its references."""
    best = np.array([max(float(np.max(refs @ c)), 0.0) if len(refs) else 0.0
                     for c, refs in zip(caption, references)])
    total = clip_scores + best
    return np.where(total > 0, 2 * clip_scores * best / np.where(total > 0, total, 1.0), 0.0)


# --------------------------------------------------------------------- the model
@dataclass
class ClipScorer:
    """CLIP's two towers, loaded from one folder, embedding images and texts L2-normalised."""

    folder: Path
    encoder: object  # pipeline.embed.encoder.Encoder (image_embeds, normalised)
    preprocessor: object  # pipeline.embed.preprocess.Preprocessor
    text_model: object
    tokenizer: object
    device: torch.device
    batch_size: int = 64
    max_length: int = field(default=77)

    @classmethod
    def load(cls, folder: Path, device: Optional[torch.device] = None, batch_size: int = 64) -> "ClipScorer":
        from pipeline.embed.encoder import Encoder
        from pipeline.embed.preprocess import Preprocessor
        from pipeline.models.openclip import OpenClip
        from pipeline.models.pretrained import load_clip, load_clip_text
        from pipeline.core.runtime import choose_device

        device = device or choose_device("auto")
        vision, processor = load_clip(folder)
        # An open_clip model holds both towers: loaded once.
        text, tokenizer = (vision, vision.tokenizer()) if isinstance(vision, OpenClip) else load_clip_text(folder)
        encoder = Encoder.build(vision, device, "fp32", "image_embeds", normalize=True)
        if isinstance(text, OpenClip):
            limit = text.context_length
        else:
            limit = int(getattr(text.config, "max_position_embeddings", 77))
        return cls(Path(folder), encoder, Preprocessor.from_processor(processor, "processor"), text.to(device),
                   tokenizer, device, batch_size, limit)

    @torch.inference_mode()
    def texts(self, texts: Sequence[str]) -> np.ndarray:
        """[N, D] normalised embeddings of ``PROMPT + text`` (CLIPScore's prompt added here)."""
        from pipeline.models.openclip import OpenClip

        open_clip = isinstance(self.text_model, OpenClip)
        out = []
        for lo in range(0, len(texts), self.batch_size):
            batch = [PROMPT + t for t in texts[lo:lo + self.batch_size]]
            if open_clip:  # open_clip's tokenizer pads and cuts at the context length itself
                emb = self.text_model.model.encode_text(self.tokenizer(batch).to(self.device))
            else:
                enc = self.tokenizer(batch, padding=True, truncation=True, max_length=self.max_length,
                                     return_tensors="pt").to(self.device)
                emb = self.text_model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).text_embeds
            out.append(torch.nn.functional.normalize(emb.float(), dim=-1).cpu().numpy())
        dim = self.text_model.embed_dim if open_clip else int(self.text_model.config.projection_dim)
        return np.concatenate(out) if out else np.zeros((0, dim), np.float32)

    def images(self, images_dir: Path, keys: Sequence[str]) -> dict[str, np.ndarray]:
        """Normalised image embeddings of the wanted keys found in the image tar shards."""
        from pipeline.embed.preprocess import ImageDecodeError
        from pipeline.formats.image_shards import ImageShardError, iter_shard, list_shards

        wanted = set(keys)
        found: dict[str, np.ndarray] = {}
        pending: list[tuple[str, torch.Tensor]] = []

        def flush() -> None:
            if pending:
                pixels = self.preprocessor.normalize(torch.stack([p for _, p in pending]))
                vectors = self.encoder(pixels).cpu().numpy()
                found.update({k: v for (k, _), v in zip(pending, vectors)})
                pending.clear()

        for shard in tqdm(list_shards(images_dir), desc="clipscore images", unit="shard"):
            if len(found) + len(pending) == len(wanted):
                break
            try:
                for sample in iter_shard(shard):
                    key = sample.key if sample.key in wanted else sample.key.rpartition("/")[2]
                    if key not in wanted or key in found or any(k == key for k, _ in pending):
                        continue
                    try:
                        pending.append((key, self.preprocessor.to_uint8(sample.image)))
                    except ImageDecodeError as err:
                        log.warning("clipscore: image %s skipped (%s)", key, err)
                    if len(pending) == self.batch_size:
                        flush()
            except ImageShardError as err:
                log.warning("clipscore: skipping %s (%s)", shard, err)
        flush()
        return found


# -------------------------------------------------------------------- the scores
@dataclass
class ClipScores:
    """Corpus means and per-image scores of one caption set."""

    clip_s: float
    refclip_s: float
    per_image: dict[Hashable, dict[str, float]]


def score_sets(
    scorer: ClipScorer,
    image_embeddings: Mapping[Hashable, np.ndarray],
    references: Mapping[Hashable, Sequence[str]],
    sets: Mapping[str, Mapping[Hashable, str]],
) -> dict[str, ClipScores]:
    """CLIP-S and RefCLIP-S of each caption set, over the images that have an embedding.

    Every distinct text (captions of all sets, references) is embedded once.
    """
    texts = sorted({t for captions in sets.values() for t in captions.values() if t.strip()}
                   | {r for i in references for r in references[i]})
    table = dict(zip(texts, scorer.texts(texts)))
    out: dict[str, ClipScores] = {}
    for name, captions in sets.items():
        ids = [i for i in captions if i in image_embeddings]
        if not ids:
            continue
        dim = next(iter(image_embeddings.values())).shape[0]
        blank = np.array([not captions[i].strip() for i in ids])
        # float64 from here: the means are sums of hundreds or thousands of scores.
        cap = np.stack([np.zeros(dim) if b else table[captions[i]] for i, b in zip(ids, blank)]).astype(np.float64)
        img = np.stack([image_embeddings[i] for i in ids]).astype(np.float64)
        refs = [np.stack([table[r] for r in references[i]]).astype(np.float64) if references[i]
                else np.zeros((0, dim)) for i in ids]
        s = clip_s(img, cap)
        r = refclip_s(s, cap, refs)
        out[name] = ClipScores(
            clip_s=float(s.mean()), refclip_s=float(r.mean()),
            per_image={i: {"clip_s": float(a), "refclip_s": float(b)} for i, a, b in zip(ids, s, r)},
        )
    return out


def clipscore_unavailable(folder: Optional[Path], images_dir: Optional[Path]) -> Optional[str]:
    """Why CLIPScore cannot be computed here, or None."""
    from pipeline.models.pretrained import clip_text_missing

    if folder is None:
        return "no CLIP folder given"
    if not Path(folder).is_dir():
        return f"CLIP folder not found: {folder}"
    reason = clip_text_missing(Path(folder))
    if reason is not None:
        return reason + " (set evaluate.clipscore_model to a whole CLIP)"
    if images_dir is None:
        return "no image folder given (CLIP-S compares each caption with its image)"
    if not Path(images_dir).is_dir():
        return f"image folder not found: {images_dir}"
    return None
