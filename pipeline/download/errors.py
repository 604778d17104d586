"""Named failures of one record. The name goes into the shard's status file."""
from __future__ import annotations

from typing import Optional

from pipeline.core.errors import CaplineError

# Every failure name a status line can carry, and what it means.
FAILURES = {
    "http_error": "the server answered with an HTTP error status (reason holds it)",
    "timeout": "connect or read timed out on every attempt",
    "connection_error": "could not connect, or the connection broke, on every attempt",
    "too_many_redirects": "more redirects than download.max_redirects",
    "bad_redirect": "a redirect to a scheme other than http/https (never to file:)",
    "unsupported_url": "a URL scheme other than http, https or file",
    "file_not_found": "a file: URL naming no readable file",
    "too_large": "the body is larger than download.max_bytes",
    "not_an_image": "the bytes are no image format on the allow-list (pipeline/formats/imaging.py: EPS, SVG, PDF, HTML are not)",
    "decode_error": "the image is truncated or corrupt (full decode failed)",
    "too_many_pixels": "width × height above download.max_pixels (decompression bomb)",
    "sha256_mismatch": "the bytes do not match the sha256 the list gives",
    "error": "an unexpected error (reason holds it)",
}


class RecordFailure(Exception):
    """A record that ends in a named failure. ``transient`` ones are retried."""

    def __init__(self, status: str, reason: str, transient: bool = False, retry_after: Optional[float] = None):
        assert status in FAILURES, status
        super().__init__(f"{status}: {reason}")
        self.status = status
        self.reason = reason
        self.transient = transient
        self.retry_after = retry_after

    def __reduce__(self):  # crosses the process pool intact
        return (RecordFailure, (self.status, self.reason, self.transient, self.retry_after))


class DecodePoolDied(Exception):
    """The image processes died while one record was in them, on every try. Not a
    property of the record (the OOM killer, a kill from outside): never a final status."""


class DownloadIncomplete(CaplineError):
    """Some shards were not written because their records met dying image processes."""

    def __init__(self, records: int, shards: list[int], first: str) -> None:
        super().__init__(
            f"{records} records in {len(shards)} shards (first: {first}) were not processed: the image "
            f"processes (download.decode_processes) kept dying. Those shards were not written, all others "
            f"are kept; run the download again to fetch the rest (or set download.decode_processes: 0).")
        self.records = records
        self.shards = shards
