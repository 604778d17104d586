"""Fetch annotation files (local paths, file/http/https URLs, zip members), cached.

``SOURCE#member`` picks a file inside a zip archive (``caption_datasets.zip#dataset_coco.json``);
a zip with one data file needs no member. Downloads are cached by URL under the
cache folder, so a rerun of prepare fetches nothing.
"""
from __future__ import annotations

import hashlib
import os
import time
import zipfile
from pathlib import Path
from typing import BinaryIO, Optional
from urllib.parse import unquote, urlsplit
from urllib.request import url2pathname

from tqdm import tqdm

from pipeline.prepare.errors import DatasetError

DATA_SUFFIXES = (".json", ".jsonl", ".csv", ".tsv", ".txt")
_CHUNK = 1 << 20


def _split_member(src: str) -> tuple[str, Optional[str]]:
    base, _, member = src.partition("#")
    return base, (member or None)


def _local_path(src: str) -> Path:
    if src.lower().startswith("file:"):
        return Path(url2pathname(unquote(urlsplit(src).path)))
    return Path(src)


def _download(url: str, dest: Path, user_agent: str, retries: int = 3, timeout: float = 60.0) -> None:
    import urllib3

    http = urllib3.PoolManager(headers={"User-Agent": user_agent})
    tmp = dest.with_name(dest.name + f".tmp-{os.getpid()}")
    last: Exception | None = None
    for attempt in range(retries + 1):
        try:
            resp = http.request(
                "GET", url, preload_content=False, timeout=urllib3.Timeout(connect=10.0, read=timeout),
                # total=False would turn redirects off (urllib3 then returns the 3xx itself):
                # follow up to 5 redirects, retry nothing else here (the loop below does).
                retries=urllib3.Retry(total=None, connect=0, read=0, status=0, other=0, redirect=5,
                                      raise_on_redirect=True),
            )
            try:
                if resp.status != 200:
                    err = DatasetError(url, f"HTTP {resp.status} {resp.reason or ''}".strip())
                    if resp.status < 500 and resp.status != 429:
                        raise err
                    raise ConnectionError(str(err))
                total = int(resp.headers.get("Content-Length") or 0) or None
                with open(tmp, "wb") as f, tqdm(total=total, unit="B", unit_scale=True, desc=dest.name, leave=False) as bar:
                    for chunk in resp.stream(_CHUNK):
                        f.write(chunk)
                        bar.update(len(chunk))
            finally:
                resp.release_conn()
            os.replace(tmp, dest)
            return
        except DatasetError:
            raise
        except urllib3.exceptions.MaxRetryError as err:
            if isinstance(err.reason, urllib3.exceptions.ResponseError):  # too many redirects: final
                raise DatasetError(url, "more than 5 redirects") from None
            last = err
            time.sleep(min(30.0, 2.0**attempt))
        except Exception as err:  # timeouts, resets, 5xx: retried with backoff
            last = err
            time.sleep(min(30.0, 2.0**attempt))
    tmp.unlink(missing_ok=True)
    raise DatasetError(url, f"download failed after {retries + 1} attempts: {last}")


def _fetch_whole(base: str, cache_dir: Path, user_agent: str) -> Path:
    """The file at ``base`` on local disk: itself, or its cached download."""
    if base.lower().startswith(("http://", "https://")):
        name = Path(unquote(urlsplit(base).path)).name or "download"
        slot = cache_dir / hashlib.sha256(base.encode()).hexdigest()[:16]
        dest = slot / name
        if not dest.exists():
            slot.mkdir(parents=True, exist_ok=True)
            _download(base, dest, user_agent)
        return dest
    path = _local_path(base)
    if not path.is_file():
        raise DatasetError(base, "file not found")
    return path


def _pick_member(zf: zipfile.ZipFile, archive: str, member: Optional[str]) -> zipfile.ZipInfo:
    """The member to read; errors name ``archive`` as the user gave it (never the cached copy)."""
    infos = [i for i in zf.infolist() if not i.is_dir()]
    if member:
        hits = [i for i in infos if i.filename == member] or [i for i in infos if Path(i.filename).name == member]
        if len(hits) != 1:
            raise DatasetError(archive, f"zip member {member!r} not found (members: {[i.filename for i in infos][:20]})")
        return hits[0]
    data = [i for i in infos if i.filename.lower().endswith(DATA_SUFFIXES)]
    if len(data) != 1:
        raise DatasetError(archive, f"zip holds {len(data)} data files; name one as ARCHIVE#MEMBER: {[i.filename for i in data][:20]}")
    return data[0]


def _copy_hashing(src: BinaryIO, dest: Path) -> str:
    h = hashlib.sha256()
    tmp = dest.with_name(dest.name + f".tmp-{os.getpid()}")
    with open(tmp, "wb") as out:
        while chunk := src.read(_CHUNK):
            h.update(chunk)
            out.write(chunk)
    os.replace(tmp, dest)
    return h.hexdigest()


def materialize(src: str, dest_dir: Path, name: Optional[str], cache_dir: Path, user_agent: str) -> tuple[str, str]:
    """Copy the annotation file ``src`` into ``dest_dir``; return (file name, sha256)."""
    base, member = _split_member(src)
    whole = _fetch_whole(base, Path(cache_dir), user_agent)
    if member or zipfile.is_zipfile(whole):
        try:
            with zipfile.ZipFile(whole) as zf:
                info = _pick_member(zf, base, member)
                target = name or Path(info.filename).name
                with zf.open(info) as f:
                    return target, _copy_hashing(f, dest_dir / target)
        except zipfile.BadZipFile as err:
            raise DatasetError(base, f"not a readable zip archive: {err}") from None
    target = name or whole.name
    with open(whole, "rb") as f:
        return target, _copy_hashing(f, dest_dir / target)

