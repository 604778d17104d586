"""The ASGI app (Starlette): routes, error replies, and the path of one /caption request.

A request is read (pipeline/serve/inputs.py), fetched when it names a URL, and its
image decoded and checked (size, format, pixel count: the embed stage's
preprocessing) in a thread, off the event loop; only the uint8 pixels go to the
model's queue (pipeline/serve/batcher.py), so a bad image never reaches the model.
"""
from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from dataclasses import dataclass
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from pipeline.caption.run import LoadedCaptioner
from pipeline.serve.batcher import MicroBatcher, QueueFull
from pipeline.serve.errors import ServeError
from pipeline.serve.inputs import read_request
from pipeline.serve.metrics import Metrics

log = logging.getLogger("pipeline.serve")


@dataclass(frozen=True)
class ServeOptions:
    max_batch: int = 16  # images per forward pass
    max_wait_ms: float = 10.0  # how long the first image of a batch waits for others
    max_queue: int = 256  # images waiting for the model before new ones get 503
    max_bytes: int = 20_000_000  # request body cap (the download stage's max_bytes)
    body_timeout: float = 30.0  # seconds for a whole request body


class Service:
    """The loaded model behind its queue, the URL fetcher, the metrics and the model's identity."""

    def __init__(self, loaded: LoadedCaptioner, identity: dict, options: ServeOptions) -> None:
        from pipeline.download.fetch import Fetcher

        self.loaded = loaded
        self.identity = identity
        self.options = options
        self.metrics = Metrics()
        self.fetcher = Fetcher(loaded.fetch_params)
        self.batcher = MicroBatcher(self._run_batch, options.max_batch, options.max_wait_ms / 1000.0,
                                    options.max_queue, on_batch=self.metrics.batch)

    def _run_batch(self, items: list[tuple[Any, str]]) -> list:
        return self.loaded.caption_pixels([pixels for pixels, _ in items], [key for _, key in items])

    def fetch(self, url: str) -> bytes:
        from pipeline.download.errors import RecordFailure

        try:
            return self.fetcher.fetch(url)
        except RecordFailure as err:
            raise ServeError(502, "fetch_failed", f"{url[:200]}: {err.status}: {err.reason}") from None

    def prepare(self, data: bytes, from_url: bool) -> tuple[Any, str]:
        """(decoded and checked pixels, the image's sha256); the image's own fault is 400/413, a fetched one's 502.

        The sha256 names the image in the reply and seeds sampling: the same image, the same captions.
        """
        from pipeline.embed.preprocess import ImageDecodeError, TooManyPixels

        try:
            return self.loaded.embedder.pre.to_uint8(data), hashlib.sha256(data).hexdigest()
        except TooManyPixels as err:
            raise ServeError(502 if from_url else 413, "too_many_pixels", str(err)) from None
        except ImageDecodeError as err:
            raise ServeError(502 if from_url else 400, "not_an_image", str(err)) from None


def error_reply(status: int, code: str, detail: str) -> JSONResponse:
    return JSONResponse({"error": code, "detail": detail}, status_code=status)


def make_app(service: Service) -> Starlette:
    options = service.options

    async def caption(request: Request) -> Response:
        start = time.perf_counter()
        service.metrics.started()
        try:
            wanted = await read_request(request, options.max_bytes, options.body_timeout)
            data = wanted.data
            if data is None:
                data = await run_in_threadpool(service.fetch, wanted.url)
            pixels, key = await run_in_threadpool(service.prepare, data, wanted.url is not None)
            captions = await asyncio.wrap_future(service.batcher.submit((pixels, key)))
        except ClientDisconnect:
            service.metrics.disconnected()
            return Response(status_code=400)  # nobody reads it; uvicorn drops it
        except ServeError as err:
            service.metrics.finished("/caption", err.status, time.perf_counter() - start, err.code)
            return error_reply(err.status, err.code, err.detail)
        except QueueFull as err:
            service.metrics.finished("/caption", 503, time.perf_counter() - start, "overloaded")
            return error_reply(503, "overloaded", str(err))
        except Exception as err:  # the model failed on this batch: this request fails, the server goes on
            log.exception("caption failed")
            service.metrics.finished("/caption", 500, time.perf_counter() - start, "model_error")
            return error_reply(500, "model_error", f"{type(err).__name__}: {err}")
        service.metrics.finished("/caption", 200, time.perf_counter() - start)
        return JSONResponse({
            "captions": [{"caption": c.text, "score": c.score} for c in captions],
            "image": {"sha256": key},
            "model": service.identity,
        })

    async def health(request: Request) -> Response:
        alive = service.batcher.alive
        return JSONResponse({"status": "ok" if alive else "model worker stopped", "model": service.identity,
                             "queue_depth": service.batcher.depth, "max_batch": options.max_batch},
                            status_code=200 if alive else 503)

    async def metrics(request: Request) -> Response:
        return PlainTextResponse(service.metrics.render(service.batcher.depth, options.max_batch),
                                 media_type="text/plain; version=0.0.4")

    async def http_error(request: Request, exc: HTTPException) -> Response:
        return error_reply(exc.status_code, "http_error", str(exc.detail))

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        service.batcher.start()
        try:
            yield
        finally:
            # uvicorn calls this after the in-flight requests are answered: the queue is empty by then.
            await run_in_threadpool(service.batcher.close)

    return Starlette(routes=[Route("/caption", caption, methods=["POST"]), Route("/health", health),
                             Route("/metrics", metrics)],
                     exception_handlers={HTTPException: http_error}, lifespan=lifespan)
