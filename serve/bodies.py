"""Reading request bodies without letting one client stall the ingress: size limit, read deadline, bounded multipart.

    read_body(request, limit, deadline_s)  -> bytes   413 past `limit`, 408 when the body is not in by the deadline
    multipart_file(body, content_type)     -> bytes   the uploaded file of a multipart/form-data body

A client that declares 2 kB and sends 10 bytes would otherwise hold its request (and an ingress slot) for as
long as it keeps the connection open. The multipart parser counts the parts with one C-speed scan before it
looks at any of them, so 160,000 empty parts are a 413 in milliseconds, not a 47 s parse on the event loop.
"""

from __future__ import annotations

import asyncio
import email.message

from fastapi import Request

from serve.errors import ApiError

MAX_PARTS = 8  # a caption upload has one file part; a form may carry a few text fields alongside it
MAX_PART_HEADER_BYTES = 8 * 1024  # Content-Disposition + Content-Type of one part, with room to spare


async def read_body(request: Request, limit: int, deadline_s: float) -> bytes:
    """The whole body, refusing (413) as soon as it is known to exceed `limit` and (408) after `deadline_s`."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, "body_too_large", f"body of {int(declared)} bytes exceeds the limit of {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(deadline_s):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise ApiError(413, "body_too_large", f"body exceeds the limit of {limit} bytes")
                chunks.append(chunk)
    except TimeoutError:
        detail = f"request body not received within {deadline_s:g} s ({size} bytes arrived)"
        raise ApiError(408, "body_timeout", detail, {"Connection": "close"}) from None
    return b"".join(chunks)


def _boundary(content_type: str) -> bytes:
    header = email.message.Message()
    header["content-type"] = content_type
    boundary = header.get_param("boundary")
    if not isinstance(boundary, str) or not 1 <= len(boundary) <= 70:  # RFC 2046: 1..70 characters
        raise ApiError(400, "bad_multipart", "multipart/form-data Content-Type has no valid boundary parameter")
    return boundary.encode("latin-1", errors="replace")


def _disposition(head: bytes) -> tuple[str | None, str | None]:
    """(name, filename) from one part's header block."""
    header = email.message.Message()
    for line in head.decode("latin-1").split("\r\n"):
        key, sep, value = line.partition(":")
        if sep and key.strip().lower() == "content-disposition":
            header["content-disposition"] = value.strip()
    name, filename = header.get_param("name", header="content-disposition"), header.get_filename()
    return (name if isinstance(name, str) else None), filename


def multipart_file(body: bytes, content_type: str, max_parts: int = MAX_PARTS) -> bytes:
    """The payload of the `file` (or `image`, or first file) part of a multipart/form-data body."""
    delimiter = b"--" + _boundary(content_type)
    count = body.count(delimiter) - 1  # the closing delimiter is not a part
    if count > max_parts:
        raise ApiError(413, "too_many_parts", f"multipart body has {count} parts; at most {max_parts} are accepted")
    pieces = body.split(delimiter)
    if len(pieces) < 3:
        raise ApiError(400, "bad_multipart", "multipart/form-data body has no parts (missing or wrong boundary?)")
    parts: list[tuple[str | None, str | None, bytes]] = []
    for raw in pieces[1:]:
        if raw.startswith(b"--"):  # the closing delimiter "--boundary--"
            break
        head, sep, payload = raw.removeprefix(b"\r\n").partition(b"\r\n\r\n")
        if not sep:
            raise ApiError(400, "bad_multipart", "a multipart part has no blank line after its headers")
        if len(head) > MAX_PART_HEADER_BYTES:
            detail = f"a multipart part's headers are {len(head)} bytes; the limit is {MAX_PART_HEADER_BYTES}"
            raise ApiError(413, "part_header_too_large", detail)
        name, filename = _disposition(head)
        parts.append((name, filename, payload.removesuffix(b"\r\n")))
    for want in ("file", "image", None):
        for name, filename, payload in parts:
            if name == want or (want is None and filename):
                return payload
    raise ApiError(400, "missing_file", "multipart/form-data body has no 'file' field")
