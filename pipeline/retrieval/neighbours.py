"""The retrieved captions a retrieval captioner reads, by image key, from the neighbour
shards of ``capline retrieve`` (training, SCST, generate), with the identity of their
datastore (its manifest ``fingerprint`` and CLIP), which the model folder records.
(``search`` finds them in a datastore for images it has not seen.)
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from pipeline.core.errors import CaplineError
from pipeline.formats.neighbours import made_from, read_neighbour_shard


def shard_neighbours(folder: Path, keys: Sequence[str], k: int) -> tuple[list[list[str]], dict]:
    """The k nearest captions of each of ``keys`` from the neighbour shards in ``folder``, and
    the identity of their datastore."""
    folder = Path(folder)
    paths = sorted(folder.glob("*.h5")) if folder.is_dir() else []
    if not paths:
        raise CaplineError(f"{folder}: no neighbour shards (*.h5); run `capline retrieve` (retrieval.k > 0)")
    by_key: dict[str, list[str]] = {}
    identity: dict = {}
    for path in paths:
        table = read_neighbour_shard(path)
        got_k = table.ids.shape[1] if table.ids.ndim == 2 else 0
        if got_k < k:
            raise CaplineError(f"{path}: holds {got_k} neighbours per image, the captioner reads {k} "
                               "(rerun `capline retrieve` with this retrieval.k)")
        source = made_from(table.attrs) or {}
        identity = {"fingerprint": source.get("datastore"), "model_id": table.attrs.get("model_id"),
                    "model_revision": table.attrs.get("model_revision")}
        by_key.update(zip(table.keys, (caps[:k] for caps in table.captions)))
    missing = [key for key in keys if key not in by_key]
    if missing:
        raise CaplineError(f"{folder}: no neighbours for {len(missing)} images (first: {missing[0]}); "
                           "rerun `capline retrieve` on these features")
    return [by_key[key] for key in keys], identity
