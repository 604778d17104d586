"""What a POST /caption request asks to caption: image bytes, or a URL to fetch.

Three request forms (docs/serve.md):

* a multipart/form-data upload with one file field ``image``;
* JSON ``{"url": "http(s)://..."}``;
* any other body: the image's bytes themselves (``curl --data-binary @x.jpg``).

The body is read with a size cap (413 before reading when Content-Length says it
is over) and a deadline for the whole body (408: a client trickling bytes cannot
hold a connection for ever). Field names are checked: anything else is a 422.
"""
from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Optional
from urllib.parse import urlsplit

from starlette.requests import ClientDisconnect, Request

from pipeline.serve.errors import ServeError

IMAGE_FIELD = "image"
JSON_FIELDS = ("url",)


@dataclass
class Wanted:
    data: Optional[bytes] = None  # image bytes, still untrusted
    url: Optional[str] = None  # to fetch with the download stage's Fetcher


async def read_request(request: Request, max_bytes: int, body_timeout: float) -> Wanted:
    """The image bytes or URL the request carries; ServeError when the request is unusable.

    ClientDisconnect goes through: nobody is left to answer.
    """
    body = await _read_body(request, max_bytes, body_timeout)
    kind = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if kind == "multipart/form-data":
        return Wanted(data=await _multipart_image(request, body))
    if kind == "application/json":
        return Wanted(url=_json_url(body))
    if not body:
        raise ServeError(400, "empty_body", "the request has no body: send image bytes, a multipart upload "
                                            f"with a file field {IMAGE_FIELD!r}, or JSON {{\"url\": ...}}")
    return Wanted(data=body)


async def _read_body(request: Request, max_bytes: int, body_timeout: float) -> bytes:
    length = request.headers.get("content-length")
    if length is not None:
        if not length.isdigit():
            raise ServeError(400, "bad_content_length", f"Content-Length {length!r} is not a number")
        if int(length) > max_bytes:
            raise ServeError(413, "too_large", f"the body is {int(length)} bytes, over the limit of {max_bytes}")

    async def read() -> bytes:
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_bytes:
                raise ServeError(413, "too_large", f"the body is over the limit of {max_bytes} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    try:
        return await asyncio.wait_for(read(), timeout=body_timeout)
    except asyncio.TimeoutError:
        raise ServeError(408, "body_timeout", f"the body did not arrive within {body_timeout:g} s") from None


async def _multipart_image(request: Request, body: bytes) -> bytes:
    from starlette.datastructures import UploadFile
    from starlette.formparsers import MultiPartParser

    boundary = _boundary(request.headers.get("content-type", ""))
    # python-multipart accepts a body cut short (no closing boundary) as a shorter form: refuse it here.
    if boundary is None or b"--" + boundary + b"--" not in body:
        raise ServeError(400, "bad_multipart", "the multipart body has no boundary parameter or no closing "
                                               "boundary (cut short?)")

    async def stream():
        yield body

    # The body is already whole and capped in memory; small part limits keep the parser's own copies small.
    parser = MultiPartParser(request.headers, stream(), max_files=4, max_fields=4, max_part_size=64 * 1024)
    try:
        form = await parser.parse()
    except ClientDisconnect:
        raise
    except Exception as err:  # hostile framing: whatever the parser raises is the body's fault
        raise ServeError(400, "bad_multipart", f"the multipart body cannot be parsed: {err}") from None
    try:
        unknown = sorted(set(form.keys()) - {IMAGE_FIELD})
        if unknown:
            raise ServeError(422, "unknown_field", f"unknown form field(s) {', '.join(map(repr, unknown))}; "
                                                   f"send one file field {IMAGE_FIELD!r}")
        files = form.getlist(IMAGE_FIELD)
        if len(files) != 1 or not isinstance(files[0], UploadFile):
            raise ServeError(422, "missing_field", f"expected exactly one file in the form field {IMAGE_FIELD!r}, "
                                                   f"got {len(files)} value(s)")
        return await files[0].read()
    finally:
        await form.close()


def _boundary(content_type: str) -> Optional[bytes]:
    from email.message import Message

    msg = Message()
    msg["content-type"] = content_type
    value = msg.get_param("boundary")
    return value.encode("latin-1") if isinstance(value, str) and value else None


def _json_url(body: bytes) -> str:
    try:
        value = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ServeError(400, "bad_json", f"the body is not valid JSON: {err}") from None
    if not isinstance(value, dict):
        raise ServeError(422, "bad_json", "the JSON body must be an object like {\"url\": \"https://...\"}")
    unknown = sorted(set(value) - set(JSON_FIELDS))
    if unknown:
        raise ServeError(422, "unknown_field", f"unknown JSON field(s) {', '.join(map(repr, unknown))}; "
                                               f"known: {', '.join(JSON_FIELDS)}")
    url = value.get("url")
    if not isinstance(url, str) or not url:
        raise ServeError(422, "missing_field", "the JSON body needs \"url\": a string")
    # Only the web: a file: URL would let a client read the server's own files.
    if urlsplit(url).scheme.lower() not in ("http", "https"):
        raise ServeError(422, "bad_url", f"url {url[:200]!r}: only http and https URLs are fetched")
    return url
