"""Start a throwaway, loopback-only Orthanc for tests and benchmarks.

Orthanc 1.10 (Debian) has no bind-address option and listens on every
interface. We keep its own safety switches on (``RemoteAccessAllowed`` false,
HTTP authentication with a generated password) and additionally confine its
listening sockets to loopback with a small LD_PRELOAD library
(``bind_loopback.c``), compiled on first use into ``tests/support/.build/``.
After start-up we check ``/proc`` that every listening socket of the process
is on a loopback address and refuse to continue otherwise.

Run ``python tests/support/orthanc.py`` for a quick start/stop self-check.
"""

from __future__ import annotations

import atexit
import base64
import contextlib
import ipaddress
import json
import os
import secrets
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

SUPPORT_DIR = Path(__file__).resolve().parent
PRELOAD_SOURCE = SUPPORT_DIR / "bind_loopback.c"
BUILD_DIR = SUPPORT_DIR / ".build"
PRELOAD_LIBRARY = BUILD_DIR / "libbind_loopback.so"
PLUGIN_DIR = Path("/usr/share/orthanc/plugins")
DICOMWEB_PLUGIN = "libOrthancDicomWeb.so"
STARTUP_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 10.0


class OrthancError(RuntimeError):
    """Orthanc could not be started safely."""


@dataclass
class OrthancServer:
    http_port: int
    dicom_port: int
    aet: str
    username: str
    password: str
    storage: Path
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    log_file: Path | None = None
    _console: IO[bytes] | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        return f"{self.url}/dicom-web"

    @property
    def auth(self) -> tuple[str, str]:
        """(username, password), directly usable as ``requests`` auth."""
        return (self.username, self.password)

    def get_json(self, path: str, timeout: float = 10.0) -> Any:
        """GET a REST resource (e.g. ``/statistics``) and decode the JSON body."""
        with urllib.request.urlopen(self._request(path), timeout=timeout) as response:
            return json.load(response)

    def delete(self, path: str, timeout: float = 30.0) -> None:
        """DELETE a REST resource such as ``/studies/{orthanc-id}``."""
        with urllib.request.urlopen(self._request(path, method="DELETE"), timeout=timeout):
            pass

    def _request(self, path: str, method: str = "GET") -> urllib.request.Request:
        token = base64.b64encode(f"{self.username}:{self.password}".encode()).decode()
        return urllib.request.Request(
            self.url + path, method=method, headers={"Authorization": f"Basic {token}"}
        )

    def stop(self) -> None:
        """Terminate Orthanc (SIGTERM, then SIGKILL); safe to call repeatedly."""
        proc, self.process = self.process, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=STOP_TIMEOUT_S)
        if self._console is not None:
            self._console.close()
            self._console = None


def build_preload_library() -> Path:
    """Compile bind_loopback.c unless an up-to-date build exists; return the .so path."""
    if (
        PRELOAD_LIBRARY.exists()
        and PRELOAD_LIBRARY.stat().st_mtime >= PRELOAD_SOURCE.stat().st_mtime
    ):
        return PRELOAD_LIBRARY
    compiler = shutil.which("gcc") or shutil.which("cc")
    if compiler is None:
        raise OrthancError("gcc is needed to build the loopback bind() shim")
    BUILD_DIR.mkdir(parents=True, exist_ok=True)
    # Build to a unique name and rename: parallel test processes may race here,
    # and a half-written .so must never be preloaded.
    fd, tmp_name = tempfile.mkstemp(dir=BUILD_DIR, suffix=".so.tmp")
    os.close(fd)
    try:
        subprocess.run(
            [compiler, "-shared", "-fPIC", "-O2", "-Wall", "-Wextra", "-Werror",
             "-o", tmp_name, str(PRELOAD_SOURCE), "-ldl"],
            check=True,
            capture_output=True,
        )
        os.replace(tmp_name, PRELOAD_LIBRARY)
    except subprocess.CalledProcessError as exc:
        raise OrthancError(f"compiling {PRELOAD_SOURCE} failed:\n{exc.stderr.decode()}") from exc
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
    return PRELOAD_LIBRARY


def free_ports(count: int) -> list[int]:
    """Distinct free TCP ports on 127.0.0.1 (all held open together so they differ)."""
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _build_config(
    workdir: Path,
    *,
    http_port: int,
    dicom_port: int,
    aet: str,
    username: str,
    password: str,
    dicom_peers: dict[str, tuple[str, str, int]],
    extra_config: dict[str, Any],
) -> dict[str, Any]:
    plugin = PLUGIN_DIR / DICOMWEB_PLUGIN
    if not plugin.exists():
        raise OrthancError(f"{plugin} missing; install the orthanc-dicomweb package")
    config: dict[str, Any] = {
        "Name": f"test-{aet}",
        "StorageDirectory": str(workdir / "storage"),
        "IndexDirectory": str(workdir / "index"),
        "HttpPort": http_port,
        "DicomPort": dicom_port,
        "DicomAet": aet,
        "Plugins": [str(plugin)],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": False},
        # Orthanc's own protections stay on; the bind() shim is a second layer.
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": True,
        "RegisteredUsers": {username: password},
        "DicomModalities": {
            name: [peer_aet, host, port] for name, (peer_aet, host, port) in dicom_peers.items()
        },
        # Benchmarks and tests send from ad-hoc AE titles; accept them.
        "DicomCheckCalledAet": False,
        "DicomAlwaysAllowStore": True,
        "DicomAlwaysAllowEcho": True,
        # Nothing to resume between throwaway runs.
        "SaveJobs": False,
        "HttpDescribeErrors": True,
    }
    return _deep_merge(config, extra_config)


def _hex_to_ip(hex_addr: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """Decode an address column of /proc/net/tcp{,6}.

    The kernel prints each 32-bit word of the network-order address with %08X,
    i.e. as a host-order integer, so each word is re-packed in native order.
    """
    words = [int(hex_addr[i : i + 8], 16) for i in range(0, len(hex_addr), 8)]
    return ipaddress.ip_address(b"".join(struct.pack("=I", w) for w in words))


def listening_addresses(pid: int) -> list[tuple[str, int]]:
    """(address, port) of every TCP socket in LISTEN state owned by ``pid``."""
    inodes: set[str] = set()
    fd_dir = Path(f"/proc/{pid}/fd")
    for entry in fd_dir.iterdir():
        with contextlib.suppress(OSError):  # fds come and go while we look
            target = os.readlink(entry)
            if target.startswith("socket:["):
                inodes.add(target[len("socket:[") : -1])
    found: list[tuple[str, int]] = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(FileNotFoundError), open(table) as handle:
            next(handle)  # header line
            for line in handle:
                cols = line.split()
                local, state, inode = cols[1], cols[3], cols[9]
                if state == "0A" and inode in inodes:  # 0A == TCP_LISTEN
                    addr, port = local.split(":")
                    found.append((str(_hex_to_ip(addr)), int(port, 16)))
    return found


def _assert_loopback_only(server: OrthancServer, timeout: float = 5.0) -> None:
    """Fail at once on a non-loopback listener; give both expected ports a moment."""
    assert server.process is not None
    deadline = time.monotonic() + timeout
    while True:
        listening = listening_addresses(server.process.pid)
        exposed = [(a, p) for a, p in listening if not ipaddress.ip_address(a).is_loopback]
        if exposed:
            raise OrthancError(f"Orthanc listens beyond loopback: {exposed}")
        missing = {server.http_port, server.dicom_port} - {p for _, p in listening}
        if not missing:
            return
        if time.monotonic() > deadline:
            raise OrthancError(f"Orthanc is not listening on ports {missing}: {listening}")
        time.sleep(0.1)


def _log_tail(path: Path | None, lines: int = 30) -> str:
    if path is None or not path.exists():
        return "(no log)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def _wait_until_ready(server: OrthancServer, console_log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        assert server.process is not None
        if server.process.poll() is not None:
            raise OrthancError(
                f"Orthanc exited with {server.process.returncode}\n"
                f"{_log_tail(server.log_file)}\n{_log_tail(console_log)}"
            )
        try:
            server.get_json("/system", timeout=2.0)
            return
        except (urllib.error.URLError, OSError, ValueError) as exc:
            last_error = exc
        time.sleep(0.2)
    raise OrthancError(
        f"Orthanc did not answer /system within {timeout:.0f} s ({last_error})\n"
        f"{_log_tail(server.log_file)}"
    )


def start_orthanc(
    workdir: Path,
    *,
    aet: str = "ORTHANC",
    dicom_peers: dict[str, tuple[str, str, int]] | None = None,
    extra_config: dict[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
) -> OrthancServer:
    """Start Orthanc with its state in ``workdir``; the caller must call ``stop()``.

    ``dicom_peers`` maps a modality name to (AET, host, port). ``extra_config`` is
    deep-merged over the generated configuration. ``env`` adds environment variables
    (e.g. ``TCP_NODELAY=1``, which DCMTK reads to disable Nagle on DICOM sockets).
    """
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    preload = build_preload_library()
    orthanc = shutil.which("Orthanc")
    if orthanc is None:
        raise OrthancError("Orthanc executable not found (apt install orthanc)")

    http_port, dicom_port = free_ports(2)
    username, password = "harness", secrets.token_urlsafe(24)
    config = _build_config(
        workdir,
        http_port=http_port,
        dicom_port=dicom_port,
        aet=aet,
        username=username,
        password=password,
        dicom_peers=dicom_peers or {},
        extra_config=extra_config or {},
    )
    config_path = workdir / "orthanc.json"
    # The file holds the generated password: keep it private to this user.
    fd = os.open(config_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        json.dump(config, handle, indent=2)

    log_file = workdir / "orthanc.log"
    console_log = workdir / "orthanc.console.log"
    proc_env = {**os.environ, **(env or {})}
    proc_env["LD_PRELOAD"] = " ".join(filter(None, [str(preload), proc_env.get("LD_PRELOAD")]))
    console = open(console_log, "wb")  # noqa: SIM115 - closed in stop()
    server = OrthancServer(
        http_port=http_port,
        dicom_port=dicom_port,
        aet=aet,
        username=username,
        password=password,
        storage=workdir / "storage",
        log_file=log_file,
        _console=console,
    )
    # Errors before Orthanc's logger is configured go to stderr -> console log.
    server.process = subprocess.Popen(
        [orthanc, f"--logfile={log_file}", str(config_path)],
        cwd=workdir,
        env=proc_env,
        stdin=subprocess.DEVNULL,
        stdout=console,
        stderr=subprocess.STDOUT,
    )
    atexit.register(server.stop)  # safety net if the caller forgets or crashes
    try:
        _wait_until_ready(server, console_log, STARTUP_TIMEOUT_S)
        _assert_loopback_only(server)
    except BaseException:
        server.stop()
        raise
    return server


if __name__ == "__main__":
    with tempfile.TemporaryDirectory(prefix="orthanc-selfcheck-") as tmp:
        started = time.monotonic()
        srv = start_orthanc(Path(tmp))
        try:
            version = srv.get_json("/system")["Version"]
            assert srv.process is not None
            print(f"Orthanc {version} up in {time.monotonic() - started:.1f} s: "
                  f"HTTP {srv.http_port}, DICOM {srv.dicom_port}, AET {srv.aet}")
            print(f"listening: {listening_addresses(srv.process.pid)}")
            try:
                urllib.request.urlopen(srv.url + "/system", timeout=5)
                raise SystemExit("FAIL: unauthenticated request was accepted")
            except urllib.error.HTTPError as exc:
                print(f"unauthenticated /system -> HTTP {exc.code} (expected 401)")
            print(f"DICOMweb: {srv.get_json('/dicom-web/studies')!r} studies")
        finally:
            srv.stop()
        print("stopped")
