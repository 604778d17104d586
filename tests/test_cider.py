"""The one CIDEr-D: equal to pycocoevalcap's Cider (corpus, per image, fixed document
frequencies), and the in-process tokenizer equal to the Java PTB tokenizer."""
from __future__ import annotations

import random
import subprocess

import pytest
from pycocoevalcap.cider.cider import Cider

from tests.helpers.evaluate import REFERENCES, RESULTS

needs_java = pytest.mark.skipif(
    subprocess.run(["java", "-version"], capture_output=True).returncode != 0, reason="needs Java")

WORDS = "a the red blue cat dog sits on mat big small square circle two three of".split()


def _random_corpus(seed: int, images: int = 40):
    rng = random.Random(seed)
    sentence = lambda lo, hi: " ".join(rng.choices(WORDS, k=rng.randint(lo, hi)))  # noqa: E731
    gts = {i: [sentence(2, 11) for _ in range(rng.randint(1, 5))] for i in range(images)}
    res = {i: sentence(0, 9) for i in gts}  # some candidates are empty
    res[0] = gts[0][0]  # an exact match
    return gts, res


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_corpus_equals_pycocoevalcap(seed):
    from pipeline.text.cider import cider_d

    gts, res = _random_corpus(seed)
    theirs, theirs_per_image = Cider().compute_score(gts, {i: [c] for i, c in res.items()})
    ours, ours_per_image = cider_d(gts, res)
    assert abs(ours - theirs) < 1e-9
    assert len(ours_per_image) == len(gts)
    assert max(abs(a - b) for a, b in zip(ours_per_image, theirs_per_image)) < 1e-9
    assert max(theirs_per_image) > 1.0  # not a degenerate corpus of zeros


@needs_java
def test_corpus_equals_pycocoevalcap_on_real_captions():
    from pipeline.text.cider import cider_d
    from pipeline.evaluate.scores import tokenize_groups

    gts = tokenize_groups(REFERENCES)
    res = {k: v[0] for k, v in tokenize_groups({k: [c] for k, c in RESULTS.items()}).items()}
    theirs, per = Cider().compute_score(gts, {i: [c] for i, c in res.items()})
    ours, ours_per = cider_d(gts, res)
    assert abs(ours - theirs) < 1e-9 and max(abs(a - b) for a, b in zip(ours_per, per)) < 1e-9


def test_reward_with_training_document_frequencies_equals_pycocoevalcap():
    """Each of k samples of a training image, scored against that image's references with
    the training split's document frequencies, equals pycocoevalcap's per-image CIDEr-D in
    a corpus run over the whole training split where that sample is the image's caption."""
    from pipeline.text.cider import CiderD

    gts, _ = _random_corpus(5, images=25)
    rng = random.Random(7)
    samples = {i: [" ".join(rng.choices(WORDS, k=rng.randint(1, 9))) for _ in range(3)] for i in gts}
    scorer = CiderD(gts.values())
    refs = {i: scorer.vectors(gts[i]) for i in gts}
    images = [i for i in gts for _ in range(3)]
    ours = scorer.scores([s for i in gts for s in samples[i]], [refs[i] for i in images])
    for k in range(3):
        _, theirs = Cider().compute_score(gts, {i: [samples[i][k]] for i in gts})
        for n, i in enumerate(gts):
            assert abs(ours[n * 3 + k] - theirs[n]) < 1e-9


def test_constant_equals_pycocoevalcap():
    from pipeline.text.cider import CiderD

    gts, res = _random_corpus(3, images=20)
    candidates = list(res.values())[:6] + [""]
    groups = list(gts.values())
    fast = CiderD(groups).constant(candidates, groups)
    for caption, value in zip(candidates, fast):
        assert abs(value - Cider().compute_score(gts, {i: [caption] for i in gts})[0]) < 1e-9


def test_empty_references_are_refused():
    from pipeline.text.cider import CiderD

    with pytest.raises(ValueError):
        CiderD([])
    with pytest.raises(ValueError):
        CiderD([["a cat"]]).score("a cat", [])


COCO_STYLE = [
    "A man's dog (big) [red] {x} runs.", "Don't stop: we're here; they'll go!", 'He said "hi" -- ok...',
    "a cat's toy, 3.5 lbs & $5 a.m. Mr. Smith", "left-hand side/top", "it's 10:30 p.m.", "U.S.A. end.",
    "can't won't shan't ain't", "a <b>bold</b> move", "naïve café", "hello?? world!!", "e-mail @home #tag 50%",
    "o'clock", "a 'quoted' word", "well...yes", "cannot gonna gotta wanna", "x..", "A.", "end .", "dogs' toys",
    "1,000 people, 2 dogs", "a dog.cat", "St. Louis and Dr. Who", "the U.S. army.", "e.g. this", "a b. c",
    "I'm he'd you've", "a - b", "a ... b", "#1 #2", "x:y", "a;b", "hi , there", "no. 5", "T-shirt", "James'",
    "a 1950's car", "Two men, one with a hat.", "cat!?", "2.", "100-yard", "a+b", "a\\b", "a=b", "a.b.c",
    "end.\"", "\"start", "this is it. then that", "A man. A dog.", "he said: 'hi'", "a cat--dog", "...a",
    "don'T", "two dogs , sitting", "5.5.", "Co. ltd.", "the triangle is green &amp; big",
    "a café sign — naïve <b>bold</b> text", "A group of people standing around a kitchen.",
    "A giraffe standing next to a tree in a field", "a person riding a wave on top of a surfboard",
    "There is a plate of food on the table.", "Two zebras grazing in the grass.", "",
]


@needs_java
def test_fast_tokenizer_equals_java_on_demo_and_coco_style_captions():
    from pipeline.prepare.scenes import captions_for, scene_for
    from pipeline.text.tokenizer import fast_ptb_tokenize, ptb_tokenize

    # Every template and synonym of the demo: 6 captions each of 400 scenes.
    demo = sorted({c for i in range(400) for c in captions_for(scene_for(i, 3), 6, 3)})
    sentences = demo + COCO_STYLE
    java = ptb_tokenize(sentences)
    differ = [(s, j, fast_ptb_tokenize(s)) for s, j in zip(sentences, java) if fast_ptb_tokenize(s) != j]
    assert not differ, differ[:5]
    assert len(demo) > 1000
