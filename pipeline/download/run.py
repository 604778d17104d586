"""The download stage: records in, image shards out, every record accounted for.

Records are streamed from the prepared source and cut into shards of
``records_per_shard`` by position, so shard ``i`` always holds the same records.
A rank takes the shards with ``i % world_size == rank``, keeps those already
finished from the same inputs (resume: ``resume.py``; a finished shard made from
other records, params or code is remade, with a log line saying why), puts back
those an unfinished run had finished and kept in ``<out>.partial`` (see
``pipeline/core/partial.py``), and fetches the rest on a thread pool. Files of shards
beyond the last one (the list shrank) are removed, so the folder equals what a
fresh run writes. At most
``2 × workers`` records are in flight and only a few shards are open at once, so
memory does not grow with the length of the list. Each shard is written whole
(see ``shards.py``) as soon as its last record is done; a shard holding a record
that the image processes could not take (they kept dying) is not written, so the
next run fetches it again.
"""
from __future__ import annotations

import hashlib
import logging
import multiprocessing
import queue
import threading
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional

from tqdm import tqdm

from pipeline.download.errors import DecodePoolDied, DownloadIncomplete, RecordFailure
from pipeline.download.fetch import Fetcher
from pipeline.download.image import process_image
from pipeline.download.resume import remove_orphans, run_fingerprint, shard_fingerprint, unfinish, why_not_reusable
from pipeline.download.shards import (Outcome, is_finished, read_statuses, remove_stale, shard_files, shard_stem,
                                      write_shard)
from pipeline.core.fingerprint import RedoLog, digest
from pipeline.core.files import write_metrics
from pipeline.core.partial import PartialShards
from pipeline.core.params import DownloadParams
from pipeline.formats.records import Record
from pipeline.core.runtime import Rank, rank_path

log = logging.getLogger(__name__)

@dataclass
class Summary:
    records: int = 0
    shards: int = 0
    shards_resumed: int = 0
    seconds: float = 0.0
    fetched_ok: int = 0  # ok images fetched by this run (resumed shards excluded)
    by_status: Counter = field(default_factory=Counter)
    # Records the image processes could not take, and their shards (left unwritten).
    interrupted: int = 0
    unfinished_shards: list = field(default_factory=list)
    first_interrupted: str = ""

    def as_metrics(self) -> dict:
        ok = self.by_status.get("ok", 0)
        out = {
            "records": self.records,
            "ok": ok,
            "failed": self.records - ok,
            "shards": self.shards,
            "shards_resumed": self.shards_resumed,
            "seconds": round(self.seconds, 3),
            "images_per_s": round(self.fetched_ok / self.seconds, 2) if self.seconds > 0 else 0.0,
        }
        out.update({f"status_{k}": v for k, v in sorted(self.by_status.items())})
        return out


# The outcome of a record the image processes could not take. Never written as a
# status: its shard is left for the next run (see ImagePool).
INTERRUPTED = "interrupted"


class ImagePool:
    """Processes for decode/resize/encode, replaced when one of them dies.

    A dead worker (the OOM killer, a crash inside a C decoder, a kill) breaks a
    ProcessPoolExecutor for good: the records in it and every later one would fail
    with BrokenProcessPool. Here the broken pool is replaced by a fresh one and the
    record tried again. A record that meets a dying pool ``TRIES`` times, or any record
    once ``MAX_DEATHS`` pools in a row died before finishing an image, raises
    ``DecodePoolDied``: that says nothing about the record, so it is never its status.
    """

    TRIES = 3
    # More than TRIES: one record that kills every process it enters must not stop the others.
    MAX_DEATHS = 5

    def __init__(self, processes: int) -> None:
        methods = multiprocessing.get_all_start_methods()
        # forkserver or spawn, never fork: a fresh pool may start while fetch threads run.
        self._ctx = multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")
        self._processes = processes
        self._lock = threading.Lock()
        self._deaths = 0  # pools that died since an image last came back
        self._pool: Optional[ProcessPoolExecutor] = self._new()
        try:
            self.run(int)  # start them now, not in the middle of the run
        except DecodePoolDied:
            pass  # every record will say so

    def _new(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(max_workers=self._processes, mp_context=self._ctx)

    def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` in an image process; raises DecodePoolDied when the processes keep dying."""
        tries = 0
        while tries < self.TRIES:
            with self._lock:
                pool = self._pool
            if pool is None:
                raise DecodePoolDied(f"gave up after {self.MAX_DEATHS} image process pools in a row died")
            try:
                future = pool.submit(fn, *args)
            except BrokenProcessPool:  # it broke before this record got in: no try spent
                self._replace(pool)
                continue
            try:
                result = future.result()
            except BrokenProcessPool:
                tries += 1
                self._replace(pool)
                continue
            with self._lock:
                self._deaths = 0
            return result
        raise DecodePoolDied(f"an image process died while this record was in it, {self.TRIES} times")

    def _replace(self, broken: ProcessPoolExecutor) -> None:
        with self._lock:
            if self._pool is not broken:
                return  # another thread has replaced it already
            self._deaths += 1
            self._pool = self._new() if self._deaths < self.MAX_DEATHS else None
        broken.shutdown(wait=False, cancel_futures=True)

    def shutdown(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)


def fetch_record(fetcher: Fetcher, params: DownloadParams, record: Record,
                 images: Optional[ImagePool] = None) -> Outcome:
    """Fetch, check and re-encode one record (on ``images`` if given); never raises."""
    try:
        data = fetcher.fetch(record.url)
        if record.sha256 and hashlib.sha256(data).hexdigest() != record.sha256:
            raise RecordFailure("sha256_mismatch", f"sha256 {hashlib.sha256(data).hexdigest()} != {record.sha256}")
        args = (data, params.max_pixels, params.resize, params.jpeg_quality)
        jpeg, w, h = images.run(process_image, *args) if images else process_image(*args)
        return Outcome(record, "ok", None, jpeg, w, h)
    except RecordFailure as fail:
        return Outcome(record, fail.status, fail.reason)
    except DecodePoolDied as err:
        return Outcome(record, INTERRUPTED, str(err))
    except Exception as err:  # a bug or an odd input must not lose the record
        return Outcome(record, "error", f"{type(err).__name__}: {err}")


def iter_shards(records: Iterable[Record], per_shard: int) -> Iterator[tuple[int, list[Record]]]:
    batch: list[Record] = []
    index = 0
    for rec in records:
        batch.append(rec)
        if len(batch) == per_shard:
            yield index, batch
            batch, index = [], index + 1
    if batch:
        yield index, batch


@dataclass
class _Open:
    outcomes: list
    remaining: int
    fingerprint: dict
    digest: str
    interrupted: int = 0


def _owned_records(total: Optional[int], per_shard: int, rank: Rank) -> Optional[int]:
    if total is None:
        return None
    n_shards = -(-total // per_shard)
    return sum(min(per_shard, total - i * per_shard) for i in range(n_shards) if rank.owns(i))


def download_records(
    records: Iterable[Record],
    out_dir: str | Path,
    params: DownloadParams,
    rank: Rank = Rank(),
    base_dir: Optional[Path] = None,
    total: Optional[int] = None,
    progress: bool = True,
) -> Summary:
    """Download ``records`` into shards under ``out_dir``; return the run's summary.

    Raises ``DownloadIncomplete`` at the end when some shards could not be finished
    because the image processes kept dying; every other shard is written.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    images = ImagePool(params.decode_processes) if params.decode_processes > 0 else None
    fetcher = Fetcher(params, base_dir)
    summary = Summary()
    window = 2 * params.workers
    max_open = max(2, -(-window // params.records_per_shard) + 2)
    results: queue.Queue = queue.Queue()
    open_shards: dict[int, _Open] = {}
    inflight = 0
    failures = 0
    start = time.monotonic()
    bar = tqdm(total=_owned_records(total, params.records_per_shard, rank), unit="img",
               desc=f"download rank {rank.rank}" if rank.world_size > 1 else "download",
               disable=not progress, smoothing=0.1)

    def work(index: int, pos: int, rec: Record) -> None:
        results.put((index, pos, fetch_record(fetcher, params, rec, images)))

    def handle(item: tuple[int, int, Outcome]) -> None:
        nonlocal inflight, failures
        index, pos, outcome = item
        inflight -= 1
        shard = open_shards[index]
        shard.outcomes[pos] = outcome
        shard.remaining -= 1
        if outcome.status == INTERRUPTED:
            shard.interrupted += 1
            summary.interrupted += 1
            summary.first_interrupted = summary.first_interrupted or f"{outcome.record.key} {outcome.record.url}"
        else:
            summary.by_status[outcome.status] += 1
        if outcome.status == "ok":
            summary.fetched_ok += 1
        else:
            failures += 1
            bar.set_postfix(failed=failures, refresh=False)
        bar.update(1)
        if shard.remaining == 0:
            if shard.interrupted:
                # Not written: a finished shard is final, and these records have no
                # status of their own yet. The next run fetches the whole shard again.
                summary.unfinished_shards.append(index)
            else:
                write_shard(out_dir, index, shard.outcomes, shard.fingerprint)
                # Out of DVC's reach until the run completes (see pipeline/core/partial.py).
                partial.save(shard_stem(index), shard.digest, shard_files(out_dir, index))
            del open_shards[index]

    def drain(block: bool) -> None:
        while True:
            try:
                handle(results.get(block=block))
            except queue.Empty:
                return
            block = False

    def keep(index: int, n: int) -> None:
        summary.shards_resumed += 1
        for line in read_statuses(out_dir, index):
            summary.by_status[line["status"]] += 1
        bar.update(n)

    run_fp = run_fingerprint(params)
    partial = PartialShards(out_dir)
    partial.sweep()
    redo = RedoLog(log, "download")
    n_shards = 0
    owned: list[str] = []
    restored = 0
    pool = ThreadPoolExecutor(max_workers=params.workers, thread_name_prefix="fetch")
    try:
        for index, recs in iter_shards(records, params.records_per_shard):
            n_shards = index + 1
            if not rank.owns(index):
                continue
            stem = shard_stem(index)
            owned.append(stem)
            summary.shards += 1
            summary.records += len(recs)
            remove_stale(out_dir, index)
            fingerprint = shard_fingerprint(run_fp, recs)
            key = digest(fingerprint)
            partial.keep_only(stem, key)
            finished = is_finished(out_dir, index)
            why = why_not_reusable(out_dir, index, fingerprint) if finished else None
            if finished and why is None:
                keep(index, len(recs))
                continue
            unfinish(out_dir, index)
            if partial.restore(stem, key, shard_files(out_dir, index)):
                restored += 1
                keep(index, len(recs))
                continue
            if finished:
                redo.note(f"shard {stem}", why)
            while len(open_shards) >= max_open:
                drain(block=True)
            open_shards[index] = _Open([None] * len(recs), len(recs), fingerprint, key)
            for pos, rec in enumerate(recs):
                while inflight >= window:
                    drain(block=True)
                pool.submit(work, index, pos, rec)
                inflight += 1
            drain(block=False)
        while open_shards:
            drain(block=True)
        remove_orphans(out_dir, n_shards)
        if not summary.unfinished_shards:
            # Every shard is in the output folder, where DVC records it: nothing to keep.
            partial.forget(owned)
            partial.forget_others(shard_stem(i) for i in range(n_shards))
            partial.remove_if_empty()
    finally:
        redo.close()
        if restored:
            log.warning("download: put back %d shards finished by a run that did not complete (from %s)",
                        restored, partial.root)
        # After an interrupt, queued records are dropped; running ones end within their timeouts.
        pool.shutdown(wait=True, cancel_futures=True)
        if images:
            images.shutdown()
        bar.close()
    summary.seconds = time.monotonic() - start
    if summary.unfinished_shards:
        raise DownloadIncomplete(summary.interrupted, summary.unfinished_shards, summary.first_interrupted)
    return summary


def download(
    source_dir: str | Path,
    out_dir: str | Path,
    params: DownloadParams,
    rank: Rank = Rank(),
    metrics_path: Optional[str | Path] = None,
    progress: bool = True,
) -> Summary:
    """The download stage: ``data/source`` -> ``data/images`` (+ metrics)."""
    from pipeline.prepare.manifest import read_manifest
    from pipeline.prepare.source import iter_records

    manifest = read_manifest(source_dir)
    summary = download_records(iter_records(source_dir), out_dir, params, rank,
                               base_dir=Path(source_dir), total=manifest.records, progress=progress)
    if metrics_path:
        # Ranks share nothing: each writes its own metrics file when there are several.
        write_metrics(rank_path(metrics_path, rank), summary.as_metrics())
    return summary
