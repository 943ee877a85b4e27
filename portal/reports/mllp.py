"""HL7 v2 over MLLP (HL7 v2.5.1 Appendix C): <VT> message <FS><CR>, one ACK per message.

A threaded TCP server on the configured address. Each connection may carry many messages;
a frame larger than the limit is read to its end without being kept, then answered AR; a
peer that stays silent past the idle timeout is disconnected.
"""

from __future__ import annotations

import logging
import socket
import socketserver
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)

START, END = b"\x0b", b"\x1c\x0d"
IDLE_TIMEOUT = 120.0

Handler = Callable[[bytes, str, bool], bytes]


class _Connection(socketserver.BaseRequestHandler):
    server: MllpServer

    def handle(self) -> None:
        sock: socket.socket = self.request
        sock.settimeout(IDLE_TIMEOUT)
        peer = self.client_address[0]
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

    def __init__(self, address: tuple[str, int], on_message: Handler, max_bytes: int) -> None:
        self.on_message = on_message
        self.max_bytes = max_bytes
        super().__init__(address, _Connection)

    def start(self) -> threading.Thread:
        """Serve in a background thread (tests); ``shutdown()`` stops it."""
        thread = threading.Thread(target=self.serve_forever, name="mllp", daemon=True)
        thread.start()
        return thread
