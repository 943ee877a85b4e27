"""How the web workers listen: one socket gunicorn's master shares, or one of their own each
(SO_REUSEPORT). Apart from ``portal.gunicorn_config``, whose import sets the process's
metrics folder, so that anything may import it."""

from __future__ import annotations

from typing import Any


def own_sockets(setting: str, workers: int, addresses: list[Any], inherited: bool,
                migrates: bool) -> bool:
    """Whether each worker gets a socket of its own (``reuse_port``): PORTAL_REUSE_PORT
    ``setting`` 1 or 0, else ("") only when the kernel hands a closing socket's waiting
    connections to the others (``migrates``: net.ipv4.tcp_migrate_req=1), so a reload loses
    none; and never for one worker, a unix socket or sockets handed over by systemd or an old
    master (``inherited``, USR2)."""
    if setting == "0" or workers < 2 or inherited \
            or not all(isinstance(address, tuple) for address in addresses):
        return False
    return setting == "1" or migrates
