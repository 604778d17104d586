"""The constant-caption baseline: the best single caption given for every image.

A captioner that ignores its image can still score well by always saying the most
"typical" caption. The baseline is the training caption, among the most frequent
ones, whose CIDEr is highest when given for every test image; a model worth having
beats it clearly.

Ranking K candidates with pycocoevalcap's Cider would rebuild the reference
vectors K times; ``constant_ciders`` builds them once and scores every candidate
with the same formula (vectorised), and the chosen caption is then scored by the
real scorers.
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from typing import Hashable, Iterable, Mapping

import numpy as np
from pycocoevalcap.cider.cider_scorer import precook

_SPACE = re.compile(r"\s+")
N = 4  # CIDEr-D sums 1..4-grams
SIGMA = 6.0  # pycocoevalcap's length-penalty width


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
    refs = [r for caps in gts.values() for r in caps]
    owner = np.repeat(np.arange(len(gts)), [len(caps) for caps in gts.values()])
    n_refs = np.array([len(caps) for caps in gts.values()], dtype=np.float64)
    cooked = [precook(r, N) for r in refs]
    # Document frequency: in how many images' reference sets an n-gram occurs.
    df: Counter = Counter()
    start = 0
    for caps in gts.values():
        df.update({g for c in cooked[start:start + len(caps)] for g in c})
        start += len(caps)
    ref_len = np.log(float(len(gts)))

    def tfidf(counts: dict) -> tuple[dict, np.ndarray, int]:
        vec, norm, length = {}, np.zeros(N), 0
        for gram, tf in counts.items():
            v = float(tf) * (ref_len - np.log(max(1.0, df.get(gram, 0.0))))
            vec[gram] = v
            norm[len(gram) - 1] += v * v
            if len(gram) == 2:  # pycocoevalcap's quirk: "length" counts bigrams
                length += tf
        return vec, np.sqrt(norm), length

    index: dict[tuple, tuple[list[int], list[float]]] = {}
    norm_ref = np.zeros((len(refs), N))
    len_ref = np.zeros(len(refs))
    for r, counts in enumerate(cooked):
        vec, norm_ref[r], len_ref[r] = tfidf(counts)
        for gram, v in vec.items():
            rows, vals = index.setdefault(gram, ([], []))
            rows.append(r)
            vals.append(v)
    inverted = {g: (np.array(rows), np.array(vals)) for g, (rows, vals) in index.items()}

    out = np.zeros(len(candidate_tokens))
    for c, tokens in enumerate(candidate_tokens):
        vec, norm_hyp, len_hyp = tfidf(precook(tokens, N))
        val = np.zeros((len(refs), N))
        for gram, h in vec.items():
            if gram in inverted:
                rows, vals = inverted[gram]
                val[rows, len(gram) - 1] += np.minimum(h, vals) * vals
        denom = norm_hyp[None, :] * norm_ref
        val = np.where(denom != 0, val / np.where(denom != 0, denom, 1.0), val)
        val *= np.exp(-((len_hyp - len_ref) ** 2) / (2 * SIGMA**2))[:, None]
        per_image = np.bincount(owner, weights=val.mean(axis=1), minlength=len(gts)) / n_refs * 10.0
        out[c] = per_image.mean()
    return out


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
