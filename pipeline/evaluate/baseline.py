"""The constant-caption baseline: the best single caption given for every image.

A captioner that ignores its image can still score well by always saying the most
"typical" caption. The baseline is the training caption, among the most frequent
ones, whose CIDEr is highest when given for every test image; a model worth having
beats it clearly.

Ranking K candidates with pycocoevalcap's Cider would rebuild the reference
vectors K times; ``constant_ciders`` builds them once and scores every candidate
with the same formula (``pipeline.text.cider``, vectorised), and the chosen
caption is then scored by the real scorers.
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from typing import Hashable, Iterable, Mapping

import numpy as np

from pipeline.text.cider import CiderD

_SPACE = re.compile(r"\s+")


def normalise_caption(text: str) -> str:
    """Lower case, single spaces, no trailing full stop: how duplicates are counted."""
    return _SPACE.sub(" ", text.lower()).strip().rstrip(" .").strip()


def frequent_captions(captions: Iterable[str], k: int) -> list[str]:
    """The k most frequent captions after normalisation (ties: first seen), each in its commonest spelling."""
    counts: Counter[str] = Counter()
    spellings: dict[str, Counter[str]] = {}
    for caption in captions:
        key = normalise_caption(caption)
        if not key:
            continue
        counts[key] += 1
        spellings.setdefault(key, Counter())[caption.strip()] += 1
    # Counter.most_common keeps first-seen order among equal counts.
    return [spellings[key].most_common(1)[0][0] for key, _ in counts.most_common(k)]


@dataclass(frozen=True)
class Baseline:
    caption: str
    cider: float  # as ranked by constant_ciders (pycocoevalcap's formula)
    candidates: list[tuple[str, float]]  # every candidate tried, with its CIDEr


def constant_ciders(candidate_tokens: list[str], gts: Mapping[Hashable, list[str]]) -> np.ndarray:
    """Corpus CIDEr of each tokenized candidate when given for every image of ``gts`` (tokenized)."""
    groups = list(gts.values())
    return CiderD(groups).constant(candidate_tokens, groups)


def best_constant_caption(
    candidates: list[str], candidate_tokens: list[str], gts: Mapping[Hashable, list[str]]
) -> Baseline:
    """Pick the candidate with the highest constant-caption CIDEr (ties: the more frequent)."""
    if not candidates:
        raise ValueError("no candidate captions for the constant baseline")
    ciders = constant_ciders(candidate_tokens, gts)
    best = int(np.argmax(ciders))
    return Baseline(
        caption=candidates[best],
        cider=float(ciders[best]),
        candidates=[(c, float(s)) for c, s in zip(candidates, ciders)],
    )


def constant_caption_baseline(
    captions: list[str], references: Mapping[Hashable, list[str]], k: int = 50, java: str = "java"
) -> Baseline:
    """Best constant caption among the k most frequent of ``captions`` (raw text) for raw references."""
    from pipeline.evaluate.scores import tokenize_groups

    candidates = frequent_captions(captions, k)
    gts = tokenize_groups({i: list(caps) for i, caps in references.items()}, java=java)
    tokens = tokenize_groups({"c": candidates}, java=java)["c"] if candidates else []
    return best_constant_caption(candidates, tokens, gts)
