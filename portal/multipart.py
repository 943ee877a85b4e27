"""multipart/related (RFC 2387) as PS3.18 uses it: parse STOW-RS bodies and an external
archive's WADO-RS answers, write the portal's WADO-RS answers.

A codec with no portal imports, so both the DICOMweb face and the archive's external client
use it (docs/architecture.md "What may import what": the archive never imports dicomweb).
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from werkzeug.http import parse_options_header


class MultipartError(ValueError):
    """The body is not well-formed multipart/related."""


@dataclass(frozen=True)
class Part:
    """One body part: its content type (lower case, without parameters) and payload."""

    content_type: str
    payload: memoryview


def _part_content_type(raw_headers: bytes | bytearray) -> str:
    for line in raw_headers.split(b"\r\n"):
        name, sep, value = line.partition(b":")
        if sep and name.strip().lower() == b"content-type":
            mimetype, _params = parse_options_header(value.decode("latin-1").strip())
            return mimetype.lower()
    return ""


def split_parts(body: bytes | bytearray, boundary: str, max_parts: int = 100_000) -> list[Part]:
    """Split a multipart body into parts without copying payloads."""
    if not boundary or len(boundary) > 70:
        raise MultipartError("missing or invalid boundary")
    view = memoryview(body)
    delimiter = b"--" + boundary.encode("latin-1")
    # The first delimiter opens the body or a line after the preamble (RFC 2046 5.1.1).
    start = 0
    if _delimiter_line(body, delimiter, 0) != 0:
        start = _delimiter_line(body, b"\r\n" + delimiter, 0)
        if start < 0:
            raise MultipartError("the body does not contain the boundary")
        start += 2  # past the CRLF that ends the preamble
    pos = start + len(delimiter)
    parts: list[Part] = []
    while True:
        if body[pos:pos + 2] == b"--":
            return parts
        line_end = body.find(b"\r\n", pos)
        if line_end < 0:
            raise MultipartError("truncated body")
        pos = line_end + 2
        end = _delimiter_line(body, b"\r\n" + delimiter, pos)
        if end < 0:
            raise MultipartError("a part is not terminated by the boundary")
        headers: bytes | bytearray = b""
        if body.startswith(b"\r\n", pos):
            payload_start = pos + 2
        else:
            header_end = body.find(b"\r\n\r\n", pos, end + 2)
            if header_end < 0:
                raise MultipartError("a part has no header/body separator")
            headers, payload_start = body[pos:header_end], header_end + 4
        parts.append(Part(_part_content_type(headers), view[payload_start:end]))
        if len(parts) > max_parts:
            raise MultipartError(f"more than {max_parts} parts")
        pos = end + 2 + len(delimiter)


_PADDING = frozenset(b" \t")


def _delimiter_line(body: bytes | bytearray, delimiter: bytes, start: int) -> int:
    """Where the next delimiter line begins (its CRLF), or -1. RFC 2046 5.1.1: the boundary
    is followed by ``--`` (the close) or by optional spaces and tabs, then CRLF; the same
    bytes followed by anything else (``--bndX`` for the boundary ``bnd``) are a part's data."""
    at = body.find(delimiter, start)
    while at >= 0:
        after = at + len(delimiter)
        if body[after:after + 2] == b"--":
            return at
        while after < len(body) and body[after] in _PADDING:
            after += 1
        if body[after:after + 2] == b"\r\n":
            return at
        at = body.find(delimiter, at + 1)
    return -1


def new_boundary() -> str:
    """A random boundary that cannot collide with DICOM content by accident."""
    return "portal-" + secrets.token_hex(16)


@dataclass(frozen=True)
class FilePart:
    """A part's payload kept in a file of ``size`` bytes: streamed in chunks, then deleted."""

    path: str
    size: int

    def __len__(self) -> int:
        return self.size

    def chunks(self, chunk_size: int = 1 << 20) -> Iterator[bytes]:
        """The file's bytes; the file is gone once they are read (or the reading stops)."""
        try:
            with open(self.path, "rb") as handle:
                while chunk := handle.read(chunk_size):
                    yield chunk
        finally:
            self.discard()

    def discard(self) -> None:
        """Delete the file (again, harmlessly)."""
        Path(self.path).unlink(missing_ok=True)


def located_part(content_type: str, payload: bytes, boundary: str, location: str) -> bytes:
    """One body part with a Content-Location naming the resource it is (PS3.18 8.6.1.2)."""
    return (f"--{boundary}\r\nContent-Type: {content_type}\r\n"
            f"Content-Location: {location}\r\nContent-Length: {len(payload)}\r\n\r\n"
            ).encode("latin-1") + payload + b"\r\n"


def closing(boundary: str) -> bytes:
    """The close delimiter that ends a multipart body."""
    return f"--{boundary}--\r\n".encode("latin-1")


def stream_parts(parts: Iterable[tuple[str, bytes | FilePart]], boundary: str
                 ) -> Iterator[bytes]:
    """Yield a multipart/related body part by part (content type, payload)."""
    for content_type, payload in parts:
        yield (f"--{boundary}\r\nContent-Type: {content_type}\r\n"
               f"Content-Length: {len(payload)}\r\n\r\n").encode("latin-1")
        if isinstance(payload, FilePart):
            yield from payload.chunks()
        else:
            yield payload
        yield b"\r\n"
    yield f"--{boundary}--\r\n".encode("latin-1")
