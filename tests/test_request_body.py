"""A request body read straight from gunicorn's socket (security._from_gunicorn_socket), with
gunicorn's own request parser over a real socket pair: the body whole, the next request on
the connection untouched, a sender that stops early refused, and the portable way kept for
what is not a plain Content-Length body."""

from __future__ import annotations

import os
import socket
import threading
import tracemalloc
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from gunicorn.config import Config
from gunicorn.http.parser import RequestParser
from werkzeug.exceptions import BadRequest

from portal.security import _from_gunicorn_socket

NEXT = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"


@contextmanager
def parsed(head: bytes, body: bytes, *, then: bytes = b"",
           close: bool = False) -> Iterator[tuple[Any, dict[str, Any], RequestParser]]:
    """gunicorn's parser on one end of a socket pair; the other end sends ``head``, ``body``
    and ``then`` (from a thread: the body is larger than the socket's buffer)."""
    server, client = socket.socketpair()
    server.settimeout(20)  # a body left on the socket would block, not pass

    def send() -> None:
        client.sendall(head + body + then)
        if close:
            client.shutdown(socket.SHUT_WR)

    sender = threading.Thread(target=send)
    sender.start()
    try:
        parser = RequestParser(Config(), server, ("127.0.0.1", 1))
        request = next(parser)
        environ = {"wsgi.input": request.body, "gunicorn.socket": server}
        yield request, environ, parser
    finally:
        sender.join(timeout=30)
        server.close()
        client.close()


def _head(length: int, extra: str = "") -> bytes:
    return (f"POST /dicomweb/studies HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Content-Length: {length}\r\n{extra}\r\n").encode()


@pytest.mark.parametrize("size", [1, 5_000, 3_000_000])
def test_the_body_arrives_whole_and_the_next_request_is_left_on_the_connection(
        size: int) -> None:
    body = os.urandom(size)
    with parsed(_head(size), body, then=NEXT) as (_request, environ, parser):
        received = _from_gunicorn_socket(environ, size)
        assert received == body
        assert isinstance(received, bytearray)
        # Nothing of the body is left for gunicorn to drain, and the next request is whole.
        assert environ["wsgi.input"].read(1024) == b""
        following = next(parser)
        assert (following.method, following.path) == ("GET", "/healthz")


def test_a_sender_that_stops_early_is_refused_and_the_connection_not_reused() -> None:
    body = os.urandom(200_000)
    with parsed(_head(len(body)), body[:150_000], close=True) as (_request, environ, _parser):
        with pytest.raises(BadRequest, match="ended before its Content-Length"):
            _from_gunicorn_socket(environ, len(body))
        assert environ["wsgi.input"].failed is True  # gunicorn closes such a connection


def test_what_is_not_a_plain_length_body_is_left_to_the_portable_way() -> None:
    body = os.urandom(10_000)
    # A body partly read already.
    with parsed(_head(len(body)), body) as (_request, environ, _parser):
        first = environ["wsgi.input"].read(100)
        assert _from_gunicorn_socket(environ, len(body) - 100) is None
        assert first + environ["wsgi.input"].read(len(body)) == body
    # A chunked body.
    chunked = b"5\r\nhello\r\n0\r\n\r\n"
    head = b"POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n"
    with parsed(head, chunked) as (_request, environ, _parser):
        assert _from_gunicorn_socket(environ, 5) is None
        assert environ["wsgi.input"].read(100) == b"hello"
    # Another server's input (no gunicorn socket).
    with parsed(_head(len(body)), body) as (_request, environ, _parser):
        del environ["gunicorn.socket"]
        assert _from_gunicorn_socket(environ, len(body)) is None


def test_memory_follows_the_bytes_that_came_not_the_announced_length() -> None:
    """A sender announces a gigabyte, sends 100 KB and stops: 400, and the buffer never
    grew past what arrived (a buffer of the announced size would be 1 GiB at once)."""
    announced = 1 << 30
    tracemalloc.start()
    try:
        with parsed(_head(announced), os.urandom(100_000), close=True) as (_r, environ, _p), \
                pytest.raises(BadRequest):
            _from_gunicorn_socket(environ, announced)
        _current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20, peak
