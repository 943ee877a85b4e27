"""Several gunicorn workers may listen each on a socket of their own (``reuse_port`` in
portal/gunicorn_config.py), so the kernel spreads a client's keep-alive connections over
them: chosen where a reload loses no connection by it (``own_sockets``); such a server starts
only on an address nothing else listens on (SO_REUSEPORT would otherwise let a second server
of the same user share it quietly), and the default loses no connection at a reload."""

from __future__ import annotations

import http.client
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from portal.listening import own_sockets
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
    with served(tmp_path / "instance", "bench", WORKERS="2", REUSE_PORT="1") as node:
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
                   PORTAL_BIND=f"127.0.0.1:{port}", PORTAL_WORKERS="2", PORTAL_REUSE_PORT="1")
        server = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "-c", "python:portal.gunicorn_config",
             "app:app"], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, start_new_session=True)
        try:
            _out, errors = server.communicate(timeout=60)
        except subprocess.TimeoutExpired:  # it started after all: stop it and its workers
            os.killpg(server.pid, signal.SIGKILL)
            server.communicate()
            raise
        assert server.returncode != 0
        assert f"127.0.0.1:{port} is taken by another server" in errors
        other.settimeout(0.5)
        for _ in range(4):
            with socket.create_connection(("127.0.0.1", port), timeout=5):
                accepted, _address = other.accept()
                accepted.close()


def _wait_for_listeners(pid: int, count: int, but_not: frozenset[int] = frozenset()
                        ) -> list[int]:
    """The worker pids of gunicorn ``pid`` once ``count`` of them (none of ``but_not``) each
    hold a listening socket (their own, or the one they share)."""
    deadline = time.monotonic() + 60
    while True:
        workers = [w for w in _children(pid) if w not in but_not]
        if len(workers) == count and all(listening_addresses(w) for w in workers):
            return workers
        assert time.monotonic() < deadline, workers
        time.sleep(0.1)


def test_own_sockets_only_where_a_reload_loses_no_connection() -> None:
    """Sockets of their own where the kernel hands a closing socket's waiting connections
    on (tcp_migrate_req), or when asked; never where they cannot work."""
    tcp, unix = [("127.0.0.1", 5000)], ["/run/portal.sock"]
    assert own_sockets("", 2, tcp, inherited=False, migrates=True)
    assert not own_sockets("", 2, tcp, inherited=False, migrates=False)
    assert own_sockets("1", 2, tcp, inherited=False, migrates=False)
    assert not own_sockets("0", 2, tcp, inherited=False, migrates=True)
    for workers, addresses, inherited in ((1, tcp, False), (2, unix, False), (2, tcp, True),
                                          (2, [*tcp, *unix], False)):
        assert not own_sockets("1", workers, addresses, inherited=inherited, migrates=True)


def test_no_new_connection_is_lost_while_the_workers_are_replaced(tmp_path: Path) -> None:
    """A reload (HUP) while an old worker still serves a kept-alive connection, with the
    default settings of this machine: every connection made meanwhile is answered. (With a
    socket of its own per worker and no tcp_migrate_req, the connections waiting on an old
    worker's socket as it closed were reset: 2 runs of 5.)"""
    with served(tmp_path / "instance", "bench", WORKERS="2") as node:
        old = _wait_for_listeners(node.pid, 2)
        kept = http.client.HTTPConnection("127.0.0.1", node.port, timeout=10)
        kept.request("GET", "/healthz")
        assert kept.getresponse().status == 200
        os.kill(node.pid, signal.SIGHUP)
        answered = 0
        deadline = time.monotonic() + 4  # past the 2 s a stopping worker keeps a kept-alive
        while time.monotonic() < deadline:
            connection = http.client.HTTPConnection("127.0.0.1", node.port, timeout=30)
            try:
                connection.request("GET", "/healthz")
                assert connection.getresponse().status == 200
                answered += 1
            finally:
                connection.close()
        kept.close()
        assert answered > 10
        new = _wait_for_listeners(node.pid, 2, but_not=frozenset(old))
        assert not set(new) & set(old)
