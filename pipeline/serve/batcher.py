"""Micro-batching: requests that arrive together share one forward pass.

One worker thread owns the model (torch is not run from several threads at once).
It blocks for the first queued item, then keeps collecting until it has
``max_batch`` items or ``max_wait`` seconds have passed since that first item,
and calls ``run(items)`` once for the whole batch. An exception in ``run`` fails
that batch's futures only; the worker goes on with the next batch.
"""
from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import Future
from typing import Any, Callable, Optional, Sequence

_STOP = object()


class QueueFull(Exception):
    """More items waiting than ``max_queue``: the caller should answer 503."""


class MicroBatcher:
    def __init__(self, run: Callable[[list[Any]], Sequence[Any]], max_batch: int, max_wait: float,
                 max_queue: int = 1024, on_batch: Optional[Callable[[int, float], None]] = None) -> None:
        if max_batch < 1 or max_wait < 0 or max_queue < 1:
            raise ValueError("max_batch >= 1, max_wait >= 0 and max_queue >= 1 are required")
        self.run = run
        self.max_batch = max_batch
        self.max_wait = max_wait
        self.max_queue = max_queue
        self.on_batch = on_batch  # (batch size, seconds in run) after each batch, for metrics
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="capline-model", daemon=True)
        self._closed = False
        self._lock = threading.Lock()  # no item may be queued behind the stop mark

    def start(self) -> "MicroBatcher":
        self._thread.start()
        return self

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def depth(self) -> int:
        """Items waiting for a batch (not the one being run)."""
        return self._queue.qsize()

    def submit(self, item: Any) -> Future:
        future: Future = Future()
        with self._lock:
            if self._closed:
                raise QueueFull("the server is shutting down")
            if not self._thread.is_alive():  # nothing would ever answer: refuse instead of hanging
                raise QueueFull("the model worker has stopped")
            if self._queue.qsize() >= self.max_queue:
                raise QueueFull(f"{self.max_queue} images already wait for the model")
            self._queue.put((item, future))
        return future

    def close(self, timeout: float = 60.0) -> None:
        """Run what is queued, then stop the worker (graceful shutdown)."""
        with self._lock:
            self._closed = True
            self._queue.put(_STOP)
        self._thread.join(timeout)

    # ------------------------------------------------------------- worker thread
    def _loop(self) -> None:
        stopping = False
        while not stopping:
            first = self._queue.get()
            if first is _STOP:
                return
            batch = [first]
            deadline = time.monotonic() + self.max_wait
            while len(batch) < self.max_batch:
                try:
                    nxt = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if nxt is _STOP:
                    stopping = True  # finish this batch first
                    break
                batch.append(nxt)
            self._run_batch(batch)

    def _run_batch(self, batch: list) -> None:
        items = [item for item, _ in batch]
        futures = [f for _, f in batch]
        start = time.perf_counter()
        try:
            results = self.run(items)
            if len(results) != len(items):
                raise RuntimeError(f"the batch function gave {len(results)} results for {len(items)} items")
        except Exception as err:  # one failed batch fails its requests, never the worker
            results, error = None, err
        else:
            error = None
        # Counted before any reply goes out, so /metrics read after a reply includes its batch.
        if self.on_batch is not None:
            self.on_batch(len(items), time.perf_counter() - start)
        for i, f in enumerate(futures):
            if error is not None:
                f.set_exception(error)
            else:
                f.set_result(results[i])
