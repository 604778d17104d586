"""Corpus and per-image caption metrics, computed by pycocoevalcap's own scorers.

Tokenization, BLEU (option "closest"), METEOR, ROUGE-L and CIDEr are exactly those
of ``COCOEvalCap.evaluate``, so the numbers equal it on the same files.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Hashable, Iterator, Mapping, Optional

from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.rouge.rouge import Rouge

from pipeline.evaluate.meteor import Meteor
from pipeline.text.tokenizer import ptb_tokenize

METRICS = ("bleu_1", "bleu_2", "bleu_3", "bleu_4", "meteor", "rouge_l", "cider")


@dataclass
class Scores:
    """Corpus metrics (flat names from METRICS) and the same metrics per image."""

    corpus: dict[str, float]
    per_image: dict[Hashable, dict[str, float]] = field(default_factory=dict)


def tokenize_groups(groups: Mapping[Hashable, list[str]], java: str = "java") -> dict[Hashable, list[str]]:
    """PTB-tokenize a mapping of id -> captions in one Java call, keeping its shape."""
    flat = [c for caps in groups.values() for c in caps]
    tokens = iter(ptb_tokenize(flat, java=java))
    return {k: [next(tokens) for _ in caps] for k, caps in groups.items()}


@contextlib.contextmanager
def _meteor_or(meteor: Optional[Meteor], java: str) -> Iterator[Meteor]:
    if meteor is not None:
        yield meteor
    else:
        with Meteor(java=java) as own:
            yield own


def score_tokenized(
    gts: Mapping[Hashable, list[str]],
    res: Mapping[Hashable, list[str]],
    meteor: Optional[Meteor] = None,
    java: str = "java",
) -> Scores:
    """Score tokenized candidates (one per image) against tokenized references.

    ``gts`` and ``res`` must have the same keys in the same order (the order sums run in).
    """
    if list(gts) != list(res):
        raise ValueError("references and candidates must cover the same images in the same order")
    ids = list(gts)
    per_image: dict[Hashable, dict[str, float]] = {i: {} for i in ids}
    corpus: dict[str, float] = {}

    def put(name: str, score: float, scores: object) -> None:
        corpus[name] = float(score)
        for i, s in zip(ids, scores):  # type: ignore[call-overload]
            per_image[i][name] = float(s)

    bleu, bleus = Bleu(4).compute_score(gts, res, verbose=0)
    for n in range(4):
        put(f"bleu_{n + 1}", bleu[n], bleus[n])
    with _meteor_or(meteor, java) as m:
        put("meteor", *m.compute_score(gts, res))
    put("rouge_l", *Rouge().compute_score(gts, res))
    put("cider", *Cider().compute_score(gts, res))
    return Scores(corpus=corpus, per_image=per_image)


def score_captions(
    references: Mapping[Hashable, list[str]],
    candidates: Mapping[Hashable, str],
    meteor: Optional[Meteor] = None,
    java: str = "java",
) -> Scores:
    """Tokenize and score raw captions: candidates' images, in the references' order."""
    ids = [i for i in references if i in candidates]
    missing = [i for i in candidates if i not in references]
    if missing:
        raise ValueError(f"candidates for images without references: {missing[:5]!r}")
    gts = tokenize_groups({i: list(references[i]) for i in ids}, java=java)
    res = tokenize_groups({i: [candidates[i]] for i in ids}, java=java)
    return score_tokenized(gts, res, meteor=meteor, java=java)
