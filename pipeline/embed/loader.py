"""The DataLoader side of embedding: worker processes read image shards, decode and
preprocess images, and hand uint8 batches to the main process.

Work is cut into units (shard, stripe): a shard is read by ``stripes`` workers when
there are fewer shards than workers (each decodes every stripes-th batch-sized chunk),
else by one. Unit k goes to worker k % num_workers. A worker reports when a unit is
finished, so the main process knows when a shard is complete and can write it.
Order inside a shard is restored by sorting by key.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.embed.preprocess import ImageDecodeError, Preprocessor
from pipeline.formats.image_shards import ImageShardError, iter_shard
from pipeline.formats.records import split_for


@dataclass(frozen=True)
class SplitRule:
    val_fraction: float
    test_fraction: float


def stripes_for(n_shards: int, num_workers: int) -> int:
    """How many workers read each shard, so that every worker has work."""
    workers = max(1, num_workers)
    return max(1, -(-workers // max(1, n_shards))) if n_shards < workers else 1


def sample_split(key: str, meta: dict, rule: SplitRule) -> str:
    split = meta.get("split")
    if split in ("train", "val", "test"):
        return split
    # img2dataset shards carry no split: the same hash rule as the dataset records.
    return split_for(key, rule.val_fraction, rule.test_fraction)


class ShardBatches(IterableDataset):
    """Yields dict batches: uint8 ``pixels`` [n, 3, H, W] with per-row ``shard``/``key``/
    ``split``/``captions``, ``failed`` records, ``done`` units and the worker's timings."""

    def __init__(self, shards: list[Path], pre: Preprocessor, batch_size: int, rule: SplitRule,
                 stripes: int) -> None:
        self.shards = [Path(s) for s in shards]
        self.pre = pre
        self.batch_size = batch_size
        self.rule = rule
        self.stripes = stripes

    def units(self, worker: int, num_workers: int) -> list[tuple[int, int]]:
        all_units = [(i, s) for i in range(len(self.shards)) for s in range(self.stripes)]
        return [u for k, u in enumerate(all_units) if k % num_workers == worker]

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for shard_idx, stripe in self.units(worker, num_workers):
            yield from self._unit(shard_idx, stripe)

    def _unit(self, shard_idx: int, stripe: int) -> Iterator[dict]:
        """Batches of one (shard, stripe): chunk c of the shard is samples
        [c*B, (c+1)*B) and belongs to stripe c % stripes. A batch is always one chunk
        (less its failed images), whatever the workers and ranks, so the vectors
        are bit-for-bit those of any other run."""
        batch = _Batch()
        chunk = -1
        t = time.perf_counter()
        try:
            for j, sample in enumerate(iter_shard(self.shards[shard_idx])):
                if (j // self.batch_size) % self.stripes != stripe:
                    continue
                if j // self.batch_size != chunk:
                    if batch.keys or batch.failed:
                        yield batch.emit()
                        batch = _Batch()
                    chunk = j // self.batch_size
                batch.read_s += time.perf_counter() - t
                t = time.perf_counter()
                try:
                    pixels = self.pre.to_uint8(sample.image)
                except ImageDecodeError as err:
                    reason = "missing_image" if not sample.image else "decode_error"
                    batch.failed.append({"shard": shard_idx, "key": sample.key, "status": reason,
                                         "reason": str(err)})
                    pixels = None
                batch.decode_s += time.perf_counter() - t
                if pixels is not None:
                    if batch.pixels and pixels.shape != batch.pixels[0].shape:
                        # Only a processor without a crop gives differing sizes.
                        yield batch.emit()
                        batch = _Batch()
                    split = sample_split(sample.key, sample.meta, self.rule)
                    batch.add(shard_idx, sample.key, split, sample.meta.get("captions", []), pixels)
                t = time.perf_counter()
        except ImageShardError as err:
            # Reported as data, not raised here: the main process then stops with
            # this message alone, after writing the shards already complete.
            batch.error = str(err)
            yield batch.emit()
            return
        batch.read_s += time.perf_counter() - t
        batch.done.append((shard_idx, stripe))
        yield batch.emit()


class _Batch:
    def __init__(self) -> None:
        self.shard: list[int] = []
        self.keys: list[str] = []
        self.splits: list[str] = []
        self.captions: list[list[str]] = []
        self.pixels: list[torch.Tensor] = []
        self.failed: list[dict] = []
        self.done: list[tuple[int, int]] = []
        self.read_s = 0.0
        self.decode_s = 0.0
        self.error: Optional[str] = None

    def add(self, shard: int, key: str, split: str, captions: list[str], pixels: torch.Tensor) -> None:
        self.shard.append(shard)
        self.keys.append(key)
        self.splits.append(split)
        self.captions.append(captions)
        self.pixels.append(pixels)

    def emit(self) -> dict:
        pixels = torch.stack(self.pixels) if self.pixels else torch.zeros(0, dtype=torch.uint8)
        return {"pixels": pixels, "shard": self.shard, "keys": self.keys, "splits": self.splits,
                "captions": self.captions, "failed": self.failed, "done": self.done,
                "read_s": self.read_s, "decode_s": self.decode_s, "error": self.error}


def make_loader(dataset: ShardBatches, workers: int, pin_memory: bool) -> DataLoader:
    """batch_size=None: the dataset batches itself (batches never mix workers)."""
    kwargs: dict = {}
    if workers > 0:
        kwargs = {"prefetch_factor": 2, "persistent_workers": False}
    return DataLoader(dataset, batch_size=None, num_workers=workers, pin_memory=pin_memory, **kwargs)

