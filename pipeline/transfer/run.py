"""The transfer stage: caption domain B's test images with a model trained on domain A,
once with A's datastore (the one it was trained with) and once with B's (built here from
B's training captions), and score both against B's references with pycocoevalcap's CIDEr.

Writes, in ``out_dir``: ``transfer.json`` (the figures; evaluate copies ``transfer_cider``,
``transfer_cider_source_datastore`` and ``transfer_ratio`` into eval.json), the two
results files, ``references.json``, and B's datastore (``datastore/``) with its source
captions. With ``transfer.domain: none`` only ``transfer.json`` is written, saying so.
A model without retrieval (``retrieval.k: 0``) reads no datastore: it captions B once,
and both figures are that one (ratio 1).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

from tqdm import tqdm

from pipeline.caption.run import LoadedCaptioner, load_datastore, load_torch_backend
from pipeline.core.files import TRANSFER_FIELDS, write_json
from pipeline.core.errors import ParamsError
from pipeline.core.params import Params
from pipeline.core.runtime import current_rank
from pipeline.transfer.domain import WORDINGS, DomainImage, coco_captions, domain_images, image_bytes, in_split

log = logging.getLogger(__name__)
SUMMARY = "transfer.json"


def run(params: Params, model_dir: Path, source_datastore: Path, clip_dir: Path, gpt_dir: Path, out_dir: Path,
        progress: bool = True) -> dict[str, Any]:
    """Run the experiment of ``params.transfer``; return (and write) its summary.

    ``source_datastore``: the datastore the model was trained with (A's); ``clip_dir`` and
    ``gpt_dir``: the pinned models B's datastore is encoded and length-filtered with."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if params.transfer.domain == "none":
        summary: dict[str, Any] = {**dict.fromkeys(TRANSFER_FIELDS), "domain": "none",
                                   "skipped": "transfer.domain is none (docs/retrieval.md#domain-transfer)"}
        write_json(out_dir / SUMMARY, summary, indent=2)
        return summary

    images = domain_images(params)
    test = list(in_split(images, "test"))
    train = list(in_split(images, "train"))
    if not test or not train:
        raise ParamsError(f"transfer.images: {params.transfer.images} images give {len(train)} training and "
                         f"{len(test)} test images of domain B; raise it")
    loaded = _load(model_dir, params, source_datastore)
    k = loaded.model.retrieval.k
    references = {im.key: list(im.captions) for im in test}
    write_json(out_dir / "references.json", coco_captions(test), indent=1, ensure_ascii=False)

    source = _caption(loaded, test, params, "domain B, A's datastore", progress)
    write_json(out_dir / "results_source_datastore.json", _results(test, source), indent=1, ensure_ascii=False)
    if k:
        own_store = _build_own_datastore(params, train, clip_dir, gpt_dir, out_dir, progress)
        loaded.datastore = load_datastore(loaded.model, own_store)
        own = _caption(loaded, test, params, "domain B, B's datastore", progress)
    else:
        own = source  # no prompt: the datastore changes nothing
    write_json(out_dir / "results_own_datastore.json", _results(test, own), indent=1, ensure_ascii=False)

    cider_own, cider_source = _cider(references, own, source)
    words = set(domain_words(params))
    summary = {
        "transfer_cider": cider_own,
        "transfer_cider_source_datastore": cider_source,
        "transfer_ratio": cider_own / cider_source if cider_source else None,
        "domain": params.transfer.domain,
        "retrieval_k": k,
        "test_images": len(test),
        "datastore_captions": len(loaded.datastore) if k else 0,  # what the length filter kept
        # How often a caption names a colour in B's words: what B's datastore should change.
        "b_words_share_own_datastore": _share_with(own, words),
        "b_words_share_source_datastore": _share_with(source, words),
    }
    write_json(out_dir / SUMMARY, summary, indent=2)
    return summary


def domain_words(params: Params) -> list[str]:
    return list(WORDINGS[params.transfer.domain].values())


def _load(model_dir: Path, params: Params, source_datastore: Path) -> LoadedCaptioner:
    """The model folder with its own CLIP copy, decoding as the generate stage, searching A's datastore."""
    from pipeline.core.params import DownloadParams
    from pipeline.text.decoding import check_room

    model, embedder = load_torch_backend(model_dir, None, params.device, params.generate.precision,
                                         DownloadParams().max_pixels)
    store = load_datastore(model, source_datastore if model.retrieval.k else None)
    return LoadedCaptioner(model, embedder, params.generate, check_room(model, params.generate), DownloadParams(),
                           store)


def _caption(loaded: LoadedCaptioner, images: list[DomainImage], params: Params, what: str,
             progress: bool) -> list[str]:
    size = params.generate.batch_size
    captions: list[str] = []
    with tqdm(total=len(images), desc=f"transfer: {what}", unit="img", disable=not progress) as bar:
        for lo in range(0, len(images), size):
            batch = images[lo:lo + size]
            pixels = [loaded.embedder.pre.to_uint8(image_bytes(im, params)) for im in batch]
            captions += [caps[0].text for caps in loaded.caption_pixels(pixels, [im.key for im in batch])]
            bar.update(len(batch))
    return captions


def _build_own_datastore(params: Params, train: list[DomainImage], clip_dir: Path, gpt_dir: Path, out_dir: Path,
                         progress: bool) -> Path:
    """B's datastore from B's training captions, with the retrieval params A's was built with."""
    from pipeline.retrieval.datastore import build_datastore

    source = out_dir / "datastore_captions.json"
    write_json(source, coco_captions(train), indent=1, ensure_ascii=False)
    own = params.model_copy(update={"retrieval": params.retrieval.model_copy(update={"source": str(source)})})
    store = out_dir / "datastore"
    build_datastore(own, out_dir, Path(clip_dir), Path(gpt_dir), store, current_rank(), progress=progress)
    return store


def _results(images: list[DomainImage], captions: list[str]) -> list[dict]:
    return [{"image_id": im.key, "caption": c} for im, c in zip(images, captions)]


def _cider(references: dict[str, list[str]], *candidates: list[str]) -> list[float]:
    """pycocoevalcap's CIDEr (PTB-tokenized, as evaluate) of each candidate list against ``references``."""
    from pycocoevalcap.cider.cider import Cider

    from pipeline.evaluate.scores import tokenize_groups
    from pipeline.text.java import require_java

    java = require_java()
    gts = tokenize_groups(references, java=java)
    out = []
    for captions in candidates:
        res = tokenize_groups({k: [c] for k, c in zip(references, captions)}, java=java)
        out.append(float(Cider().compute_score(gts, res)[0]))
    return out


def _share_with(captions: list[str], words: set[str]) -> Optional[float]:
    if not captions:
        return None
    return sum(1 for c in captions if words & set(c.lower().split())) / len(captions)
