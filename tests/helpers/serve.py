"""`capline serve` for tests and benchmarks: a model folder to serve, a real server on
127.0.0.1 (a free port) in a thread of this process, and a plain HTTP client.

``make_served_model`` saves an untrained tiny captioner (mapper + the scene-word
GPT-2) with its CLIP copied in: exactly the folder `capline caption` takes.
``ServerThread`` runs uvicorn on a socket bound to port 0 and stops it on exit.
"""
from __future__ import annotations

import http.client
import json
import threading
import time
import uuid
from pathlib import Path
from typing import Optional

from pipeline.serve.metrics import parse_metrics


def make_served_model(folder: Path, clip_dir: Path, gpt_dir: Path, prefix_length: int = 2) -> Path:
    """An untrained (seeded) captioner saved with ``clip_dir`` inside it; features recorded as embed would."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.core.params import MapperParams
    from pipeline.models.captioner import ClipCaptioner
    from pipeline.models.pretrained import load_clip
    from tests.helpers.models import clip_feature_attrs

    clip, _ = load_clip(clip_dir)
    dim = int(clip.config.projection_dim)
    features = clip_feature_attrs(clip_dir, dim)
    gpt = AutoModelForCausalLM.from_pretrained(gpt_dir, trust_remote_code=False)
    tok = AutoTokenizer.from_pretrained(gpt_dir, trust_remote_code=False)
    torch.manual_seed(0)
    model = ClipCaptioner.from_settings(MapperParams(type="mlp", prefix_length=prefix_length).model_dump(), dim,
                                        gpt, tok, features=features, finetune_gpt=False)
    return model.save(folder, clip_dir=clip_dir)


class ServerThread:
    """uvicorn serving ``service`` on 127.0.0.1:<free port> in a thread; ``with`` starts and stops it."""

    def __init__(self, service, start_timeout: float = 30.0) -> None:
        from pipeline.serve.run import bind, uvicorn_server

        self.service = service
        self.sock = bind("127.0.0.1", 0)
        self.port = self.sock.getsockname()[1]
        self.server = uvicorn_server(service, graceful_timeout=10.0)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.start_timeout = start_timeout

    def __enter__(self) -> "ServerThread":
        self.thread.start()
        deadline = time.monotonic() + self.start_timeout
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the server did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()


# ------------------------------------------------------------------------ client
class Reply:
    def __init__(self, status: int, body: bytes, content_type: str) -> None:
        self.status = status
        self.body = body
        self.content_type = content_type

    def json(self) -> dict:
        return json.loads(self.body)

    def __repr__(self) -> str:
        return f"Reply({self.status}, {self.body[:300]!r})"


def request(port: int, method: str, path: str, body: Optional[bytes] = None, content_type: Optional[str] = None,
            timeout: float = 60.0, conn: Optional[http.client.HTTPConnection] = None) -> Reply:
    """One request; ``conn`` reuses a keep-alive connection (left open), else one is opened and closed."""
    own = conn is None
    conn = conn or http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        headers = {"Content-Type": content_type} if content_type else {}
        conn.request(method, path, body=body, headers=headers)
        resp = conn.getresponse()
        return Reply(resp.status, resp.read(), resp.getheader("Content-Type", ""))
    finally:
        if own:
            conn.close()


def post_image(port: int, data: bytes, **kw) -> Reply:
    return request(port, "POST", "/caption", data, "image/jpeg", **kw)


def post_json(port: int, value, **kw) -> Reply:
    return request(port, "POST", "/caption", json.dumps(value).encode(), "application/json", **kw)


def multipart(fields: list[tuple[str, str, bytes]], boundary: Optional[str] = None) -> tuple[bytes, str]:
    """A multipart/form-data body of (name, filename or "", bytes) fields, and its Content-Type."""
    boundary = boundary or uuid.uuid4().hex
    out = b""
    for name, filename, data in fields:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        out += (f"--{boundary}\r\nContent-Disposition: {disposition}\r\n"
                f"Content-Type: application/octet-stream\r\n\r\n").encode() + data + b"\r\n"
    out += f"--{boundary}--\r\n".encode()
    return out, f"multipart/form-data; boundary={boundary}"


def metrics(port: int) -> dict[str, float]:
    return parse_metrics(request(port, "GET", "/metrics").body.decode())


def batch_counts(values: dict[str, float]) -> dict[int, int]:
    """Batch size -> forward passes of that size, from /metrics."""
    prefix = 'capline_batches_total{size="'
    return {int(k[len(prefix):-2]): int(v) for k, v in values.items() if k.startswith(prefix)}
