"""The portal under a real gunicorn on a loopback port, for tests of what only the real
server does (header checks, request streaming, worker processes)."""

from __future__ import annotations

import http.client
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.conftest import REPO, free_port, wait_for


@dataclass(frozen=True)
class Served:
    """A running gunicorn: its port and the Basic credentials of one machine client."""

    port: int
    client: str
    secret: str
    pid: int = 0  # the gunicorn master's process id (its worker is its child)


@contextmanager
def served(instance: Path, client: str, log: Path | None = None, read: bool = False,
           **settings: str) -> Iterator[Served]:
    """One gunicorn worker for a fresh instance folder (only these PORTAL_* settings, plus
    a registered machine client, with the read right if ``read``), until the block ends; its
    output goes to ``log`` if given."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PORTAL_")}
    env.update(PORTAL_INSTANCE_PATH=str(instance), PORTAL_ENV="test",
               PORTAL_BIND=f"127.0.0.1:{port}", PORTAL_WORKERS="1")
    env.update({f"PORTAL_{key}": value for key, value in settings.items()})  # WORKERS too
    made = subprocess.run([sys.executable, "-m", "flask", "--app", "app", "clients", "create",
                           client, *(["--read"] if read else [])], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60, check=True)
    secret = made.stdout.split("secret: ", 1)[1].split()[0]
    output = log.open("ab") if log is not None else None
    server = subprocess.Popen([sys.executable, "-m", "gunicorn", "-c",
                               "python:portal.gunicorn_config", "app:app"], cwd=REPO, env=env,
                              stdout=output or subprocess.DEVNULL,
                              stderr=output or subprocess.DEVNULL)
    try:
        def ready() -> bool:
            try:
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
                connection.request("GET", "/healthz")
                return connection.getresponse().status == 200
            except OSError:
                return False

        assert wait_for(ready, timeout=30)
        yield Served(port, client, secret, server.pid)
    finally:
        server.terminate()
        try:
            server.wait(timeout=45)  # a worker may take up to the 30 s graceful timeout
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=10)
        if output is not None:
            output.close()
