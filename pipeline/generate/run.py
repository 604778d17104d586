"""Captioning feature shards with batched decoding (transformers' generate, KV cache).

Writes, in ``out_dir``: ``results.json`` (COCO results, ``image_id`` = record key,
the first, i.e. best, caption of each image: what evaluate scores),
``nbest.jsonl`` when ``num_return_sequences`` > 1 (every caption of each image with
its sequence score, best first), ``results_shuffled.json`` (the control: each image
gets the caption the model makes for another image's vector, a seeded derangement,
so no image keeps its own), ``references.json`` (COCO captions file for exactly
the captioned images) and ``generation_config.json`` (the decoding that made them,
in transformers' format). Images of the split without a non-blank reference caption
are left out: they cannot be scored.

An image's captions do not depend on the other images of its batch (beam search
rows are independent; samples are seeded per image), so the control is the same
permutation applied to the captions already made: feeding the shuffled vectors
again would give exactly these captions at twice the cost.

Under torchrun the rows are split among the processes by index and gathered on
rank 0, which alone writes; the files equal a single-process run's.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from pipeline.text.decoding import Caption, check_room, decode_batch, prepare_for_inference
from pipeline.models.decoding_config import save_generation_config
from pipeline.formats.features import FeatureShardError
from pipeline.core.files import CAPTIONED_WITH_FILE, write_json, write_jsonl, write_metrics
from pipeline.models.captioner import ClipCaptioner
from pipeline.core.params import GenerateParams
from pipeline.core.runtime import choose_device, choose_precision, current_rank, gather, process_group

log = logging.getLogger(__name__)
NBEST = "nbest.jsonl"


def derangement(n: int, seed: int) -> np.ndarray:
    """A seeded permutation with no fixed point (for n > 1): image i gets vector perm[i]."""
    order = np.random.default_rng(seed).permutation(n)
    perm = np.empty(n, dtype=np.int64)
    perm[order] = np.roll(order, -1)  # each image takes the next one's vector in a random cycle
    return perm


def caption_vectors(model: ClipCaptioner, vectors: np.ndarray, params: GenerateParams, keys: Sequence[str],
                    progress: bool = True, max_new_tokens: Optional[int] = None,
                    prompts: Optional[Sequence[Sequence[int]]] = None) -> list[list[Caption]]:
    """The captions of each of ``vectors`` [N, D] (best first), ``params.batch_size`` images at a time.

    ``model`` is already on its device in its precision (``prepare_for_inference``);
    ``keys`` name the images (they seed sampling); ``prompts``: a retrieval captioner's
    prompt ids of each image.
    """
    from tqdm import tqdm

    captions: list[list[Caption]] = []
    with tqdm(total=len(vectors), desc="generate", unit="img", disable=not progress) as bar:
        for lo in range(0, len(vectors), params.batch_size):
            batch = torch.from_numpy(np.asarray(vectors[lo:lo + params.batch_size], dtype=np.float32))
            captions += decode_batch(model, batch, params, keys[lo:lo + len(batch)], max_new_tokens=max_new_tokens,
                                     prompts=None if prompts is None else prompts[lo:lo + len(batch)])
            bar.update(len(batch))
    return captions


def model_prompts(model: ClipCaptioner, features_dir: Path, table, split: str, retrieval_dir: Optional[Path],
                  datastore: Optional[str]) -> tuple[Optional[list[list[int]]], Optional[str]]:
    """A retrieval captioner's prompt ids of each image of ``table`` (None for k=0): from the
    neighbour shards, or searched in ``datastore`` (the model's own CLIP only); and the
    fingerprint of the datastore the captions came from."""
    from pipeline.formats.features import load_features
    from pipeline.retrieval.neighbours import shard_neighbours
    from pipeline.retrieval.search import check_clip, datastore_neighbours
    from pipeline.retrieval.store import Datastore

    k = model.retrieval.k
    if k == 0:
        return None, None
    if datastore is not None:
        store = Datastore.load(Path(datastore))
        check_clip(store, model.features)
        # The query is CLIP's image embedding, also for a model that reads patch tokens.
        vectors = load_features(features_dir, split=split)
        by_key = dict(zip(vectors.keys, vectors.embeddings))
        queries = np.stack([by_key[key] for key in table.keys])
        neighbours = datastore_neighbours(store, queries, k, keys=table.keys)
        return model.prompt_ids(neighbours), store.manifest.get("fingerprint")
    if retrieval_dir is None:
        raise FeatureShardError("the model reads retrieved captions (retrieval.k > 0): pass the neighbour "
                                "shards (--retrieval data/retrieval) or a datastore (generate.datastore)")
    neighbours, _ = shard_neighbours(Path(retrieval_dir), table.keys, k)
    return model.prompt_ids(neighbours), model.retrieval.datastore.get("fingerprint")


def run(model_dir: str | Path, features_dir: str | Path, out_dir: str | Path, params: GenerateParams,
             metrics_path: str | Path | None = None, progress: bool = True, device: str = "auto",
             retrieval_dir: str | Path | None = None) -> dict:
    """Caption the ``params.split`` images of ``features_dir`` on ``device``; return (and write) metrics.

    A retrieval captioner reads each image's neighbours from ``retrieval_dir`` (the neighbour
    shards), or from the datastore ``params.datastore`` when one is set."""
    from pipeline.formats.features import load_features

    rank = current_rank()
    device = choose_device(device, rank, key="device")
    precision = choose_precision(params.precision, device, key="generate.precision")
    model = ClipCaptioner.load(model_dir)
    table = load_features(Path(features_dir), split=params.split, expect=model.feature_expectation(),
                          dataset=model.feature_dataset)
    if len(table) == 0:
        raise FeatureShardError(f"{features_dir}: no images in the {params.split!r} split (generate.split)")
    model.check_features(table.attrs, int(table.embeddings.shape[-1]), str(features_dir))
    table = _with_references(table)
    if len(table) == 0:
        raise FeatureShardError(f"{features_dir}: no image of the {params.split!r} split has a reference caption")
    limit = check_room(model, params)
    prompts, datastore_fingerprint = model_prompts(model, Path(features_dir), table, params.split,
                            None if retrieval_dir is None else Path(retrieval_dir), params.datastore)
    model = prepare_for_inference(model, device, precision)

    started = time.perf_counter()
    with process_group(rank, device):
        # Under torchrun each rank captions rows rank, rank+N, ...; rank 0 gathers them.
        mine = np.arange(rank.rank, len(table), rank.world_size)
        part = caption_vectors(model, table.embeddings[mine], params, [table.keys[i] for i in mine],
                               progress and rank.is_main, max_new_tokens=limit,
                               prompts=None if prompts is None else [prompts[i] for i in mine])
        parts = gather((mine.tolist(), part))
    seconds = time.perf_counter() - started
    nbest: list[list[Caption]] = [[] for _ in range(len(table))]
    for rows, caps in parts:
        for i, c in zip(rows, caps):
            nbest[i] = c
    if not rank.is_main:
        return {}  # rank 0 writes the files and the metrics

    captions = [caps[0].text for caps in nbest]
    perm = derangement(len(table), params.seed)
    results = [{"image_id": k, "caption": c} for k, c in zip(table.keys, captions)]
    shuffled = [{"image_id": k, "caption": captions[j]} for k, j in zip(table.keys, perm)]
    references = {
        "images": [{"id": k} for k in table.keys],
        "annotations": [
            {"image_id": k, "id": n, "caption": c}
            for n, (k, c) in enumerate((k, c) for k, caps in zip(table.keys, table.captions) for c in caps)
        ],
    }
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "results.json", results, indent=1, ensure_ascii=False)
    write_json(out_dir / "results_shuffled.json", shuffled, indent=1, ensure_ascii=False)
    write_json(out_dir / "references.json", references, indent=1, ensure_ascii=False)
    # What made the captions, for evaluate: how many retrieved captions the prompts held, and from where.
    write_json(out_dir / CAPTIONED_WITH_FILE, {"retrieval_k": model.retrieval.k, "datastore": datastore_fingerprint})
    if params.num_return_sequences > 1:
        write_jsonl(out_dir / NBEST, nbest_rows(table.keys, nbest))
    else:
        (out_dir / NBEST).unlink(missing_ok=True)  # a previous run's list would no longer match
    save_generation_config(params, out_dir, model.eos_token_id, model.pad_token_id)

    all_captions = [c.text for caps in nbest for c in caps]
    metrics = {
        "captions": len(captions),
        "split": params.split,
        "num_beams": params.num_beams,
        "do_sample": params.do_sample,
        "num_return_sequences": params.num_return_sequences,
        "precision": precision,
        "device": str(device),
        "empty_captions": sum(1 for c in captions if not c),
        "mean_words": round(float(np.mean([len(c.split()) for c in captions])), 3),
        "distinct_captions": len(set(captions)),
        "retrieval_k": model.retrieval.k,
        "distinct_per_image": round(float(np.mean([len({c.text for c in caps}) for caps in nbest])), 3),
        "seconds": round(seconds, 3),
        "captions_per_s": round(len(all_captions) / max(seconds, 1e-9), 3),
        "images_per_s": round(len(captions) / max(seconds, 1e-9), 3),
        "world_size": rank.world_size,
        "clip_revision": model.features.get("model_revision"),
        "gpt_revision": model.gpt_source.get("revision"),
    }
    if metrics_path is not None:
        write_metrics(metrics_path, metrics)
    return metrics


def nbest_rows(keys: Sequence[str], nbest: Sequence[Sequence[Caption]]) -> list[dict]:
    """One ``nbest.jsonl`` line per image: its captions, best first, with their scores."""
    return [{"image_id": k, "captions": [{"caption": c.text, "score": c.score} for c in caps]}
            for k, caps in zip(keys, nbest)]


def _with_references(table):
    """The rows that have a non-blank reference caption, with only those captions.

    An image without references cannot be scored (evaluate refuses it, and
    pycocoevalcap's scorers fail on it), and a blank reference breaks ROUGE-L;
    training skips blank captions too.
    """
    from pipeline.formats.features import FeatureTable

    captions = [[c for c in caps if c and c.strip()] for caps in table.captions]
    keep = [i for i, caps in enumerate(captions) if caps]
    if len(keep) == len(table) and all(len(a) == len(b) for a, b in zip(captions, table.captions)):
        return table
    if len(keep) < len(table):
        log.warning("generate: %d of %d images have no reference caption and are left out",
                    len(table) - len(keep), len(table))
    return FeatureTable(keys=[table.keys[i] for i in keep], embeddings=table.embeddings[keep],
                        splits=[table.splits[i] for i in keep], captions=[captions[i] for i in keep],
                        attrs=table.attrs)
