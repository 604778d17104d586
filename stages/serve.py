"""`capline serve`: an HTTP captioning service (Starlette + uvicorn) with micro-batching (docs/serve.md)."""
from __future__ import annotations

import click

from stages.caption import decoding_options


@click.command("serve")
@click.option("--model", "model_dir", default="data/model", show_default=True, type=click.Path(file_okay=False),
              help="trained model folder, as `capline caption` takes it")
@click.option("--clip", "clip_dir", default=None, type=click.Path(file_okay=False),
              help="CLIP folder, for a model folder trained without one [default: the model folder's clip/]")
@click.option("--host", default="127.0.0.1", show_default=True, help="address to listen on")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535),
              help="port to listen on; 0 = a free one (printed on stderr)")
@click.option("--max-batch", default=16, show_default=True, type=click.IntRange(min=1),
              help="most images in one forward pass")
@click.option("--max-wait-ms", default=10.0, show_default=True, type=click.FloatRange(min=0),
              help="how long a batch's first image waits for others to join it")
@click.option("--max-queue", default=256, show_default=True, type=click.IntRange(min=1),
              help="images waiting for the model beyond which requests get 503")
@click.option("--max-bytes", default=20_000_000, show_default=True, type=click.IntRange(min=1),
              help="largest request body (413 beyond)")
@click.option("--body-timeout", default=30.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="seconds for a whole request body to arrive (408 beyond)")
@click.option("--limit-concurrency", default=None, type=click.IntRange(min=1),
              help="most connections and requests at once; more get 503 [default: no limit]")
@click.option("--graceful-timeout", default=60.0, show_default=True, type=click.FloatRange(min=0),
              help="on SIGTERM, seconds the requests in flight get to finish")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:N or mps")
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16", "fp16"]), default="auto",
              show_default=True, help="auto: bf16 weights where the device runs bf16 fast, else fp32")
@decoding_options
def serve(model_dir: str, clip_dir: str | None, host: str, port: int, max_batch: int, max_wait_ms: float,
          max_queue: int, max_bytes: int, body_timeout: float, limit_concurrency: int | None,
          graceful_timeout: float, device: str, precision: str, **decoding) -> None:
    """Serve captions over HTTP: POST /caption (image bytes, a multipart upload, or JSON {"url": ...}),
    GET /health, GET /metrics. Requests that arrive together share one forward pass.

    Every decoding option defaults to the model folder's generation_config.json.
    SIGTERM finishes the requests in flight, then exits 0.
    """
    from pipeline.caption.run import option_name, resolve_decoding
    from pipeline.serve.app import ServeOptions
    from pipeline.serve.run import build_service
    from pipeline.serve.run import serve as run_server

    d = resolve_decoding(model_dir, decoding, name=option_name)
    options = ServeOptions(max_batch=max_batch, max_wait_ms=max_wait_ms, max_queue=max_queue, max_bytes=max_bytes,
                           body_timeout=body_timeout)
    service = build_service(model_dir, options, d, clip_dir=clip_dir, device=device, precision=precision)
    run_server(service, host, port, graceful_timeout=graceful_timeout, limit_concurrency=limit_concurrency)
