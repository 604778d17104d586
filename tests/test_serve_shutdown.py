"""`capline serve` as its own process: SIGTERM while requests are in flight answers every one
of them with 200, then the process exits 0."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

from tests.helpers.images import jpeg
from tests.helpers.serve import make_served_model, metrics, post_image, request


@pytest.fixture
def model_dir(tmp_path, hub_clip_dir, tiny_gpt_dir):
    return make_served_model(tmp_path / "model", hub_clip_dir, tiny_gpt_dir)


def _port_from(proc: subprocess.Popen, log, tries: int = 1200) -> int:
    """The port the server prints on stderr (a file: a pipe left unread could fill and block the
    server) once it has bound its socket; polled at most ``tries`` times (about 60 s)."""
    for _ in range(tries):
        found = re.search(r"listening on http://127\.0\.0\.1:(\d+)", log.read_text())
        if found:
            return int(found.group(1))
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    raise AssertionError("the server printed no address:\n" + log.read_text())


def test_sigterm_finishes_the_requests_in_flight_then_exits_0(model_dir, tmp_path):
    # Batches wait up to 5 s for company, so the requests below are surely in flight when SIGTERM comes.
    cmd = [sys.executable, "-m", "stages.cli", "serve", "--model", str(model_dir), "--port", "0",
           "--max-batch", "16", "--max-wait-ms", "5000", "--device", "cpu", "--num-beams", "1",
           "--max-new-tokens", "4"]
    log = tmp_path / "stderr.txt"
    with open(log, "w") as err:
        proc = subprocess.Popen(cmd, cwd=tmp_path, stderr=err, stdout=subprocess.DEVNULL,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        port = _port_from(proc, log)
        assert request(port, "GET", "/health", timeout=60).status == 200
        replies: list = []
        clients = [threading.Thread(target=lambda i=i: replies.append(post_image(port, jpeg(seed=i), timeout=60)))
                   for i in range(4)]
        for t in clients:
            t.start()
        for _ in range(400):  # bounded: at most about 10 s
            if metrics(port)["capline_in_flight_requests"] == 4:
                break
            time.sleep(0.025)
        else:
            raise AssertionError("the four requests were never in flight together")
        assert metrics(port)["capline_images_captioned_total"] == 0  # still waiting for their batch
        proc.send_signal(signal.SIGTERM)
        for t in clients:
            t.join(60)
        assert [r.status for r in replies] == [200] * 4, replies
        assert all(r.json()["captions"] for r in replies)
        assert proc.wait(timeout=60) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
