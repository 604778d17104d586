"""A killed `dvc repro` resumes download and embed, for real.

Each test runs `dvc repro` in a fresh git copy of the project, kills it (the whole
process group, SIGKILL) while the stage is between shards, runs `dvc repro` again,
and checks that the finished shards were kept and that the stage's entry in
dvc.lock (its outputs' hashes) equals that of an uninterrupted run in another copy.
Then `dvc exp run -S` with a param that does not change the shards keeps them all;
a killed `dvc exp run -S` with one that does, run again, gets back the shards it
had finished (DVC checks out the recorded ones over them first) and remakes the
rest with a log line naming the param; a download change remakes the feature
shards too.

Download is stopped at a known point: the loopback server holds every image of
shards 3 and later until the test opens the gate, so shards 0-2 are finished and
no later one can be. Embed is stopped when its first feature shard appears; its
CLIP is made big enough (and run in fp32) that each of its ten shards takes a
noticeable time, so the kill lands between shards.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Callable

import pytest
import yaml

from tests.helpers.images import jpeg
from tests.helpers.loopback import Reply
from tests.helpers.repo import copy_project, env, run, stages_run

pytestmark = pytest.mark.slow

# Nothing here should take long; this only stops a broken test from hanging.
GIVE_UP_S = 900


def _start(cmd: list[str], repo: Path, log: Path) -> subprocess.Popen:
    """``cmd`` in its own process group, so that one kill reaches DVC, the stage and its workers."""
    with open(log, "wb") as out:
        return subprocess.Popen(cmd, cwd=repo, env=env(repo), stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


def _kill_when(proc: subprocess.Popen, ready: Callable[[], bool], log: Path) -> None:
    """SIGKILL the process group of ``proc`` as soon as ``ready()``; fail if it ends first."""
    deadline = time.monotonic() + GIVE_UP_S
    while not ready():
        assert proc.poll() is None, f"the run ended before the kill:\n{log.read_text()[-4000:]}"
        assert time.monotonic() < deadline, "gave up waiting for the moment to kill"
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGSTOP)  # freeze the group: what is on disk now is what the kill leaves
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _lock_entry(repo: Path, stage: str) -> dict:
    """A stage's dvc.lock entry without its metrics file (that holds timings)."""
    entry = yaml.safe_load((repo / "dvc.lock").read_text())["stages"][stage]
    entry["outs"] = [o for o in entry["outs"] if not o["path"].startswith("data/metrics/")]
    return entry


def _out_hash(repo: Path, stage: str, path: str) -> str:
    return next(o["md5"] for o in _lock_entry(repo, stage)["outs"] if o["path"] == path)


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _metrics(repo: Path, stage: str) -> dict:
    return json.loads((repo / f"data/metrics/{stage}.json").read_text())


# --------------------------------------------------------------------- download
N, PER_SHARD, OPEN = 40, 5, 15  # records 15 and later wait for the gate: shards 0-2 can finish, 3-7 cannot


@pytest.fixture(scope="module")
def gated(tmp_path_factory, module_loopback):
    """A loopback server with N images, those of shards 3+ held until ``gate`` is set, and the list."""
    gate = threading.Event()
    folder = tmp_path_factory.mktemp("list")
    srv = module_loopback
    lines = []
    for i in range(N):
        url = srv.route(f"/{i}.jpg", Reply(200, jpeg(48, 32, seed=i), gate=gate if i >= OPEN else None))
        lines.append(json.dumps({"url": url, "captions": [f"image {i}"]}))
    (folder / "list.jsonl").write_text("\n".join(lines) + "\n")
    yield srv, gate, folder / "list.jsonl"
    gate.set()  # before the server stops: no reply is left waiting


def _download_params(listing: Path) -> dict:
    # Every fetch thread has its own connection slot (per_host >= workers), so records
    # start in list order and the last open record always starts before the first held
    # one; held requests never time out before the kill.
    return {"data": {"source": "jsonl", "annotations": str(listing)},
            "download": {"records_per_shard": PER_SHARD, "workers": 2, "per_host": 16, "retries": 0,
                         "read_timeout": 600}}


def test_killed_download_resumes_under_dvc_repro(gated, tmp_path_factory):
    srv, gate, listing = gated
    params = _download_params(listing)
    repo = copy_project(tmp_path_factory.mktemp("killed"), params)
    images = repo / "data/images"
    log = repo.parent / "killed.log"

    proc = _start(["dvc", "repro", "download"], repo, log)
    _kill_when(proc, lambda: (images / "00002.tar").exists() and srv.hits[f"/{OPEN}.jpg"] > 0, log)
    finished = sorted(p.name for p in images.glob("*.tar"))
    assert finished == ["00000.tar", "00001.tar", "00002.tar"], finished
    gate.set()
    hits = dict(srv.hits)

    out = run(["dvc", "repro", "download"], repo)
    assert "Running stage 'download'" in out
    assert "in 8 shards (3 resumed)" in out  # the stage's summary line
    assert _metrics(repo, "download")["shards_resumed"] == 3
    assert all(srv.hits[f"/{i}.jpg"] == hits[f"/{i}.jpg"] for i in range(OPEN))  # not fetched again

    # The same dvc.lock entry (outputs byte for byte) as an uninterrupted run.
    ref = copy_project(tmp_path_factory.mktemp("uninterrupted"), params)
    run(["dvc", "repro", "download"], ref)
    assert _files(images) == _files(ref / "data/images")
    assert _lock_entry(repo, "download") == _lock_entry(ref, "download")

    # A param that changes no byte: the stage reruns and keeps every shard.
    hits = dict(srv.hits)
    before = _out_hash(repo, "download", "data/images")
    out = run(["dvc", "exp", "run", "download", "-S", "download.workers=3"], repo)
    assert stages_run(out) == {"download"} and "in 8 shards (8 resumed)" in out
    assert dict(srv.hits) == hits
    assert _out_hash(repo, "download", "data/images") == before

    # A killed experiment with a param that changes the bytes. Run again, `dvc exp run`
    # first checks out the recorded shards (jpeg_quality 95) over the three it had
    # finished; those come back from data/images.partial, the rest are remade with a
    # log line saying why, and nothing is fetched twice.
    gate.clear()
    hits = dict(srv.hits)
    log = repo.parent / "killed-exp.log"
    proc = _start(["dvc", "exp", "run", "download", "-S", "download.jpeg_quality=80"], repo, log)
    _kill_when(proc, lambda: (len(list((repo / "data/images.partial").glob("*.tar"))) == 3
                              and srv.hits[f"/{OPEN}.jpg"] > hits[f"/{OPEN}.jpg"]), log)
    gate.set()
    hits = dict(srv.hits)
    out = run(["dvc", "exp", "run", "download", "-S", "download.jpeg_quality=80"], repo)
    assert "in 8 shards (3 resumed)" in out
    assert "download: put back 3 shards finished by a run that did not complete" in out
    assert "download: remaking shard 00003, made with other inputs: params.jpeg_quality: 95 there, 80 here" in out
    assert all(srv.hits[f"/{i}.jpg"] == hits[f"/{i}.jpg"] for i in range(OPEN))
    assert not (repo / "data/images.partial").exists()
    assert _out_hash(repo, "download", "data/images") != before
    assert yaml.safe_load((repo / "params.yaml").read_text())["download"]["jpeg_quality"] == 80
    run(["capline", "download", "--source", "data/source", "--out", str(repo.parent / "fresh80"),
         "--metrics", str(repo.parent / "fresh80.json"), "--no-progress"], repo)
    assert _files(images) == _files(repo.parent / "fresh80")


# ------------------------------------------------------------------------ embed
SHARDS = 10
EMBED = {
    "data": {"demo": {"images": 8 * SHARDS, "image_size": 96}},
    "download": {"records_per_shard": 8, "workers": 4},
    # A CLIP big enough that one shard takes a noticeable time (about 1 GFLOP per
    # image in fp32: 0.2-0.6 s per shard here), with no pre-training: only its cost matters.
    "clip": {"precision": "fp32", "batch_size": 8, "workers": 1,
             "demo": {"hidden_size": 256, "layers": 4, "heads": 4, "patch_size": 8, "projection_dim": 64,
                      "pretrain_steps": 0}},
}


def test_killed_embed_resumes_under_dvc_repro(tmp_path_factory):
    repo = copy_project(tmp_path_factory.mktemp("killed"), EMBED)
    features = repo / "data/features"
    log = repo.parent / "killed.log"
    run(["dvc", "repro", "download", "model_clip", "embed_plan"], repo)

    proc = _start(["dvc", "repro", "embed"], repo, log)
    _kill_when(proc, lambda: features.is_dir() and any(features.glob("*.h5")), log)
    finished = sorted(p.name for p in features.glob("*.h5"))
    assert 1 <= len(finished) < SHARDS, f"{finished}: the kill did not land between shards"

    out = run(["dvc", "repro", "embed"], repo)
    assert stages_run(out) == {"embed"}
    m = _metrics(repo, "embed")
    assert (m["shards_kept"], m["shards_written"]) == (len(finished), SHARDS - len(finished))

    ref = copy_project(tmp_path_factory.mktemp("uninterrupted"), EMBED)
    run(["dvc", "repro", "embed"], ref)
    assert _files(features) == _files(ref / "data/features")
    assert _lock_entry(repo, "embed") == _lock_entry(ref, "embed")

    # clip.workers does not change a vector: embed reruns and keeps every shard.
    before = _out_hash(repo, "embed", "data/features")
    out = run(["dvc", "exp", "run", "embed", "-S", "clip.workers=0"], repo)
    assert stages_run(out) == {"embed"}
    assert _metrics(repo, "embed")["shards_kept"] == SHARDS
    assert _out_hash(repo, "embed", "data/features") == before

    # A download param that changes the images: both stages rerun, no feature shard is
    # kept, and the log says why. (Embed's own params: tests/test_embed.py.)
    out = run(["dvc", "exp", "run", "embed", "-S", "download.jpeg_quality=80"], repo)
    assert stages_run(out) == {"download", "embed"}
    assert "embed: remaking 00000.h5, made with other inputs: source_sha256:" in out
    assert _metrics(repo, "embed")["shards_kept"] == 0
    assert _out_hash(repo, "embed", "data/features") != before
