"""Benchmark of self-critical training's reward: CIDEr-D of sampled captions in the loop.

A COCO-sized training split is simulated: --images images x 5 references of 8-14
words over an 800-word vocabulary (COCO-like lengths and a long tail). Each step
scores --batch images x --samples sampled captions against their image's references.
In one run it measures, on the same batches:
  (a) ours: pipeline.text.cider.CiderD with document frequencies from the whole
      training split (computed once), references turned into vectors per batch, and
      candidates tokenized by fast_ptb_tokenize;
  (b) the reference way: one pycocoevalcap Cider().compute_score call per batch
      (which recounts document frequencies from that batch's references) on
      candidates tokenized by the Java PTB tokenizer (one call per batch);
  (c) the same as (a) but the CIDEr-D of (b)'s definition: df from the batch, to show
      the scores are pycocoevalcap's (max difference printed).
The last line printed is a JSON object.

    python bench/scst_reward.py [--images 20000] [--batch 50] [--samples 5] [--steps 20]
"""
from __future__ import annotations

import argparse
import json
import random
import time

from pycocoevalcap.cider.cider import Cider

from pipeline.text.cider import CiderD
from pipeline.text.tokenizer import fast_ptb_tokenize, ptb_tokenize


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=20000)
    ap.add_argument("--batch", type=int, default=50)
    ap.add_argument("--samples", type=int, default=5)
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args()
    rng = random.Random(0)
    words = [f"w{n}" for n in range(800)]

    def sentence() -> str:
        return " ".join(rng.choices(words[: rng.choice([50, 200, 800])], k=rng.randint(8, 14)))

    refs = [[sentence() for _ in range(5)] for _ in range(args.images)]
    t = time.perf_counter()
    scorer = CiderD(refs)
    t_df = time.perf_counter() - t
    batches = []
    for _ in range(args.steps):
        images = rng.sample(range(args.images), args.batch)
        owners = [i for i in images for _ in range(args.samples)]
        # Raw text as a captioner writes it: capitals and a full stop.
        batches.append((owners, [sentence().capitalize() + "." for _ in owners]))
    n = args.steps * args.batch * args.samples

    t = time.perf_counter()
    for owners, captions in batches:
        vecs = {i: scorer.vectors(refs[i]) for i in set(owners)}
        scorer.scores([fast_ptb_tokenize(c) for c in captions], [vecs[i] for i in owners])
    t_ours = time.perf_counter() - t

    t = time.perf_counter()
    diff = 0.0
    for owners, captions in batches:
        tokens = ptb_tokenize(captions)
        gts = {k: refs[i] for k, i in enumerate(owners)}
        _, theirs = Cider().compute_score(gts, {k: [tok] for k, tok in enumerate(tokens)})
        ours = CiderD(gts.values()).corpus(gts, dict(enumerate(tokens)))[1]
        diff = max(diff, float(abs(ours - theirs).max()))
    t_ref = time.perf_counter() - t  # includes (c); measured below and subtracted
    t = time.perf_counter()
    for owners, captions in batches:
        tokens = [fast_ptb_tokenize(c) for c in captions]
        gts = {k: refs[i] for k, i in enumerate(owners)}
        CiderD(gts.values()).corpus(gts, dict(enumerate(tokens)))
    t_c = time.perf_counter() - t
    t_ref -= t_c

    print(f"training split: {args.images} images x 5 refs; document frequencies once: {t_df:.2f} s")
    print(f"{args.steps} steps of {args.batch} images x {args.samples} samples = {n} captions")
    print(f"(a) ours (CiderD, training df, fast tokenizer): {t_ours:.3f} s, {n / t_ours:.0f} captions/s, "
          f"{1000 * t_ours / args.steps:.1f} ms per step")
    print(f"(b) pycocoevalcap Cider + Java PTB per batch: {t_ref:.3f} s, {n / t_ref:.0f} captions/s, "
          f"{1000 * t_ref / args.steps:.1f} ms per step")
    print(f"speed-up {t_ref / t_ours:.1f}x; (c) our CIDEr-D with the batch's df vs pycocoevalcap: "
          f"max |diff| {diff:.1e}")
    print(json.dumps({"captions": n, "ours_s": round(t_ours, 3), "reference_s": round(t_ref, 3),
                      "ours_captions_per_s": round(n / t_ours), "reference_captions_per_s": round(n / t_ref),
                      "ratio": round(t_ref / t_ours, 2), "df_seconds": round(t_df, 2), "max_diff": diff}))


if __name__ == "__main__":
    main()
