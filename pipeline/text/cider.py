"""CIDEr-D, one implementation for the whole pipeline.

The formula is pycocoevalcap's ``CiderScorer`` (Vedantam et al. 2015, the "D"
variant every COCO paper reports): each caption becomes tf-idf vectors of its 1- to
4-grams; a candidate's score against one reference is, per n, the cosine of the
clipped vectors (``min(hyp, ref) * ref`` summed over the candidate's n-grams),
times a Gaussian penalty on the length difference (sigma 6); the four are averaged,
averaged over the references and multiplied by 10. Two of pycocoevalcap's quirks are
kept on purpose, so that scores are equal to 1e-9: the "length" is the number of
bigrams, and the penalty also applies when a norm is zero.

What differs is only how the work is organised. pycocoevalcap recounts the
document frequencies (in how many images' reference sets an n-gram occurs) on
every call, from the very references it scores. ``CiderD`` takes them once from a
corpus of reference groups and then scores any candidate against any references:

- evaluation (pycocoevalcap's definition): the corpus is the scored images'
  references, ``CiderD(gts.values()).corpus(gts, res)``;
- self-critical training's reward: the corpus is the training split, and each
  sampled caption is scored against its own image's references, in the loop;
- the constant-caption baseline: one caption against every image
  (``constant``, vectorised over the references with an inverted index).

Inputs are tokenized captions (space-separated tokens, as pycocoevalcap's PTB
tokenizer leaves them).
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Hashable, Iterable, Mapping, Sequence

import numpy as np

N = 4  # CIDEr-D sums 1..4-grams
SIGMA = 6.0  # width of the length penalty

Gram = tuple[str, ...]


def ngram_counts(tokens: str, n: int = N) -> Counter:
    """Counts of the 1..n-grams of a tokenized caption (pycocoevalcap's ``precook``)."""
    words = tokens.split()
    counts: Counter = Counter()
    for k in range(1, n + 1):
        counts.update(zip(*(words[i:] for i in range(k))))  # the k-grams, in order (C speed)
    return counts


@dataclass(frozen=True)
class Vector:
    """A caption's tf-idf weights, the norm per n-gram order and its "length" (bigram count)."""

    weights: dict[Gram, float]
    norms: tuple[float, ...]
    length: int


class CiderD:
    """CIDEr-D with document frequencies fixed from ``reference_groups`` (one group per image)."""

    def __init__(self, reference_groups: Iterable[Sequence[str]], n: int = N, sigma: float = SIGMA) -> None:
        self.n = n
        self.sigma = sigma
        df: Counter = Counter()
        images = 0
        for group in reference_groups:
            images += 1
            df.update({g for ref in group for g in ngram_counts(ref, n)})
        if images == 0:
            raise ValueError("CIDEr-D needs at least one group of references for its document frequencies")
        self.images = images
        # idf of an n-gram = log(images) - log(df); an n-gram no reference holds counts as df 1.
        self.log_images = math.log(float(images))
        self._log_df = {g: math.log(float(c)) for g, c in df.items()}

    # ------------------------------------------------------------------ vectors
    def vector(self, tokens: str) -> Vector:
        """tf-idf vector of a tokenized caption; unseen n-grams get df 1 (idf = log(images))."""
        weights: dict[Gram, float] = {}
        norms = [0.0] * self.n
        length = 0
        log_df = self._log_df
        for gram, tf in ngram_counts(tokens, self.n).items():
            w = float(tf) * (self.log_images - log_df.get(gram, 0.0))
            weights[gram] = w
            norms[len(gram) - 1] += w * w
            if len(gram) == 2:  # pycocoevalcap's "length": the number of bigrams
                length += tf
        return Vector(weights, tuple(math.sqrt(x) for x in norms), length)

    def vectors(self, captions: Iterable[str]) -> list[Vector]:
        return [self.vector(c) for c in captions]

    # ------------------------------------------------------------------ scoring
    def score(self, candidate: str | Vector, references: Sequence[Vector]) -> float:
        """CIDEr-D of one candidate against one image's references (already vectors)."""
        if not references:
            raise ValueError("CIDEr-D of a candidate needs at least one reference")
        hyp = candidate if isinstance(candidate, Vector) else self.vector(candidate)
        hw = hyp.weights
        total = [0.0] * self.n
        two_sigma2 = 2 * self.sigma ** 2
        for ref in references:
            rw = ref.weights
            # Only shared n-grams add to the dot product. math.fsum is exact, so the sum
            # does not depend on the (hash-seeded) order of the set intersection.
            parts: list[list[float]] = [[] for _ in range(self.n)]
            for gram in hw.keys() & rw.keys():
                r = rw[gram]
                parts[len(gram) - 1].append(min(hw[gram], r) * r)
            penalty = math.exp(-float(hyp.length - ref.length) ** 2 / two_sigma2)
            for k in range(self.n):
                val = math.fsum(parts[k])
                if hyp.norms[k] != 0 and ref.norms[k] != 0:
                    val /= hyp.norms[k] * ref.norms[k]
                total[k] += val * penalty
        return sum(total) / self.n / len(references) * 10.0

    def scores(self, candidates: Sequence[str | Vector], references: Sequence[Sequence[Vector]]) -> np.ndarray:
        """Score candidate i against references[i] (e.g. k samples of one image share its list)."""
        if len(candidates) != len(references):
            raise ValueError(f"{len(candidates)} candidates but {len(references)} reference lists")
        return np.array([self.score(c, r) for c, r in zip(candidates, references)], dtype=np.float64)

    def corpus(self, gts: Mapping[Hashable, Sequence[str]], res: Mapping[Hashable, str]) -> tuple[float, np.ndarray]:
        """(mean, per image) over ``gts``' images, in its order, as pycocoevalcap's Cider gives them.

        Equal to ``Cider().compute_score(gts, {i: [res[i]]})`` when this object was made
        from ``gts.values()`` (pycocoevalcap's document frequencies).
        """
        per_image = np.array([self.score(res[i], self.vectors(refs)) for i, refs in gts.items()], dtype=np.float64)
        return float(per_image.mean()) if len(per_image) else float("nan"), per_image

    def constant(self, candidates: Sequence[str], groups: Sequence[Sequence[str]]) -> np.ndarray:
        """Mean CIDEr-D of each candidate when it is given for every image of ``groups``.

        The same formula as ``score``, organised for one caption against all
        references at once: the references are turned into vectors once, and each
        candidate touches only the references that share one of its n-grams.
        """
        n = self.n
        refs = [r for group in groups for r in group]
        owner = np.repeat(np.arange(len(groups)), [len(g) for g in groups])
        n_refs = np.array([len(g) for g in groups], dtype=np.float64)
        index: dict[Gram, tuple[list[int], list[float]]] = {}
        norm_ref = np.zeros((len(refs), n))
        len_ref = np.zeros(len(refs))
        for r, tokens in enumerate(refs):
            vec = self.vector(tokens)
            norm_ref[r], len_ref[r] = vec.norms, vec.length
            for gram, v in vec.weights.items():
                rows, vals = index.setdefault(gram, ([], []))
                rows.append(r)
                vals.append(v)
        inverted = {g: (np.array(rows), np.array(vals)) for g, (rows, vals) in index.items()}

        out = np.zeros(len(candidates))
        for c, tokens in enumerate(candidates):
            hyp = self.vector(tokens)
            val = np.zeros((len(refs), n))
            for gram, h in hyp.weights.items():
                if gram in inverted:
                    rows, vals = inverted[gram]
                    val[rows, len(gram) - 1] += np.minimum(h, vals) * vals
            denom = np.asarray(hyp.norms)[None, :] * norm_ref
            val = np.where(denom != 0, val / np.where(denom != 0, denom, 1.0), val)
            val *= np.exp(-((hyp.length - len_ref) ** 2) / (2 * self.sigma ** 2))[:, None]
            per_image = np.bincount(owner, weights=val.mean(axis=1), minlength=len(groups)) / n_refs * 10.0
            out[c] = per_image.mean()
        return out


def cider_d(gts: Mapping[Hashable, Sequence[str]], res: Mapping[Hashable, str]) -> tuple[float, np.ndarray]:
    """pycocoevalcap's corpus CIDEr-D (document frequencies from ``gts``), mean and per image."""
    return CiderD(gts.values()).corpus(gts, res)
