"""A real HTTP server on 127.0.0.1 for tests and benchmarks, started and stopped by them.

Routes map a path to a list of replies served in order (the last one repeats), so
"500 then 200" or "429 with Retry-After, then the image" are one line each.
Replies can wait before answering (latency), stall halfway through the body, or
hold until the test opens their gate (a kill test stops a client at a known point).
"""
from __future__ import annotations

import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Optional


@dataclass
class Reply:
    status: int = 200
    body: bytes = b""
    headers: dict = field(default_factory=dict)
    content_type: str = "image/jpeg"
    delay: float = 0.0  # seconds before the response starts
    stall: float = 0.0  # seconds to pause after half of the body
    gate: Optional[threading.Event] = None  # answer only once this is set


class _QuietServer(ThreadingHTTPServer):
    """A client that hangs up mid-request (a fault some tests make on purpose) is not
    a server error: nothing is printed for it; any other error keeps its traceback."""

    def handle_error(self, request, client_address) -> None:
        import sys

        if not isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
            super().handle_error(request, client_address)


class LoopbackServer:
    def __init__(self, latency: float = 0.0) -> None:
        self.routes: dict[str, list[Reply]] = {}
        self.hits: Counter = Counter()
        self.headers_seen: dict[str, list[dict]] = defaultdict(list)
        self.latency = latency
        self.times: dict[str, list[float]] = defaultdict(list)  # arrival time of each request
        self.active = 0
        self.max_active = 0  # most requests in progress at once
        self._stop = threading.Event()
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet
                pass

            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                with server._lock:
                    n = server.hits[path]
                    server.hits[path] += 1
                    server.headers_seen[path].append(dict(self.headers))
                    server.times[path].append(time.monotonic())
                    server.active += 1
                    server.max_active = max(server.max_active, server.active)
                    replies = server.routes.get(path)
                try:
                    self._answer(replies, n)
                finally:
                    with server._lock:
                        server.active -= 1

            def _answer(self, replies: Optional[list[Reply]], n: int) -> None:
                reply = replies[min(n, len(replies) - 1)] if replies else Reply(404, b"not found", content_type="text/plain")
                if reply.gate is not None:
                    while not reply.gate.wait(0.05):
                        if server._stop.is_set():
                            return
                wait = reply.delay + server.latency
                if wait and server._stop.wait(wait):
                    return
                try:
                    self.send_response(reply.status)
                    self.send_header("Content-Type", reply.content_type)
                    self.send_header("Content-Length", str(len(reply.body)))
                    for k, v in reply.headers.items():
                        self.send_header(k, v)
                    self.end_headers()
                    if reply.stall:
                        half = len(reply.body) // 2
                        self.wfile.write(reply.body[:half])
                        self.wfile.flush()
                        if server._stop.wait(reply.stall):
                            return
                        self.wfile.write(reply.body[half:])
                    else:
                        self.wfile.write(reply.body)
                except (BrokenPipeError, ConnectionResetError):
                    pass

        self.httpd = _QuietServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self._thread: Optional[threading.Thread] = None

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def route(self, path: str, *replies: Reply) -> str:
        with self._lock:
            self.routes[path] = list(replies)
        return self.url(path)

    def start(self) -> "LoopbackServer":
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        if self._thread:
            self._thread.join(timeout=5)

    def __enter__(self) -> "LoopbackServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def serve_forever_cli() -> None:
    """``python -m tests.helpers.loopback DIR [LATENCY]``: serve the files of DIR (for subprocess use)."""
    import sys
    from pathlib import Path

    folder, latency = Path(sys.argv[1]), float(sys.argv[2]) if len(sys.argv) > 2 else 0.0
    srv = LoopbackServer(latency)
    for p in sorted(folder.iterdir()):
        if p.is_file():
            srv.route("/" + p.name, Reply(200, p.read_bytes()))
    srv.start()
    print(srv.port, flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        srv.stop()


if __name__ == "__main__":
    serve_forever_cli()
