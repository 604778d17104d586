"""Kill and resume, byte-identical shards, rank split, streaming memory."""
from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import yaml

from pipeline.prepare.run import prepare
from pipeline.core.runtime import Rank
from pipeline.download.run import download, download_records
from pipeline.download.errors import DownloadIncomplete
from pipeline.core.params import DataParams, DownloadParams
from pipeline.formats.records import Record
from tests.helpers.images import jpeg, read_status
from tests.helpers.loopback import LoopbackServer, Reply

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


def test_kill_and_resume_is_byte_identical(tmp_path, loopback):
    loopback.latency = 0.03
    source = _source(tmp_path, loopback)
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
    hits_before = dict(loopback.hits)
    subprocess.run(cmd + ["--out", str(out), "--metrics", str(tmp_path / "m.json")], cwd=ROOT, check=True,
                   capture_output=True)
    assert _files(out) == _files(tmp_path / "ref")
    # Finished shards were kept, not fetched again.
    for name in done:
        for line in read_status(out / name.replace(".tar", ".status.jsonl")):
            path = "/" + line["url"].rsplit("/", 1)[1]
            assert loopback.hits[path] == hits_before.get(path, 0)
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["records"] == N and metrics["shards_resumed"] == len(done)
    assert metrics["status_ok"] == sum(1 for i in range(N) if i % 7 != 3)
    assert metrics["status_http_error"] == sum(1 for i in range(N) if i % 7 == 3)


def test_ranks_split_shards_by_index(tmp_path, loopback):
    source = _source(tmp_path, loopback)
    p = DownloadParams(workers=4, records_per_shard=PER_SHARD, decode_processes=0, retries=0)
    for r in range(3):
        download(source, tmp_path / "split", p, Rank(r, 3), metrics_path=tmp_path / "m.json", progress=False)
        assert sorted(p_.name for p_ in (tmp_path / "split").glob("*.tar")) == \
            [f"{i:05d}.tar" for i in range(N // PER_SHARD) if i % 3 <= r]
    download(source, tmp_path / "whole", p, progress=False)
    assert _files(tmp_path / "split") == _files(tmp_path / "whole")
    assert json.loads((tmp_path / "m.rank1.json").read_text())["records"] == 2 * PER_SHARD


def test_stale_temporary_files_are_replaced(tmp_path, loopback):
    source = _source(tmp_path, loopback)
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
from pipeline.core.params import DownloadParams
from pipeline.formats.records import Record
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
    from tests.helpers.images import encode, solid

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


def test_a_killed_image_process_is_replaced_and_its_records_retried(tmp_path, loopback):
    recs = _slow_records(loopback)
    thread, result = _run_in_thread(recs, tmp_path / "out", DownloadParams(**DYING))
    deadline = time.monotonic() + 60
    while not sum(loopback.hits.values()) and time.monotonic() < deadline:  # the pool is up and warm
        time.sleep(0.005)
    assert _kill_image_processes() == 1
    thread.join(120)
    assert "error" not in result, result
    assert result["summary"].by_status == {"ok": 6}
    for shard in ("00000", "00001"):
        assert {s["status"] for s in read_status(tmp_path / "out" / f"{shard}.status.jsonl")} == {"ok"}
    assert all(loopback.hits[f"/{i}.jpg"] == 1 for i in range(6))  # the image is decoded again, not fetched


def test_records_the_dying_processes_never_took_are_fetched_by_the_next_run(tmp_path, loopback):
    out = tmp_path / "out"
    recs = _slow_records(loopback)
    thread, result = _run_in_thread(recs, out, DownloadParams(**DYING))
    deadline = time.monotonic() + 60
    while not sum(loopback.hits.values()) and time.monotonic() < deadline:
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


# ------------------------------------------ fingerprints: what a rerun may reuse
def _file_records(tmp: Path, n: int = 25, caption: str = "cap") -> list[Record]:
    folder = tmp / "pics"
    folder.mkdir(exist_ok=True)
    recs = []
    for i in range(n):
        path = folder / f"{i}.jpg"
        if not path.exists():
            path.write_bytes(jpeg(40, 30, seed=i))
        url = path.as_uri() if i % 9 != 4 else (folder / f"gone{i}.jpg").as_uri()  # some failures too
        recs.append(Record(f"k{i:03d}", url, "train", (f"{caption} {i}",)))
    return recs


def _stamps(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in sorted(folder.iterdir())}


FP = dict(workers=2, records_per_shard=5, decode_processes=0, retries=0)


def test_changing_a_param_that_does_not_change_bytes_keeps_every_shard(tmp_path, caplog):
    recs, out = _file_records(tmp_path), tmp_path / "out"
    first = download_records(recs, out, DownloadParams(**FP), progress=False)
    stamps = _stamps(out)
    assert first.shards == 5 and first.shards_resumed == 0
    assert sorted(p.name for p in out.glob("*.fingerprint.json")) == [f"{i:05d}.fingerprint.json" for i in range(5)]
    again = download_records(recs, out, DownloadParams(**{**FP, "workers": 3, "per_host": 1, "read_timeout": 2.0,
                                                          "retries": 2, "user_agent": "other"}), progress=False)
    assert again.shards_resumed == 5 and again.fetched_ok == 0
    assert _stamps(out) == stamps  # not one file rewritten
    assert "remaking" not in caplog.text


def test_a_param_that_changes_the_bytes_remakes_the_shards_and_says_why(tmp_path, caplog):
    recs, out = _file_records(tmp_path), tmp_path / "out"
    download_records(recs, out, DownloadParams(**FP), progress=False)
    caplog.set_level("WARNING")
    again = download_records(recs, out, DownloadParams(**{**FP, "jpeg_quality": 60}), progress=False)
    assert again.shards_resumed == 0
    assert "download: remaking shard 00000, made with other inputs: params.jpeg_quality: 95 there, 60 here" \
        in caplog.text
    # A few lines per reason, then one count: not one line per shard.
    assert caplog.text.count("remaking shard") == 3
    assert "remaking 2 more shards for the same reason: params.jpeg_quality" in caplog.text
    download_records(recs, tmp_path / "fresh", DownloadParams(**{**FP, "jpeg_quality": 60}), progress=False)
    assert _files(out) == _files(tmp_path / "fresh")


def test_only_the_shards_whose_records_changed_are_remade(tmp_path, caplog):
    recs, out = _file_records(tmp_path), tmp_path / "out"
    download_records(recs, out, DownloadParams(**FP), progress=False)
    stamps = _stamps(out)
    caplog.set_level("WARNING")
    changed = list(recs)
    changed[7] = Record(recs[7].key, recs[7].url, recs[7].split, ("another caption",))  # shard 1
    again = download_records(changed, out, DownloadParams(**FP), progress=False)
    assert again.shards_resumed == 4
    assert "remaking shard 00001, made with other inputs: records_sha256:" in caplog.text
    assert "remaking shard 00000" not in caplog.text
    now = _stamps(out)
    assert {n for n in now if now[n] != stamps[n]} == {"00001.tar", "00001.status.jsonl", "00001.fingerprint.json"}
    download_records(changed, tmp_path / "fresh", DownloadParams(**FP), progress=False)
    assert _files(out) == _files(tmp_path / "fresh")


def test_a_code_change_or_a_missing_fingerprint_remakes_the_shard(tmp_path, caplog):
    recs, out = _file_records(tmp_path, n=10), tmp_path / "out"
    download_records(recs, out, DownloadParams(**FP), progress=False)
    reference = _files(out)
    fp = json.loads((out / "00000.fingerprint.json").read_text())
    fp["code_sha256"] = "0" * 64  # as if made by other code
    (out / "00000.fingerprint.json").write_text(json.dumps(fp))
    (out / "00001.fingerprint.json").unlink()  # as if made before fingerprints existed
    caplog.set_level("WARNING")
    again = download_records(recs, out, DownloadParams(**FP), progress=False)
    assert again.shards_resumed == 0
    assert "remaking shard 00000, made with other inputs: code_sha256: '00000000000…0000000' there" in caplog.text
    assert "remaking shard 00001, made with other inputs: it has no readable fingerprint file" in caplog.text
    assert _files(out) == reference


def test_shards_the_records_no_longer_reach_are_removed(tmp_path, caplog):
    recs, out = _file_records(tmp_path), tmp_path / "out"
    download_records(recs, out, DownloadParams(**FP), progress=False)
    (out / "00007.tar.tmp-123").write_bytes(b"left by a killed run")
    caplog.set_level("WARNING")
    # The list shrank: 12 records are shards 0-2 (the last one of two records).
    shrunk = download_records(recs[:12], out, DownloadParams(**FP), progress=False)
    assert shrunk.shards == 3 and shrunk.shards_resumed == 2
    assert "download: removed 7 files of shards the records no longer reach (this run has 3 shards)" in caplog.text
    download_records(recs[:12], tmp_path / "fresh12", DownloadParams(**FP), progress=False)
    assert _files(out) == _files(tmp_path / "fresh12")
    # records_per_shard grew: other records per shard, fewer shards.
    download_records(recs, out, DownloadParams(**{**FP, "records_per_shard": 10}), progress=False)
    download_records(recs, tmp_path / "fresh10", DownloadParams(**{**FP, "records_per_shard": 10}), progress=False)
    assert _files(out) == _files(tmp_path / "fresh10")
    assert sorted(p.name for p in out.glob("*.tar")) == ["00000.tar", "00001.tar", "00002.tar"]


def test_every_download_param_is_placed_in_or_out_of_the_fingerprint():
    from pipeline.download.resume import BYTE_PARAMS, OTHER_PARAMS

    fields = set(DownloadParams.model_fields)
    assert set(BYTE_PARAMS) | set(OTHER_PARAMS) == fields, "place the new param in resume.py"
    assert not set(BYTE_PARAMS) & set(OTHER_PARAMS)


def test_the_code_digest_covers_the_modules_that_make_the_bytes():
    from pipeline.core.fingerprint import ROOT, modules_run_by

    run = {p.relative_to(ROOT).as_posix() for p in modules_run_by(["pipeline.download.run"])}
    assert {"pipeline/download/image.py", "pipeline/download/fetch.py", "pipeline/download/shards.py",
            "pipeline/download/resume.py", "pipeline/formats/imaging.py", "pipeline/core/fingerprint.py"} <= run


def test_shards_of_a_killed_run_come_back_after_the_output_folder_was_reverted(tmp_path, caplog, loopback):
    """What `dvc exp run` does before it reruns a killed experiment: it checks out the
    last recorded output over the killed run's finished shards. They come back from
    the .partial folder, untouched, instead of being fetched again."""
    gate = threading.Event()
    gate.set()
    lines = []
    for i in range(30):
        url = loopback.route(f"/{i}.jpg", Reply(200, jpeg(48, 32, seed=i), gate=gate if i >= 10 else None))
        lines.append(json.dumps({"url": url, "captions": [f"image {i}"]}))
    (tmp_path / "list.jsonl").write_text("\n".join(lines) + "\n")
    source = tmp_path / "source"
    prepare(source, DataParams(source="jsonl", annotations=str(tmp_path / "list.jsonl")))
    base = dict(workers=2, per_host=2, records_per_shard=5, decode_processes=0, retries=0, read_timeout=300)
    recorded = tmp_path / "recorded"  # the output dvc.lock records: jpeg_quality 95
    download(source, recorded, DownloadParams(**base), progress=False)
    assert not (tmp_path / "recorded.partial").exists()  # a finished run keeps nothing aside

    # The experiment (jpeg_quality 60) is killed once shards 0 and 1 are finished;
    # the images of shard 2 onwards are held back, so no later shard can be.
    params = tmp_path / "p60.yaml"
    params.write_text(yaml.safe_dump({"download": {**base, "jpeg_quality": 60}}))
    out = tmp_path / "out"
    shutil.copytree(recorded, out)
    gate.clear()
    proc = subprocess.Popen([sys.executable, "-m", "stages.cli", "download", "--params", str(params),
                             "--source", str(source), "--out", str(out), "--metrics", str(tmp_path / "m.json"),
                             "--no-progress"], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    partial = tmp_path / "out.partial"
    deadline = time.monotonic() + 120
    while not (list(partial.glob("00001@*.tar")) and loopback.hits["/10.jpg"]):
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert sorted(p.name.split("@")[0] for p in partial.glob("*.tar")) == ["00000", "00001"]

    # dvc exp run checks out the recorded output over the killed run's shards.
    shutil.rmtree(out)
    shutil.copytree(recorded, out)
    gate.set()
    hits = dict(loopback.hits)
    caplog.set_level("WARNING")
    summary = download(source, out, DownloadParams(**base, jpeg_quality=60), progress=False)
    assert summary.shards_resumed == 2
    assert all(loopback.hits[f"/{i}.jpg"] == hits[f"/{i}.jpg"] for i in range(10))  # not fetched again
    assert f"download: put back 2 shards finished by a run that did not complete (from {partial})" in caplog.text
    assert "remaking shard 00002, made with other inputs: params.jpeg_quality: 95 there, 60 here" in caplog.text
    assert "remaking shard 00000" not in caplog.text
    download(source, tmp_path / "fresh", DownloadParams(**base, jpeg_quality=60), progress=False)
    assert _files(out) == _files(tmp_path / "fresh")
    assert not partial.exists()


def test_links_a_killed_run_left_half_made_are_removed(tmp_path):
    from pipeline.core.partial import PartialShards

    recs, out = _file_records(tmp_path, n=10), tmp_path / "out"
    download_records(recs, out, DownloadParams(**FP), progress=False)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()  # a process id that no longer runs
    (out / f".00001.tar.{dead}.link").write_bytes(b"half")
    (tmp_path / "out.partial").mkdir()
    (tmp_path / "out.partial" / f".00001@0123456789abcdef.tar.{dead}.link").write_bytes(b"half")
    alive = out / f".00000.tar.{os.getpid()}.link"  # another process's link in progress is left alone
    alive.write_bytes(b"busy")
    PartialShards(out).sweep()
    assert not (out / f".00001.tar.{dead}.link").exists() and alive.exists()
    assert not list((tmp_path / "out.partial").iterdir())
