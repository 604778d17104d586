"""The FAISS index of the datastore: exact inner product (IndexFlatIP) or inverted
lists (IndexIVFFlat, IndexIVFPQ) above ``retrieval.flat_max_captions``.

faiss-cpu is the dependency (the GPU build, where installed, takes the same calls
and moves the index to the GPU for the search). Vectors are L2-normalised, so the
inner product is the cosine. IVF lists are trained on a seeded sample, so the same
vectors give the same index.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.errors import CaplineError
from pipeline.core.params import RetrievalParams

FLAT, IVF = "flat", "ivf"
TRAIN_PER_LIST = 64  # training vectors per inverted list (faiss asks for at least 39)
PQ_BITS = 8
SEED = 0


def _faiss():
    import faiss

    return faiss


def choose_kind(count: int, params: RetrievalParams) -> str:
    """``flat`` or ``ivf`` for a datastore of ``count`` captions."""
    if params.index != "auto":
        return params.index
    return FLAT if count <= params.flat_max_captions else IVF


def nlist_for(count: int, params: RetrievalParams) -> int:
    wanted = params.ivf_nlist or max(1, int(4 * math.sqrt(count)))
    return max(1, min(wanted, count))


def build_index(vectors: np.ndarray, kind: str, params: RetrievalParams) -> tuple[Any, dict]:
    """The index over ``vectors`` [N, D] (float32, unit rows) and what it is (for the manifest)."""
    faiss = _faiss()
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    n, dim = vectors.shape
    if kind == FLAT:
        index = faiss.IndexFlatIP(dim)
        index.add(vectors)
        return index, {"type": "IndexFlatIP"}
    nlist = nlist_for(n, params)
    quantizer = faiss.IndexFlatIP(dim)
    if params.ivf_pq_m:
        if dim % params.ivf_pq_m:
            raise CaplineError(f"retrieval.ivf_pq_m: {params.ivf_pq_m} does not divide the CLIP width {dim}")
        index = faiss.IndexIVFPQ(quantizer, dim, nlist, params.ivf_pq_m, PQ_BITS, faiss.METRIC_INNER_PRODUCT)
        info = {"type": "IndexIVFPQ", "nlist": nlist, "pq_m": params.ivf_pq_m, "pq_bits": PQ_BITS}
    else:
        index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
        info = {"type": "IndexIVFFlat", "nlist": nlist}
    index.cp.seed = SEED
    rng = np.random.default_rng(SEED)
    sample = max(TRAIN_PER_LIST * nlist, 2 ** PQ_BITS if params.ivf_pq_m else 0)
    rows = np.sort(rng.choice(n, size=sample, replace=False)) if n > sample else np.arange(n)
    index.train(vectors[rows])
    index.add(vectors)
    info["trained_on"] = int(len(rows))
    return index, info


def gpu_count() -> int:
    faiss = _faiss()
    return int(faiss.get_num_gpus()) if hasattr(faiss, "StandardGpuResources") else 0


def for_search(index: Any, nprobe: int) -> Any:
    """The index ready to search: ``nprobe`` lists for IVF; on the GPU where the faiss build has one."""
    faiss = _faiss()
    if isinstance(index, faiss.IndexIVF):
        index.nprobe = nprobe
    if gpu_count():
        # Kept on the module so the resources live as long as the GPU index.
        for_search.resources = faiss.StandardGpuResources()
        index = faiss.index_cpu_to_gpu(for_search.resources, 0, index)
        if hasattr(index, "nprobe"):
            index.nprobe = nprobe
    return index


def search(index: Any, queries: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(scores, ids) [Q, n] of the ``n`` nearest rows, best first; id -1 where there are fewer."""
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    return index.search(queries, n)


def write_index(index: Any, path: Path) -> None:
    _faiss().write_index(index, str(path))


def read_index(path: Path) -> Any:
    try:
        return _faiss().read_index(str(path))
    except RuntimeError as err:
        raise CaplineError(f"{path}: not a readable FAISS index ({err})") from None
