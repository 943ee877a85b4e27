"""Rendering speed, portal vs Orthanc, side by side in one run.

Generates a synthetic CT series (default 150 slices of 512x512, demo.studies) and one large
synthetic radiograph (default 2500 wide x 3000 high, 16-bit MONOCHROME2, uncompressed),
starts a throwaway Orthanc with the DICOMweb plugin (tests/support/orthanc.py) and the
portal (gunicorn) on 127.0.0.1, stores the same files in both (STOW-RS), and measures

* a) cold renders of CT slices as JPEG at their native size, every request a different
     (slice, window centre) pair so no render cache can answer,
* b) one fixed URL repeated: a render-cache hit on the portal, a fresh render on Orthanc,
* c) cold renders of the radiograph to a 1024-wide JPEG (ms per image, one connection),
* d) bytes per image (JPEG and WebP) at the default quality,
* e) peak memory while rendering the largest file,
* f) with ``--files``: your own DICOM files (any modality and transfer syntax): the first
     view of each file and its repeat, one at a time, then cold and cached load over all
     of them,

for 1 and 8 keep-alive connections, with wrk (or a Python load generator when wrk is
missing). Orthanc is asked through its DICOMweb plugin (same URLs as the portal) and through
its own REST API. See benchmarks/README.md.

    .venv/bin/python benchmarks/render.py [--seconds 10] [--json out.json]
    .venv/bin/python benchmarks/render.py --files DIR_OR_FILE ... [--scenarios f,a]
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import functools
import http.client
import io
import json
import math
import os
import platform
import secrets
import shutil
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
for _entry in (REPO_ROOT, BENCH_DIR):  # import portal.*, tests.* and the ingest benchmark
    if str(_entry) not in sys.path:
        sys.path.insert(0, str(_entry))

import numpy as np  # noqa: E402
import requests  # noqa: E402
from ingest import (  # noqa: E402
    ProcessGroup,
    Series,
    Target,
    load_generator,
    log,
    make_series,
    multipart_body,
    orthanc_target,
    portal_target,
    run_main,
    settle,
    stow_bulk,
    verify,
)
from PIL import Image  # noqa: E402
from pydicom import dcmread  # noqa: E402
from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.uid import ExplicitVRLittleEndian, generate_uid  # noqa: E402

APIS = ("portal", "orthanc-dicomweb", "orthanc-rest")
SCENARIOS = ("a", "b", "c", "d", "e", "f", "g", "m")
# Scenarios that need the generated CT, MR and radiograph (m and g are not run by default).
SYNTHETIC = ("a", "b", "c", "d", "e", "g", "m")
DEFAULT_SCENARIOS = ("a", "b", "c", "d", "e")
SIGNED = "portal-signed"  # b) through the viewer's signed URL (issue 17), beside the others
WRK = shutil.which("wrk")
QUALITY = 90  # asked of both servers in a)-c): Orthanc's default, the portal's is 85
CT_WINDOW = (40.0, 400.0)  # soft tissue; also the first window stored in the demo CT files
XR_WINDOW = (2048.0, 4096.0)  # the radiograph's own window (the full 12-bit range)
# Cold requests differ in window centre (per request) and width (per run). The steps keep
# every value within 6 significant digits: the portal's cache key formats them with {:g}.
CT_STEPS = (0.001, 0.01)  # centre step per pass over the slices, width step per run (HU)
XR_STEPS = (0.1, 0.1)  # centre step per request, width step per run (stored values)
XR_TARGET_WIDTH = 1024
MR_WINDOW = (600.0, 1200.0)  # g): a brain MR's usual display window (stored values)
MR_SIZE, MR_SLICES = 256, 24
RUN_PAUSE_S = 1.0
HTTP_TIMEOUT_S = 60.0


# --------------------------------------------------------------------------- data


def write_radiograph(path: Path, *, columns: int, rows: int, seed: str) -> Path:
    """A synthetic 12-bit chest-like radiograph, Explicit VR Little Endian, uncompressed.

    Smooth anatomy (body, lungs, ribs) plus Gaussian quantum noise, so JPEG sizes and
    encode times are in the range of a real radiograph rather than of a flat image.
    """
    rng = np.random.default_rng(int.from_bytes(seed.encode()[:8].ljust(8, b"\0"), "little"))
    y = np.linspace(-1.0, 1.0, rows, dtype=np.float32)[:, None]
    x = np.linspace(-1.0, 1.0, columns, dtype=np.float32)[None, :]
    image = 2400.0 - 900.0 * x**2 - 300.0 * y
    body = (x / 0.85) ** 2 + (y / 1.1) ** 2 < 1.0
    image = np.where(body, image + 600.0, image)
    for cx in (-0.38, 0.38):
        lung = ((x - cx) / 0.3) ** 2 + ((y + 0.1) / 0.6) ** 2 < 1.0
        image = np.where(lung, image - 900.0, image)
    for k in range(12):
        rib = np.abs(y + 0.7 - k * 0.12 - 0.15 * np.abs(x)) < 0.02
        image = np.where(rib & body, image + 250.0, image)
    image = image + rng.normal(0.0, 20.0, image.shape).astype(np.float32)
    pixels = np.clip(image, 0, 4095).astype(np.uint16)

    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1"  # Computed Radiography Image Storage
    ds.SOPInstanceUID = generate_uid(entropy_srcs=[seed, "sop"])
    ds.StudyInstanceUID = generate_uid(entropy_srcs=[seed, "study"])
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=[seed, "series"])
    ds.PatientName = "Bench^Radiograph"
    ds.PatientID = "BENCH-XR"
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.StudyDate = ds.SeriesDate = "20240101"
    ds.StudyTime = ds.SeriesTime = "120000"
    ds.AccessionNumber = "BENCHXR1"
    ds.StudyID = "1"
    ds.Modality = "CR"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.Rows, ds.Columns = rows, columns
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelSpacing = ["0.14", "0.14"]
    ds.WindowCenter, ds.WindowWidth = 2048, 4096
    ds.PixelData = pixels.tobytes()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def write_mr_series(folder: Path, *, slices: int, size: int, seed: str) -> list[Path]:
    """A synthetic brain-like MR series: 16-bit unsigned, MONOCHROME2, no rescale, no window
    in the files (so the portal's series default window and Orthanc's own apply when none is
    asked), Explicit VR Little Endian, uncompressed; smooth anatomy plus Rician-like noise."""
    rng = np.random.default_rng(int.from_bytes(seed.encode()[:8].ljust(8, b"\0"), "little"))
    study = generate_uid(entropy_srcs=[seed, "study"])
    series = generate_uid(entropy_srcs=[seed, "series"])
    y = np.linspace(-1.0, 1.0, size, dtype=np.float32)[:, None]
    x = np.linspace(-1.0, 1.0, size, dtype=np.float32)[None, :]
    paths = []
    folder.mkdir(parents=True, exist_ok=True)
    for number in range(1, slices + 1):
        z = (number - slices / 2) / slices
        head = (x / 0.75) ** 2 + (y / 0.9) ** 2 < 1.0 - z * z
        brain = (x / 0.65) ** 2 + (y / 0.8) ** 2 < 0.9 - z * z
        ventricles = (np.abs(x) - 0.12) ** 2 / 0.01 + (y / 0.3) ** 2 < 1.0
        image = np.where(head, 900.0, 20.0) + np.where(brain, 300.0 + 150.0 * x, 0.0)
        image = np.where(brain & ventricles, 250.0, image)
        image = np.abs(image + rng.normal(0.0, 25.0, image.shape))
        ds = Dataset()
        ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.4"  # MR Image Storage
        ds.SOPInstanceUID = generate_uid(entropy_srcs=[seed, "sop", str(number)])
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.PatientName, ds.PatientID = "Bench^Brain", "BENCH-MR"
        ds.PatientBirthDate, ds.PatientSex = "19700101", "O"
        ds.StudyDate = ds.SeriesDate = "20240101"
        ds.StudyTime = ds.SeriesTime = "120000"
        ds.AccessionNumber, ds.StudyID = "BENCHMR1", "1"
        ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "MR", 1, number
        ds.ImagePositionPatient = [-120, -120, number * 5.0]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing, ds.SliceThickness = ["0.9375", "0.9375"], "5"
        ds.Rows = ds.Columns = size
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.PixelData = np.clip(image, 0, 65535).astype(np.uint16).tobytes()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        path = folder / f"MR{number:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


@dataclass(frozen=True)
class Image3:
    """The UIDs of one stored image and its Orthanc id."""

    study: str
    series: str
    sop: str
    orthanc_id: str = ""


def image_uids(path: Path) -> Image3:
    ds = dcmread(path, stop_before_pixels=True)
    return Image3(str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID))


# --------------------------------------------------------------------------- endpoints


@dataclass(frozen=True)
class Endpoint:
    """How to reach one API: base URL (scheme, host, port) and credentials."""

    name: str  # one of APIS, or "portal-signed"
    base: str  # e.g. http://127.0.0.1:8042
    auth: tuple[str, str]
    cookie: str = ""  # portal-signed: the browser session's cookie instead of credentials

    @property
    def host_port(self) -> tuple[str, int]:
        parts = urlsplit(self.base)
        return parts.hostname or "127.0.0.1", parts.port or 80

    @property
    def authorization(self) -> str:
        token = base64.b64encode(f"{self.auth[0]}:{self.auth[1]}".encode()).decode()
        return f"Basic {token}"

    def headers(self, accept: str) -> dict[str, str]:
        """What every request sends: Accept, and credentials or the session cookie."""
        if self.cookie:
            return {"Cookie": self.cookie, "Accept": accept}
        return {"Authorization": self.authorization, "Accept": accept}


def rendered_path(api: str, root: str, image: Image3) -> str:
    """The path (without query) of an instance's rendered resource on one API."""
    if api == "orthanc-rest":
        return f"/instances/{image.orthanc_id}/rendered"
    return (f"{root}/studies/{image.study}/series/{image.series}/instances/{image.sop}"
            "/rendered")


def frame_path(api: str, root: str, image: Image3) -> str:
    """The path of the first frame's rendered resource (c): Orthanc REST counts from 0."""
    if api == "orthanc-rest":
        return f"/instances/{image.orthanc_id}/frames/0/rendered"
    return rendered_path(api, root, image)


def window_query(api: str, *, quality: int | None,
                 viewport: tuple[int, int] | None = None) -> str:
    """Query string with ``{c}`` and ``{w}`` placeholders for the window centre and width.

    Orthanc's DICOMweb plugin wants the function (3 values) and does not decode %2C, so
    commas go raw to every API. Orthanc REST has its own names; ``width=`` there keeps the
    aspect ratio, as the portal's viewport does (the plugin's viewport stretches to exactly
    the size given, so the caller passes one with the image's aspect ratio).
    """
    if api == "orthanc-rest":
        parts = ["window-center={c}", "window-width={w}"]
        if viewport:
            parts.insert(0, f"width={viewport[0]}")
    else:
        parts = ["window={c},{w},linear"]
        if viewport:
            parts.insert(0, f"viewport={viewport[0]},{viewport[1]}")
    if quality is not None:
        parts.append(f"quality={quality}")
    return "?" + "&".join(parts)


@dataclass(frozen=True)
class Pattern:
    """The request paths of one load run.

    With ``vary``, request number ``j`` of run ``run`` asks for image
    ``paths[j % len(paths)]`` with window centre ``centre + (j // len(paths)) * centre_step``
    and width ``width + run * width_step``: no two requests of a run are alike (thread ``t``
    of ``T`` numbers its requests ``k * T + t``: the numbers grow with the requests of the
    run, not with the number of threads, so the radiograph's centre stays within its values
    for the runs measured, about 1,000 requests) and no two runs share a width, so a render
    cache never answers. Without ``vary`` every request is
    ``paths[0]`` at ``centre``/``width``.
    """

    paths: tuple[str, ...]
    query: str  # contains {c} and {w}
    centre: float
    width: float
    centre_step: float
    width_step: float
    vary: bool

    @staticmethod
    def _digits(step: float) -> int:
        return max(0, -math.floor(math.log10(step) + 1e-9))

    def _width_text(self, run: int) -> str:
        width = self.width + run * self.width_step if self.vary else self.width
        return f"{width:.{self._digits(self.width_step)}f}"

    def _centre_fmt(self) -> str:
        return f"%.{self._digits(self.centre_step)}f"

    def path(self, run: int, j: int) -> str:
        query = self.query.replace("{w}", self._width_text(run))
        if not self.vary:
            return self.paths[0] + query.replace("{c}", self._centre_fmt() % self.centre)
        n = len(self.paths)
        centre = self.centre + (j // n) * self.centre_step
        return self.paths[j % n] + query.replace("{c}", self._centre_fmt() % centre)

    def lua(self, *, run: int, headers: dict[str, str], threads: int) -> str:
        """A wrk script issuing exactly the requests ``path(run, j)`` describes."""
        quoted = ",\n  ".join(json.dumps(p) for p in self.paths)
        # No other % in these queries: commas are sent raw, nothing is percent-encoded.
        query = self.query.replace("{w}", self._width_text(run)).replace("{c}", "%s")
        header_lines = "\n".join(f"wrk.headers[{json.dumps(k)}] = {json.dumps(v)}"
                                 for k, v in headers.items())
        vary = "true" if self.vary else "false"
        return f"""-- generated by benchmarks/render.py
local paths = {{
  {quoted}
}}
local query = {json.dumps(query)}
local centre0, step, fmt, vary = {self.centre!r}, {self.centre_step!r}, {
            json.dumps(self._centre_fmt())}, {vary}
local threads = {threads}
{header_lines}
local counter = 0
function setup(thread)
  thread:set("tid", counter)
  counter = counter + 1
end
local k = 0
local fixed = nil
function request()
  if not vary then
    if fixed == nil then
      fixed = wrk.format("GET", paths[1] .. string.format(query, string.format(fmt, centre0)))
    end
    return fixed
  end
  local j = k * threads + tid
  k = k + 1
  local n = #paths
  local centre = centre0 + math.floor(j / n) * step
  return wrk.format("GET", paths[(j % n) + 1] .. string.format(query, string.format(fmt, centre)))
end
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {{"requests": %d, "duration_us": %d, "bytes": %d, "connect": %d, "read": %d, ' ..
    '"write": %d, "status": %d, "timeout": %d, "p50_us": %d, "p90_us": %d, "p99_us": %d, ' ..
    '"mean_us": %.1f, "max_us": %d}}\\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status,
    e.timeout, latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency.mean, latency.max))
end
"""


# --------------------------------------------------------------------------- load generators


@dataclass
class LoadResult:
    requests: int
    seconds: float
    bytes: int
    errors: dict[str, int]
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    max_ms: float

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds > 0 else 0.0

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())


def run_wrk(endpoint: Endpoint, pattern: Pattern, *, run: int, connections: int,
            seconds: float, accept: str, script_dir: Path) -> LoadResult:
    threads = min(connections, os.cpu_count() or 1)
    script = script_dir / f"wrk-{secrets.token_hex(4)}.lua"
    script.write_text(pattern.lua(run=run, headers=endpoint.headers(accept), threads=threads))
    script.chmod(0o600)  # holds credentials
    argv = [WRK or "wrk", "-t", str(threads), "-c", str(connections), "-d", f"{seconds:g}s",
            "--timeout", f"{HTTP_TIMEOUT_S:g}s", "-s", str(script), endpoint.base]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 120)
    finally:
        script.unlink()
    line = next((ln for ln in done.stdout.splitlines() if ln.startswith("WRKJSON ")), None)
    if done.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stdout[-800:]}"
                           f"{done.stderr[-800:]}")
    raw = json.loads(line[len("WRKJSON "):])
    return LoadResult(
        requests=raw["requests"], seconds=raw["duration_us"] / 1e6, bytes=raw["bytes"],
        errors={k: raw[k] for k in ("connect", "read", "write", "status", "timeout") if raw[k]},
        p50_ms=raw["p50_us"] / 1e3, p90_ms=raw["p90_us"] / 1e3, p99_ms=raw["p99_us"] / 1e3,
        mean_ms=raw["mean_us"] / 1e3, max_ms=raw["max_us"] / 1e3,
    )


def run_python(endpoint: Endpoint, pattern: Pattern, *, run: int, connections: int,
               seconds: float, accept: str, script_dir: Path) -> LoadResult:
    """Fallback without wrk: one thread per keep-alive connection (http.client).

    Slower than wrk and it competes with the servers for the GIL-free CPU less well, so
    its numbers are lower bounds; the report says which client ran.
    """
    del script_dir
    host, port = endpoint.host_port
    headers = endpoint.headers(accept)
    latencies: list[list[float]] = [[] for _ in range(connections)]
    received = [0] * connections
    errors: dict[str, int] = {}
    lock = threading.Lock()
    start = time.perf_counter()
    deadline = start + seconds
    max_requests = 1_000_000  # per connection, a hard bound besides the deadline

    def worker(tid: int) -> None:
        conn = http.client.HTTPConnection(host, port, timeout=HTTP_TIMEOUT_S)
        try:
            for k in range(max_requests):
                if time.perf_counter() >= deadline:
                    break
                path = pattern.path(run, k * connections + tid)
                t0 = time.perf_counter()
                try:
                    conn.request("GET", path, headers=headers)
                    response = conn.getresponse()
                    body = response.read()
                except (OSError, http.client.HTTPException):
                    with lock:
                        errors["read"] = errors.get("read", 0) + 1
                    conn.close()
                    conn = http.client.HTTPConnection(host, port, timeout=HTTP_TIMEOUT_S)
                    continue
                latencies[tid].append(time.perf_counter() - t0)
                received[tid] += len(body)
                if response.status > 399:
                    with lock:
                        errors["status"] = errors.get("status", 0) + 1
        finally:
            conn.close()

    workers = [threading.Thread(target=worker, args=(t,), daemon=True)
               for t in range(connections)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=seconds + HTTP_TIMEOUT_S + 10)
    elapsed = time.perf_counter() - start
    all_ms = sorted(x * 1e3 for lat in latencies for x in lat)
    if not all_ms:
        raise RuntimeError("no request completed")

    def pct(p: float) -> float:
        return all_ms[min(len(all_ms) - 1, max(0, math.ceil(p / 100 * len(all_ms)) - 1))]

    return LoadResult(requests=len(all_ms), seconds=elapsed, bytes=sum(received),
                      errors=errors, p50_ms=pct(50), p90_ms=pct(90), p99_ms=pct(99),
                      mean_ms=statistics.fmean(all_ms), max_ms=all_ms[-1])


# --------------------------------------------------------------------------- checks


class CheckFailed(RuntimeError):
    """A response was not a 200 with a decodable image of the expected kind and size."""


@dataclass
class Sample:
    url: str
    status: int
    content_type: str
    nbytes: int
    size: tuple[int, int] | None
    image_format: str | None
    elapsed_ms: float = 0.0  # request sent to last byte received, before any check


def fetch_image(session: requests.Session, endpoint: Endpoint, path: str, *, accept: str,
                expect_format: str, expect_size: tuple[int, int] | None) -> Sample:
    """GET one rendition and insist on 200 + a decodable image; CheckFailed says why."""
    url = endpoint.base + path
    start = time.perf_counter()
    response = session.get(url, auth=None if endpoint.cookie else endpoint.auth,
                           headers=endpoint.headers(accept),
                           timeout=HTTP_TIMEOUT_S)  # reads the whole body
    elapsed_ms = (time.perf_counter() - start) * 1000
    sample = Sample(url, response.status_code, response.headers.get("Content-Type", ""),
                    len(response.content), None, None, elapsed_ms)
    if response.status_code != 200:
        raise CheckFailed(f"GET {url} (Accept: {accept}) -> HTTP {response.status_code} "
                          f"{sample.content_type}: {response.text[:500]!r}")
    try:
        with Image.open(io.BytesIO(response.content)) as image:
            image.load()
            sample.size, sample.image_format = image.size, image.format
    except Exception as exc:  # any decoder error: the body is not an image
        raise CheckFailed(f"GET {url} -> 200 {sample.content_type}, {sample.nbytes} bytes, "
                          f"not decodable: {exc}; first bytes {response.content[:64]!r}"
                          ) from exc
    if sample.image_format != expect_format:
        raise CheckFailed(f"GET {url} -> {sample.image_format}, expected {expect_format}")
    if expect_size is not None and sample.size != expect_size:
        raise CheckFailed(f"GET {url} -> {sample.size[0]}x{sample.size[1]}, expected "
                          f"{expect_size[0]}x{expect_size[1]}")
    return sample


# --------------------------------------------------------------------------- cells


@dataclass
class Cell:
    """One measured (scenario, connections, API) combination."""

    scenario: str
    connections: int
    api: str
    requests: int = 0
    seconds: float = 0.0
    rps: float = 0.0
    p50_ms: float = 0.0
    p90_ms: float = 0.0
    p99_ms: float = 0.0
    mean_ms: float = 0.0
    max_ms: float = 0.0
    mean_response_bytes: float = 0.0  # wrk: includes HTTP headers
    sample_image_bytes: float = 0.0
    example_url: str = ""
    error: str | None = None


@dataclass
class Bytes:
    """Mean encoded size of one kind of image on one API (scenario d)."""

    image: str  # ct | xr
    format: str  # jpeg | webp
    quality: str  # "default" or a number
    api: str
    mean_bytes: float | None
    images: int
    size: tuple[int, int] | None = None
    note: str = ""


@dataclass
class Bench:
    args: argparse.Namespace
    workdir: Path
    endpoints: dict[str, Endpoint]
    ct: list[Image3]  # empty when only f) runs
    xr: Image3 | None
    xr_size: tuple[int, int]  # output of c): (width, height)
    files: list[UserFile] = field(default_factory=list)  # f): stored in every API
    mr: list[Image3] = field(default_factory=list)  # g)
    runs: dict[str, int] = field(default_factory=dict)
    # b) also through the viewer's signed URL (a browser session's cookie and token).
    signed: tuple[Endpoint, str] | None = None

    def endpoint(self, api: str) -> Endpoint:
        if api == SIGNED and self.signed is not None:
            return self.signed[0]
        return self.endpoints[api]

    def signed_pattern(self) -> Pattern:
        """b) through the signed frame URL the viewer page hands out for the middle slice."""
        assert self.signed is not None
        middle = self.ct[len(self.ct) // 2]
        path = (f"/dicomweb/studies/{middle.study}/series/{middle.series}/instances/"
                f"{middle.sop}/frames/1/rendered")
        return Pattern((path,), window_query("portal", quality=QUALITY) + f"&t={self.signed[1]}",
                       *CT_WINDOW, *CT_STEPS, False)

    def new_run(self, api: str) -> int:
        """A fresh run number on one API (1, 2, ...): cold runs never repeat a request."""
        self.runs[api] = self.runs.get(api, 0) + 1
        return self.runs[api]

    def root(self, api: str) -> str:
        return {"portal": "/dicomweb", "orthanc-dicomweb": "/dicom-web"}.get(api, "")

    def ct_pattern(self, api: str, *, vary: bool) -> Pattern:
        paths = [rendered_path(api, self.root(api), im) for im in self.ct]
        if not vary:  # b): the middle slice, always the same URL
            paths = [paths[len(paths) // 2]]
        return Pattern(tuple(paths), window_query(api, quality=QUALITY), *CT_WINDOW, *CT_STEPS,
                       vary)

    def mr_pattern(self, api: str) -> Pattern:
        """g): like a) over the MR slices (every request a new window)."""
        return Pattern(tuple(rendered_path(api, self.root(api), im) for im in self.mr),
                       window_query(api, quality=QUALITY), *MR_WINDOW, *CT_STEPS, True)

    def xr_pattern(self, api: str) -> Pattern:
        return Pattern((frame_path(api, self.root(api), self.xr),),
                       window_query(api, quality=QUALITY, viewport=self.xr_size), *XR_WINDOW,
                       *XR_STEPS, True)


def load(bench: Bench, api: str, pattern: Pattern, *, connections: int, seconds: float,
         run: int) -> LoadResult:
    client = run_wrk if bench.args.client == "wrk" else run_python
    return client(bench.endpoint(api), pattern, run=run, connections=connections,
                  seconds=seconds, accept="image/jpeg", script_dir=bench.workdir)


def measure_cell(bench: Bench, scenario: str, connections: int, api: str, pattern: Pattern,
                 expect_size: tuple[int, int] | None, *, warm_connections: int) -> Cell:
    """Check samples, warm up (unmeasured), load for --seconds, check again.

    ``expect_size`` None: images of many sizes (f), so the check that bodies were as large as
    the samples is left to wrk's count of non-2xx answers.
    """
    cell = Cell(scenario, connections, api)
    endpoint = bench.endpoint(api)
    seconds = bench.args.seconds
    try:
        with requests.Session() as session:
            # Samples come from their own request numbers: they must not warm the cache for
            # the measured requests of a cold scenario.
            sample_run = bench.new_run(api)
            samples = [fetch_image(session, endpoint, pattern.path(sample_run, k),
                                   accept="image/jpeg", expect_format="JPEG",
                                   expect_size=expect_size) for k in range(3)]
            cell.sample_image_bytes = statistics.fmean(s.nbytes for s in samples)
            cell.example_url = samples[0].url
            if warm_connections and bench.args.warmup > 0:
                warmup = load(bench, api, pattern, connections=warm_connections,
                              seconds=bench.args.warmup,
                              run=bench.new_run(api))
                if warmup.error_count:
                    raise CheckFailed(f"warm-up errors {warmup.errors}")
            time.sleep(RUN_PAUSE_S)
            result = load(bench, api, pattern, connections=connections, seconds=seconds,
                          run=bench.new_run(api))
            # After the run: still healthy, and what was served looked like the samples.
            fetch_image(session, endpoint, pattern.path(bench.new_run(api), 0),
                        accept="image/jpeg", expect_format="JPEG", expect_size=expect_size)
        if result.error_count:
            raise CheckFailed(f"{result.error_count} failed requests during the run "
                              f"({result.errors}); sample {cell.example_url}")
        if result.requests == 0:
            raise CheckFailed("no request completed")
        cell.mean_response_bytes = result.bytes / result.requests
        # wrk counts headers too (a few hundred bytes); a body far smaller than the samples
        # would mean errors or empty answers were being counted as renders.
        if expect_size and cell.mean_response_bytes < 0.7 * cell.sample_image_bytes:
            raise CheckFailed(f"responses averaged {cell.mean_response_bytes:.0f} bytes, "
                              f"samples {cell.sample_image_bytes:.0f}")
        cell.requests, cell.seconds, cell.rps = result.requests, result.seconds, result.rps
        cell.p50_ms, cell.p90_ms, cell.p99_ms = result.p50_ms, result.p90_ms, result.p99_ms
        cell.mean_ms, cell.max_ms = result.mean_ms, result.max_ms
        log(f"  {scenario}) {api:<17} c={connections}: {cell.rps:8.1f} req/s  "
            f"p50 {cell.p50_ms:7.1f} ms  p99 {cell.p99_ms:7.1f} ms  ({cell.requests} requests)")
    except (CheckFailed, RuntimeError, requests.RequestException) as exc:
        cell.error = str(exc)
        log(f"  {scenario}) {api} c={connections}: FAILED: {exc}")
    return cell


def measure_bytes(bench: Bench) -> list[Bytes]:
    """d): mean encoded size over a spread of CT slices, and of the radiograph.

    The window is the files' own (CT 40/400, radiograph 2048/4096), asked explicitly so
    every API applies the same one; quality is left to each server's default, then 90.
    """
    step = max(1, len(bench.ct) // 15)
    kinds = (("ct", bench.ct[::step][:15], CT_WINDOW, None, None),
             ("xr", [bench.xr], XR_WINDOW, bench.xr_size, bench.xr_size))
    out: list[Bytes] = []
    with requests.Session() as session:
        for kind, images, window, viewport, expect_size in kinds:
            for fmt, accept, pil in (("jpeg", "image/jpeg", "JPEG"),
                                     ("webp", "image/webp", "WEBP")):
                for quality in (None, QUALITY):
                    label = "default" if quality is None else str(quality)
                    for api in bench.endpoints:
                        to_path = frame_path if kind == "xr" else rendered_path
                        query = window_query(api, quality=quality, viewport=viewport)
                        sizes: list[int] = []
                        dims = None
                        try:
                            for im in images:
                                fixed = Pattern((to_path(api, bench.root(api), im),), query,
                                                *window, 1.0, 1.0, vary=False)
                                sample = fetch_image(session, bench.endpoints[api],
                                                     fixed.path(0, 0), accept=accept,
                                                     expect_format=pil,
                                                     expect_size=expect_size)
                                sizes.append(sample.nbytes)
                                dims = sample.size
                        except (CheckFailed, requests.RequestException) as exc:
                            # Orthanc 1.10 renders JPEG and PNG only: expected, not a failure.
                            expected = fmt == "webp" and api != "portal"
                            note = (f"not offered: {str(exc)[:200]}" if expected
                                    else f"FAILED: {exc}")
                            out.append(Bytes(kind, fmt, label, api, None, 0, note=note))
                            if not expected:
                                log(f"  d) {kind} {fmt} q={label} {api}: FAILED: {exc}")
                            continue
                        out.append(Bytes(kind, fmt, label, api, statistics.fmean(sizes),
                                         len(sizes), dims))
    return out


# --------------------------------------------------------------------------- your files (f)

FILES_MAX = 5000
FILES_VIEW_WIDTH = 1024  # f): wider images are asked at this width (aspect kept), as on a phone
STOW_BATCH_BYTES = 64 << 20


@dataclass
class UserFile:
    """One of the files given with --files, and what became of it."""

    path: str
    image: Image3
    transfer_syntax: str
    modality: str
    photometric: str
    columns: int
    rows: int
    frames: int
    nbytes: int
    refused: dict[str, str] = field(default_factory=dict)  # api -> why it was not stored
    first_ms: dict[str, float] = field(default_factory=dict)  # f) first view, per API
    repeat_ms: dict[str, float] = field(default_factory=dict)  # f) the same URL again
    failed: dict[str, str] = field(default_factory=dict)  # api -> why it did not render

    @property
    def viewport(self) -> tuple[int, int] | None:
        """The size asked: the original, or FILES_VIEW_WIDTH wide when wider."""
        if self.columns <= FILES_VIEW_WIDTH:
            return None
        return FILES_VIEW_WIDTH, max(1, round(FILES_VIEW_WIDTH * self.rows / self.columns))


def collect_files(paths: list[Path]) -> tuple[list[tuple[UserFile, Path]], list[str]]:
    """Every DICOM file with pixel data under ``paths`` (files or directories, recursive).

    Returns the images (one per SOP Instance UID) and a line for each file left out.
    """
    from pydicom.errors import InvalidDicomError

    candidates: list[Path] = []
    for path in paths:
        if path.is_dir():
            candidates += sorted(p for p in path.rglob("*") if p.is_file())
        elif path.is_file():
            candidates.append(path)
        else:
            raise SystemExit(f"--files: {path} is neither a file nor a directory")
    found: list[tuple[UserFile, Path]] = []
    skipped: list[str] = []
    seen: set[str] = set()
    for path in candidates:
        if len(found) >= FILES_MAX:
            skipped.append(f"{path}: more than {FILES_MAX} images given; the rest left out")
            break
        try:
            ds = dcmread(path, defer_size=1024)
            if "PixelData" not in ds and "FloatPixelData" not in ds:
                skipped.append(f"{path}: no pixel data")
                continue
            sop = str(ds.SOPInstanceUID)
            image = Image3(str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), sop)
            if "PixelData" not in ds:
                skipped.append(f"{path}: float pixel data (neither server renders it)")
                continue
            user = UserFile(str(path), image, str(ds.file_meta.TransferSyntaxUID),
                            str(ds.get("Modality", "")), str(ds.get("PhotometricInterpretation",
                                                                   "")),
                            int(ds.Columns), int(ds.Rows), int(ds.get("NumberOfFrames") or 1),
                            path.stat().st_size)
        except (InvalidDicomError, AttributeError, KeyError, ValueError, TypeError,
                OSError) as exc:
            skipped.append(f"{path}: not a DICOM image ({type(exc).__name__}: "
                           f"{str(exc)[:120]})")
            continue
        if sop in seen:
            skipped.append(f"{path}: SOP Instance UID {sop} given twice")
            continue
        seen.add(sop)
        found.append((user, path))
    return found, skipped


def _stow_files(target: Target, files: list[tuple[UserFile, Path]]) -> dict[str, str]:
    """STOW-RS the files in batches; SOP Instance UID -> why it was refused (if it was)."""
    refused: dict[str, str] = {}
    batches: list[list[tuple[UserFile, bytes]]] = [[]]
    size = 0
    for user, path in files:
        payload = path.read_bytes()
        if batches[-1] and size + len(payload) > STOW_BATCH_BYTES:
            batches.append([])
            size = 0
        batches[-1].append((user, payload))
        size += len(payload)
    with requests.Session() as session:
        session.auth = target.auth
        for batch in batches:
            body, content_type = multipart_body([payload for _user, payload in batch])
            response = session.post(f"{target.dicomweb}/studies", data=body, timeout=600,
                                    headers={"Content-Type": content_type,
                                             "Accept": "application/dicom+json"})
            stored: set[str] = set()
            failed: dict[str, str] = {}
            with contextlib.suppress(ValueError):
                answer = response.json()
                if isinstance(answer, dict):
                    for item in answer.get("00081199", {}).get("Value") or []:
                        stored.update(item.get("00081155", {}).get("Value") or [])
                    for item in answer.get("00081198", {}).get("Value") or []:
                        uid = (item.get("00081155", {}).get("Value") or [""])[0]
                        reason = (item.get("00081197", {}).get("Value") or ["?"])[0]
                        failed[uid] = f"STOW failure reason {reason}"
            for user, _payload in batch:
                sop = user.image.sop
                if sop not in stored:
                    refused[sop] = failed.get(sop) or (
                        f"STOW-RS HTTP {response.status_code}: {response.text[:200]!r}")
    return refused


def store_files(targets: list[Target], files: list[tuple[UserFile, Path]]) -> None:
    """Store the given files in every target; note on each file who refused it."""
    for target in targets:
        log(f"  storing {len(files)} file(s) in {target.name} (STOW-RS) ...")
        api = "portal" if target.name == "portal" else "orthanc"
        for sop, why in _stow_files(target, files).items():
            user = next(u for u, _p in files if u.image.sop == sop)
            user.refused[api] = why


def _files_query(api: str, user: UserFile) -> str:
    """f) first view: each server's own default window, JPEG quality 90, phone-sized."""
    viewport = user.viewport
    if api == "orthanc-rest":
        parts = [f"width={viewport[0]}"] if viewport else []
    else:
        parts = [f"viewport={viewport[0]},{viewport[1]}"] if viewport else []
    return "?" + "&".join([*parts, f"quality={QUALITY}"])


def measure_file_views(bench: Bench) -> None:
    """f) one file at a time: the first view on each API, then the same URL again.

    The APIs take turns going first. Only a 200 with a decodable JPEG counts.
    """
    apis = list(bench.endpoints)
    with requests.Session() as session:
        for number, user in enumerate(bench.files):
            order = apis[number % len(apis):] + apis[:number % len(apis)]
            for api in order:
                path = rendered_path(api, bench.root(api), user.image) + _files_query(api, user)
                for record in (user.first_ms, user.repeat_ms):
                    try:
                        sample = fetch_image(session, bench.endpoints[api], path,
                                             accept="image/jpeg", expect_format="JPEG",
                                             expect_size=None)
                    except (CheckFailed, requests.RequestException) as exc:
                        user.failed[api] = str(exc)[:300]
                        break
                    record[api] = sample.elapsed_ms
            if (number + 1) % 50 == 0:
                log(f"  f) {number + 1}/{len(bench.files)} files viewed")


def files_pattern(bench: Bench, api: str, *, vary: bool) -> Pattern:
    """f) load over every file all APIs rendered, at their original size, with an explicit
    window varied per request (cold) or the middle file again and again (cached)."""
    usable = [u for u in bench.files if not u.failed]
    paths = [rendered_path(api, bench.root(api), u.image) for u in usable]
    if not vary:
        paths = [paths[len(paths) // 2]]
    return Pattern(tuple(paths), window_query(api, quality=QUALITY), *CT_WINDOW, *CT_STEPS,
                   vary)


def summarize_files(files: list[UserFile], apis: list[str]) -> dict[str, Any]:
    """Medians and means of f) per API, over all files and per transfer syntax."""
    def stats(group: list[UserFile], attr: str) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for api in apis:
            values = [getattr(u, attr)[api] for u in group if api in getattr(u, attr)]
            out[api] = ({"median_ms": statistics.median(values),
                         "mean_ms": statistics.fmean(values), "files": len(values)}
                        if values else None)
        return out

    both = [u for u in files if all(a in u.first_ms for a in apis)]
    portal_failed = [(u, u.failed.get("portal") or u.refused.get("portal", "")) for u in files
                     if "portal" in u.failed or "portal" in u.refused]
    by_syntax: dict[str, list[UserFile]] = {}
    for user in both:
        by_syntax.setdefault(user.transfer_syntax, []).append(user)
    return {
        "files": len(files),
        "rendered_by_all": len(both),
        "first_view": stats(both, "first_ms"),
        "repeat_view": stats(both, "repeat_ms"),
        "first_view_by_transfer_syntax": {ts: stats(group, "first_ms")
                                          for ts, group in sorted(by_syntax.items())},
        "portal_only_failures": [
            {"path": u.path, "why": why} for u, why in portal_failed if not _undecodable(u, why)],
        "other_failures": [
            {"path": u.path, "api": api, "why": why}
            for u in files for api, why in {**u.refused, **u.failed}.items()
            if api != "portal"]
        + [{"path": u.path, "api": "portal", "why": f"{why} (pydicom cannot decode it either: "
            f"{_undecodable(u, why)})"} for u, why in portal_failed if _undecodable(u, why)],
    }


def _undecodable(user: UserFile, why: str) -> str:
    """Why pydicom, the reference decoder here, cannot decode the file's first frame, when
    the portal refused to render it with a 4xx ("" otherwise): a damaged file refused with a
    reason is a note, not a failure of the portal (pydicom's test files hold such ones)."""
    return _reference_failure(user.path) if "-> HTTP 4" in why else ""


@functools.cache
def _reference_failure(path: str) -> str:
    """Why pydicom cannot decode the first frame of ``path`` ("" when it can)."""
    from pydicom.pixels import pixel_array

    try:
        pixel_array(path, index=0)
    except Exception as exc:  # any failure of the reference decoder is the answer
        return f"{type(exc).__name__}: {str(exc).splitlines()[0][:80]}"
    return ""


# --------------------------------------------------------------------------- memory


def _descendants(root: int) -> list[int]:
    """Every process below ``root`` (from /proc)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, frontier = [], [root]
    while frontier:
        parent = frontier.pop()
        children = [pid for pid, ppid in parents.items() if ppid == parent]
        found += children
        frontier += children
    return found


def _peak_mb(pid: int) -> float | None:
    """VmHWM (peak resident memory) of a process in MB."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(
            errors="replace")
    except OSError:
        return ""


def measure_memory(bench: Bench) -> dict[str, Any]:
    """e): peak resident memory (VmHWM) while rendering the largest file at full size.

    The radiograph (the largest file) is asked for at its original size as PNG and JPEG
    and at 1024 wide, with a window no earlier request used. Then the peak of every
    process is read from /proc: the portal's gunicorn workers (which never decode when
    render isolation is on), its render processes, and Orthanc (one process doing both).
    """
    sizes = (None, None, bench.xr_size)
    for pid in _descendants(os.getpid()):
        # Reset each peak (Linux 4.0+), so the STOW uploads before do not count.
        with contextlib.suppress(OSError):
            Path(f"/proc/{pid}/clear_refs").write_text("5")
    with requests.Session() as session:
        for api in bench.endpoints:
            if api == "orthanc-dicomweb":
                continue  # the same process as orthanc-rest
            for number, (fmt, accept) in enumerate((("PNG", "image/png"),
                                                    ("JPEG", "image/jpeg"),
                                                    ("JPEG", "image/jpeg"))):
                viewport = sizes[number]
                query = window_query(api, quality=None, viewport=viewport)
                fixed = Pattern((frame_path(api, bench.root(api), bench.xr),), query,
                                XR_WINDOW[0] + 7.0 + number, XR_WINDOW[1] + 7.0, 1.0, 1.0,
                                vary=False)
                fetch_image(session, bench.endpoints[api], fixed.path(0, 0), accept=accept,
                            expect_format=fmt, expect_size=viewport or bench.args.xr)
    workers, render, orthanc = [], [], []
    for pid in _descendants(os.getpid()):
        command, peak = _cmdline(pid), _peak_mb(pid)
        if peak is None:
            continue
        if "Orthanc" in command:
            orthanc.append(peak)
        elif "gunicorn" in command and "portal.gunicorn_config" in command:
            workers.append(peak)  # the master too; it never serves requests
        elif "multiprocessing.spawn" in command and "resource_tracker" not in command:
            render.append(peak)
    return {"portal_web_worker_peak_mb": max(workers, default=None),
            "portal_render_process_peak_mb": max(render, default=None),
            "orthanc_peak_mb": max(orthanc, default=None),
            "processes": {"gunicorn": len(workers), "render": len(render),
                          "orthanc": len(orthanc)}}


def measure_full_caches(bench: Bench) -> dict[str, Any]:
    """m): fill the portal's in-process caches to their caps through real requests, then read
    the peak resident memory (VmHWM, over the whole run: not reset) of every gunicorn worker
    and render process.

    The render cache (``RENDER_CACHE_MB`` per worker) is filled with the radiograph as PNG
    with a new window each time: ten at full size (3 MB bodies), then 1024 wide until three
    times its cap for every worker has been sent over two connections (the kernel spreads
    them over the workers); the render processes' frame
    caches (``RENDER_FRAME_CACHE_MB`` each) with the radiograph prepared at several output
    sizes and every CT and MR slice at native size. Nothing is cached in Orthanc's way, so
    only the portal is measured.
    """
    from concurrent.futures import ThreadPoolExecutor

    def peaks() -> tuple[list[float], list[float]]:
        web, render = [], []
        for pid in _descendants(os.getpid()):
            command, peak = _cmdline(pid), _peak_mb(pid)
            if peak is None:
                continue
            if "gunicorn" in command and "portal.gunicorn_config" in command:
                web.append(peak)
            elif "multiprocessing.spawn" in command and "resource_tracker" not in command:
                render.append(peak)
        return sorted(web, reverse=True), sorted(render, reverse=True)

    settings = portal_render_settings()
    workers = int(str(settings["gunicorn"]).split()[0])
    # The peak so far (the STOW-RS uploads of the set-up: a 75 MB request), then reset it
    # (Linux 4.0+), so what follows is serving with the caches filling and full.
    ingest_web, ingest_render = peaks()
    for pid in _descendants(os.getpid()):
        with contextlib.suppress(OSError):
            Path(f"/proc/{pid}/clear_refs").write_text("5")
    cache_mb, frame_mb = int(settings["RENDER_CACHE_MB"]), int(settings["RENDER_FRAME_CACHE_MB"])
    render_processes = workers * int(settings["RENDER_WORKERS"])
    endpoint = bench.endpoints["portal"]
    assert bench.xr is not None
    path = frame_path("portal", "/dicomweb", bench.xr)
    sent: dict[str, float] = {"png": 0, "frames": 0}

    def png(number: int, viewport: tuple[int, int] | None = bench.xr_size) -> int:
        query = window_query("portal", quality=None, viewport=viewport).format(
            c=f"{XR_WINDOW[0] + 0.5 + number * 0.5:.1f}", w=f"{XR_WINDOW[1] + 3.5:.1f}")
        with requests.Session() as session:
            sample = fetch_image(session, endpoint, path + query, accept="image/png",
                                 expect_format="PNG", expect_size=viewport or bench.args.xr)
        sent["png"] += sample.nbytes
        return sample.nbytes

    with ThreadPoolExecutor(max_workers=2) as pool:
        list(pool.map(lambda n: png(n, None), range(-10, 0)))
    wanted = 3 * workers * cache_mb * 2**20
    count = max(1, math.ceil((wanted - sent["png"]) / max(png(0), 1)))
    with ThreadPoolExecutor(max_workers=2) as pool:
        list(pool.map(png, range(1, count + 1)))
    # The radiograph prepared at four output sizes (full size: 15 MB of 16-bit pixels, the
    # others reduced by whole factors), every CT and MR slice at native size.
    frames: list[tuple[str, tuple[int, int] | None]] = [
        (path + window_query("portal", quality=QUALITY, viewport=viewport)
         .format(c="2048.3", w="4096.3"), None)
        for viewport in (None, (2048, 2048), (1024, 1024), (512, 512))]
    frames += [(rendered_path("portal", "/dicomweb", im) + window_query(
        "portal", quality=QUALITY).format(c="40.3", w="400.3"), (512, 512)) for im in bench.ct]
    frames += [(rendered_path("portal", "/dicomweb", im) + window_query(
        "portal", quality=QUALITY).format(c="600.3", w="1200.3"), (MR_SIZE, MR_SIZE))
        for im in bench.mr]
    frame_bytes = (bench.args.xr[0] * bench.args.xr[1] * 2 * (1 + 1 / 4 + 1 / 9 + 1 / 25)
                   + len(bench.ct) * 512 * 512 * 2 + len(bench.mr) * MR_SIZE * MR_SIZE * 2)

    def one(item: tuple[str, tuple[int, int] | None]) -> None:
        with requests.Session() as session:
            fetch_image(session, endpoint, item[0], accept="image/jpeg", expect_format="JPEG",
                        expect_size=item[1])

    for _round in range(2):  # every worker's processes see the frames
        with ThreadPoolExecutor(max_workers=2) as pool:
            list(pool.map(one, frames))
    sent["frames"] = frame_bytes
    web, render = peaks()
    return {"ingest_web_worker_peaks_mb": ingest_web[:workers],
            "ingest_render_process_peaks_mb": ingest_render,
            "render_cache_cap_mb": cache_mb, "frame_cache_cap_mb": frame_mb,
            "render_cache_filled_mb": sent["png"] / 2**20 / workers,
            # each frame goes to one process of each worker (affinity by file): its share
            "frame_cache_filled_mb": sent["frames"] / 2**20 * workers / max(render_processes,
                                                                             1),
            "png_requests": count + 11,
            "web_worker_peaks_mb": web[:workers],  # the master (no requests) is the smallest
            "render_process_peaks_mb": render}


# --------------------------------------------------------------------------- set-up


def orthanc_ids(base: str, auth: tuple[str, str], images: list[Image3]) -> list[Image3]:
    out = []
    with requests.Session() as session:
        session.auth = auth
        for im in images:
            found = session.post(f"{base}/tools/lookup", data=im.sop, timeout=30)
            found.raise_for_status()
            ids = [x["ID"] for x in found.json() if x.get("Type") == "Instance"]
            if len(ids) != 1:
                raise RuntimeError(f"Orthanc lookup of {im.sop}: {found.text[:300]}")
            out.append(Image3(im.study, im.series, im.sop, ids[0]))
    return out


PORTAL_RENDER_KEYS = ("REDIS_URL", "RENDER_ISOLATION", "RENDER_WORKERS", "RENDER_MEMORY_MB",
                      "RENDER_TIMEOUT_SECONDS", "RENDER_CACHE_MB", "RENDER_FRAME_CACHE_MB",
                      "MAX_RENDER_PIXELS")


def portal_render_settings() -> dict[str, Any]:
    """Render-related settings the portal started with: defaults, overridden by PORTAL_*."""
    from portal import config, gunicorn_config

    known = {s.key: s.default for s in config.SETTINGS}
    settings: dict[str, Any] = {
        "gunicorn": f"{gunicorn_config.workers} workers x {gunicorn_config.threads} threads "
                    f"({gunicorn_config.worker_class})",
    }
    for key in PORTAL_RENDER_KEYS:
        if key in known:
            settings[key] = os.environ.get(f"PORTAL_{key}", known[key])
    settings["render cache"] = ("Redis" if settings.get("REDIS_URL")
                                else "in-process LRU per gunicorn worker")
    return settings


def git_state() -> str:
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT,
                          capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "portal"], cwd=REPO_ROOT,
                           capture_output=True, text=True).stdout.strip()
    return f"{head or 'unknown'}{' + uncommitted changes under portal/' if dirty else ''}"


def set_up(args: argparse.Namespace, workdir: Path, procs: ProcessGroup
           ) -> tuple[Bench, dict[str, Any]]:
    tag = secrets.token_hex(4)
    synthetic = bool(set(args.scenarios) & set(SYNTHETIC))
    series: list[Series] = []
    if synthetic:
        log(f"generating {args.slices} CT slices 512x512 and a {args.xr[0]}x{args.xr[1]} "
            "radiograph ...")
        ct = make_series(load_generator(), workdir / "data" / "ct", slices=args.slices,
                         size=512, seed=f"render-bench-{tag}-ct")
        xr_file = write_radiograph(workdir / "data" / "xr" / "XR0001.dcm", columns=args.xr[0],
                                   rows=args.xr[1], seed=f"render-bench-{tag}-xr")
        xr = Series([xr_file], [xr_file.read_bytes()], image_uids(xr_file).study)
        mr_files = write_mr_series(workdir / "data" / "mr", slices=MR_SLICES, size=MR_SIZE,
                                   seed=f"render-bench-{tag}-mr")
        mr = Series(mr_files, [f.read_bytes() for f in mr_files], image_uids(mr_files[0]).study)
        series = [ct, xr, mr]
    given: list[tuple[UserFile, Path]] = []
    skipped: list[str] = []
    if "f" in args.scenarios:
        given, skipped = collect_files(args.files)
        log(f"--files: {len(given)} image(s), {len(skipped)} file(s) left out")
        if not given:
            raise SystemExit("--files: no DICOM file with pixel data found")

    log("starting Orthanc ...")
    orthanc = orthanc_target(workdir, procs, nodelay=False, paths=())
    for item in args.portal_env:
        key, _, value = item.partition("=")
        os.environ[key] = value  # portal_target passes os.environ to gunicorn
    log("starting portal (gunicorn) ...")
    portal = portal_target(workdir, procs, paths=())
    targets: list[Target] = [orthanc, portal]
    for target in targets:
        for one in series:
            log(f"  storing {len(one.payloads)} instance(s) in {target.name} (STOW-RS) ...")
            stow_bulk(target, one)
            verify(target, one)
    if given:
        store_files(targets, given)
    # The portal warms each new series up (thumbnail, middle image, a CT's volume) a second
    # after its last instance: let that end before anything is measured.
    log(f"  after storing: {settle():.1f} s of work")

    orthanc_base = orthanc.dicomweb.removesuffix("/dicom-web")
    portal_base = portal.dicomweb.removesuffix("/dicomweb")
    endpoints = {
        "portal": Endpoint("portal", portal_base, portal.auth),
        "orthanc-dicomweb": Endpoint("orthanc-dicomweb", orthanc_base, orthanc.auth),
        "orthanc-rest": Endpoint("orthanc-rest", orthanc_base, orthanc.auth),
    }
    endpoints = {k: v for k, v in endpoints.items() if k in args.apis}
    ct_images: list[Image3] = []
    xr_image: Image3 | None = None
    if synthetic:
        ct_images = orthanc_ids(orthanc_base, orthanc.auth, [image_uids(f) for f in ct.files])
        xr_image = orthanc_ids(orthanc_base, orthanc.auth, [image_uids(xr_file)])[0]
    stored = [user for user, _path in given if not user.refused]
    for user, found in zip(stored, orthanc_ids(orthanc_base, orthanc.auth,
                                               [u.image for u in stored]), strict=True):
        user.image = found
    xr_size = (XR_TARGET_WIDTH, round(XR_TARGET_WIDTH * args.xr[1] / args.xr[0]))
    bench = Bench(args, workdir, endpoints, ct_images, xr_image, xr_size, stored)
    if synthetic:
        bench.mr = orthanc_ids(orthanc_base, orthanc.auth, [image_uids(f) for f in mr_files])
    if "b" in args.scenarios and not args.no_signed:
        bench.signed = signed_viewer(workdir / "portal-instance", endpoints["portal"],
                                     ct_images)
    with requests.Session() as session:
        plugin = session.get(f"{orthanc_base}/plugins/dicom-web", auth=orthanc.auth,
                             timeout=10).json()
    config = {
        "seconds": args.seconds, "warmup_seconds": args.warmup,
        "connections": args.connections, "client": args.client,
        "client_version": _wrk_version() if args.client == "wrk" else "python http.client",
        "cpus": os.cpu_count(), "loadavg_before": os.getloadavg(),
        "python": platform.python_version(), "platform": platform.platform(),
        "portal_code": git_state(),
        "settings": {
            "portal": {**portal_render_settings(), "portal_env": list(args.portal_env)},
            "orthanc": {"version": orthanc.settings.get("version"),
                        "dicomweb_plugin": plugin.get("Version"),
                        "HttpThreadsCount": "default (50)",
                        "MaximumStorageCacheSize": "default (128 MB of DICOM files)"},
        },
    }
    if synthetic:
        config["ct"] = {"slices": args.slices, "size": "512x512", "bits": 16,
                        "transfer_syntax": "Explicit VR Little Endian",
                        "bytes_per_file": round(ct.nbytes / len(ct.payloads))}
        config["radiograph"] = {
            "columns": args.xr[0], "rows": args.xr[1], "bits_stored": 12,
            "photometric": "MONOCHROME2", "transfer_syntax": "Explicit VR Little Endian",
            "bytes": len(xr.payloads[0]), "rendered_to": f"{xr_size[0]}x{xr_size[1]}"}
    config["varied"] = {
        "a": f"request j of run r: slice j mod {args.slices} (all {args.slices} cycled), "
             f"window centre {CT_WINDOW[0]:g} + floor(j/{args.slices}) x {CT_STEPS[0]} HU, "
             f"width {CT_WINDOW[1]:g} + r x {CT_STEPS[1]} HU; linear, quality {QUALITY}, "
             "native 512x512",
        "b": f"nothing: slice {args.slices // 2 + 1}, window "
             f"{CT_WINDOW[0]:g}/{CT_WINDOW[1]:g} linear, quality {QUALITY}",
        "c": f"request j of run r: window centre {XR_WINDOW[0]:g} + j x {XR_STEPS[0]}, "
             f"width {XR_WINDOW[1]:g} + r x {XR_STEPS[1]}; linear, quality {QUALITY}, "
             f"{xr_size[0]}x{xr_size[1]}",
        "f": f"first view: each file once per API at the server's default window, JPEG "
             f"quality {QUALITY}, original size or {FILES_VIEW_WIDTH} wide (aspect kept), "
             "then the same URL again; load: like a) and b) over the files rendered by "
             "every API, at their original size",
    }
    config["varied"] = {k: v for k, v in config["varied"].items() if k in args.scenarios}
    if "f" in args.scenarios:
        config["files"] = {"given": [str(p) for p in args.files], "images": len(given),
                           "stored_in_all": len(stored), "left_out": skipped,
                           "refused": {u.path: u.refused for u, _p in given if u.refused}}
    return bench, config


def _wrk_version() -> str:
    done = subprocess.run([WRK or "wrk", "--version"], capture_output=True, text=True)
    text = (done.stdout or done.stderr or "wrk").splitlines()[0]
    return text.split(" Copyright")[0]


# --------------------------------------------------------------------------- run


def run_benchmark(args: argparse.Namespace, workdir: Path, procs: ProcessGroup
                  ) -> dict[str, Any]:
    bench, config = set_up(args, workdir, procs)
    apis = list(bench.endpoints)
    cells: list[Cell] = []
    plan: list[tuple[str, int]] = []
    for scenario in ("a", "g", "b"):
        if scenario in args.scenarios:
            plan += [(scenario, c) for c in args.connections]
    if "c" in args.scenarios:
        plan += [("c", c) for c in args.connections]
    files: dict[str, Any] = {}
    if "f" in args.scenarios:
        log(f"f) first and repeated view of {len(bench.files)} file(s), one at a time ...")
        measure_file_views(bench)
        files = summarize_files(bench.files, apis)
        if files["rendered_by_all"]:
            for scenario in ("f-cold", "f-cached"):
                plan += [(scenario, c) for c in args.connections]
        else:
            log("  f) no file rendered on every API: no load cells")
    ct_size = (512, 512)
    for i, (scenario, connections) in enumerate(plan):
        # Rotate who goes first so no API always gets the calmer machine.
        order = apis[i % len(apis):] + apis[:i % len(apis)]
        log(f"[{i + 1}/{len(plan)}] scenario {scenario}, {connections} connection(s) ...")
        # Warm up (unmeasured) before the first cell of each scenario, with as many
        # connections as that scenario will use: render processes, caches, connections.
        first_of_scenario = i == 0 or plan[i - 1][0] != scenario
        warm = max(c for s, c in plan if s == scenario) if first_of_scenario else 0
        for api in order:
            if scenario == "c":
                pattern, size = bench.xr_pattern(api), bench.xr_size
            elif scenario == "g":
                pattern, size = bench.mr_pattern(api), (MR_SIZE, MR_SIZE)
            elif scenario.startswith("f-"):
                pattern, size = files_pattern(bench, api, vary=scenario == "f-cold"), None
            else:
                pattern, size = bench.ct_pattern(api, vary=scenario == "a"), ct_size
            cells.append(measure_cell(bench, scenario, connections, api, pattern, size,
                                      warm_connections=warm))
        if scenario == "b" and bench.signed is not None:
            cells.append(measure_cell(bench, scenario, connections, SIGNED,
                                      bench.signed_pattern(), ct_size, warm_connections=warm))
    sizes: list[Bytes] = []
    if "d" in args.scenarios:
        log("d) bytes per image ...")
        sizes = measure_bytes(bench)
    memory: dict[str, Any] = {}
    if "e" in args.scenarios:
        log("e) peak memory after rendering the largest file ...")
        try:
            memory = measure_memory(bench)
        except (CheckFailed, requests.RequestException) as exc:
            memory = {"error": str(exc)}
            log(f"  e) FAILED: {exc}")
    if "m" in args.scenarios:
        log("m) filling the portal's caches to their caps, then peak memory ...")
        try:
            memory["full_caches"] = measure_full_caches(bench)
        except (CheckFailed, requests.RequestException) as exc:
            memory["full_caches"] = {"error": str(exc)}
            log(f"  m) FAILED: {exc}")
    config["loadavg_after"] = os.getloadavg()
    return {
        "config": config,
        "cells": [asdict(c) for c in cells],
        "bytes": [asdict(b) for b in sizes],
        "memory": memory,
        "files": files,
        "file_results": [asdict(u) for u in bench.files],
        "failures": [asdict(c) for c in cells if c.error]
        + [asdict(b) for b in sizes if b.note.startswith("FAILED")]
        + [{"scenario": "f", "api": "portal", "error": f["why"], "path": f["path"]}
           for f in files.get("portal_only_failures", [])],
    }


# --------------------------------------------------------------------------- report

SCENARIO_TITLES = {
    "a": "a) CT 512x512 JPEG, cold (varied)",
    "b": "b) CT 512x512 JPEG, same URL (portal cache hit)",
    "c": "c) radiograph -> {w}x{h} JPEG, cold",
    "g": "g) MR 256x256 JPEG, cold (varied)",
    "f-cold": "f) your files, original size JPEG, cold (varied)",
    "f-cached": "f) your files, the middle one again (portal cache hit)",
}
LABEL_WIDTH = 71


def _signed_line(signed: dict[str, Any], group: dict[str, dict[str, Any]],
                 connections: int) -> str:
    """b) through the viewer's signed URL, with its ratios to the old route and Orthanc."""
    label = f"b) the same image through the viewer's signed URL, {connections} conn"
    if signed["error"]:
        return f"{label}: FAILED {signed['error']}"
    ratios = ", ".join(
        f"{signed['rps'] / c['rps']:.2f}x {name}" for name, c in group.items()
        if not c["error"] and c["rps"])
    return (f"{label}: {signed['rps']:,.1f} req/s, p50 {signed['p50_ms']:.2f} ms, p99 "
            f"{signed['p99_ms']:.2f} ms ({ratios})")


def signed_viewer(instance: Path, portal: Endpoint, ct: list[Image3]
                  ) -> tuple[Endpoint, str] | None:
    """A physician's browser session in the portal's database (granted the CT, as sign-in
    would leave it) and the signed URL token its viewer page gives the middle slice."""
    import re
    from datetime import timedelta

    from portal import create_app
    from portal.access.grants import create_grant
    from portal.access.models import User
    from portal.access.principal import Principal
    from portal.auth.models import UserSession
    from portal.auth.sessions import DatabaseSessionInterface, _digest
    from portal.db import utcnow

    app = create_app({"INSTANCE_PATH": str(instance), "SECRET_KEY": secrets.token_urlsafe(32)})
    token = secrets.token_urlsafe(32)
    middle = ct[len(ct) // 2]
    try:
        with app.extensions["db"].write_transaction() as session:
            user = User(issuer="https://bench.invalid", subject="bench-doctor",
                        email="bench@bench.invalid", display_name="Dr Bench",
                        roles=["physician"], active=True, security_epoch=0)
            session.add(user)
            session.flush()
            admin = Principal("user", 0, "bench", roles=frozenset({"office_manager"}))
            create_grant(session, admin, user_id=user.id, study_uid=middle.study)
            now = utcnow()
            session.add(UserSession(token_sha256=_digest(token), data={}, user_fk=user.id,
                                    security_epoch=0, created_at=now, last_seen_at=now,
                                    expires_at=now + timedelta(hours=4), auth_time=now))
        interface = app.session_interface
        assert isinstance(interface, DatabaseSessionInterface)
        cookie = f"{interface.cookie_name(app)}={token}"
    finally:
        app.extensions["db"].dispose()
    page = requests.get(f"{portal.base}/studies/{middle.study}/view/{middle.series}",
                        headers={"Cookie": cookie}, timeout=HTTP_TIMEOUT_S)
    found = re.search(r'id="viewer-data"[^>]*>(.*?)</script>', page.text, re.S)
    signed = json.loads(found.group(1)).get("signed", {}) if found else {}
    if middle.sop not in signed:
        log(f"  no signed URL from the viewer page (HTTP {page.status_code}): b) without it")
        return None
    return Endpoint(SIGNED, portal.base, ("", ""), cookie), signed[middle.sop]


def _fmt(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def format_table(result: dict[str, Any]) -> str:
    cfg = result["config"]
    files = result.get("files") or {}
    apis = [a for a in APIS if any(c["api"] == a for c in result["cells"])
            or any(b["api"] == a for b in result["bytes"])
            or (files.get("first_view") or {}).get(a)]
    others = [a for a in apis if a != "portal"]
    short = {"orthanc-dicomweb": "orthanc-dw", "orthanc-rest": "orthanc-rest"}
    header = f"{'':<{LABEL_WIDTH}}{'metric':<9}{'portal':>10}"
    for api in others:
        header += f"{short[api]:>14}{'ratio':>7}"
    xr = cfg.get("radiograph") or {"rendered_to": "-x-"}
    lines = [
        f"Rendering, portal vs Orthanc {cfg['settings']['orthanc']['version']} "
        f"(DICOMweb plugin {cfg['settings']['orthanc']['dicomweb_plugin']}); "
        f"{cfg['seconds']:g} s per cell after {cfg['warmup_seconds']:g} s warm-up; "
        f"client {cfg['client_version']}; {cfg['cpus']} CPUs; load average before "
        f"{cfg['loadavg_before'][0]:.2f}, after {cfg['loadavg_after'][0]:.2f}",
        header,
    ]

    def row(label: str, metric: str, values: dict[str, float | None], digits: int) -> None:
        text = f"{label:<{LABEL_WIDTH}}{metric:<9}{_fmt(values.get('portal'), digits):>10}"
        for api in others:
            other, mine = values.get(api), values.get("portal")
            ratio = f"{mine / other:.2f}" if mine is not None and other else "-"
            text += f"{_fmt(other, digits):>14}{ratio:>7}"
        lines.append(text)

    by_key: dict[tuple[str, int], dict[str, dict[str, Any]]] = {}
    for cell in result["cells"]:
        by_key.setdefault((cell["scenario"], cell["connections"]), {})[cell["api"]] = cell
    for (scenario, connections), group in by_key.items():
        signed = group.pop(SIGNED, None)
        title = SCENARIO_TITLES[scenario].format(
            w=xr["rendered_to"].split("x")[0], h=xr["rendered_to"].split("x")[1])
        label = f"{title}, {connections} conn"

        def pick(metric: str, group: dict[str, dict[str, Any]] = group
                 ) -> dict[str, float | None]:
            return {api: (None if c["error"] else c[metric]) for api, c in group.items()}

        row(label, "req/s", pick("rps"), 1)
        if scenario == "c":
            row("", "ms/image", pick("mean_ms"), 1)
        row("", "p50 ms", pick("p50_ms"), 1)
        row("", "p99 ms", pick("p99_ms"), 1)
        if signed is not None:
            lines.append(_signed_line(signed, group, connections))
    groups: dict[tuple[str, str, str], dict[str, float | None]] = {}
    for entry in result["bytes"]:
        groups.setdefault((entry["image"], entry["format"], entry["quality"]),
                          {})[entry["api"]] = entry["mean_bytes"]
    for (image, fmt, quality), values in groups.items():
        what = "CT 512x512" if image == "ct" else f"radiograph {xr['rendered_to']}"
        q = f"quality {quality}"
        if quality == "default":
            q = "default quality (" + ("portal 85, Orthanc 90)" if fmt == "jpeg" else "85)")
        row(f"d) {what} {fmt.upper()}, {q}", "bytes", values, 0)
    if files:
        lines.append(f"f) your files: {files['files']} image(s) stored in every server, "
                     f"{files['rendered_by_all']} rendered by every API; per file, one at a "
                     "time (median ms):")

        def medians(stats: dict[str, Any]) -> dict[str, float | None]:
            return {api: (v or {}).get("median_ms") for api, v in stats.items()}

        row("f) first view (server's default window, JPEG q90)", "p50 ms",
            medians(files["first_view"]), 1)
        row("f) the same URL again", "p50 ms", medians(files["repeat_view"]), 1)
        for syntax, stats in files["first_view_by_transfer_syntax"].items():
            count = max((v or {}).get("files", 0) for v in stats.values())
            row(f"f) first view, {syntax} ({count} file(s))", "p50 ms", medians(stats), 1)
        for failure in files["portal_only_failures"]:
            lines.append(f"FAILED f portal: {failure['path']}: {failure['why']}")
        for failure in files["other_failures"]:
            lines.append(f"note f {failure['api']}: {failure['path']}: {failure['why']}")
        for skipped in cfg.get("files", {}).get("left_out", [])[:20]:
            lines.append(f"left out: {skipped}")
    memory = result.get("memory") or {}
    full = memory.get("full_caches")
    if full and full.get("error"):
        lines.append(f"FAILED m: {full['error']}")
    elif full:
        lines.append(
            f"m) peak resident memory (VmHWM, reset after the uploads) with the caches full "
            f"(render cache {full['render_cache_filled_mb']:.0f} MB sent per worker's "
            f"{full['render_cache_cap_mb']} MB cap, frame caches "
            f"{full['frame_cache_filled_mb']:.0f} MB sent per process's "
            f"{full['frame_cache_cap_mb']} MB): web workers "
            + ", ".join(f"{v:.0f}" for v in full["web_worker_peaks_mb"])
            + " MB; render processes "
            + ", ".join(f"{v:.0f}" for v in full["render_process_peaks_mb"])
            + f" MB (goal: web worker <= 300 MB: "
            f"{'met' if max(full['web_worker_peaks_mb'], default=0) <= 300 else 'NOT met'}); "
            "before, during the STOW-RS uploads of the set-up: web workers "
            + ", ".join(f"{v:.0f}" for v in full.get("ingest_web_worker_peaks_mb", []))
            + " MB")
    if memory.get("error"):
        lines.append(f"FAILED e: {memory['error']}")
    elif "portal_web_worker_peak_mb" in memory:
        lines.append(
            "e) peak resident memory (VmHWM, reset first) while rendering the radiograph at "
            "full size: "
            f"portal web worker {_fmt(memory['portal_web_worker_peak_mb'], 0)} MB, portal "
            f"render process {_fmt(memory['portal_render_process_peak_mb'], 0)} MB, Orthanc "
            f"{_fmt(memory['orthanc_peak_mb'], 0)} MB (one process)")
    lines.append("ratio = portal / Orthanc: for req/s above 1 means the portal is faster; for "
                 "ms and bytes above 1 means the portal is slower / larger.")
    for failure in result["failures"]:
        what = failure.get("error") or failure.get("note")
        lines.append(f"FAILED {failure.get('scenario', 'd')} {failure['api']}: {what}")
    lines.append("varied: " + "; ".join(f"{k}) {v}" for k, v in cfg["varied"].items()))
    for name, settings in cfg["settings"].items():
        lines.append(f"{name}: " + ", ".join(f"{k}={v}" for k, v in settings.items()))
    lines.append(f"portal code: {cfg['portal_code']}")
    return "\n".join(lines)


def _connections(text: str) -> list[int]:
    values = [int(x) for x in text.split(",") if x.strip()]
    if not values or min(values) < 1 or max(values) > 256:
        raise argparse.ArgumentTypeError("connections are 1..256, comma separated")
    return values


def _size(text: str) -> tuple[int, int]:
    cols, _, rows = text.lower().partition("x")
    size = (int(cols), int(rows))
    if min(size) < 64 or size[0] * size[1] > 50_000_000:
        raise argparse.ArgumentTypeError("WIDTHxHEIGHT, each at least 64, at most 50 Mpixel")
    return size


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0,
                        help="measured duration of each cell (default 10)")
    parser.add_argument("--warmup", type=float, default=2.0,
                        help="unmeasured load before the first cell of each scenario and API")
    parser.add_argument("--connections", type=_connections, default=[1, 8],
                        help="keep-alive connections for a) and b) (default 1,8)")
    parser.add_argument("--slices", type=int, default=150, help="CT slices cycled over in a)")
    parser.add_argument("--xr", type=_size, default=(2500, 3000),
                        help="radiograph WIDTHxHEIGHT (default 2500x3000)")
    parser.add_argument("--scenarios", type=lambda s: s.split(","), default=None,
                        help="comma-separated subset of a,b,c,d,e,f,g,m (g: MR cold, m: "
                             "memory with full caches; default a-e, or f "
                             "with --files)")
    parser.add_argument("--apis", type=lambda s: s.split(","), default=list(APIS),
                        help=f"comma-separated subset of {','.join(APIS)}")
    parser.add_argument("--client", choices=("auto", "wrk", "python"), default="auto",
                        help="load generator (auto: wrk when installed)")
    parser.add_argument("--portal-env", action="append", default=[], metavar="KEY=VALUE",
                        help="extra environment for the portal, e.g. "
                             "PORTAL_RENDER_ISOLATION=0 (repeatable)")
    parser.add_argument("--files", type=Path, nargs="+", default=[], metavar="PATH",
                        help="your own DICOM files or directories (recursive) for f); "
                             "alone, only f) runs unless --scenarios says otherwise")
    parser.add_argument("--no-signed", action="store_true",
                        help="b) without the viewer's signed URL (issue 17)")
    parser.add_argument("--json", type=Path, help="also write the results as JSON here")
    parser.add_argument("--workdir", type=Path,
                        help="keep servers' state and logs here instead of a deleted temp dir")
    args = parser.parse_args(argv)
    if args.scenarios is None:
        args.scenarios = ["f"] if args.files else list(DEFAULT_SCENARIOS)
    if "f" in args.scenarios and not args.files:
        parser.error("scenario f needs --files PATH ...")
    if not set(args.scenarios) <= set(SCENARIOS) or not args.scenarios:
        parser.error(f"--scenarios must be a subset of {','.join(SCENARIOS)}")
    if not set(args.apis) <= set(APIS) or "portal" not in args.apis:
        parser.error(f"--apis must be a subset of {','.join(APIS)} including portal")
    if not 1 <= args.seconds <= 600 or not 0 <= args.warmup <= 60:
        parser.error("--seconds is 1..600 and --warmup 0..60")
    if args.slices < 1:
        parser.error("--slices must be at least 1")
    if any("=" not in item or not item.startswith("PORTAL_") for item in args.portal_env):
        parser.error("--portal-env takes PORTAL_KEY=VALUE")
    if args.client == "auto":
        args.client = "wrk" if WRK else "python"
    elif args.client == "wrk" and not WRK:
        parser.error("wrk is not installed (apt-get install wrk), use --client python")
    return args


def main(argv: list[str] | None = None) -> int:
    return run_main(parse_args(argv), run_benchmark, format_table)


if __name__ == "__main__":
    sys.exit(main())

