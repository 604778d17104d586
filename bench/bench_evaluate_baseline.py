"""Constant-caption baseline: ranking K candidates with one pass vs K pycocoevalcap Cider calls.

Run: python bench/bench_evaluate_baseline.py [--images 2000] [--candidates 20]
Prints both times, the ratio, and the largest score difference (should be ~1e-15).
"""
from __future__ import annotations

import argparse
import random
import time

from pycocoevalcap.cider.cider import Cider

from pipeline.evaluate.baseline import constant_ciders


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--refs", type=int, default=5)
    ap.add_argument("--candidates", type=int, default=20)
    args = ap.parse_args()
    rng = random.Random(0)
    words = [f"w{n}" for n in range(800)]  # a COCO-like vocabulary tail
    sentence = lambda: " ".join(rng.choices(words[: rng.choice([50, 200, 800])], k=rng.randint(8, 14)))
    gts = {i: [sentence() for _ in range(args.refs)] for i in range(args.images)}
    candidates = [sentence() for _ in range(args.candidates)]

    t0 = time.perf_counter()
    ours = constant_ciders(candidates, gts)
    t_ours = time.perf_counter() - t0
    t0 = time.perf_counter()
    ref = [Cider().compute_score(gts, {i: [c] for i in gts})[0] for c in candidates]
    t_ref = time.perf_counter() - t0
    diff = max(abs(a - b) for a, b in zip(ours, ref))
    print(f"{args.images} images x {args.refs} refs, {args.candidates} candidates")
    print(f"constant_ciders: {t_ours:.2f} s; pycocoevalcap Cider per candidate: {t_ref:.2f} s; "
          f"speed-up {t_ref / t_ours:.1f}x; max |diff| {diff:.1e}")


if __name__ == "__main__":
    main()
