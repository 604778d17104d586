"""Kill and resume, byte-identical shards, rank split, streaming memory."""
from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import yaml

from pipeline.datasets.prepare import prepare
from pipeline.runtime import Rank
from pipeline.download.run import download, download_records
from pipeline.download.errors import DownloadIncomplete
from pipeline.params import DataParams, DownloadParams
from pipeline.records import Record
from tests.helpers_download import jpeg, read_status
from tests.helpers_http import LoopbackServer, Reply

ROOT = Path(__file__).resolve().parents[1]
N, PER_SHARD = 60, 10


def _source(tmp: Path, srv: LoopbackServer) -> Path:
    lines = []
    for i in range(N):
        url = srv.route(f"/{i}.jpg", Reply(200, jpeg(48, 32, seed=i)))
        if i % 7 == 3:
            url = srv.url(f"/missing{i}")  # failures must resume identically too
        lines.append(json.dumps({"url": url, "captions": [f"image {i}", f"<b>picture</b> {i}"]}))
    (tmp / "list.jsonl").write_text("\n".join(lines) + "\n")
    prepare(tmp / "source", DataParams(source="jsonl", annotations=str(tmp / "list.jsonl")))
    return tmp / "source"


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_kill_and_resume_is_byte_identical(tmp_path):
    with LoopbackServer(latency=0.03) as srv:
        source = _source(tmp_path, srv)
        params = {"download": {"workers": 2, "per_host": 2, "records_per_shard": PER_SHARD, "decode_processes": 0}}
        (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
        cmd = [sys.executable, "-m", "stages.cli", "download", "--params", str(tmp_path / "params.yaml"),
               "--source", str(source), "--no-progress"]
        # Uninterrupted reference run.
        subprocess.run(cmd + ["--out", str(tmp_path / "ref"), "--metrics", str(tmp_path / "ref.json")],
                       cwd=ROOT, check=True, capture_output=True)
        # Interrupted run: SIGKILL once two shards are finished.
        out = tmp_path / "out"
        proc = subprocess.Popen(cmd + ["--out", str(out), "--metrics", str(tmp_path / "m.json")], cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while not (out / "00001.tar").exists() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        done = sorted(p.name for p in out.glob("*.tar"))
        assert 2 <= len(done) < N // PER_SHARD, done  # killed midway
        hits_before = dict(srv.hits)
        subprocess.run(cmd + ["--out", str(out), "--metrics", str(tmp_path / "m.json")], cwd=ROOT, check=True,
                       capture_output=True)
    assert _files(out) == _files(tmp_path / "ref")
    # Finished shards were kept, not fetched again.
    for name in done:
        for line in read_status(out / name.replace(".tar", ".status.jsonl")):
            path = "/" + line["url"].rsplit("/", 1)[1]
            assert srv.hits[path] == hits_before.get(path, 0)
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["records"] == N and metrics["shards_resumed"] == len(done)
    assert metrics["status_ok"] == sum(1 for i in range(N) if i % 7 != 3)
    assert metrics["status_http_error"] == sum(1 for i in range(N) if i % 7 == 3)


def test_ranks_split_shards_by_index(tmp_path):
    with LoopbackServer() as srv:
        source = _source(tmp_path, srv)
        p = DownloadParams(workers=4, records_per_shard=PER_SHARD, decode_processes=0, retries=0)
        for r in range(3):
            download(source, tmp_path / "split", p, Rank(r, 3), metrics_path=tmp_path / "m.json", progress=False)
            assert sorted(p_.name for p_ in (tmp_path / "split").glob("*.tar")) == \
                [f"{i:05d}.tar" for i in range(N // PER_SHARD) if i % 3 <= r]
        download(source, tmp_path / "whole", p, progress=False)
    assert _files(tmp_path / "split") == _files(tmp_path / "whole")
    assert json.loads((tmp_path / "m.rank1.json").read_text())["records"] == 2 * PER_SHARD


def test_stale_temporary_files_are_replaced(tmp_path):
    with LoopbackServer() as srv:
        source = _source(tmp_path, srv)
        out = tmp_path / "out"
        out.mkdir()
        (out / "00002.tar.tmp-99999").write_bytes(b"half a shard")
        download(source, out, DownloadParams(records_per_shard=PER_SHARD, decode_processes=0, retries=0), progress=False)
    assert not list(out.glob("*.tmp-*"))
    assert len(list(out.glob("*.tar"))) == N // PER_SHARD


MEMORY_SCRIPT = """
import json, resource, sys
from pathlib import Path
from pipeline.download.run import download_records
from pipeline.params import DownloadParams
from pipeline.records import Record
n, image, out = int(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
cap = "a long caption " * 400  # 6 kB per record: holding all records would show
def records():
    for i in range(n):
        yield Record(f"{i:08d}", image.as_uri(), "train", (cap + str(i),))
s = download_records(records(), out, DownloadParams(workers=4, records_per_shard=100, decode_processes=0), progress=False)
assert s.by_status["ok"] == n, s
print(json.dumps({"peak_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""


def test_peak_memory_does_not_grow_with_records(tmp_path):
    from tests.helpers_download import encode, solid

    image = tmp_path / "tiny.png"
    image.write_bytes(encode(solid((1, 2, 3), (8, 8)), "PNG"))

    def peak(n: int) -> int:
        out = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, str(n), str(image), str(tmp_path / f"o{n}")],
                             cwd=ROOT, check=True, capture_output=True, text=True)
        return json.loads(out.stdout.strip().splitlines()[-1])["peak_kib"]

    small, large = peak(600), peak(6000)  # 6000 x 6 kB = 36 MB if the input were held
    assert large <= 1.3 * small, (small, large)


# ------------------------------------------------------- dying image processes
def _kill_image_processes() -> int:
    """SIGKILL the decode processes (the pool's workers are this process's children)."""
    killed = 0
    for child in multiprocessing.active_children():
        try:
            os.kill(child.pid, signal.SIGKILL)
            killed += 1
        except ProcessLookupError:
            pass
    return killed


def _run_in_thread(recs, out, params) -> tuple[threading.Thread, dict]:
    result: dict = {}

    def target():
        try:
            result["summary"] = download_records(recs, out, params, progress=False)
        except Exception as err:  # handed to the test thread
            result["error"] = err

    thread = threading.Thread(target=target)
    thread.start()
    return thread, result


def _slow_records(srv: LoopbackServer, n: int = 6) -> list[Record]:
    # Each reply waits 0.3 s, so every image is still on the wire when the processes are killed.
    return [Record(f"r{i}", srv.route(f"/{i}.jpg", Reply(200, jpeg(48, 32, seed=i), delay=0.3)), "train", (f"c{i}",))
            for i in range(n)]


DYING = dict(workers=2, per_host=2, records_per_shard=3, retries=0, decode_processes=1)


def test_a_killed_image_process_is_replaced_and_its_records_retried(tmp_path):
    with LoopbackServer() as srv:
        recs = _slow_records(srv)
        thread, result = _run_in_thread(recs, tmp_path / "out", DownloadParams(**DYING))
        deadline = time.monotonic() + 60
        while not sum(srv.hits.values()) and time.monotonic() < deadline:  # the pool is up and warm
            time.sleep(0.005)
        assert _kill_image_processes() == 1
        thread.join(120)
    assert "error" not in result, result
    assert result["summary"].by_status == {"ok": 6}
    for shard in ("00000", "00001"):
        assert {s["status"] for s in read_status(tmp_path / "out" / f"{shard}.status.jsonl")} == {"ok"}
    assert all(srv.hits[f"/{i}.jpg"] == 1 for i in range(6))  # the image is decoded again, not fetched


def test_records_the_dying_processes_never_took_are_fetched_by_the_next_run(tmp_path):
    out = tmp_path / "out"
    with LoopbackServer() as srv:
        recs = _slow_records(srv)
        thread, result = _run_in_thread(recs, out, DownloadParams(**DYING))
        deadline = time.monotonic() + 60
        while not sum(srv.hits.values()) and time.monotonic() < deadline:
            time.sleep(0.005)
        while thread.is_alive() and time.monotonic() < deadline:  # every fresh process dies at once
            _kill_image_processes()
            time.sleep(0.005)
        thread.join(120)
        # No shard was written with a status that only says the processes died.
        assert isinstance(result.get("error"), DownloadIncomplete), result
        assert "run the download again" in str(result["error"]) and result["error"].shards == [0, 1]
        assert not list(out.iterdir())
        summary = download_records(recs, out, DownloadParams(**DYING), progress=False)
    assert summary.shards_resumed == 0 and summary.by_status == {"ok": 6}
    for shard in ("00000", "00001"):
        assert {s["status"] for s in read_status(out / f"{shard}.status.jsonl")} == {"ok"}
