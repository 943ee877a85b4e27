"""Ingest throughput, portal vs Orthanc, side by side in one run.

Generates a synthetic CT series (default 150 slices of 512x512), starts a
throwaway Orthanc (tests/support/orthanc.py) and the portal (gunicorn plus
``flask dimse serve``) on 127.0.0.1, and measures instances per second for

* ``stow-bulk``   STOW-RS, one multipart/related request with every instance,
* ``stow-single`` STOW-RS, one request per instance over a keep-alive session,
* ``c-store``     DCMTK storescu, one association with every file,

using the same client code for both servers. Every (repetition, path) gets a
freshly generated series with its own UIDs, and both servers receive the same
bytes, so each measurement stores new instances (never the "already stored"
path) and both archives grow identically during the run. After each run the
target must report exactly the expected instances over QIDO-RS, otherwise the
run fails. See benchmarks/README.md.

    .venv/bin/python benchmarks/ingest.py [--repeat 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import ipaddress
import json
import os
import platform
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # run as a script from anywhere: import tests.*, portal.*
    sys.path.insert(0, str(REPO_ROOT))

import requests  # noqa: E402
from pydicom import dcmread  # noqa: E402

from tests.support.orthanc import (  # noqa: E402
    free_ports,
    listening_addresses,
    start_orthanc,
)

PATHS = ("stow-bulk", "stow-single", "c-store")
TARGETS = ("orthanc", "orthanc-nodelay", "portal")
SCU_AET = "BENCHSCU"
STORESCU = "/usr/bin/storescu"  # DCMTK; .venv/bin/storescu is pynetdicom's, a different tool
ECHOSCU = "/usr/bin/echoscu"
# Orthanc's documented default since 1.7.4, set explicitly so the report is certain of it.
ORTHANC_SETTINGS: dict[str, Any] = {"SyncStorageArea": True}
PORTAL_READY_TIMEOUT_S = 60.0
VERIFY_TIMEOUT_S = 60.0
SOP_INSTANCE_UID = "00080018"
FAILED_SOP_SEQUENCE = "00081198"


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- processes


class ProcessGroup:
    """Everything the benchmark started, stopped in reverse order by stop_all().

    Subprocesses run in their own session so a whole tree (gunicorn master and
    workers) is stopped through its process-group id, which is the pid we got.
    """

    def __init__(self) -> None:
        self._stoppers: list[Callable[[], None]] = []

    def start(
        self, argv: list[str], *, env: dict[str, str], log_path: Path
    ) -> subprocess.Popen[bytes]:
        out = open(log_path, "ab")  # noqa: SIM115 - closed by the stopper
        proc = subprocess.Popen(
            argv, cwd=REPO_ROOT, env=env, stdin=subprocess.DEVNULL, stdout=out,
            stderr=subprocess.STDOUT, start_new_session=True,
        )

        def stop() -> None:
            if proc.poll() is None:
                self._signal(proc, signal.SIGTERM)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    self._signal(proc, signal.SIGKILL)
                    proc.wait(timeout=10)
            out.close()

        self._stoppers.append(stop)
        return proc

    def adopt(self, stop: Callable[[], None]) -> None:
        """Stop something started elsewhere (the Orthanc harness) with the rest."""
        self._stoppers.append(stop)

    def stop_all(self) -> None:
        while self._stoppers:
            self._stoppers.pop()()

    @staticmethod
    def _signal(proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)


def _terminate_on_signal(signum: int, _frame: FrameType | None) -> None:
    # Turn SIGTERM/SIGHUP into an exception so every finally block runs.
    raise SystemExit(128 + signum)


def _with_children(pid: int) -> list[int]:
    """``pid`` and its descendants (gunicorn's workers hold their own listening sockets when
    there are several: ``reuse_port`` in portal/gunicorn_config.py)."""
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        with contextlib.suppress(OSError):
            for task in Path(f"/proc/{current}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
    return found


def assert_loopback_only(pid: int, expected_ports: set[int], what: str) -> None:
    listening = [address for each in _with_children(pid) for address in listening_addresses(each)]
    exposed = [(a, p) for a, p in listening if not ipaddress.ip_address(a).is_loopback]
    if exposed:
        raise RuntimeError(f"{what} listens beyond loopback: {exposed}")
    missing = expected_ports - {p for _, p in listening}
    if missing:
        raise RuntimeError(f"{what} does not listen on {missing}: {listening}")


def wait_for_echo(aet: str, port: int, timeout: float = 30.0) -> None:
    """C-ECHO until the SCP accepts BENCHSCU, proving the C-STORE path is usable."""
    deadline = time.monotonic() + timeout
    while True:
        result = subprocess.run(
            [ECHOSCU, "-aec", aet, "-aet", SCU_AET, "127.0.0.1", str(port)],
            capture_output=True, text=True,
        )
        if result.returncode == 0:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"C-ECHO to {aet}@127.0.0.1:{port} failed:\n{result.stderr}")
        time.sleep(0.5)


# --------------------------------------------------------------------------- targets


@dataclass(frozen=True)
class Target:
    name: str
    dicomweb: str  # base URL: {dicomweb}/studies is the STOW-RS and QIDO-RS endpoint
    auth: tuple[str, str]
    aet: str
    dicom_port: int
    paths: tuple[str, ...]  # the ingest paths measured on this target
    settings: dict[str, Any] = field(default_factory=dict)
    unavailable: dict[str, str] = field(default_factory=dict)  # path -> why it cannot run


def orthanc_target(workdir: Path, procs: ProcessGroup, *, nodelay: bool,
                   paths: tuple[str, ...]) -> Target:
    """Stock Orthanc, or (nodelay) the same with DCMTK's TCP_NODELAY switch on.

    DCMTK 3.6.7 leaves Nagle's algorithm on for DICOM sockets unless TCP_NODELAY=1
    is in the environment; with a synchronous SCU every C-STORE-RSP then tends to
    wait for a delayed ACK (~40 ms on Linux). The stock row is what a Debian install
    gets; the nodelay row separates that transport artefact from storage speed.
    """
    name = "orthanc-nodelay" if nodelay else "orthanc"
    env = {"TCP_NODELAY": "1"} if nodelay else {}
    server = start_orthanc(workdir / name, aet="ORTHANC", extra_config=ORTHANC_SETTINGS, env=env)
    procs.adopt(server.stop)
    version = server.get_json("/system")["Version"]
    wait_for_echo(server.aet, server.dicom_port)
    settings = {
        "version": version,
        **ORTHANC_SETTINGS,
        "StorageCompression": False,
        "MaximumPduLength": 16384,
        "index": "SQLite (default)",
        "DICOM TCP_NODELAY": "1 (env)" if nodelay else "unset (DCMTK default: Nagle on)",
    }
    return Target(name, server.dicomweb_url, server.auth, server.aet,
                  server.dicom_port, paths, settings)


def _parse_client_secret(output: str) -> tuple[str, str]:
    wanted = ("client:", "secret:")
    values = dict(line.split(":", 1) for line in output.splitlines() if line.startswith(wanted))
    return values["client"].strip(), values["secret"].strip()


def portal_target(workdir: Path, procs: ProcessGroup, *, paths: tuple[str, ...]) -> Target:
    instance = workdir / "portal-instance"
    instance.mkdir(parents=True)
    http_port, dimse_port = free_ports(2)
    env = dict(os.environ)
    env.update(
        PORTAL_INSTANCE_PATH=str(instance),
        PORTAL_SECRET_KEY=secrets.token_urlsafe(32),
        PORTAL_BIND=f"127.0.0.1:{http_port}",
        PORTAL_DIMSE_HOST="127.0.0.1",
        PORTAL_DIMSE_PORT=str(dimse_port),
        PORTAL_DIMSE_AE_TITLE="PORTAL",
        PORTAL_DIMSE_ALLOWED_PEERS=f"{SCU_AET}@127.0.0.1",
    )
    # The documented production entry point; bind comes from PORTAL_BIND (loopback).
    # No control socket: gunicorn 27 puts one in ~/.gunicorn, shared by every instance.
    gunicorn = procs.start(
        [sys.executable, "-m", "gunicorn", "-c", "python:portal.gunicorn_config",
         "--no-control-socket", "app:app"],
        env=env, log_path=workdir / "portal-gunicorn.log",
    )
    base = f"http://127.0.0.1:{http_port}"
    # Readiness = schema upgraded (gunicorn on_starting), database and archive usable.
    _wait_http_ready(f"{base}/readyz", gunicorn, workdir / "portal-gunicorn.log")

    created = subprocess.run(
        [sys.executable, "-m", "flask", "--app", "app", "clients", "create", "bench", "--read"],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120,
    )
    if created.returncode != 0:
        raise RuntimeError(f"flask clients create failed:\n{created.stdout}\n{created.stderr}")
    auth = _parse_client_secret(created.stdout)

    assert_loopback_only(gunicorn.pid, {http_port}, "portal gunicorn")
    unavailable: dict[str, str] = {}
    if "c-store" in paths:
        dimse = procs.start(
            [sys.executable, "-m", "flask", "--app", "app", "dimse", "serve"],
            env=env, log_path=workdir / "portal-dimse.log",
        )
        try:
            wait_for_echo("PORTAL", dimse_port)
        except RuntimeError as exc:
            # Report the path as failed but still measure the others.
            unavailable["c-store"] = f"{exc}\nportal-dimse.log:\n" + _tail(
                workdir / "portal-dimse.log", 2)
            log(f"portal C-STORE unavailable: {unavailable['c-store']}")
        if dimse.poll() is None:
            assert_loopback_only(dimse.pid, {dimse_port}, "portal dimse")
    settings = _portal_settings()
    return Target("portal", f"{base}/dicomweb", auth, "PORTAL", dimse_port, paths, settings,
                  unavailable)


def _portal_settings() -> dict[str, Any]:
    from portal import gunicorn_config  # what gunicorn just used, read the same way

    return {
        "gunicorn": f"{gunicorn_config.workers} workers x {gunicorn_config.threads} threads "
                    f"({gunicorn_config.worker_class})",
        "DIMSE_MAX_PDU": os.environ.get("PORTAL_DIMSE_MAX_PDU", "default (262144)"),
        "database": "SQLite in the instance dir (default)",
        "durability": "fsync of every instance before acknowledging",
    }


def _wait_http_ready(url: str, proc: subprocess.Popen[bytes], log_path: Path) -> None:
    deadline = time.monotonic() + PORTAL_READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"portal exited with {proc.returncode}:\n{_tail(log_path)}")
        with contextlib.suppress(requests.RequestException):
            if requests.get(url, timeout=2).status_code == 200:
                return
        time.sleep(0.3)
    raise RuntimeError(f"{url} not ready after {PORTAL_READY_TIMEOUT_S:.0f} s:\n{_tail(log_path)}")


def _tail(path: Path, lines: int = 40) -> str:
    if not path.exists():
        return "(no log)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


# --------------------------------------------------------------------------- data


@dataclass
class Series:
    files: list[Path]
    payloads: list[bytes]
    study_uid: str

    @property
    def nbytes(self) -> int:
        return sum(len(p) for p in self.payloads)


def make_series(
    generator: Callable[..., list[Path]], out_dir: Path, *, slices: int, size: int, seed: str
) -> Series:
    files = generator(out_dir, slices=slices, size=size, uid_seed=seed)
    study_uids = {str(dcmread(f, stop_before_pixels=True).StudyInstanceUID) for f in files}
    if len(study_uids) != 1 or len(files) != slices:
        raise RuntimeError(f"generator gave {len(files)} files in studies {study_uids}")
    # Read up front so the timed section is network + server work only (client
    # disk reads would be identical for both targets, but add noise).
    return Series(files, [f.read_bytes() for f in files], study_uids.pop())


def load_generator() -> Callable[..., list[Path]]:
    from demo.studies import write_ct_series

    return write_ct_series


# --------------------------------------------------------------------------- ingest paths


def multipart_body(parts: list[bytes]) -> tuple[bytes, str]:
    boundary = secrets.token_hex(16)  # 128 random bits: will not occur inside the data
    chunks: list[bytes] = []
    for part in parts:
        chunks += [f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode(),
                   part, b"\r\n"]
    chunks.append(f"--{boundary}--\r\n".encode())
    content_type = f'multipart/related; type="application/dicom"; boundary={boundary}'
    return b"".join(chunks), content_type


def _check_stow(response: requests.Response) -> None:
    if response.status_code not in (200, 202):
        raise RuntimeError(f"STOW-RS HTTP {response.status_code}: {response.text[:500]}")
    with contextlib.suppress(ValueError):
        body = response.json()
        failed = body.get(FAILED_SOP_SEQUENCE, {}).get("Value") if isinstance(body, dict) else None
        if failed:
            raise RuntimeError(f"STOW-RS reported {len(failed)} failed instance(s)")


def stow_bulk(target: Target, series: Series) -> float:
    body, content_type = multipart_body(series.payloads)  # built before the clock starts
    headers = {"Content-Type": content_type, "Accept": "application/dicom+json"}
    with requests.Session() as session:
        session.auth = target.auth
        start = time.perf_counter()
        response = session.post(f"{target.dicomweb}/studies", data=body, headers=headers,
                                timeout=600)
        elapsed = time.perf_counter() - start
    _check_stow(response)
    return elapsed


def stow_single(target: Target, series: Series) -> float:
    requests_ = [multipart_body([payload]) for payload in series.payloads]
    with requests.Session() as session:
        session.auth = target.auth
        start = time.perf_counter()
        for body, content_type in requests_:
            response = session.post(
                f"{target.dicomweb}/studies", data=body, timeout=120,
                headers={"Content-Type": content_type, "Accept": "application/dicom+json"},
            )
            _check_stow(response)
        return time.perf_counter() - start


def c_store(target: Target, series: Series) -> float:
    argv = [STORESCU, "-aec", target.aet, "-aet", SCU_AET, "127.0.0.1",
            str(target.dicom_port), *map(str, series.files)]
    start = time.perf_counter()
    result = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    elapsed = time.perf_counter() - start
    if result.returncode != 0 or "E:" in result.stderr:
        raise RuntimeError(f"storescu failed ({result.returncode}):\n{result.stderr[-2000:]}")
    return elapsed


INGEST: dict[str, Callable[[Target, Series], float]] = {
    "stow-bulk": stow_bulk, "stow-single": stow_single, "c-store": c_store,
}


# --------------------------------------------------------------------------- verification


def count_instances(target: Target, study_uid: str) -> int:
    """Distinct SOP Instance UIDs QIDO-RS reports for the study (paging if needed)."""
    url = f"{target.dicomweb}/studies/{study_uid}/instances"
    seen: set[str] = set()
    with requests.Session() as session:
        session.auth = target.auth
        while True:
            response = session.get(url, params={"offset": len(seen), "limit": 1000},
                                   headers={"Accept": "application/dicom+json"}, timeout=60)
            if response.status_code == 204:
                break
            response.raise_for_status()
            page = {item[SOP_INSTANCE_UID]["Value"][0] for item in response.json()}
            if not page - seen:  # empty page, or a server that ignores offset
                break
            seen |= page
    return len(seen)


def verify(target: Target, series: Series) -> float:
    """Wait until the target lists exactly the sent instances; return the wait time."""
    expected = len(series.payloads)
    start = time.monotonic()
    while True:
        found = count_instances(target, series.study_uid)
        if found == expected:
            return time.monotonic() - start
        if found > expected or time.monotonic() - start > VERIFY_TIMEOUT_S:
            raise RuntimeError(
                f"{target.name}: study {series.study_uid} holds {found} instances, "
                f"expected {expected}"
            )
        time.sleep(0.5)


# --------------------------------------------------------------------------- run


@dataclass
class Run:
    target: str
    path: str
    repetition: int
    instances: int
    megabytes: float
    seconds: float
    instances_per_s: float
    visible_after_s: float
    settled_after_s: float = 0.0  # until the machine was idle again (``settle``)


@dataclass
class Failure:
    target: str
    path: str
    repetition: int  # -1: the path could not be set up at all
    error: str


def _busy_ticks() -> int:
    """CPU time the whole machine has spent busy so far, in clock ticks (/proc/stat)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return sum(fields) - fields[3] - fields[4]  # all but idle and iowait


def settle(limit_s: float = 180.0, window_s: float = 0.5, idle_cores: float = 0.15,
           idle_for_s: float = 2.0) -> float:
    """Wait until the machine has been idle (under ``idle_cores`` busy in each ``window_s``)
    for ``idle_for_s`` in a row, and return how long the work before that took. What a
    server does after acknowledging (the portal warms the new series up: its middle image
    and, for a CT or MR series, its 3D volume, decoded from all its slices) must not bill the
    next run of either server; it is reported per run instead (``settled_after_s``).
    ``idle_for_s`` is longer than the second the portal waits for a series to settle before
    warming it (portal/imaging/prerender.py): a shorter look saw that second as idle and let
    the warm-up bill the next run. Without /proc, a fixed ``idle_for_s``."""
    start = time.monotonic()
    if not Path("/proc/stat").exists():
        time.sleep(idle_for_s)
        return 0.0
    ticks = os.sysconf("SC_CLK_TCK")
    idle_since: float | None = None
    while time.monotonic() - start < limit_s:
        began = time.monotonic()
        before = _busy_ticks()
        time.sleep(window_s)
        if (_busy_ticks() - before) / ticks / window_s >= idle_cores:
            idle_since = None
        else:
            idle_since = began if idle_since is None else idle_since
            if time.monotonic() - idle_since >= idle_for_s:
                return idle_since - start
    return time.monotonic() - start


def measure(target: Target, path: str, series: Series, repetition: int) -> Run:
    os.sync()  # flush earlier runs' dirty pages so they do not bill this run
    seconds = INGEST[path](target, series)
    waited = verify(target, series)
    n = len(series.payloads)
    return Run(target.name, path, repetition, n, round(series.nbytes / 1e6, 1),
               round(seconds, 3), round(n / seconds, 1), round(waited, 2))


def start_targets(args: argparse.Namespace, workdir: Path, procs: ProcessGroup) -> list[Target]:
    paths = tuple(args.paths)
    targets: list[Target] = []
    if "orthanc" in args.targets:
        log("starting Orthanc ...")
        targets.append(orthanc_target(workdir, procs, nodelay=False, paths=paths))
    if "orthanc-nodelay" in args.targets and "c-store" in paths:
        log("starting Orthanc with TCP_NODELAY=1 (C-STORE only) ...")
        targets.append(orthanc_target(workdir, procs, nodelay=True, paths=("c-store",)))
    if "portal" in args.targets:
        log("starting portal (gunicorn" + (" + dimse serve" if "c-store" in paths else "")
            + ") ...")
        targets.append(portal_target(workdir, procs, paths=paths))
    for target in targets:
        log(f"  {target.name}: {target.dicomweb}; C-STORE {target.aet}@127.0.0.1:"
            f"{target.dicom_port}; paths {','.join(target.paths)}")
    return targets


def run_benchmark(args: argparse.Namespace, workdir: Path, procs: ProcessGroup) -> dict[str, Any]:
    generator = load_generator()
    targets = start_targets(args, workdir, procs)
    run_tag = secrets.token_hex(4)  # UIDs never repeat across benchmark invocations either

    log("warm-up (5 instances per path and target, not measured) ...")
    failures: list[Failure] = [Failure(t.name, path, -1, why)
                               for t in targets for path, why in t.unavailable.items()]
    for path in args.paths:
        series = make_series(generator, workdir / "data" / f"warmup-{path}", slices=5,
                             size=args.size, seed=f"bench-{run_tag}-warmup-{path}")
        for target in targets:
            if path in target.paths and path not in target.unavailable:
                try:
                    measure(target, path, series, -1)
                except (RuntimeError, requests.RequestException) as exc:
                    log(f"warm-up {path} -> {target.name} failed: {exc}")
                settle()  # its after-ingest work must not bill the first measured run
        shutil.rmtree(series.files[0].parent)

    runs: list[Run] = []
    for rep in range(args.repeat):
        # Alternate who goes first so no target always gets the warmer machine.
        order = targets if rep % 2 == 0 else targets[::-1]
        for path in args.paths:
            log(f"[{rep + 1}/{args.repeat}] {path}: generating {args.slices} slices ...")
            series = make_series(generator, workdir / "data" / f"{rep}-{path}",
                                 slices=args.slices, size=args.size,
                                 seed=f"bench-{run_tag}-{rep}-{path}")
            for target in order:
                if path not in target.paths or path in target.unavailable:
                    continue
                try:
                    run = measure(target, path, series, rep)
                except (RuntimeError, requests.RequestException) as exc:
                    # A broken path must not abort the others, nor count as a result.
                    failures.append(Failure(target.name, path, rep, str(exc)))
                    log(f"[{rep + 1}/{args.repeat}] {path} -> {target.name}: FAILED: {exc}")
                    settle()  # what it did store must not bill the next run either
                else:
                    run.settled_after_s = round(settle(), 1)
                    log(f"[{rep + 1}/{args.repeat}] {path} -> {target.name}: "
                        f"{run.instances_per_s:.1f} inst/s ({run.seconds:.2f} s; "
                        f"work after acknowledging: {run.settled_after_s:.1f} s)")
                    runs.append(run)
            shutil.rmtree(series.files[0].parent)
    return {
        "config": {
            "slices": args.slices, "size": args.size, "repeat": args.repeat,
            "paths": list(args.paths), "targets": [t.name for t in targets],
            "cpus": os.cpu_count(), "python": platform.python_version(),
            "platform": platform.platform(),
            "fresh_data": "new UIDs per repetition and path; identical bytes to every target",
            "settings": {t.name: t.settings for t in targets},
        },
        "runs": [asdict(r) for r in runs],
        "failures": [asdict(f) for f in failures],
        "summary": summarize(runs, failures, list(args.paths)),
    }


def summarize(runs: list[Run], failures: list[Failure], paths: list[str]) -> dict[str, Any]:
    """Per path: median and raw rates per target, failures, and portal/Orthanc ratios."""
    summary: dict[str, Any] = {}
    for path in paths:
        row: dict[str, Any] = {}
        names = dict.fromkeys(x.target for x in [*runs, *failures] if x.path == path)
        for target in names:
            rates = [r.instances_per_s for r in runs if r.path == path and r.target == target]
            failed = [f for f in failures if f.path == path and f.target == target]
            row[target] = {
                "median_instances_per_s": round(statistics.median(rates), 1) if rates else None,
                "runs": rates,
                "failed_runs": len(failed),
            }
        for base in ("orthanc", "orthanc-nodelay"):
            if (row.get(base, {}).get("median_instances_per_s")
                    and row.get("portal", {}).get("median_instances_per_s")):
                row[f"ratio_portal_over_{base.replace('-', '_')}"] = round(
                    row["portal"]["median_instances_per_s"]
                    / row[base]["median_instances_per_s"], 2)
        summary[path] = row
    return summary


def _cell(entry: dict[str, Any] | None) -> str:
    if entry is None:
        return f"{'-':>9}"
    if entry["median_instances_per_s"] is None:
        return f"{'FAIL':>9}"
    mark = "!" if entry["failed_runs"] else ""  # some repetitions failed
    return f"{entry['median_instances_per_s']:>8.1f}{mark or ' '}"


def format_table(result: dict[str, Any]) -> str:
    cfg = result["config"]
    lines = [
        f"Ingest of {cfg['slices']} CT slices {cfg['size']}x{cfg['size']} "
        f"({cfg['slices'] * cfg['size'] ** 2 * 2 / 1e6:.0f} MB of pixels): instances/s, "
        f"median of {cfg['repeat']} run(s), {cfg['cpus']} CPUs",
        f"{'path':<26}{'orthanc':>9}{'portal':>9}{'portal/orthanc':>16}   runs (inst/s)",
    ]
    for path, row in result["summary"].items():
        for base, label in (("orthanc", path), ("orthanc-nodelay", f"{path} (TCP_NODELAY)")):
            if base not in row and not (base == "orthanc" and "portal" in row):
                continue
            cells = [row.get(base), row.get("portal")]
            ratio = row.get(f"ratio_portal_over_{base.replace('-', '_')}")
            raw = "; ".join(
                f"{name}: " + (" ".join(f"{v:.0f}" for v in row[name]["runs"]) or "FAIL")
                for name in (base, "portal") if name in row)
            lines.append(
                f"{label:<26}"
                + "".join(_cell(c) for c in cells)
                + (f"{ratio:>16.2f}" if ratio is not None else f"{'-':>16}")
                + f"   {raw}"
            )
    for failure in result["failures"]:
        summary = " | ".join(ln.strip() for ln in failure["error"].splitlines() if ln.strip())
        lines.append(f"FAILED {failure['target']} {failure['path']} "
                     f"(repetition {failure['repetition']}): {summary[:400]}")
    lines.append("ratio > 1: portal faster; < 1: Orthanc faster. "
                 "(TCP_NODELAY) row: Orthanc with DCMTK's Nagle switch off, see README.")
    for name, settings in cfg["settings"].items():
        lines.append(f"{name}: " + ", ".join(f"{k}={v}" for k, v in settings.items()))
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=3, help="repetitions per path (median)")
    parser.add_argument("--slices", type=int, default=150)
    parser.add_argument("--size", type=int, default=512, help="rows and columns per slice")
    parser.add_argument("--paths", type=lambda s: s.split(","), default=list(PATHS),
                        help=f"comma-separated subset of {','.join(PATHS)}")
    parser.add_argument("--targets", type=lambda s: s.split(","), default=list(TARGETS),
                        help=f"comma-separated subset of {','.join(TARGETS)}")
    parser.add_argument("--json", type=Path, help="also write the results as JSON here")
    parser.add_argument("--workdir", type=Path,
                        help="keep servers' state and logs here instead of a deleted temp dir")
    args = parser.parse_args(argv)
    for value, allowed in ((args.paths, PATHS), (args.targets, TARGETS)):
        if not set(value) <= set(allowed) or not value:
            parser.error(f"{value} is not a subset of {allowed}")
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    return args


@contextlib.contextmanager
def working_directory(keep: Path | None) -> Iterator[Path]:
    if keep is not None:
        keep.mkdir(parents=True, exist_ok=True)
        yield keep.resolve()
    else:
        with tempfile.TemporaryDirectory(prefix="ingest-bench-") as tmp:
            yield Path(tmp)


def run_main(args: argparse.Namespace,
             run: Callable[[argparse.Namespace, Path, ProcessGroup], dict[str, Any]],
             table: Callable[[dict[str, Any]], str]) -> int:
    """Run a benchmark with its servers, always stop them, print and save the result."""
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _terminate_on_signal)
    procs = ProcessGroup()
    atexit.register(procs.stop_all)  # idempotent; covers exits that bypass the finally
    with working_directory(args.workdir) as workdir:
        try:
            result = run(args, workdir, procs)
        finally:
            log("stopping servers ...")
            procs.stop_all()
    print(table(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, default=str) + "\n")
        log(f"wrote {args.json}")
    return 1 if result["failures"] else 0


def main(argv: list[str] | None = None) -> int:
    return run_main(parse_args(argv), run_benchmark, format_table)


if __name__ == "__main__":
    sys.exit(main())
