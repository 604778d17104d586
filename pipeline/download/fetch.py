"""Fetching one URL's bytes: http/https with limits and retries, and file: URLs.

A thread pool of workers shares one urllib3 PoolManager (keep-alive connection
pools per host). Redirects are followed by hand so that their number is capped and
none leads from http(s) to another scheme. Transient failures (timeouts,
connection errors, 429, 5xx) are retried with exponential backoff and jitter,
honouring Retry-After; other 4xx are final.
"""
from __future__ import annotations

import email.utils
import random
import stat
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Optional
from urllib.parse import unquote, urljoin, urlsplit
from urllib.request import url2pathname

import urllib3
from urllib3.exceptions import (
    ConnectTimeoutError,
    HTTPError,
    NewConnectionError,
    ProtocolError,
    ReadTimeoutError,
)

from pipeline.download.errors import RecordFailure
from pipeline.formats.imaging import ACCEPT
from pipeline.core.params import DownloadParams

REDIRECTS = (301, 302, 303, 307, 308)
# A server asking to wait longer than this is treated as a final failure: one
# record must not hold a worker for an hour.
MAX_RETRY_AFTER = 60.0
_CHUNK = 64 * 1024


def _retry_after(value: Optional[str]) -> Optional[float]:
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


class Fetcher:
    """Thread-safe fetcher of URL bytes with the limits of ``DownloadParams``."""

    def __init__(self, params: DownloadParams, base_dir: Optional[Path] = None) -> None:
        self.p = params
        # Relative file: URLs (the demo's "file:images/x.png") resolve against the source folder.
        self.base_dir = Path(base_dir) if base_dir else Path.cwd()
        self.http = urllib3.PoolManager(
            num_pools=max(64, params.workers),
            maxsize=params.per_host,
            block=False,
            retries=False,
            timeout=urllib3.Timeout(connect=params.connect_timeout, read=params.read_timeout),
            # Exactly the formats open_image decodes: a CDN that negotiates
            # (AVIF, WebP, JPEG) never picks one we would refuse.
            headers={"User-Agent": params.user_agent, "Accept": ACCEPT},
        )
        self._hosts: dict[str, threading.BoundedSemaphore] = defaultdict(lambda: threading.BoundedSemaphore(params.per_host))
        self._hosts_lock = threading.Lock()

    def _host_slot(self, host: str) -> threading.BoundedSemaphore:
        with self._hosts_lock:
            return self._hosts[host]

    # ------------------------------------------------------------------ public
    def fetch(self, url: str) -> bytes:
        """The body at ``url``; raises ``RecordFailure`` with a named status."""
        scheme = urlsplit(url).scheme.lower()
        if scheme == "file":
            return self._read_file(url)
        if scheme not in ("http", "https"):
            raise RecordFailure("unsupported_url", f"scheme {scheme or '(none)'!r} is not http, https or file")
        attempt = 0
        while True:
            try:
                return self._fetch_http(url)
            except RecordFailure as fail:
                if not fail.transient or attempt >= self.p.retries:
                    if fail.transient and attempt:
                        fail.reason += f" (after {attempt + 1} attempts)"
                    raise
                if fail.retry_after is not None and fail.retry_after > MAX_RETRY_AFTER:
                    fail.reason += f" (Retry-After {fail.retry_after:.0f}s is over {MAX_RETRY_AFTER:.0f}s)"
                    raise
                delay = self.p.backoff * 2**attempt * random.uniform(0.5, 1.5)
                if fail.retry_after is not None:
                    delay = max(delay, fail.retry_after)
                time.sleep(delay)
                attempt += 1

    # ----------------------------------------------------------------- private
    def _read_file(self, url: str) -> bytes:
        parts = urlsplit(url)
        if parts.netloc not in ("", "localhost"):
            raise RecordFailure("unsupported_url", f"file URL with a host ({parts.netloc}) is not supported")
        path = Path(url2pathname(unquote(parts.path)))
        if not path.is_absolute():
            path = self.base_dir / path
        try:
            st = path.stat()
            # Only regular files: a device (/dev/zero) or a FIFO has no size and would
            # never end (or never open).
            if not stat.S_ISREG(st.st_mode):
                raise RecordFailure("file_not_found", f"{path.name} is not a regular file")
            if st.st_size > self.p.max_bytes:
                raise RecordFailure("too_large", f"{st.st_size} bytes > max_bytes {self.p.max_bytes}")
            with open(path, "rb") as f:
                data = f.read(self.p.max_bytes + 1)  # the file may have grown since stat
            if len(data) > self.p.max_bytes:
                raise RecordFailure("too_large", f"over max_bytes {self.p.max_bytes}")
            return data
        except (FileNotFoundError, IsADirectoryError, PermissionError, NotADirectoryError) as err:
            raise RecordFailure("file_not_found", f"{type(err).__name__}: {path.name}") from None

    def _fetch_http(self, url: str) -> bytes:
        for _ in range(self.p.max_redirects + 1):
            host = urlsplit(url).netloc.lower()
            with self._host_slot(host):
                status, location, retry_after, body = self._one_request(url)
            if status in REDIRECTS and location:
                nxt = urljoin(url, location)
                if urlsplit(nxt).scheme.lower() not in ("http", "https"):
                    raise RecordFailure("bad_redirect", f"redirect to {urlsplit(nxt).scheme}: refused")
                url = nxt
                continue
            if status == 200:
                assert body is not None
                return body
            transient = status == 429 or status >= 500
            raise RecordFailure("http_error", f"HTTP {status}", transient=transient, retry_after=retry_after)
        raise RecordFailure("too_many_redirects", f"more than {self.p.max_redirects} redirects")

    def _one_request(self, url: str) -> tuple[int, Optional[str], Optional[float], Optional[bytes]]:
        # A whole-body deadline as well, so a server trickling bytes cannot hold a worker forever.
        deadline = time.monotonic() + self.p.connect_timeout + 4 * self.p.read_timeout
        try:
            resp = self.http.request("GET", url, preload_content=False, redirect=False, retries=False)
        except NewConnectionError as err:  # (a subclass of ConnectTimeoutError in urllib3 2)
            raise RecordFailure("connection_error", f"cannot connect: {err}", transient=True) from None
        except ConnectTimeoutError:
            raise RecordFailure("timeout", f"connect timeout after {self.p.connect_timeout}s", transient=True) from None
        except ReadTimeoutError:
            raise RecordFailure("timeout", f"no response within read_timeout {self.p.read_timeout}s", transient=True) from None
        except urllib3.exceptions.MaxRetryError as err:  # raised around connect errors with retries=False
            reason = err.reason
            if isinstance(reason, ConnectTimeoutError) and not isinstance(reason, NewConnectionError):
                raise RecordFailure("timeout", "connect timeout", transient=True) from None
            raise RecordFailure("connection_error", str(reason), transient=True) from None
        except (ProtocolError, HTTPError, OSError) as err:
            raise RecordFailure("connection_error", f"{type(err).__name__}: {err}", transient=True) from None
        clean = False  # whether the connection can go back to the pool for reuse
        try:
            status = resp.status
            if status != 200:
                length = resp.headers.get("Content-Length")
                if length and length.isdigit() and int(length) <= _CHUNK:
                    resp.drain_conn()  # small error page: keep the connection alive
                    clean = True
                return status, resp.headers.get("Location"), _retry_after(resp.headers.get("Retry-After")), None
            length = resp.headers.get("Content-Length")
            if length and length.isdigit() and int(length) > self.p.max_bytes:
                raise RecordFailure("too_large", f"Content-Length {length} > max_bytes {self.p.max_bytes}")
            chunks, size = [], 0
            # read1 returns what one socket read brings; stream()/read(n) would block until n
            # bytes, so a server trickling a byte per read_timeout would never meet the deadline.
            read1 = getattr(resp, "read1", None)  # urllib3 >= 2.3
            body = (iter(lambda: read1(_CHUNK, decode_content=True), b"") if read1 is not None
                    else resp.stream(_CHUNK, decode_content=True))
            try:
                for chunk in body:
                    size += len(chunk)
                    if size > self.p.max_bytes:
                        raise RecordFailure("too_large", f"body over max_bytes {self.p.max_bytes}")
                    if time.monotonic() > deadline:
                        raise RecordFailure("timeout", "body not complete within the request deadline", transient=True)
                    chunks.append(chunk)
            except ReadTimeoutError:
                raise RecordFailure("timeout", f"body stalled longer than read_timeout {self.p.read_timeout}s", transient=True) from None
            except (ProtocolError, HTTPError, OSError) as err:
                raise RecordFailure("connection_error", f"body: {type(err).__name__}: {err}", transient=True) from None
            clean = True
            return status, None, None, b"".join(chunks)
        finally:
            if not clean:
                resp.close()  # unread or broken body: never reuse this connection
            resp.release_conn()
