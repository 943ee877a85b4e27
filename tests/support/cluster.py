"""The reference cluster (docs/cluster.md) on this machine, for tests and benchmarks.

One PostgreSQL (the portal's index and Orthanc's, in two databases), one Redis, Orthanc with
``orthanc-postgresql`` (index AND storage in PostgreSQL) and its DICOMweb plugin as the
archive tier, N portal nodes under gunicorn (each with its own instance folder: nothing on
a node's disk is the only copy of anything), an RQ job worker (``flask jobs worker``, with
its scheduler: the nodes put pre-rendering, notices and the periodic jobs on its queue), and
nginx in front with TLS and HTTP/2, the
config filled in from ``deploy/nginx.conf.template``. Everything binds 127.0.0.1 on free
ports under one temp folder, and ``stop()`` ends and removes it all.

The failure methods (``kill_node``, ``hang_redis``, ``restart_postgres``, ``stop_orthanc``
and their opposites) are what tests/cluster/ uses to break it on purpose.

``python -m tests.support.cluster`` (``make cluster``) starts it, prints the addresses and
waits for Ctrl-C.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import redis

from portal.config import SETTINGS
from tests.conftest import REPO, PostgresCluster, free_port, wait_for
from tests.support import orthanc as orthanc_support

TEMPLATE = REPO / "deploy" / "nginx.conf.template"
MAX_REQUEST_BYTES = next(s.default for s in SETTINGS if s.key == "MAX_REQUEST_BYTES")
# Passive health checks of the template: one failure takes a node out for 5 s.
MAX_FAILS, FAIL_TIMEOUT = 1, "5s"
CLIENT = "cluster-modality"


class ClusterError(RuntimeError):
    """A part of the cluster did not start."""


def render_nginx_config(*, listen: str, server_name: str, upstreams: list[str],
                        tls_cert: Path, tls_key: Path, access_log: str, static_root: Path,
                        body_temp: str, max_body_bytes: int = MAX_REQUEST_BYTES) -> str:
    """``deploy/nginx.conf.template`` filled in (the server block for conf.d/)."""
    servers = "\n".join(f"    server {address} max_fails={MAX_FAILS} "
                        f"fail_timeout={FAIL_TIMEOUT};" for address in upstreams)
    values = {"LISTEN": listen, "SERVER_NAME": server_name, "UPSTREAM_SERVERS": servers,
              "TLS_CERT": str(tls_cert), "TLS_KEY": str(tls_key), "ACCESS_LOG": access_log,
              "STATIC_ROOT": str(static_root).rstrip("/"), "BODY_TEMP": body_temp,
              "MAX_BODY_BYTES": str(max_body_bytes), "MAX_FAILS": str(MAX_FAILS),
              "FAIL_TIMEOUT": FAIL_TIMEOUT}
    text = TEMPLATE.read_text()
    for key, value in values.items():
        text = text.replace("{{" + key + "}}", value)
    if "{{" in text:
        raise ClusterError("nginx template has an unfilled placeholder")
    return text


def self_signed_certificate(folder: Path) -> tuple[Path, Path]:
    """A throwaway certificate for 127.0.0.1 and localhost (cert.pem, key.pem)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "portal cluster (test)")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.SubjectAlternativeName([
                x509.DNSName("localhost"),
                x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    return cert_path, key_path


def _http_ok(url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as answer:
            return bool(answer.status == 200)
    except (OSError, urllib.error.URLError):
        return False


def _stop_group(process: subprocess.Popen[bytes] | None) -> None:
    """SIGTERM to a process group started with ``start_new_session``; SIGKILL after 30 s."""
    if process is None or process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)


@dataclass
class Node:
    """One portal node: gunicorn on its own port and instance folder."""

    name: str
    port: int
    instance: Path
    env: dict[str, str]
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log(self) -> Path:
        return self.instance.parent / f"{self.name}.log"


class Cluster:
    """The reference cluster; ``start()`` then ``stop()`` (or use it as a context manager)."""

    def __init__(self, root: Path | None = None, nodes: int = 2, *, workers: int = 1,
                 threads: int = 4, extra_settings: dict[str, str] | None = None) -> None:
        # Not under pytest's temp folder: PostgreSQL's user must reach it.
        self.root = root or Path(tempfile.mkdtemp(prefix="portal-cluster-"))
        self.node_count, self.workers, self.threads = nodes, workers, threads
        self.extra_settings = extra_settings or {}
        self.postgres = PostgresCluster(self.root / "pg")
        self.redis_port = free_port()
        self.redis_process: subprocess.Popen[bytes] | None = None
        self.orthanc: orthanc_support.OrthancServer | None = None
        self.orthanc_database = "orthanc"
        self.nodes: list[Node] = []
        self.nginx_port = free_port()
        self.nginx_process: subprocess.Popen[bytes] | None = None
        # `flask jobs worker` (RQ, with its scheduler) beside the nodes, on node a's settings.
        self.worker_process: subprocess.Popen[bytes] | None = None
        self.secret_key = secrets.token_urlsafe(48)
        # A scraper's token: /readyz shows the queue's counts only to a scraper.
        self.metrics_token = secrets.token_urlsafe(32)
        self.database_url = ""
        self.client_secret = ""
        self.tls_cert = self.root / "nginx" / "cert.pem"

    # -- addresses ---------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """nginx's address (https, HTTP/2)."""
        return f"https://127.0.0.1:{self.nginx_port}"

    @property
    def redis_url(self) -> str:
        return f"redis://127.0.0.1:{self.redis_port}/0"

    @property
    def client(self) -> tuple[str, str]:
        """Basic credentials of a machine client that may store and read everything."""
        return (CLIENT, self.client_secret)

    @property
    def postgres_dsn(self) -> str:
        return f"host=127.0.0.1 port={self.postgres.port} user=portal dbname=postgres"

    def portal_dsn(self) -> str:
        """A psycopg connection string of the portal's database."""
        name = self.database_url.rsplit("/", 1)[1]
        return f"host=127.0.0.1 port={self.postgres.port} user=portal dbname={name}"

    # -- start and stop ----------------------------------------------------------------------

    def __enter__(self) -> Cluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            self.root.chmod(0o711)  # PostgreSQL's user passes through, lists nothing
            self.postgres.start()
            self.database_url = self.postgres.new_database()
            with psycopg.connect(self.postgres_dsn, autocommit=True) as conn:
                conn.execute(f'CREATE DATABASE "{self.orthanc_database}"')
            self.start_redis()
            self._start_orthanc()
            self._prepare_nodes()
            for node in self.nodes:
                self.start_node(node)  # one after the other: the first one migrates
            self.start_worker()
            self._start_nginx()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Stop everything that runs and remove the temp folder; safe to call twice."""
        steps = [self._stop_nginx, self.stop_worker,
                 *[lambda n=n: self.stop_node(n) for n in self.nodes],
                 self.stop_orthanc, self.resume_redis, self.stop_redis, self._stop_postgres]
        for step in steps:
            try:
                step()
            except Exception as exc:  # keep stopping the rest
                print(f"cluster: stopping failed: {exc}", file=sys.stderr)
        shutil.rmtree(self.root, ignore_errors=True)

    # -- PostgreSQL --------------------------------------------------------------------------

    def _pg_ctl(self, *args: str) -> None:
        from tests.conftest import _pg_bindir

        self.postgres._run(str(_pg_bindir() / "pg_ctl"), "-D", str(self.postgres.data), *args)

    def _stop_postgres(self) -> None:
        if self.postgres.data.exists():
            self.postgres.stop()

    def stop_postgres(self) -> None:
        """Stop PostgreSQL at once (every connection of every node breaks)."""
        self._pg_ctl("-m", "immediate", "-w", "stop")

    def start_postgres(self) -> None:
        """Start it again on the same port and data."""
        self._pg_ctl("-w", "-t", "60", "-l", str(self.postgres.root / "log"), "-o",
                     f"-h 127.0.0.1 -p {self.postgres.port} -k {self.postgres.root} -F "
                     "-c fsync=off", "start")

    # -- Redis -------------------------------------------------------------------------------

    def start_redis(self) -> None:
        """Start (or start again) redis-server on its port; an empty cache."""
        executable = shutil.which("redis-server") or "/usr/bin/redis-server"
        self.redis_process = subprocess.Popen(
            [executable, "--port", str(self.redis_port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--maxmemory", "128mb", "--maxmemory-policy", "allkeys-lru"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis.from_url(self.redis_url, socket_timeout=1)

        def ready() -> bool:
            try:
                return bool(client.ping())
            except redis.RedisError:
                return False

        if not wait_for(ready, timeout=10):
            raise ClusterError("redis-server did not start")

    def stop_redis(self) -> None:
        process, self.redis_process = self.redis_process, None
        if process is not None and process.poll() is None:
            process.terminate()
            process.wait(timeout=10)

    def hang_redis(self) -> None:
        """SIGSTOP: connections are accepted by the kernel, nothing ever answers."""
        if self.redis_process is not None:
            self.redis_process.send_signal(signal.SIGSTOP)

    def resume_redis(self) -> None:
        if self.redis_process is not None and self.redis_process.poll() is None:
            self.redis_process.send_signal(signal.SIGCONT)

    # -- Orthanc on PostgreSQL ---------------------------------------------------------------

    def _start_orthanc(self) -> None:
        plugins = orthanc_support.PLUGIN_DIR
        for library in ("libOrthancPostgreSQLIndex.so", "libOrthancPostgreSQLStorage.so"):
            if not (plugins / library).exists():
                raise ClusterError(f"{plugins / library} missing: install orthanc-postgresql")
        self.orthanc = orthanc_support.start_orthanc(self.root / "orthanc", extra_config={
            "Plugins": [str(plugins / orthanc_support.DICOMWEB_PLUGIN),
                        str(plugins / "libOrthancPostgreSQLIndex.so"),
                        str(plugins / "libOrthancPostgreSQLStorage.so")],
            "PostgreSQL": {"EnableIndex": True, "EnableStorage": True,
                           "Host": "127.0.0.1", "Port": self.postgres.port,
                           "Database": self.orthanc_database, "Username": "portal",
                           "Password": "", "EnableSsl": False,
                           # Several Orthanc servers may share the database (docs/cluster.md).
                           "Lock": False, "IndexConnectionsCount": 2}})

    def stop_orthanc(self) -> None:
        if self.orthanc is not None:
            self.orthanc.stop()

    def start_orthanc(self) -> None:
        """Start the stopped Orthanc again with the same configuration (ports, password)."""
        server = self.orthanc
        assert server is not None and server.process is None
        workdir = self.root / "orthanc"
        env = {**os.environ, "LD_PRELOAD": str(orthanc_support.build_preload_library())}
        console = workdir / "orthanc.console.log"
        with open(console, "ab") as out:
            server.process = subprocess.Popen(
                [shutil.which("Orthanc") or "Orthanc", f"--logfile={server.log_file}",
                 str(workdir / "orthanc.json")], cwd=workdir, env=env,
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
        orthanc_support._wait_until_ready(server, console, orthanc_support.STARTUP_TIMEOUT_S)
        orthanc_support._assert_loopback_only(server)

    def orthanc_has_instance(self, sop_instance_uid: str) -> bool:
        """Whether Orthanc's own REST API knows this SOP Instance UID."""
        assert self.orthanc is not None
        found = self.orthanc_json("/tools/lookup", data=sop_instance_uid.encode())
        return any(item.get("Type") == "Instance" for item in found)

    def orthanc_json(self, path: str, data: bytes | None = None) -> Any:
        assert self.orthanc is not None
        request = self.orthanc._request(path, method="POST" if data is not None else "GET")
        with urllib.request.urlopen(request, data=data, timeout=10) as answer:
            return json.load(answer)

    # -- portal nodes ------------------------------------------------------------------------

    def _prepare_nodes(self) -> None:
        assert self.orthanc is not None
        for index in range(self.node_count):
            name = "node-" + "abcdefgh"[index]
            port = free_port()
            env = {k: v for k, v in os.environ.items() if not k.startswith("PORTAL_")}
            settings = {
                "ENV": "production", "SECRET_KEY": self.secret_key,
                "METRICS_TOKEN": self.metrics_token,
                "INSTANCE_PATH": str(self.root / name / "instance"),
                "DATABASE_URL": self.database_url, "REDIS_URL": self.redis_url,
                "ARCHIVE_URL": self.orthanc.dicomweb_url,
                "ARCHIVE_USERNAME": self.orthanc.username,
                "ARCHIVE_PASSWORD": self.orthanc.password,
                "ARCHIVE_BREAKER_FAILURES": "3", "ARCHIVE_BREAKER_RESET_SECONDS": "10",
                "ARCHIVE_CONNECT_TIMEOUT_SECONDS": "1", "ARCHIVE_TIMEOUT_SECONDS": "10",
                "ARCHIVE_WRITE_THROUGH": "true",
                "TRUSTED_PROXIES": "1", "TRUSTED_PROXY_ADDRESSES": "127.0.0.1",
                "BIND": f"127.0.0.1:{port}", "WORKERS": str(self.workers),
                "THREADS": str(self.threads), "RENDER_WORKERS": "1", "LOG_LEVEL": "WARNING",
                **self.extra_settings}
            env.update({f"PORTAL_{key}": value for key, value in settings.items()})
            instance = Path(settings["INSTANCE_PATH"])
            instance.mkdir(parents=True, exist_ok=True)
            self.nodes.append(Node(name, port, instance, env))
        made = subprocess.run(
            [sys.executable, "-m", "flask", "--app", "app", "clients", "create", "--read",
             CLIENT], cwd=REPO, env=self.nodes[0].env, capture_output=True, text=True,
            timeout=120)
        if made.returncode:
            raise ClusterError(f"clients create failed: {made.stderr[-2000:]}")
        self.client_secret = made.stdout.split("secret: ", 1)[1].split()[0]

    def node(self, which: int | str) -> Node:
        if isinstance(which, int):
            return self.nodes[which]
        return next(n for n in self.nodes if n.name == which)

    def start_node(self, node: Node | int | str) -> None:
        """Start a node's gunicorn (in its own process group) and wait until it is healthy."""
        node = node if isinstance(node, Node) else self.node(node)
        if node.process is not None and node.process.poll() is None:
            return
        with open(node.log, "ab") as log:
            node.process = subprocess.Popen(
                [sys.executable, "-m", "gunicorn", "-c", "python:portal.gunicorn_config",
                 "app:app"], cwd=REPO, env=node.env, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True)
        if not wait_for(lambda: _http_ok(node.url + "/healthz") or
                        node.process is None or node.process.poll() is not None, timeout=60):
            raise ClusterError(f"{node.name} did not start")
        if node.process.poll() is not None:
            raise ClusterError(f"{node.name} exited: {node.log.read_text()[-3000:]}")

    def kill_node(self, node: Node | int | str) -> None:
        """kill -9 the node: gunicorn's master, its workers and their render processes."""
        node = node if isinstance(node, Node) else self.node(node)
        process, node.process = node.process, None
        if process is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)

    def stop_node(self, node: Node | int | str) -> None:
        """Stop a node gracefully (SIGTERM to its process group)."""
        node = node if isinstance(node, Node) else self.node(node)
        process, node.process = node.process, None
        _stop_group(process)

    # -- the job worker ----------------------------------------------------------------------

    def start_worker(self) -> None:
        """Start `flask jobs worker` (an RQ worker with its scheduler) and wait until the
        queue sees it: from then on the nodes put background work on the queue."""
        if self.worker_process is not None and self.worker_process.poll() is None:
            return
        # The nodes' settings, with a folder of its own: what it fetches from Orthanc to
        # render lands on no node's disk.
        folder = self.root / "worker"
        (folder / "instance").mkdir(parents=True, exist_ok=True)
        env = {**self.nodes[0].env, "PORTAL_INSTANCE_PATH": str(folder / "instance")}
        with open(folder / "worker.log", "ab") as log:
            self.worker_process = subprocess.Popen(
                [sys.executable, "-m", "flask", "--app", "app", "jobs", "worker"], cwd=REPO,
                env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        client = redis.Redis.from_url(self.redis_url, socket_timeout=1)

        def registered() -> bool:
            try:
                return any(key.startswith(b"rq:worker:") for key in client.keys("rq:worker:*"))
            except redis.RedisError:
                return False

        if not wait_for(lambda: registered() or self.worker_process is None
                        or self.worker_process.poll() is not None, timeout=60) \
                or self.worker_process.poll() is not None:
            raise ClusterError("the job worker did not start: "
                               + (folder / "worker.log").read_text()[-2000:])

    def stop_worker(self) -> None:
        """Stop the job worker (SIGTERM: it finishes the job it runs)."""
        process, self.worker_process = self.worker_process, None
        _stop_group(process)

    def flask(self, *args: str, node: int = 0, timeout: float = 120) -> \
            subprocess.CompletedProcess[str]:
        """Run a ``flask`` command with a node's settings (e.g. ``archive verify``)."""
        return subprocess.run([sys.executable, "-m", "flask", "--app", "app", *args],
                              cwd=REPO, env=self.nodes[node].env, capture_output=True,
                              text=True, timeout=timeout)

    # -- nginx -------------------------------------------------------------------------------

    def _start_nginx(self) -> None:
        nginx = shutil.which("nginx") or "/usr/sbin/nginx"
        if not Path(nginx).exists():
            raise ClusterError("nginx not found: install the nginx package")
        folder = self.root / "nginx"
        for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
            (folder / "temp" / sub).mkdir(parents=True, exist_ok=True)
        cert, key = self_signed_certificate(folder)
        self.tls_cert = cert
        server = render_nginx_config(
            listen=f"127.0.0.1:{self.nginx_port}", server_name="localhost",
            upstreams=[f"127.0.0.1:{n.port}" for n in self.nodes], tls_cert=cert, tls_key=key,
            access_log=str(folder / "access.log"), static_root=REPO / "static",
            body_temp=str(folder / "temp" / "body"))
        (folder / "portal.conf").write_text(server)
        temp = folder / "temp"
        user = "user root;\n" if os.geteuid() == 0 else ""
        (folder / "nginx.conf").write_text(
            f"{user}worker_processes 1;\npid {folder / 'nginx.pid'};\n"
            f"error_log {folder / 'error.log'} warn;\n"
            "events { worker_connections 1024; }\n"
            "http {\n    include /etc/nginx/mime.types;\n"
            "    default_type application/octet-stream;\n    sendfile on;\n"
            f"    client_body_temp_path {temp / 'body'};\n"
            f"    proxy_temp_path {temp / 'proxy'};\n"
            f"    fastcgi_temp_path {temp / 'fastcgi'};\n"
            f"    uwsgi_temp_path {temp / 'uwsgi'};\n    scgi_temp_path {temp / 'scgi'};\n"
            f"    include {folder / 'portal.conf'};\n}}\n")
        checked = subprocess.run([nginx, "-t", "-p", str(folder), "-c",
                                  str(folder / "nginx.conf")], capture_output=True, text=True)
        if checked.returncode:
            raise ClusterError(f"nginx -t failed: {checked.stderr}")
        self.nginx_process = subprocess.Popen(
            [nginx, "-p", str(folder), "-c", str(folder / "nginx.conf"), "-g", "daemon off;"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        import ssl

        context = ssl.create_default_context(cafile=str(cert))

        def ready() -> bool:
            try:
                with urllib.request.urlopen(self.url + "/healthz", timeout=2,
                                            context=context) as answer:
                    return bool(answer.status == 200)
            except (OSError, urllib.error.URLError):
                return False

        if not wait_for(ready, timeout=20):
            raise ClusterError(f"nginx did not answer: {(folder / 'error.log').read_text()}")

    def _stop_nginx(self) -> None:
        process, self.nginx_process = self.nginx_process, None
        if process is not None and process.poll() is None:
            process.terminate()  # SIGTERM: fast shutdown
            process.wait(timeout=10)


def main() -> None:
    """``make cluster``: start the cluster, print where it is, wait for Ctrl-C."""
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--workers", type=int, default=1, help="gunicorn workers per node")
    arguments = parser.parse_args()
    started = time.monotonic()
    with Cluster(nodes=arguments.nodes, workers=arguments.workers) as cluster:
        assert cluster.orthanc is not None
        print(f"cluster up in {time.monotonic() - started:.1f} s (folder {cluster.root})")
        print(f"  portal (nginx, TLS, HTTP/2): {cluster.url}   CA: {cluster.tls_cert}")
        for node in cluster.nodes:
            print(f"  {node.name}: {node.url}   log: {node.log}")
        print(f"  machine client: {cluster.client[0]} / {cluster.client[1]}")
        print(f"  Orthanc: {cluster.orthanc.url} ({cluster.orthanc.username} / "
              f"{cluster.orthanc.password})   PostgreSQL: {cluster.portal_dsn()}")
        print(f"  Redis: {cluster.redis_url}")
        print("Ctrl-C stops and removes everything.")
        # Both end the wait (SIGINT may arrive ignored when started in the background).
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.default_int_handler)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
        print("stopping")


if __name__ == "__main__":
    main()
