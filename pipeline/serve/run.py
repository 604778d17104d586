"""Starting `capline serve`: load the model folder, bind the socket, run uvicorn.

uvicorn answers SIGTERM (and Ctrl-C) with a graceful shutdown: it stops
accepting connections, lets the requests in flight finish (their images are
still in the model's queue or batch), then runs the app's shutdown, which stops
the model's worker. It then sends itself the signal again; we turn that second
SIGTERM into a clean exit 0, since the server did stop as asked.
"""
from __future__ import annotations

import signal
import socket
import sys
from pathlib import Path
from typing import Optional

from pipeline.caption.run import LoadedCaptioner, load_captioner
from pipeline.core.params import Decoding
from pipeline.models.captioner import retrieval_k
from pipeline.models.pretrained import ModelError
from pipeline.serve.app import ServeOptions, Service, make_app


def model_identity(model_dir: Path, loaded: LoadedCaptioner) -> dict:
    """What every reply names the model by: its folder, a digest of all its files, its CLIP, GPT-2 and decoding."""
    from pipeline.core.checkpoint import digest_files

    features = loaded.model.features or {}
    return {
        "name": Path(model_dir).resolve().name,
        "sha256": digest_files(model_dir),
        "clip": {"model_id": features.get("model_id"), "revision": features.get("model_revision")},
        "gpt": loaded.model.gpt_source,
        "decoding": loaded.decoding.model_dump(),
    }


def build_service(model_dir: str | Path, options: ServeOptions, decoding: Optional[Decoding] = None,
                  clip_dir: str | Path | None = None, device: str = "auto", precision: str = "auto") -> Service:
    if retrieval_k(model_dir) > 0:
        raise ModelError(f"{model_dir}: it reads retrieved captions (retrieval.k {retrieval_k(model_dir)}); serve has "
                         "no datastore yet: caption it with `capline caption --datastore`")
    loaded = load_captioner(model_dir, decoding, clip_dir=clip_dir, device=device, precision=precision)
    return Service(loaded, model_identity(Path(model_dir), loaded), options)


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket (port 0: a free one, read back with ``getsockname``)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.setblocking(False)
    return sock


def uvicorn_server(service: Service, graceful_timeout: float = 60.0, limit_concurrency: Optional[int] = None):
    import uvicorn

    config = uvicorn.Config(make_app(service), log_level="warning", access_log=False, lifespan="on",
                            timeout_graceful_shutdown=graceful_timeout, limit_concurrency=limit_concurrency)
    return uvicorn.Server(config)


def serve(service: Service, host: str, port: int, graceful_timeout: float = 60.0,
          limit_concurrency: Optional[int] = None) -> None:
    """Serve until SIGTERM or Ctrl-C; prints the address (the real port when ``port`` is 0) on stderr."""
    sock = bind(host, port)
    bound = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    print(f"capline serve: listening on http://{shown}:{bound} (model {service.identity['name']}, "
          f"max batch {service.options.max_batch}, max wait {service.options.max_wait_ms:g} ms)",
          file=sys.stderr, flush=True)
    server = uvicorn_server(service, graceful_timeout, limit_concurrency)
    # uvicorn re-sends SIGTERM to itself once it has shut down gracefully: that one means "done".
    signal.signal(signal.SIGTERM, _exit_cleanly)
    server.run(sockets=[sock])


def _exit_cleanly(signum, frame) -> None:
    raise SystemExit(0)
