"""When a finished image shard may be reused, and clearing what a fresh run would not write.

Each shard has a fingerprint (``NNNNN.fingerprint.json``, written with it) made of:

* ``records``, ``records_sha256``: how many input records the shard holds and a
  digest of them (key, url, split, captions, sha256): another list, another
  ``data`` setting or another ``records_per_shard`` gives other records;
* ``params``: the download params that change the shard's bytes (``BYTE_PARAMS``);
* ``code_sha256``: every project module the stage runs, so that a code change
  remakes the shards as DVC would without ``persist``;
* ``libraries``: Pillow's version (its JPEG encoder makes the bytes).

A finished shard (its tar exists) whose fingerprint differs, or has none, is remade
with a log line naming what differs. Params that only change how the work is done
(``OTHER_PARAMS``) are left out, so changing them keeps every shard.
"""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Iterable, Optional

from pipeline.download.shards import fingerprint_path, status_path, tar_path
from pipeline.core.fingerprint import code_sha256, describe_difference, digest, library_versions
from pipeline.core.params import DownloadParams
from pipeline.formats.records import Record

log = logging.getLogger(__name__)

FORMAT = 1
# Params that decide what a record becomes (its JPEG bytes or its failure status).
BYTE_PARAMS = ("resize", "jpeg_quality", "max_pixels", "max_bytes", "max_redirects")
# Params left out of the fingerprint, and why. Every DownloadParams field is in one
# of the two lists (tested), so a new param has to be placed on purpose.
OTHER_PARAMS = {
    "workers": "concurrency only",
    "per_host": "concurrency only",
    "decode_processes": "where images are decoded, not how",
    "records_per_shard": "decides which records a shard holds: covered by records_sha256",
    "connect_timeout": "network conditions: a rerun with a longer timeout keeps finished shards",
    "read_timeout": "network conditions",
    "retries": "network conditions",
    "backoff": "network conditions",
    "user_agent": "network conditions",
}


def run_fingerprint(params: DownloadParams) -> dict:
    """The part of every shard's fingerprint that does not depend on its records."""
    return {
        "format": FORMAT,
        "params": {k: getattr(params, k) for k in BYTE_PARAMS},
        "code_sha256": code_sha256("pipeline.download.run"),
        "libraries": library_versions("pillow"),
    }


def shard_fingerprint(run_fp: dict, records: Iterable[Record]) -> dict:
    rows = [{"key": r.key, "url": r.url, "split": r.split, "captions": list(r.captions), "sha256": r.sha256}
            for r in records]
    return {**run_fp, "records": len(rows), "records_sha256": digest(rows)}


def read_fingerprint(out_dir: Path, index: int) -> Optional[dict]:
    try:
        value = json.loads(fingerprint_path(out_dir, index).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def why_not_reusable(out_dir: Path, index: int, fingerprint: dict) -> Optional[str]:
    """None when finished shard ``index`` was made from exactly these inputs, else why not."""
    saved = read_fingerprint(out_dir, index)
    if saved is None:
        return "it has no readable fingerprint file (written by an older version, or damaged)"
    if saved != fingerprint:
        return describe_difference(saved, fingerprint)
    return None


def unfinish(out_dir: Path, index: int) -> None:
    """Make shard ``index`` unfinished: the tar (the finished mark) goes first, so a kill
    while it is remade never leaves the old tar beside a new fingerprint."""
    for path in (tar_path(out_dir, index), status_path(out_dir, index), fingerprint_path(out_dir, index)):
        path.unlink(missing_ok=True)


_SHARD_FILE = re.compile(r"^(\d+)\.")


def remove_orphans(out_dir: Path, n_shards: int) -> list[str]:
    """Delete the files of shards ``n_shards`` and above (the list shrank, or
    records_per_shard grew), which a fresh run would not write. Returns their names."""
    removed = []
    for path in sorted(Path(out_dir).iterdir()):
        m = _SHARD_FILE.match(path.name)
        if m and int(m.group(1)) >= n_shards and path.is_file():
            path.unlink(missing_ok=True)
            removed.append(path.name)
    if removed:
        log.warning("download: removed %d files of shards the records no longer reach (this run has %d shards): %s",
                    len(removed), n_shards, ", ".join(removed[:6]) + (" ..." if len(removed) > 6 else ""))
    return removed
