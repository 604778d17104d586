"""`capline serve` under misbehaving clients, on a real loopback server: a client that hangs up
mid-upload, slowloris-style clients trickling headers, a client trickling its body (408 at the
body deadline), malformed multipart bodies; meanwhile every good request gets 200."""
from __future__ import annotations

import select
import socket
import threading
import time

import pytest

from pipeline.core.params import Decoding
from pipeline.serve.app import ServeOptions
from pipeline.serve.run import build_service
from tests.helpers.images import jpeg
from tests.helpers.serve import ServerThread, make_served_model, metrics, multipart, post_image, request

pytestmark = pytest.mark.usefixtures("one_torch_thread")

IMAGE = jpeg(64, 48, seed=3)
HEAD = b"POST /caption HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/jpeg\r\nContent-Length: %d\r\n\r\n"


@pytest.fixture(scope="module")
def server(tmp_path_factory, hub_clip_dir, tiny_gpt_dir):
    model = make_served_model(tmp_path_factory.mktemp("serve-faults") / "model", hub_clip_dir, tiny_gpt_dir)
    options = ServeOptions(max_batch=8, max_wait_ms=20, body_timeout=1.0)
    service = build_service(model, options, Decoding(num_beams=1, max_new_tokens=4), device="cpu", precision="fp32")
    with ServerThread(service) as srv:
        yield srv


def _connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=10)


def _wait_for(predicate, what: str, tries: int = 400, pause: float = 0.025) -> None:
    """Poll (bounded in count, hence in time) until ``predicate()``; fail naming ``what``."""
    for _ in range(tries):
        if predicate():
            return
        time.sleep(pause)
    raise AssertionError(f"never happened: {what}")


def hang_up_mid_upload(port: int) -> None:
    """Promise 200 kB, send 2 kB, close."""
    with _connect(port) as s:
        s.sendall(HEAD % 200_000 + IMAGE[:2000])


def slow_body(port: int, pause: float = 0.05, bound: int = 200) -> bytes:
    """Trickle a 100 kB body 10 bytes at a time (at most ``bound`` times); return what the server answers."""
    with _connect(port) as s:
        s.sendall(HEAD % 100_000)
        for _ in range(bound):
            if select.select([s], [], [], pause)[0]:
                return s.recv(65536)
            try:
                s.sendall(b"\0" * 10)
            except OSError:
                break
        return s.recv(65536)


def slowloris(port: int, stop: threading.Event, bound: int = 400, pause: float = 0.025) -> None:
    """Headers that never end: one header line per pause, at most ``bound`` lines, until ``stop``."""
    with _connect(port) as s:
        s.sendall(b"POST /caption HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        for i in range(bound):
            if stop.wait(pause):
                return
            try:
                s.sendall(b"X-Slow-%d: 1\r\n" % i)
            except OSError:
                return


def test_a_client_hanging_up_mid_upload_is_counted_and_the_server_goes_on(server):
    before = metrics(server.port)["capline_client_disconnects_total"]
    for _ in range(3):
        hang_up_mid_upload(server.port)
    _wait_for(lambda: metrics(server.port)["capline_client_disconnects_total"] >= before + 3,
              "three hang-ups counted in /metrics")
    assert post_image(server.port, IMAGE).status == 200
    _wait_for(lambda: metrics(server.port)["capline_in_flight_requests"] == 0, "no request left in flight")


def test_a_body_trickling_in_gets_408_at_the_deadline(server):
    head = slow_body(server.port)
    assert head.startswith(b"HTTP/1.1 408"), head[:200]
    assert b'"error":"body_timeout"' in head
    assert post_image(server.port, IMAGE).status == 200


def test_good_requests_all_succeed_while_clients_misbehave(server):
    """Every fault at once, beside 4 good clients x 4 requests: the good requests' error rate is 0."""
    stop = threading.Event()
    bad_upload, kind = multipart([("image", "a.jpg", IMAGE)])
    outcomes: dict[str, list] = {"good": [], "slow_body": [], "malformed": []}

    def good_client() -> None:
        for _ in range(4):
            outcomes["good"].append(post_image(server.port, IMAGE, timeout=60).status)

    def malformed() -> None:
        for cut in (10, 100, len(bad_upload) // 2):
            outcomes["malformed"].append(request(server.port, "POST", "/caption", bad_upload[:-cut], kind).status)

    faults = [threading.Thread(target=slowloris, args=(server.port, stop)) for _ in range(10)]
    faults += [threading.Thread(target=hang_up_mid_upload, args=(server.port,)) for _ in range(3)]
    faults += [threading.Thread(target=lambda: outcomes["slow_body"].append(slow_body(server.port)))
               for _ in range(2)]
    faults += [threading.Thread(target=malformed) for _ in range(2)]
    good = [threading.Thread(target=good_client) for _ in range(4)]
    for t in faults + good:
        t.start()
    for t in good:
        t.join(120)
    stop.set()
    for t in faults:
        t.join(60)
    assert outcomes["good"] == [200] * 16
    assert [h[:12] for h in outcomes["slow_body"]] == [b"HTTP/1.1 408"] * 2
    assert outcomes["malformed"] == [400] * 6
    assert all(not t.is_alive() for t in faults + good)
    _wait_for(lambda: metrics(server.port)["capline_in_flight_requests"] == 0, "no request left in flight")
