"""Captioning your own images with a trained model folder (``capline caption``).

The model folder is enough: its ``clip/`` copy embeds the images exactly as the
embed stage made the training features (checked: the same model id and revision,
the same preprocessing, output kind and normalisation), and its
``generation_config.json`` gives the decoding defaults, which options override.
Inputs (files, folders, http(s) URLs, tar shards: see pipeline/caption/inputs.py)
are fetched, decoded and captioned in batches; an input that fails (not found,
HTTP 404, not an image, truncated, too many pixels) gets its reason and the others
are still captioned.
"""
from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping, Optional, Sequence

import torch

from pipeline.caption.inputs import Entry, Failure, Item, count_known, iter_inputs
from pipeline.text.decoding import Caption, check_room, decode_batch, prepare_for_inference
from pipeline.models.decoding_config import load_decoding
from pipeline.core.errors import CaplineError
from pipeline.models.captioner import ClipCaptioner
from pipeline.models.pretrained import ModelError
from pipeline.core.params import Decoding, DownloadParams, validated
from pipeline.core.runtime import PRECISION_OF_DTYPE_NAME, choose_device, choose_precision

FORMATS = ("jsonl", "coco", "tsv")
BACKENDS = ("auto", "torch", "onnx")


def option_name(key: str) -> str:
    """The ``capline caption`` option of a decoding field (``num_beams`` -> ``--num-beams``)."""
    return "--" + key.replace("_", "-")


class CaptionInputError(CaplineError):
    """The CLIP folder given to caption does not match what the model was trained on."""


@dataclass
class CaptionResult:
    name: str  # the input as given (path, URL, SHARD.tar#KEY)
    image_id: str
    captions: list[Caption] = field(default_factory=list)
    error: Optional[str] = None

    @property
    def texts(self) -> list[str]:
        return [c.text for c in self.captions]

    def as_dict(self) -> dict:
        if self.error is not None:
            return {"input": self.name, "image_id": self.image_id, "error": self.error}
        return {"input": self.name, "image_id": self.image_id,
                "captions": [{"caption": c.text, "score": c.score} for c in self.captions]}


class ImageEmbedder:
    """CLIP as the training features were made, from the recorded settings."""

    def __init__(self, clip_dir: Path, features: dict, device: torch.device, precision: Optional[str] = None,
                 max_pixels: Optional[int] = None, patch_tokens: bool = False) -> None:
        from pipeline.embed.encoder import Encoder
        from pipeline.embed.preprocess import Preprocessor
        from pipeline.models.pretrained import load_clip, model_identity

        clip_dir = Path(clip_dir)
        model_id, revision = model_identity(clip_dir)
        for key, got in (("model_id", model_id), ("model_revision", revision)):
            want = features.get(key)
            if want is not None and want != got:
                raise CaptionInputError(f"clip folder {clip_dir}: {key} is {got!r} but the captioner was trained on "
                                        f"features of {want!r}")
        model, processor = load_clip(clip_dir)
        recorded = _json_or_none(features.get("preprocess"))
        mode = (recorded or {}).get("mode", "processor")
        self.pre = Preprocessor.from_processor(processor, mode, max_pixels=max_pixels)
        if recorded is not None and json.loads(self.pre.describe()) != recorded:
            raise CaptionInputError(f"clip folder {clip_dir}: its preprocessing {self.pre.describe()} differs from "
                                    f"the one the training features recorded {features.get('preprocess')}")
        if precision is None:
            # The precision the features were made in, where this device runs it.
            precision = PRECISION_OF_DTYPE_NAME.get(str(features.get("dtype")), "auto")
            if precision == "fp16" and device.type not in ("cuda", "mps"):
                precision = "fp32"
            precision = choose_precision(precision, device)
        self.encoder = Encoder.build(model, device, precision, str(features.get("output", "image_embeds")),
                                     bool(features.get("normalized", True)))
        self.patch_tokens = patch_tokens  # a cross-attention model reads the vision tower's last hidden state

    @property
    def dim(self) -> int:
        return self.encoder.token_shape[1] if self.patch_tokens else self.encoder.dim

    def __call__(self, pixels_uint8: list[torch.Tensor]) -> torch.Tensor:
        return self.embed(pixels_uint8)[0]

    def embed(self, pixels_uint8: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(what the model reads, CLIP's image vectors: a datastore's queries)."""
        batch = self.pre.normalize(torch.stack(pixels_uint8).to(self.encoder.device))
        vectors, tokens = self.encoder.encode(batch, patch_tokens=self.patch_tokens)
        # Patch tokens through fp16, exactly as embed stored the training features.
        return (tokens.float() if self.patch_tokens else vectors), vectors


def resolve_decoding(model_dir: Path, overrides: Mapping[str, object],
                     name: Callable[[str], str] = lambda key: key) -> Decoding:
    """The model folder's decoding defaults with ``overrides`` (None values ignored), validated."""
    saved = load_decoding(Path(model_dir)) or Decoding()
    values = {**saved.model_dump(), **{k: v for k, v in overrides.items() if v is not None}}
    return validated(Decoding, values, name)


@dataclass
class LoadedCaptioner:
    """A model folder ready to caption: the captioner, its CLIP embedder, the decoding and its length cap."""
    model: ClipCaptioner
    embedder: ImageEmbedder
    decoding: Decoding
    limit: int  # max_new_tokens after check_room
    fetch_params: DownloadParams  # the download stage's limits (size, pixels, timeouts) for inputs
    datastore: Optional[object] = None  # a retrieval model's (pipeline.retrieval.store.Datastore)

    def caption_pixels(self, pixels_uint8: list[torch.Tensor], image_ids: Sequence[str]) -> list[list[Caption]]:
        """Captions of decoded images (``embedder.pre.to_uint8``), one forward pass for the batch;
        a retrieval model's prompts hold each image's nearest captions in the datastore."""
        with torch.inference_mode():
            if self.datastore is None:
                vectors = self.embedder(pixels_uint8)
                prompts = None
            else:
                from pipeline.retrieval.search import datastore_neighbours

                vectors, queries = self.embedder.embed(pixels_uint8)
                neighbours = datastore_neighbours(self.datastore, queries.float().cpu().numpy(),
                                                  self.model.retrieval.k)
                prompts = self.model.prompt_ids(neighbours)
            return decode_batch(self.model, vectors, self.decoding, list(image_ids), max_new_tokens=self.limit,
                                prompts=prompts)


def load_captioner(model_dir: str | Path, decoding: Optional[Decoding] = None, clip_dir: str | Path | None = None,
                   device: str = "auto", precision: str = "auto", backend: str = "auto",
                   datastore_dir: str | Path | None = None) -> LoadedCaptioner:
    """Load a model folder and its CLIP for captioning (checked against the training features).

    ``decoding`` None: the model folder's saved defaults. ``clip_dir`` None: the
    model folder's ``clip/``. ``backend``: ``torch``, ``onnx`` (an exported folder on
    ONNX Runtime) or ``auto`` (``onnx`` when the folder is an ONNX export).
    ``datastore_dir``: a retrieval model's datastore (required for those; any datastore
    made with the model's CLIP, not only the one it was trained with).
    """
    fetch_params = DownloadParams()
    if use_onnx(model_dir, backend):
        model, embedder = load_onnx_backend(model_dir, clip_dir, device, precision, fetch_params.max_pixels)
    else:
        model, embedder = load_torch_backend(model_dir, clip_dir, device, precision, fetch_params.max_pixels)
    d = decoding if decoding is not None else resolve_decoding(Path(model_dir), {})
    limit = check_room(model, d, name=option_name)
    return LoadedCaptioner(model, embedder, d, limit, fetch_params, load_datastore(model, datastore_dir))


def load_datastore(model, datastore_dir: str | Path | None):
    """The datastore a retrieval model searches (None for k=0), refused when made with another CLIP."""
    k = getattr(getattr(model, "retrieval", None), "k", 0)
    if k == 0:
        if datastore_dir is not None:
            raise CaptionInputError("--datastore: the model reads no retrieved captions (trained with retrieval.k 0)")
        return None
    from pipeline.retrieval.search import check_clip
    from pipeline.retrieval.store import Datastore

    if datastore_dir is None:
        trained = model.retrieval.datastore.get("fingerprint")
        raise CaptionInputError(f"the model reads {k} retrieved captions per image: pass --datastore (a "
                                f"`capline datastore` folder made with its CLIP; it was trained with {trained})")
    store = Datastore.load(Path(datastore_dir))
    check_clip(store, model.features)
    return store


def caption_inputs(model_dir: str | Path, inputs: Sequence[str], decoding: Optional[Decoding] = None,
                   clip_dir: str | Path | None = None, device: str = "auto", precision: str = "auto",
                   batch_size: int = 16, progress: bool = True,
                   on_result: Optional[Callable[[CaptionResult], None]] = None,
                   backend: str = "auto", datastore_dir: str | Path | None = None) -> list[CaptionResult]:
    """Captions for every image the inputs name, in input order; failures carry their reason.

    ``decoding`` None: the model folder's saved defaults. ``clip_dir`` None: the
    model folder's ``clip/``. ``on_result`` sees each result as soon as its batch is done.
    ``backend``, ``datastore_dir``: see ``load_captioner``.
    """
    from tqdm import tqdm

    from pipeline.download.fetch import Fetcher

    loaded = load_captioner(model_dir, decoding, clip_dir=clip_dir, device=device, precision=precision,
                            backend=backend, datastore_dir=datastore_dir)
    fetcher = Fetcher(loaded.fetch_params)

    known, shards = count_known(inputs)
    results: list[CaptionResult] = []
    with tqdm(total=None if shards else known, desc="caption", unit="img",
              disable=not progress or (known <= batch_size and not shards)) as bar, \
            ThreadPoolExecutor(max_workers=loaded.fetch_params.workers) as pool:
        for batch in _batches(iter_inputs(inputs), batch_size):
            done = _caption_batch(batch, loaded, fetcher, pool)
            for r in done:
                results.append(r)
                if on_result is not None:
                    on_result(r)
            bar.update(len(done))
    return results


def use_onnx(model_dir: str | Path, backend: str) -> bool:
    """Whether ``backend`` (auto, torch, onnx) means ONNX Runtime for this folder."""
    from pipeline.caption.onnx_backend import is_onnx_folder

    if backend not in BACKENDS:
        raise CaptionInputError(f"--backend {backend!r}: expected one of {', '.join(BACKENDS)}")
    return backend == "onnx" or (backend == "auto" and is_onnx_folder(model_dir))


def load_torch_backend(model_dir, clip_dir, device: str, precision: str, max_pixels: int):
    """(ClipCaptioner in the chosen precision, ImageEmbedder of its CLIP)."""
    dev = choose_device(device, key="--device")
    resolved = choose_precision(precision, dev, key="--precision")
    model = ClipCaptioner.load(model_dir)
    clip = Path(clip_dir) if clip_dir is not None else model.clip_dir
    if clip is None:
        raise ModelError(f"{model_dir}: the model folder has no clip/ (trained without --clip); "
                         "pass --clip with the CLIP folder that made its features")
    embedder = ImageEmbedder(clip, model.features, dev, None if precision == "auto" else resolved,
                             max_pixels=max_pixels, patch_tokens=model.mapper.patch_tokens)
    if embedder.dim != model.clip_dim:
        raise CaptionInputError(f"clip folder {clip}: gives {embedder.dim}-wide vectors, the model expects "
                                f"{model.clip_dim}")
    return prepare_for_inference(model, dev, resolved), embedder


def load_onnx_backend(model_dir, clip_dir, device: str, precision: str, max_pixels: int, threads: int = 0):
    """(OnnxCaptioner, OnnxEmbedder) of an exported folder: the CPU, in the precision it was exported in;
    ``threads`` 0 lets ONNX Runtime pick."""
    from pipeline.caption.onnx_backend import OnnxCaptioner, OnnxEmbedder

    if clip_dir is not None:
        raise CaptionInputError("--clip: an ONNX folder holds its own CLIP graph")
    if device not in ("auto", "cpu") or precision != "auto":
        raise CaptionInputError("--backend onnx runs on the CPU in the precision it was exported in; "
                                "leave --device and --precision at auto")
    return OnnxCaptioner(model_dir, threads), OnnxEmbedder(model_dir, threads, max_pixels=max_pixels)


def _batches(entries: Iterable[Entry], size: int) -> Iterator[list[Entry]]:
    batch: list[Entry] = []
    for entry in entries:
        batch.append(entry)
        if sum(isinstance(e, Item) for e in batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def _caption_batch(batch: list[Entry], loaded: LoadedCaptioner, fetcher, pool: ThreadPoolExecutor) -> list[CaptionResult]:
    from pipeline.download.errors import RecordFailure
    from pipeline.embed.preprocess import ImageDecodeError

    def load(entry: Item) -> torch.Tensor:
        data = entry.data if entry.data is not None else fetcher.fetch(entry.url)
        return loaded.embedder.pre.to_uint8(data)

    results = [CaptionResult(e.name, e.image_id) for e in batch]
    futures = {i: pool.submit(load, e) for i, e in enumerate(batch) if isinstance(e, Item)}
    ok, pixels = [], []
    for i, e in enumerate(batch):
        if isinstance(e, Failure):
            results[i].error = e.reason
            continue
        try:
            pixels.append(futures[i].result())
            ok.append(i)
        except RecordFailure as err:
            results[i].error = f"{err.status}: {err.reason}"
        except ImageDecodeError as err:
            results[i].error = str(err)
    if ok:
        captions = loaded.caption_pixels(pixels, [results[i].image_id for i in ok])
        for i, caps in zip(ok, captions):
            results[i].captions = caps
    return results


# --------------------------------------------------------------------- output
def format_results(results: Sequence[CaptionResult], fmt: str) -> str:
    """The results as JSON lines (every caption, scores, errors), a COCO results file
    (each captioned image's first caption) or ``input<TAB>caption`` lines."""
    if fmt == "jsonl":
        return "".join(json.dumps(r.as_dict(), ensure_ascii=False) + "\n" for r in results)
    if fmt == "coco":
        rows = [{"image_id": r.image_id, "caption": r.captions[0].text} for r in results
                if r.error is None and r.captions]
        return json.dumps(rows, indent=1, ensure_ascii=False) + "\n"
    if fmt == "tsv":
        # One line per caption; whitespace inside a caption or a name cannot break the columns.
        return "".join(f"{' '.join(r.name.split())}\t{' '.join(c.text.split())}\n"
                       for r in results if r.error is None for c in r.captions)
    raise ValueError(f"format {fmt!r}: expected one of {', '.join(FORMATS)}")


def format_for(out: Optional[str], fmt: Optional[str]) -> str:
    """The output format: the one asked for, else what --out's suffix says, else tsv."""
    if fmt:
        return fmt
    suffix = Path(out).suffix.lower() if out else ""
    return {".jsonl": "jsonl", ".json": "coco", ".tsv": "tsv"}.get(suffix, "tsv")


def _json_or_none(text) -> Optional[dict]:
    if not text:
        return None
    try:
        value = json.loads(text)
    except (TypeError, json.JSONDecodeError):
        return None
    return value if isinstance(value, dict) and value else None
