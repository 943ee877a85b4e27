"""The same instance re-sent is not an attack (issue 18 item 3), with the real senders: DCMTK
storescu (files transcoded by DCMTK dcmconv, dcmcjpls, dcmcrle, dcmcjpeg) and dicomweb-client
STOW-RS over real HTTP, into one portal whose C-STORE SCP and web server bind 127.0.0.1.

PS3.5 10: a lossless change of transfer syntax (or another File Meta) is the same instance:
"already stored", success, one copy kept, no alert. Different content under the same SOP
Instance UID (other pixels, a lossy transcode) is still refused with 0xC111 and an alert.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from flask import Flask
from pydicom.dataset import Dataset
from pydicom.uid import (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from sqlalchemy import select

from portal.access.models import AuditEvent
from portal.archive import current_archive
from portal.archive.dimse import serve
from portal.archive.ingest import Archive
from tests.archive.test_dimse import (
    CALLED,
    DCMCJPEG,
    DCMCJPLS,
    DCMCRLE,
    PEERS,
    files_on_disk,
    output,
    stored_count,
    storescu,
    write,
)
from tests.conftest import LiveServer, close_app, free_port, make_app, make_client
from tests.factories import make_dataset

DCMCONV = "/usr/bin/dcmconv"


@dataclass(frozen=True)
class Portal:
    """One portal with its SCP and its web server running."""

    app: Flask
    archive: Archive
    port: int
    web: DICOMwebClient


@pytest.fixture
def portal(tmp_path: Path) -> Iterator[Portal]:
    """The C-STORE SCP (STORESCU from 127.0.0.1 allowed) and STOW-RS over HTTP, one archive."""
    port = free_port()
    app = make_app(tmp_path / "instance", DIMSE_HOST="127.0.0.1", DIMSE_PORT=port,
                   DIMSE_AE_TITLE=CALLED, DIMSE_ALLOWED_PEERS=PEERS)
    with app.app_context():
        archive = current_archive()
    server = serve(archive, app.config["PORTAL"], block=False)
    assert server is not None
    http = requests.Session()
    http.auth = make_client(app, "modality-web")
    try:
        with LiveServer(app) as web:
            yield Portal(app, archive, port,
                         DICOMwebClient(url=f"{web.url}/dicomweb", session=http))
    finally:
        server.shutdown()
        http.close()
        close_app(app)


def transcode(tool: tuple[str, ...], source: Path, target: Path) -> Path:
    """Run a DCMTK converter; the target file."""
    done = subprocess.run([*tool, str(source), str(target)], capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == 0, output(done)
    return target


def sent(done: subprocess.CompletedProcess[str]) -> str:
    """The C-STORE status storescu reports for its (single) file."""
    text = output(done)
    line = next((x for x in text.splitlines() if "Received Store Response" in x), "")
    return line.split("Received Store Response", 1)[1].strip() if line else text


def alerts(app: Flask) -> list[AuditEvent]:
    """Every security alert recorded so far."""
    with app.extensions["db"].new_session() as session:
        return list(session.scalars(select(AuditEvent).where(AuditEvent.event_id == "110113")))


def original(tmp_path: Path) -> tuple[Dataset, Path]:
    """A 12-bit CT image in explicit VR little endian, as a modality first sends it."""
    ds = make_dataset(rows=64, columns=64, value=100)
    return ds, write(ds, tmp_path / "native.dcm")


# (converter, storescu option that proposes the result's transfer syntax, the syntax)
LOSSLESS = {
    "implicit-vr": ((DCMCONV, "+ti"), "-xi", ImplicitVRLittleEndian),
    "jpeg-ls-lossless": ((DCMCJPLS,), "-xt", JPEGLSLossless),
    "rle": ((DCMCRLE,), "-xr", RLELossless),
    "jpeg-lossless": ((DCMCJPEG, "+e1"), "-xs", JPEGLosslessSV1),
}


def test_the_same_instance_in_other_transfer_syntaxes_is_already_stored(
        portal: Portal, tmp_path: Path) -> None:
    """storescu sends an instance, then the same instance losslessly transcoded four ways:
    every C-STORE succeeds, the first copy is the one kept, and nobody is alerted."""
    ds, native = original(tmp_path)
    done = storescu(portal.port, [native], "-R")
    assert done.returncode == 0 and sent(done).startswith("(Success)"), output(done)
    first = portal.archive.read(ds.SOPInstanceUID)
    for name, (tool, propose, syntax) in LOSSLESS.items():
        again = transcode(tool, native, tmp_path / f"{name}.dcm")
        assert pydicom.dcmread(again).file_meta.TransferSyntaxUID == syntax
        done = storescu(portal.port, [again], "-R", propose)
        assert done.returncode == 0 and sent(done).startswith("(Success)"), (name, output(done))
    assert stored_count(portal.app) == 1 and len(files_on_disk(portal.archive)) == 1
    assert portal.archive.read(ds.SOPInstanceUID) == first
    assert alerts(portal.app) == []


def test_stow_rs_then_c_store_of_the_same_instance_succeeds(portal: Portal,
                                                           tmp_path: Path) -> None:
    """An instance stored with dicomweb-client and then C-STOREd (as a C-MOVE from the PACS
    would deliver it, with the SCP's own File Meta) is the same instance; so is a second
    STOW-RS of it after the C-STORE, in another transfer syntax."""
    ds, native = original(tmp_path)
    portal.web.store_instances([ds])
    first = portal.archive.read(ds.SOPInstanceUID)
    done = storescu(portal.port, [native], "-R")
    assert done.returncode == 0 and sent(done).startswith("(Success)"), output(done)
    implicit = pydicom.dcmread(transcode((DCMCONV, "+ti"), native, tmp_path / "implicit.dcm"))
    answer = portal.web.store_instances([implicit])
    assert "FailedSOPSequence" not in answer
    assert stored_count(portal.app) == 1 and portal.archive.read(ds.SOPInstanceUID) == first
    assert alerts(portal.app) == []


def test_different_content_under_the_same_uid_is_still_a_conflict(
        portal: Portal, tmp_path: Path) -> None:
    """Other pixels, or the same pixels after a lossy (near-lossless JPEG-LS) transcode that
    kept the UID, are refused with 0xC111 and a security alert; the first copy stays."""
    ds, native = original(tmp_path)
    assert storescu(portal.port, [native], "-R").returncode == 0
    first = portal.archive.read(ds.SOPInstanceUID)
    other = make_dataset(study=ds.StudyInstanceUID, series=ds.SeriesInstanceUID,
                         sop=ds.SOPInstanceUID, rows=64, columns=64, value=101)
    lossy = transcode((DCMCJPLS, "+en", "+un"), native, tmp_path / "lossy.dcm")
    assert pydicom.dcmread(lossy).file_meta.TransferSyntaxUID == JPEGLSNearLossless
    assert pydicom.dcmread(lossy).SOPInstanceUID == ds.SOPInstanceUID
    for path, propose in ((write(other, tmp_path / "other.dcm"), ()), (lossy, ("-xu",))):
        # -d: the response's status code itself (-v names only its class).
        done = storescu(portal.port, [path], "-R", "-d", *propose)
        assert done.returncode != 0, output(done)
        assert "dimse status                  : 0xc111" in output(done).lower(), output(done)
    assert portal.archive.read(ds.SOPInstanceUID) == first
    assert stored_count(portal.app) == 1 and len(files_on_disk(portal.archive)) == 1
    reasons = [a.details.get("reason") for a in alerts(portal.app)]
    assert reasons == ["SOP Instance UID already stored with different content"] * 2
    assert all(a.details.get("sop_instance_uid") == ds.SOPInstanceUID
               for a in alerts(portal.app))
    # The explicit VR original itself (another File Meta) is still the same instance.
    assert ExplicitVRLittleEndian == pydicom.dcmread(native).file_meta.TransferSyntaxUID
