"""HL7 v2 over MLLP (HL7 v2.5.1 Appendix C): <VT> message <FS><CR>, one ACK per message.

A threaded TCP server on the configured address. Each connection may carry many messages;
a frame larger than the limit is read to its end without being kept, then answered AR; a
peer that stays silent past the idle timeout is disconnected. With a TLS context every
connection must complete a TLS 1.2+ handshake first (and, with a CA, show a certificate it
signed); there is no plain fallback on that port.
"""

from __future__ import annotations

import logging
import socket
import socketserver
import ssl
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)

START, END = b"\x0b", b"\x1c\x0d"
IDLE_TIMEOUT = 120.0
HANDSHAKE_TIMEOUT = 30.0  # a peer that opens a connection and never finishes TLS is dropped

Handler = Callable[[bytes, str, bool], bytes]


class _Connection(socketserver.BaseRequestHandler):
    server: MllpServer

    def handle(self) -> None:
        """Handshake (with TLS), then answer each framed message until the peer leaves."""
        sock: socket.socket = self.request
        peer = self.client_address[0]
        if self.server.tls is not None:
            sock.settimeout(HANDSHAKE_TIMEOUT)
            try:
                # The handshake runs in this connection's thread, so a slow peer holds only it.
                sock = self.server.tls.wrap_socket(sock, server_side=True)
            except (ssl.SSLError, OSError) as exc:
                log.warning("HL7 TLS handshake with %s failed: %s", peer,
                            getattr(exc, "reason", None) or type(exc).__name__)
                return
            try:
                self._serve(sock, peer)
            finally:
                sock.close()  # the wrapped socket: socketserver closes only the original
            return
        self._serve(sock, peer)

    def _serve(self, sock: socket.socket, peer: str) -> None:
        """Read MLLP frames and send one answer per frame."""
        sock.settimeout(IDLE_TIMEOUT)
        buffer = b""
        in_frame, kept, overflow = False, bytearray(), False
        limit = self.server.max_bytes
        while True:
            try:
                chunk = sock.recv(65536)
            except (TimeoutError, OSError):
                return
            if not chunk:
                return
            buffer += chunk
            while buffer:
                if not in_frame:
                    start = buffer.find(START)
                    if start < 0:
                        buffer = b""  # noise between frames is ignored (MLLP C.4.3)
                        break
                    buffer, in_frame, kept, overflow = buffer[start + 1:], True, bytearray(), False
                end = buffer.find(END)
                body, rest = (buffer, b"") if end < 0 else (buffer[:end], buffer[end + 2:])
                if end < 0 and body.endswith(b"\x1c"):
                    body, rest = body[:-1], b"\x1c"  # FS arrived, CR not yet
                if not overflow:
                    if len(kept) + len(body) > limit:
                        # Keep the start (for MSH-10 in the answer), drop the rest.
                        kept += body[:max(0, 4096 - len(kept))]
                        overflow = True
                    else:
                        kept += body
                buffer = rest
                if end < 0:
                    break
                in_frame = False
                answer = self.server.on_message(bytes(kept), peer, overflow)
                try:
                    sock.sendall(START + answer + END)
                except OSError:
                    return


class MllpServer(socketserver.ThreadingTCPServer):
    """The listener; ``on_message(raw, peer_address, oversized)`` returns the ACK bytes
    (``oversized``: the frame passed the limit and ``raw`` holds only its start)."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], on_message: Handler, max_bytes: int,
                 tls: ssl.SSLContext | None = None) -> None:
        self.on_message = on_message
        self.max_bytes = max_bytes
        self.tls = tls
        super().__init__(address, _Connection)

    def start(self) -> threading.Thread:
        """Serve in a background thread (tests); ``shutdown()`` stops it."""
        thread = threading.Thread(target=self.serve_forever, name="mllp", daemon=True)
        thread.start()
        return thread
