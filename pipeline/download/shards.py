"""Writing image shards: webdataset tar + status lines, deterministic and atomic.

``NNNNN.tar`` holds ``KEY.jpg`` and ``KEY.json`` per ok record, sorted by key, with
fixed metadata (mtime 0, uid/gid 0, no user names, mode 0644), so the same inputs
give the same bytes. ``NNNNN.status.jsonl`` holds one line per input record, and
``NNNNN.fingerprint.json`` what the shard was made from (see ``resume.py``).
All three are written under temporary names; the fingerprint and status files are
renamed first, the tar last, so a shard is finished exactly when its tar exists,
and then its status and fingerprint are those written with it.
"""
from __future__ import annotations

import io
import json
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

from pipeline.formats.records import Record

TMP_MARK = ".tmp-"


def shard_stem(index: int) -> str:
    return f"{index:05d}"


def tar_path(out_dir: Path, index: int) -> Path:
    return Path(out_dir) / f"{shard_stem(index)}.tar"


def status_path(out_dir: Path, index: int) -> Path:
    return Path(out_dir) / f"{shard_stem(index)}.status.jsonl"


def fingerprint_path(out_dir: Path, index: int) -> Path:
    return Path(out_dir) / f"{shard_stem(index)}.fingerprint.json"


def shard_files(out_dir: Path, index: int) -> list[Path]:
    """A shard's files in the order they are put in place: the tar (the finished mark) last."""
    return [fingerprint_path(out_dir, index), status_path(out_dir, index), tar_path(out_dir, index)]


def is_finished(out_dir: Path, index: int) -> bool:
    return tar_path(out_dir, index).exists()


@dataclass
class Outcome:
    """What became of one record: ok with its JPEG, or a named failure."""

    record: Record
    status: str
    reason: Optional[str] = None
    jpeg: Optional[bytes] = None
    width: int = 0
    height: int = 0


def _member(name: str, data: bytes) -> tuple[tarfile.TarInfo, io.BytesIO]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    return info, io.BytesIO(data)


def sample_json(o: Outcome) -> bytes:
    r = o.record
    meta = {"key": r.key, "url": r.url, "split": r.split, "captions": list(r.captions),
            "width": o.width, "height": o.height}
    return json.dumps(meta, ensure_ascii=False).encode("utf-8")


def status_line(o: Outcome) -> str:
    return json.dumps({"key": o.record.key, "url": o.record.url, "status": o.status, "reason": o.reason},
                      ensure_ascii=False) + "\n"


def fingerprint_json(fingerprint: dict) -> str:
    return json.dumps(fingerprint, sort_keys=True, indent=1, ensure_ascii=False) + "\n"


def write_shard(out_dir: Path, index: int, outcomes: Iterable[Outcome], fingerprint: dict) -> None:
    """Write shard ``index`` (status lines in input order, samples sorted by key) and its fingerprint."""
    outcomes = list(outcomes)
    suffix = f"{TMP_MARK}{os.getpid()}"
    fpath, spath, tpath = fingerprint_path(out_dir, index), status_path(out_dir, index), tar_path(out_dir, index)
    ftmp = fpath.with_name(fpath.name + suffix)
    stmp = spath.with_name(spath.name + suffix)
    ttmp = tpath.with_name(tpath.name + suffix)
    ftmp.write_text(fingerprint_json(fingerprint), encoding="utf-8")
    with open(stmp, "w", encoding="utf-8") as f:
        f.writelines(status_line(o) for o in outcomes)
    ok = sorted((o for o in outcomes if o.status == "ok"), key=lambda o: o.record.key)
    # GNU format: long names are fine, and no PAX headers carrying times or users.
    with tarfile.open(ttmp, "w", format=tarfile.GNU_FORMAT) as tar:
        for o in ok:
            assert o.jpeg is not None
            tar.addfile(*_member(f"{o.record.key}.jpg", o.jpeg))
            tar.addfile(*_member(f"{o.record.key}.json", sample_json(o)))
    os.replace(ftmp, fpath)
    os.replace(stmp, spath)
    os.replace(ttmp, tpath)


def read_statuses(out_dir: Path, index: int) -> list[dict]:
    """The status lines of a finished shard (for the summary of a resumed run)."""
    with open(status_path(out_dir, index), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def remove_stale(out_dir: Path, index: int) -> None:
    """Remove temporary files a killed run left for shard ``index`` (a fresh run leaves none)."""
    stem = shard_stem(index)
    for p in Path(out_dir).glob(f"{stem}.*{TMP_MARK}*"):
        p.unlink(missing_ok=True)
