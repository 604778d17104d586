"""SCST's rewards: CIDEr-D of sampled captions against their image's references, and the baselines.

* ``Split``: one split's image vectors and references (raw and PTB-tokenized once, in
  Java, as the evaluation does).
* ``Reward``: CIDEr-D of captions (``fast_ptb_tokenize``d) against their training
  image's references, document frequencies from the training split (the pipeline's
  one CIDEr-D, ``pipeline.text.cider``).
* ``advantages``: reward minus the mean of the image's other samples, or minus its
  greedy caption's reward; ``caption_mask``: the tokens a caption's log-probability sums.
* ``corpus_cider``: validation CIDEr-D (pycocoevalcap's, val document frequencies).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from pipeline.text.cider import CiderD, Vector
from pipeline.text.tokenizer import fast_ptb_tokenize


@dataclass
class Split:
    """One split's image vectors and references (raw and PTB-tokenized)."""

    vectors: torch.Tensor  # [images, D]
    references: list[list[str]]
    tokenized: list[list[str]]

    def __len__(self) -> int:
        return len(self.references)


def split_rows(table, select: np.ndarray) -> list[int]:
    """The selected rows that have a non-blank reference (the rows ``load_split`` keeps)."""
    return [int(i) for i in np.flatnonzero(select) if any(c and c.strip() for c in table.captions[i])]


def load_split(table, select: np.ndarray) -> tuple[torch.Tensor, list[list[str]]]:
    """Vectors (patch tokens: kept fp16, as stored; the model casts them) and non-blank
    references of the selected rows that have any."""
    rows = split_rows(table, select)
    dtype = np.float32 if table.embeddings.ndim == 2 else table.embeddings.dtype
    vectors = torch.from_numpy(np.ascontiguousarray(table.embeddings[rows], dtype=dtype)) if rows \
        else torch.zeros((0, *table.embeddings.shape[1:]))
    return vectors, [[c for c in table.captions[i] if c and c.strip()] for i in rows]


def tokenize_references(groups: list[list[str]], java: str) -> list[list[str]]:
    """PTB-tokenize every reference in one Java call (exactly as the evaluation does)."""
    from pipeline.text.tokenizer import ptb_tokenize

    flat = iter(ptb_tokenize([c for group in groups for c in group], java=java))
    return [[next(flat) for _ in group] for group in groups]


class Reward:
    """CIDEr-D of captions against their image's training references (training-split df)."""

    def __init__(self, train: Split) -> None:
        self.train = train
        self.cider = CiderD(train.tokenized)
        self.seconds = 0.0
        self.scored = 0

    def __call__(self, captions: list[str], images: list[int]) -> np.ndarray:
        """Reward of caption i (raw text) for training image images[i]."""
        started = time.perf_counter()
        refs: dict[int, list[Vector]] = {i: self.cider.vectors(self.train.tokenized[i]) for i in set(images)}
        out = self.cider.scores([fast_ptb_tokenize(c) for c in captions], [refs[i] for i in images])
        self.seconds += time.perf_counter() - started
        self.scored += len(captions)
        return out


def advantages(rewards: np.ndarray, samples: int, baseline: Optional[np.ndarray] = None) -> np.ndarray:
    """reward - baseline for rewards [images * samples] (an image's samples adjacent).

    ``baseline`` [images] (the greedy captions' rewards) or, when None, the mean of
    each image's other samples: b_ij = (sum_k r_ik - r_ij) / (samples - 1).
    """
    r = rewards.reshape(-1, samples)
    if baseline is None:
        if samples < 2:
            raise ValueError("the mean-of-others baseline needs at least 2 samples per image")
        b = (r.sum(axis=1, keepdims=True) - r) / (samples - 1)
    else:
        b = np.repeat(np.asarray(baseline, dtype=np.float64)[:, None], samples, axis=1)
    return (r - b).reshape(-1)


def caption_mask(ids: torch.Tensor, eos_id: int) -> torch.Tensor:
    """1 for each token up to and including the first EOS of its row (all of a row without one)."""
    is_eos = (ids == eos_id).long()
    before = is_eos.cumsum(dim=1) - is_eos  # EOS tokens strictly before each position
    return (before == 0).long()


def corpus_cider(captions: list[str], val: Split) -> float:
    """Corpus CIDEr-D of one caption per val image (document frequencies from the val references)."""
    scorer = CiderD(val.tokenized)
    per_image = [scorer.score(fast_ptb_tokenize(c), scorer.vectors(refs)) for c, refs in zip(captions, val.tokenized)]
    return float(np.mean(per_image))



def tokenizer_agreement(captions: list[str], java: str) -> Optional[float]:
    """Share of captions that fast_ptb_tokenize splits exactly as the Java PTB tokenizer."""
    from pipeline.text.tokenizer import ptb_tokenize

    if not captions:
        return None
    java_tokens = ptb_tokenize(captions, java=java)
    return sum(fast_ptb_tokenize(c) == t for c, t in zip(captions, java_tokens)) / len(captions)
