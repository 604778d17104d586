"""Benchmark of the retrieve search against a brute-force numpy top-k.

A random datastore of unit vectors (``--size`` captions of width ``--dim``; with
``--clusters C`` drawn around C centres, closer to real text embeddings) and
``--queries`` random unit queries. In one run it measures:
  (a) the exact index retrieve uses (IndexFlatIP via pipeline.retrieval.index):
      build seconds, queries/s for the ``--candidates`` nearest;
  (b) numpy: the matrix product of a query batch with the datastore, then
      argpartition and a sort of the candidates: queries/s, and (a)'s agreement;
  (c) the IVF index (IndexIVFFlat, ``--nlist``/``--nprobe``; null nlist = the
      stage's default 4 x sqrt(size)): build seconds (training + adding), queries/s,
      recall@k and recall@candidates against (a).
Peak RSS is the process's. The last line printed is a JSON object with
``ratio_vs_numpy_topk`` (flat queries/s over numpy's), ``peak_rss_mib`` and
``build_seconds`` (the flat index's).

    python bench/retrieve.py [--size 1000000] [--dim 512] [--queries 1000] [--clusters 0]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import time

import numpy as np

from pipeline.core.params import RetrievalParams
from pipeline.retrieval.index import build_index, for_search, search


def unit_vectors(n: int, dim: int, rng: np.random.Generator, centres: np.ndarray | None) -> np.ndarray:
    """float32 rows of unit length, made in blocks (no float64 copy of the whole matrix)."""
    out = np.empty((n, dim), np.float32)
    for lo in range(0, n, 65536):
        hi = min(n, lo + 65536)
        block = rng.standard_normal((hi - lo, dim), dtype=np.float32)
        if centres is not None:
            block = centres[rng.integers(len(centres), size=hi - lo)] + 0.5 * block / np.sqrt(dim)
        out[lo:hi] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return out


def numpy_topk(data: np.ndarray, queries: np.ndarray, n: int, batch: int) -> np.ndarray:
    """Ids of the n largest inner products per query, best first: matmul + argpartition + sort."""
    out = np.empty((len(queries), n), np.int64)
    for lo in range(0, len(queries), batch):
        scores = queries[lo:lo + batch] @ data.T
        part = np.argpartition(-scores, n - 1, axis=1)[:, :n]
        order = np.argsort(-np.take_along_axis(scores, part, axis=1), axis=1, kind="stable")
        out[lo:lo + batch] = np.take_along_axis(part, order, axis=1)
    return out


def recall(found: np.ndarray, truth: np.ndarray, k: int) -> float:
    return float(np.mean([len(set(a[:k]) & set(b[:k])) / k for a, b in zip(found, truth)]))


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=1_000_000, help="captions in the random datastore")
    ap.add_argument("--dim", type=int, default=512, help="vector width (ViT-B/32's projection: 512)")
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--clusters", type=int, default=0, help="0: uniform on the sphere; C: around C centres")
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--candidates", type=int, default=15)
    ap.add_argument("--nlist", type=int, default=None, help="IVF lists; default: the stage's 4 x sqrt(size)")
    ap.add_argument("--nprobe", type=int, default=32)
    ap.add_argument("--numpy-batch", type=int, default=64, help="queries per numpy matrix product")
    ap.add_argument("--no-ivf", action="store_true", help="skip the IVF index")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    rng = np.random.default_rng(args.seed)
    centres = rng.standard_normal((args.clusters, args.dim)).astype(np.float32) if args.clusters else None
    if centres is not None:
        centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    data = unit_vectors(args.size, args.dim, rng, centres)
    queries = unit_vectors(args.queries, args.dim, rng, centres)
    params = RetrievalParams(ivf_nlist=args.nlist, ivf_nprobe=args.nprobe)
    n = args.candidates
    result: dict = {"size": args.size, "dim": args.dim, "queries": args.queries, "clusters": args.clusters,
                    "k": args.k, "candidates": n, "threads": os.environ.get("OMP_NUM_THREADS", "all")}

    t = time.perf_counter()
    flat, _ = build_index(data, "flat", params)
    result["build_seconds"] = round(time.perf_counter() - t, 3)
    index = for_search(flat, args.nprobe)
    t = time.perf_counter()
    _, exact = search(index, queries, n)
    result["flat_queries_per_s"] = round(args.queries / (time.perf_counter() - t), 2)
    print(f"flat: built in {result['build_seconds']} s, {result['flat_queries_per_s']} queries/s", flush=True)
    del index, flat

    t = time.perf_counter()
    brute = numpy_topk(data, queries, n, args.numpy_batch)
    result["numpy_queries_per_s"] = round(args.queries / (time.perf_counter() - t), 2)
    result["ratio_vs_numpy_topk"] = round(result["flat_queries_per_s"] / result["numpy_queries_per_s"], 3)
    result["flat_vs_numpy_recall_at_candidates"] = recall(exact, brute, n)
    print(f"numpy: {result['numpy_queries_per_s']} queries/s; flat/numpy {result['ratio_vs_numpy_topk']}x, "
          f"same neighbours {result['flat_vs_numpy_recall_at_candidates']:.4f}", flush=True)

    if not args.no_ivf:
        t = time.perf_counter()
        ivf, info = build_index(data, "ivf", params)
        result["ivf_build_seconds"] = round(time.perf_counter() - t, 3)
        result["ivf_nlist"], result["ivf_nprobe"] = info["nlist"], args.nprobe
        index = for_search(ivf, args.nprobe)
        t = time.perf_counter()
        _, approx = search(index, queries, n)
        result["ivf_queries_per_s"] = round(args.queries / (time.perf_counter() - t), 2)
        result["ivf_recall_at_k"] = round(recall(approx, exact, args.k), 4)
        result["ivf_recall_at_candidates"] = round(recall(approx, exact, n), 4)
        print(f"ivf (nlist {info['nlist']}, nprobe {args.nprobe}): built in {result['ivf_build_seconds']} s, "
              f"{result['ivf_queries_per_s']} queries/s, recall@{args.k} vs exact {result['ivf_recall_at_k']}, "
              f"recall@{n} {result['ivf_recall_at_candidates']}", flush=True)
    result["peak_rss_mib"] = round(peak_rss_mib(), 1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
