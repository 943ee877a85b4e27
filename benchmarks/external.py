"""The portal in front of an external archive (Orthanc over DICOMweb): first image and sync.

Starts a throwaway Orthanc (tests/support/orthanc.py: loopback only, authentication on) and
the portal over real HTTP (werkzeug, threaded, in this process, on 127.0.0.1) with
``PORTAL_ARCHIVE_URL`` pointing at Orthanc's DICOMweb root, and measures

* ``first image, cold``    ``/rendered`` of an instance only in Orthanc: WADO-RS fetch,
  validation, durable write, hash check, render, JPEG (each sample a different instance);
* ``copy cached``          the same instance again in another rendition (a new viewport), so
  the local copy is used and only the render runs;
* ``fully cached``         the same request again (the render cache answers);
* ``sync``                 a full index sync of N single-instance studies (default 1,000,
  small synthetic 16x16 CT instances, so the QIDO-RS paging and WADO-RS metadata dominate).

    .venv/bin/python benchmarks/external.py [--studies 1000] [--slices 40] [--samples 10]
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import requests
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from werkzeug.serving import WSGIRequestHandler, make_server

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from demo.studies import write_ct_series  # noqa: E402
from portal import create_app  # noqa: E402
from portal.access import clients  # noqa: E402
from portal.archive import current_archive  # noqa: E402
from portal.archive.sync import sync_index  # noqa: E402
from portal.migrate import upgrade_database  # noqa: E402
from tests.support.orthanc import start_orthanc  # noqa: E402

USER, PASSWORD = "portal", "benchmark-archive-password-123"


def small_instance(index: int) -> bytes:
    """A 16x16 CT instance in a study of its own (sync benchmark)."""
    ds = Dataset()
    sop = generate_uid()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = sop
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, sop
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientID, ds.PatientName = f"BENCH{index % 97}", "Bench^Patient"
    ds.StudyDate, ds.Modality, ds.InstanceNumber = "20240105", "CT", 1
    ds.Rows = ds.Columns = 16
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
    ds.PixelRepresentation, ds.SamplesPerPixel = 0, 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = np.full((16, 16), index % 4096, dtype=np.uint16).tobytes()
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def upload_many(url: str, auth: tuple[str, str], payloads: list[bytes]) -> None:
    """POST instances to Orthanc's REST API from a few threads."""
    session = requests.Session()
    session.auth = auth
    lock = threading.Lock()
    queue = list(payloads)

    def work() -> None:
        local = requests.Session()
        local.auth = auth
        while True:
            with lock:
                if not queue:
                    return
                data = queue.pop()
            local.post(url + "/instances", data=data, timeout=60).raise_for_status()

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


class _QuietHandler(WSGIRequestHandler):
    def log_request(self, *args: Any, **kwargs: Any) -> None:
        pass


def portal_app(instance: Path, orthanc_url: str) -> Any:
    app = create_app({"INSTANCE_PATH": str(instance), "ENV": "test",
                      "SECRET_KEY": "benchmark-secret-key-long-enough-1234567",
                      "ARCHIVE_URL": orthanc_url, "ARCHIVE_USERNAME": USER,
                      "ARCHIVE_PASSWORD": PASSWORD})
    upgrade_database(app)
    return app


def ms(values: list[float]) -> str:
    return (f"median {statistics.median(values) * 1000:7.1f} ms   "
            f"min {min(values) * 1000:7.1f}   max {max(values) * 1000:7.1f}   n={len(values)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--studies", type=int, default=1000)
    parser.add_argument("--slices", type=int, default=40)
    parser.add_argument("--samples", type=int, default=10)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-external-") as tmp:
        work = Path(tmp)
        orthanc = start_orthanc(work / "orthanc",
                                extra_config={"RegisteredUsers": {USER: PASSWORD}})
        try:
            # -- first image -------------------------------------------------------------
            files = write_ct_series(work / "ct", slices=args.slices, size=512,
                                    uid_seed="bench-external")
            upload_many(orthanc.url, orthanc.auth, [p.read_bytes() for p in files])
            app = portal_app(work / "instance", orthanc.dicomweb_url)
            with app.app_context():
                archive = current_archive()
                assert archive.remote is not None
                sync_index(archive, archive.remote.client, full=True)
            database = app.extensions["db"]
            with database.new_session() as session:
                secret = clients.create_client(session, "bench", can_read=True,
                                               can_store=False)
                session.commit()
            server = make_server("127.0.0.1", 0, app, threaded=True,
                                 request_handler=_QuietHandler)
            threading.Thread(target=server.serve_forever, daemon=True).start()
            base = f"http://127.0.0.1:{server.server_port}/dicomweb"
            http = requests.Session()
            http.auth = ("bench", secret)
            studies = http.get(f"{base}/studies", timeout=30).json()
            study = studies[0]["0020000D"]["Value"][0]
            instances = http.get(f"{base}/studies/{study}/instances", timeout=30).json()
            urls = [f"{base}/studies/{study}/series/{i['0020000E']['Value'][0]}/instances/"
                    f"{i['00080018']['Value'][0]}/rendered" for i in instances]
            # Warm the series' shared window (its middle image) first, as the study page's
            # thumbnail does, so each sample below fetches exactly one instance.
            http.get(f"{base}/studies/{study}/thumbnail", timeout=60).raise_for_status()
            cold, copy_cached, cached = [], [], []
            for url in urls[:args.samples]:
                for bucket, params in ((cold, {}), (copy_cached, {"viewport": "256,256"}),
                                       (cached, {"viewport": "256,256"})):
                    started = time.perf_counter()
                    answer = http.get(url, params=params, headers={"Accept": "image/jpeg"},
                                      timeout=60)
                    bucket.append(time.perf_counter() - started)
                    assert answer.status_code == 200 and answer.content[:3] == b"\xff\xd8\xff"
            server.shutdown()
            pool = app.extensions.get("render_pool")
            if pool is not None:
                pool.close()
            database.dispose()
            print(f"first image of a 512x512 CT slice only in Orthanc ({args.slices} slices):")
            print(f"  cold (WADO-RS fetch + render)  {ms(cold)}")
            print(f"  copy cached (render only)      {ms(copy_cached)}")
            print(f"  fully cached (render cache)    {ms(cached)}")

            # -- sync throughput ---------------------------------------------------------
            started = time.perf_counter()
            upload_many(orthanc.url, orthanc.auth,
                        [small_instance(i) for i in range(args.studies)])
            print(f"loaded {args.studies} studies into Orthanc in "
                  f"{time.perf_counter() - started:.1f} s")
            app = portal_app(work / "instance-sync", orthanc.dicomweb_url)
            with app.app_context():
                archive = current_archive()
                assert archive.remote is not None
                started = time.perf_counter()
                report = sync_index(archive, archive.remote.client, full=True, page_size=100)
                elapsed = time.perf_counter() - started
                again = time.perf_counter()
                second = sync_index(archive, archive.remote.client, full=True, page_size=100)
                nothing_new = time.perf_counter() - again
            app.extensions["db"].dispose()
            total = args.studies + 1
            assert report.studies_synced == total and second.instances_added == 0
            print(f"sync of {total} studies ({report.instances_added} instances, "
                  f"{report.pages} QIDO-RS pages): {elapsed:.1f} s = "
                  f"{total / elapsed:.0f} studies/s")
            print(f"re-sync with nothing new: {nothing_new:.2f} s = "
                  f"{total / nothing_new:.0f} studies/s checked")
        finally:
            orthanc.stop()


if __name__ == "__main__":
    main()
