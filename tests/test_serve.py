"""`capline serve` against a real uvicorn server on 127.0.0.1: the captions are `capline caption`'s,
requests that arrive together share forward passes, and bad requests get their status and a JSON
error while good requests keep getting 200."""
from __future__ import annotations

import threading

import pytest

from pipeline.caption.run import caption_inputs
from pipeline.core.params import Decoding
from pipeline.serve.app import ServeOptions
from pipeline.serve.run import build_service
from tests.helpers.images import jpeg, png_bomb
from tests.helpers.loopback import Reply as LoopbackReply
from tests.helpers.serve import (ServerThread, batch_counts, make_served_model, metrics, multipart, post_image,
                                 post_json, request)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

DECODING = Decoding(num_beams=2, num_return_sequences=2, max_new_tokens=6)
IMAGES = [jpeg(48 + 8 * i, 40, seed=i) for i in range(4)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, hub_clip_dir, tiny_gpt_dir):
    return make_served_model(tmp_path_factory.mktemp("serve") / "model", hub_clip_dir, tiny_gpt_dir)


@pytest.fixture(scope="module")
def server(model_dir):
    """One server for the module: batches of up to 8, a batch waits up to 200 ms for company."""
    options = ServeOptions(max_batch=8, max_wait_ms=200, max_bytes=300_000, body_timeout=5.0)
    with ServerThread(build_service(model_dir, options, DECODING, device="cpu", precision="fp32")) as srv:
        yield srv


@pytest.fixture(scope="module")
def expected(model_dir, tmp_path_factory):
    """What `capline caption` says for IMAGES, one at a time."""
    folder = tmp_path_factory.mktemp("serve-images")
    paths = []
    for i, data in enumerate(IMAGES):
        paths.append(folder / f"{i}.jpg")
        paths[-1].write_bytes(data)
    results = caption_inputs(model_dir, [str(p) for p in paths], DECODING, device="cpu", precision="fp32",
                             batch_size=1, progress=False)
    return [[{"caption": c.text, "score": c.score} for c in r.captions] for r in results]


def _captions(reply):
    assert reply.status == 200, reply
    return reply.json()["captions"]


def _scores_close(got, want):
    assert [c["caption"] for c in got] == [c["caption"] for c in want]
    assert [c["score"] for c in got] == pytest.approx([c["score"] for c in want], abs=1e-4)


def test_every_request_form_gets_the_captions_capline_caption_gives(server, expected, model_dir, loopback):
    loopback.route("/0.jpg", LoopbackReply(body=IMAGES[0]))
    body, kind = multipart([("image", "1.jpg", IMAGES[1])])
    by_url = post_json(server.port, {"url": loopback.url("/0.jpg")})
    upload = request(server.port, "POST", "/caption", body, kind)
    raw = post_image(server.port, IMAGES[2])
    for reply, want in [(by_url, expected[0]), (upload, expected[1]), (raw, expected[2])]:
        got = _captions(reply)
        assert len(got) == 2 and got[0]["score"] >= got[1]["score"]
        _scores_close(got, want)
    model = raw.json()["model"]
    assert model["name"] == "model" and len(model["sha256"]) == 64
    assert model["decoding"]["num_beams"] == 2 and model["clip"]["model_id"]
    health = request(server.port, "GET", "/health")
    assert health.status == 200 and health.json()["status"] == "ok" and health.json()["model"] == model


def test_concurrent_clients_share_forward_passes(server, expected):
    """The load test: 8 clients x 4 requests at once; every one 200 with its own image's captions,
    and the model ran batches of more than one image."""
    before = batch_counts(metrics(server.port))
    clients, per_client = 8, 4
    replies: dict[tuple[int, int], object] = {}

    def client(c: int) -> None:
        for r in range(per_client):
            replies[(c, r)] = post_image(server.port, IMAGES[(c + r) % 4], timeout=60)

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert len(replies) == clients * per_client
    for (c, r), reply in replies.items():
        _scores_close(_captions(reply), expected[(c + r) % 4])
    after = batch_counts(metrics(server.port))
    new = {size: after.get(size, 0) - before.get(size, 0) for size in after}
    assert sum(size * n for size, n in new.items()) == clients * per_client
    assert max(size for size, n in new.items() if n) > 1, new  # micro-batching happened
    assert max(after) <= 8


def _bad_requests(loopback):
    loopback.route("/missing.jpg", LoopbackReply(status=404, body=b"gone"))
    loopback.route("/page.jpg", LoopbackReply(body=b"<html>not a picture</html>", content_type="text/html"))
    good = IMAGES[0]
    upload_extra, kind_extra = multipart([("image", "a.jpg", good), ("caption", "", b"a cat")])
    upload_wrong, kind_wrong = multipart([("picture", "a.jpg", good)])
    upload_ok, kind_ok = multipart([("image", "a.jpg", good)])
    return [
        ("not an image", ("POST", "/caption", b"<html><script>alert(1)</script></html>", "image/jpeg"),
         400, "not_an_image"),
        ("truncated jpeg", ("POST", "/caption", good[:200], "image/jpeg"), 400, "not_an_image"),
        ("decompression bomb", ("POST", "/caption", png_bomb(), "image/png"), 413, "too_many_pixels"),
        ("over the size limit", ("POST", "/caption", good + b"\0" * 300_000, "image/jpeg"), 413, "too_large"),
        ("empty body", ("POST", "/caption", b"", "image/jpeg"), 400, "empty_body"),
        ("unknown form field", ("POST", "/caption", upload_extra, kind_extra), 422, "unknown_field"),
        ("misnamed form field", ("POST", "/caption", upload_wrong, kind_wrong), 422, "unknown_field"),
        ("malformed multipart", ("POST", "/caption", upload_ok[:-40] + b"--garbage", kind_ok.split(";")[0]),
         400, "bad_multipart"),
        ("unknown JSON field", ("POST", "/caption", b'{"url": "http://x/a.jpg", "size": 3}', "application/json"),
         422, "unknown_field"),
        ("JSON without url", ("POST", "/caption", b"{}", "application/json"), 422, "missing_field"),
        ("file: URL", ("POST", "/caption", b'{"url": "file:///etc/passwd"}', "application/json"), 422, "bad_url"),
        ("broken JSON", ("POST", "/caption", b'{"url": ', "application/json"), 400, "bad_json"),
        ("URL answering 404", ("POST", "/caption", f'{{"url": "{loopback.url("/missing.jpg")}"}}'.encode(),
                               "application/json"), 502, "fetch_failed"),
        ("URL of a web page", ("POST", "/caption", f'{{"url": "{loopback.url("/page.jpg")}"}}'.encode(),
                               "application/json"), 502, "not_an_image"),
        ("wrong method", ("GET", "/caption", None, None), 405, "http_error"),
        ("unknown path", ("GET", "/nothing", None, None), 404, "http_error"),
    ]


def test_bad_requests_get_their_status_and_a_json_error_and_good_ones_still_work(server, expected, loopback):
    results = []
    for name, (method, path, body, kind), status, code in _bad_requests(loopback):
        reply = request(server.port, method, path, body, kind)
        assert reply.content_type == "application/json", (name, reply)
        results.append((name, reply.status, reply.json().get("error")))
        assert reply.status == 200 or reply.json()["detail"], name
        # After each bad request, a good one is served as before.
        _scores_close(_captions(post_image(server.port, IMAGES[3])), expected[3])
    assert results == [(name, status, code) for name, _, status, code in _bad_requests(loopback)]
    counts = metrics(server.port)
    assert counts['capline_errors_total{code="too_many_pixels"}'] >= 1
    assert counts['capline_requests_total{path="/caption",status="413"}'] >= 2
