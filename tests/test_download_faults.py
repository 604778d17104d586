"""One test per fault, against a real HTTP server on 127.0.0.1.

Each run holds the faulty record and a good one: the fault gets its named status
and the good record still arrives (the run goes on).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from pipeline.download.run import download_records
from pipeline.core.params import DownloadParams
from pipeline.formats.records import Record
from tests.helpers.images import jpeg, png_bomb, read_status, read_tar
from tests.helpers.loopback import LoopbackServer, Reply

FAST = dict(workers=4, per_host=4, records_per_shard=10, connect_timeout=2.0, read_timeout=2.0,
            retries=2, backoff=0.01, decode_processes=0)


@pytest.fixture
def server(loopback):
    loopback.route("/good.jpg", Reply(200, jpeg()))
    return loopback


def run(server: LoopbackServer, tmp_path: Path, url: str, sha256: str | None = None, **overrides) -> dict:
    """Download [fault, good]; return the fault's status line (after checking the good one)."""
    recs = [Record("fault", url, "train", ("x",), sha256), Record("good", server.url("/good.jpg"), "train", ("y",))]
    out = tmp_path / "out"
    download_records(recs, out, DownloadParams(**{**FAST, **overrides}), progress=False)
    lines = {s["key"]: s for s in read_status(out / "00000.status.jsonl")}
    assert lines["good"]["status"] == "ok", lines["good"]
    members = read_tar(out / "00000.tar")
    assert "good.jpg" in members and json.loads(members["good.json"])["captions"] == ["y"]
    assert ("fault.jpg" in members) == (lines["fault"]["status"] == "ok")
    return lines["fault"]


def test_404_is_final(server, tmp_path):
    line = run(server, tmp_path, server.route("/missing", Reply(404, b"no")))
    assert line["status"] == "http_error" and "404" in line["reason"]
    assert server.hits["/missing"] == 1  # 4xx other than 429: no retry


def test_500_then_success_recovered_by_retry(server, tmp_path):
    line = run(server, tmp_path, server.route("/flaky", Reply(500, b"oops"), Reply(200, jpeg(seed=3))))
    assert line["status"] == "ok"
    assert server.hits["/flaky"] == 2


def test_500_forever_gives_up_after_retries(server, tmp_path):
    line = run(server, tmp_path, server.route("/down", Reply(503, b"down")), retries=2)
    assert line["status"] == "http_error" and "503" in line["reason"]
    assert server.hits["/down"] == 3


def test_429_honours_retry_after(server, tmp_path):
    url = server.route("/busy", Reply(429, b"slow down", headers={"Retry-After": "1"}), Reply(200, jpeg()))
    line = run(server, tmp_path, url, backoff=0.0)
    assert line["status"] == "ok"
    t = server.times["/busy"]
    assert len(t) == 2 and t[1] - t[0] >= 0.95  # waited as told, not the 0 s backoff


def test_retry_after_beyond_cap_is_a_failure(server, tmp_path):
    line = run(server, tmp_path, server.route("/later", Reply(429, b"", headers={"Retry-After": "3600"})))
    assert line["status"] == "http_error" and "Retry-After" in line["reason"]
    assert server.hits["/later"] == 1


def test_body_slower_than_read_timeout(server, tmp_path):
    url = server.route("/slow", Reply(200, jpeg(), stall=5.0))
    line = run(server, tmp_path, url, read_timeout=0.3, retries=1)
    assert line["status"] == "timeout"
    assert server.hits["/slow"] == 2  # a timeout is retried


def test_no_response_before_read_timeout(server, tmp_path):
    line = run(server, tmp_path, server.route("/mute", Reply(200, jpeg(), delay=5.0)), read_timeout=0.3, retries=0)
    assert line["status"] == "timeout"


def test_connection_refused(server, tmp_path):
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    line = run(server, tmp_path, f"http://127.0.0.1:{port}/x.jpg", retries=1)
    assert line["status"] == "connection_error"


def test_truncated_jpeg(server, tmp_path):
    data = jpeg(64, 48)
    line = run(server, tmp_path, server.route("/cut.jpg", Reply(200, data[: len(data) * 2 // 3])))
    assert line["status"] == "decode_error"


def test_bytes_that_are_no_image(server, tmp_path):
    html = b"<html><body><script>alert(1)</script></body></html>"
    line = run(server, tmp_path, server.route("/page", Reply(200, html, content_type="text/html")))
    assert line["status"] == "not_an_image"


def test_redirect_chain_allowed(server, tmp_path):
    server.route("/r3", Reply(302, b"", headers={"Location": "/good.jpg"}))
    server.route("/r2", Reply(301, b"", headers={"Location": server.url("/r3")}))
    line = run(server, tmp_path, server.route("/r1", Reply(307, b"", headers={"Location": "/r2"})), max_redirects=3)
    assert line["status"] == "ok"
    assert server.hits["/r3"] == 1


def test_redirect_chain_too_long(server, tmp_path):
    for i in range(1, 5):
        server.route(f"/loop{i}", Reply(302, b"", headers={"Location": f"/loop{i + 1}"}))
    line = run(server, tmp_path, server.url("/loop1"), max_redirects=2)
    assert line["status"] == "too_many_redirects"
    assert server.hits["/loop4"] == 0


def test_redirect_to_file_is_refused(server, tmp_path):
    secret = tmp_path / "secret.jpg"
    secret.write_bytes(jpeg())
    line = run(server, tmp_path, server.route("/evil", Reply(302, b"", headers={"Location": secret.as_uri()})))
    assert line["status"] == "bad_redirect"


def test_decompression_bomb(server, tmp_path):
    line = run(server, tmp_path, server.route("/bomb.png", Reply(200, png_bomb(), content_type="image/png")))
    assert line["status"] == "too_many_pixels" and "100000x100000" in line["reason"]


def test_pixel_cap_is_the_param(server, tmp_path):
    line = run(server, tmp_path, server.route("/big.jpg", Reply(200, jpeg(80, 60))), max_pixels=64 * 48)
    assert line["status"] == "too_many_pixels"


def test_body_over_byte_cap(server, tmp_path):
    line = run(server, tmp_path, server.route("/fat.jpg", Reply(200, jpeg(300, 200))), max_bytes=len(jpeg()) + 10)
    assert line["status"] == "too_large"


def test_unsupported_scheme(server, tmp_path):
    assert run(server, tmp_path, "ftp://127.0.0.1/x.jpg")["status"] == "unsupported_url"


def test_sha256_checked_where_given(server, tmp_path):
    data = jpeg(seed=5)
    url = server.route("/h.jpg", Reply(200, data))
    assert run(server, tmp_path / "a", url, sha256="0" * 64)["status"] == "sha256_mismatch"
    assert run(server, tmp_path / "b", url, sha256=hashlib.sha256(data).hexdigest())["status"] == "ok"


def test_user_agent_sent(server, tmp_path):
    run(server, tmp_path, server.url("/good.jpg"), user_agent="capline-test/9")
    assert all(h.get("User-Agent") == "capline-test/9" for h in server.headers_seen["/good.jpg"])


def test_per_host_cap(tmp_path, loopback):
    loopback.latency = 0.05
    data = jpeg()
    recs = [Record(f"k{i:02d}", loopback.route(f"/{i}.jpg", Reply(200, data)), "train", ()) for i in range(24)]
    download_records(recs, tmp_path, DownloadParams(**{**FAST, "workers": 12, "per_host": 3}), progress=False)
    assert loopback.max_active <= 3
    assert loopback.max_active >= 2  # and it still fetched concurrently
    assert all(s["status"] == "ok" for s in read_status(tmp_path / "00000.status.jsonl") + read_status(tmp_path / "00001.status.jsonl"))


def test_file_urls_to_devices_and_fifos_are_refused(tmp_path):
    # A list may name any file: one with no end (/dev/zero) or no writer (a FIFO)
    # must fail its record, not hang the run or fill the memory.
    import os
    import threading

    from pipeline.download.errors import RecordFailure
    from pipeline.download.fetch import Fetcher

    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    fetcher = Fetcher(DownloadParams(**FAST))
    got: dict = {}

    def fetch_all() -> None:
        for name, url in (("fifo", fifo.as_uri()), ("zero", "file:///dev/zero")):
            try:
                fetcher.fetch(url)
                got[name] = "ok"
            except RecordFailure as fail:
                got[name] = fail.status

    t = threading.Thread(target=fetch_all, daemon=True)
    t.start()
    t.join(10)
    assert not t.is_alive(), "fetching a FIFO or a device hung"
    assert got == {"fifo": "file_not_found", "zero": "file_not_found"}


def test_body_trickled_slower_than_the_deadline(server, tmp_path):
    # Each byte arrives within read_timeout, so only the whole-body deadline
    # (connect + 4 x read = 2.5 s here) can end this request; the body would take 60 s.
    import socket
    import threading
    import time

    stop = threading.Event()
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    listener.settimeout(0.2)

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                continue
            with conn:
                conn.recv(65536)
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: image/jpeg\r\nContent-Length: 300\r\n\r\n")
                for _ in range(300):
                    if stop.wait(0.2):
                        break
                    try:
                        conn.sendall(b"x")
                    except OSError:
                        break

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        start = time.monotonic()
        url = f"http://127.0.0.1:{listener.getsockname()[1]}/trickle.jpg"
        line = run(server, tmp_path, url, connect_timeout=0.5, read_timeout=0.5, retries=0)
        elapsed = time.monotonic() - start
    finally:
        stop.set()
        thread.join(5)
        listener.close()
    assert line["status"] == "timeout" and "deadline" in line["reason"]
    assert elapsed < 10, elapsed
