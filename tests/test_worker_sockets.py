"""Several gunicorn workers listen each on a socket of their own (``reuse_port`` in
portal/gunicorn_config.py), so the kernel spreads a client's keep-alive connections over them;
and a server starts only on an address nothing else listens on (SO_REUSEPORT would otherwise
let a second server of the same user share it quietly)."""

from __future__ import annotations

import http.client
import os
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from tests.conftest import REPO, free_port
from tests.support.gunicorn import served
from tests.support.orthanc import listening_addresses


def _children(pid: int) -> list[int]:
    return [int(child) for child in
            Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def _sockets(pid: int) -> set[str]:
    found = set()
    for entry in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(entry)
        except OSError:
            continue  # closed while we looked
        if target.startswith("socket:["):
            found.add(target[len("socket:["):-1])
    return found


def _established_on(port: int) -> set[str]:
    """The socket inodes of the established TCP connections whose local port is ``port``."""
    found = set()
    with open("/proc/net/tcp") as table:
        next(table)
        for line in table:
            columns = line.split()
            local, state, inode = columns[1], columns[3], columns[9]
            if state == "01" and int(local.split(":")[1], 16) == port:
                found.add(inode)
    return found


def test_a_clients_connections_are_spread_over_the_workers(tmp_path: Path) -> None:
    """Two workers: each listens on the port itself, on loopback only, and 16 keep-alive
    connections of one client are served by both (on one shared socket the worker that woke
    first took all 8 of a benchmark's connections in 1 try of 8; by address hashing all 16
    on one worker has a chance of 1 in 32,768)."""
    with served(tmp_path / "instance", "bench", WORKERS="2") as node:
        deadline = time.monotonic() + 30
        while True:  # the second worker may still be booting
            workers = _children(node.pid)
            listening = {pid: listening_addresses(pid) for pid in workers}
            if len(workers) == 2 and all(listening.values()):
                break
            assert time.monotonic() < deadline, listening
            time.sleep(0.2)
        assert listening_addresses(node.pid) == []  # the master holds no listener
        for addresses in listening.values():
            assert addresses == [("127.0.0.1", node.port)]

        connections = [http.client.HTTPConnection("127.0.0.1", node.port, timeout=10)
                       for _ in range(16)]
        try:
            for connection in connections:
                connection.request("GET", "/healthz")
                answer = connection.getresponse()
                answer.read()
                assert answer.status == 200
            established = _established_on(node.port)
            served_by: Counter[int] = Counter()
            for pid in workers:
                served_by[pid] = len(_sockets(pid) & established)
            assert sum(served_by.values()) == 16, served_by
            assert all(count > 0 for count in served_by.values()), served_by
        finally:
            for connection in connections:
                connection.close()


def test_a_server_does_not_start_on_an_address_another_listens_on(tmp_path: Path) -> None:
    """Another server already listens on the port with SO_REUSEPORT: the portal's workers
    could bind beside it and take half of its connections; the portal refuses to start,
    saying why, and the other keeps every connection."""
    port = free_port()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as other:
        other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        other.bind(("127.0.0.1", port))
        other.listen(16)
        instance = tmp_path / "instance"
        env = {k: v for k, v in os.environ.items() if not k.startswith("PORTAL_")}
        env.update(PORTAL_INSTANCE_PATH=str(instance), PORTAL_ENV="test",
                   PORTAL_BIND=f"127.0.0.1:{port}", PORTAL_WORKERS="2")
        started = subprocess.run(
            [sys.executable, "-m", "gunicorn", "-c", "python:portal.gunicorn_config",
             "app:app"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
        assert started.returncode != 0
        assert f"127.0.0.1:{port} is taken by another server" in started.stderr
        other.settimeout(0.5)
        for _ in range(4):
            with socket.create_connection(("127.0.0.1", port), timeout=5):
                accepted, _address = other.accept()
                accepted.close()
