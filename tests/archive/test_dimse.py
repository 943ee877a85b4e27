"""The DIMSE SCP against real peers: DCMTK echoscu/storescu and a pynetdicom SCU.

Every server binds 127.0.0.1 on a free port and is shut down after its test. What is checked is
what a modality would see (exit codes, C-STORE statuses, A-ASSOCIATE-RJ) and what the archive
then holds (stored bytes parsed back and compared with the file that was sent).
"""

from __future__ import annotations

import functools
import io
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from flask import Flask
from pydicom.dataset import Dataset
from pydicom.tag import BaseTag, Tag
from pydicom.uid import (
    JPEG2000,
    CTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
    generate_uid,
)
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.status import code_to_category
from sqlalchemy import func, select

from portal.archive import current_archive
from portal.archive.dimse import serve
from portal.archive.ingest import Archive
from portal.archive.models import StoredObject
from portal.archive.validate import DATA_SET_DOES_NOT_MATCH
from tests.conftest import free_port, make_app, sample_paths
from tests.factories import make_dataset, to_bytes

# Debian's DCMTK; .venv/bin/storescu is pynetdicom's look-alike and must not be picked up.
STORESCU = "/usr/bin/storescu"
ECHOSCU = "/usr/bin/echoscu"
DCMCJPEG = "/usr/bin/dcmcjpeg"
DCMCJPLS = "/usr/bin/dcmcjpls"
DCMCRLE = "/usr/bin/dcmcrle"

CALLED = "PORTAL"
PEERS = ["STORESCU@127.0.0.1", "ECHOSCU@127.0.0.1"]
# Bounded network waits so a broken SCP fails the test instead of hanging it.
TIMEOUTS = ("-to", "10", "-ta", "10", "-td", "30")
CSTORE_CONFLICT = 0xC111
TRAILING_PADDING = Tag(0xFFFC, 0xFFFC)


# -- the SCP ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Scp:
    """A running SCP and the archive behind it."""

    app: Flask
    archive: Archive
    port: int
    server: Any  # pynetdicom's ThreadedAssociationServer


@pytest.fixture
def scp(tmp_path: Path) -> Iterator[Scp]:
    """The SCP on a free loopback port, accepting STORESCU and ECHOSCU from 127.0.0.1."""
    port = free_port()
    app = make_app(tmp_path / "instance", DIMSE_HOST="127.0.0.1", DIMSE_PORT=port,
                   DIMSE_AE_TITLE=CALLED, DIMSE_ALLOWED_PEERS=PEERS)
    with app.app_context():
        archive = current_archive()
    server = serve(archive, app.config["PORTAL"], block=False)
    assert server is not None
    try:
        yield Scp(app, archive, port, server)
    finally:
        server.shutdown()
        app.extensions["db"].dispose()


# -- helpers ---------------------------------------------------------------------------------

def stored_count(app: Flask) -> int:
    """Rows in the stored-object table."""
    with app.extensions["db"].new_session() as session:
        return session.scalar(select(func.count()).select_from(StoredObject)) or 0


def files_on_disk(archive: Archive) -> list[str]:
    """Object files in the store (a refused instance must leave none behind)."""
    return list(archive.store.keys())


def read_stored(archive: Archive, sop_instance_uid: str) -> Dataset:
    """The archived instance, parsed from the bytes the archive returns."""
    return pydicom.dcmread(io.BytesIO(archive.read(sop_instance_uid)))


@functools.cache
def _samples() -> dict[str, Path]:
    return {path.name: path for path in sample_paths()}


def sample(name: str) -> Path:
    """One of the pydicom / pydicom-data sample files, by file name."""
    return _samples()[name]


def storescu(port: int, files: list[Path], *options: str,
             aet: str = "STORESCU") -> subprocess.CompletedProcess[str]:
    """Run DCMTK storescu against the SCP with extra ``options``."""
    return subprocess.run(
        [STORESCU, "-v", "-aet", aet, "-aec", CALLED, *TIMEOUTS, *options,
         "127.0.0.1", str(port), *map(str, files)],
        capture_output=True, text=True, timeout=60, check=False)


def output(done: subprocess.CompletedProcess[str]) -> str:
    """Everything a DCMTK tool printed, for assertion messages."""
    return done.stdout + done.stderr


def write(ds: Dataset, path: Path) -> Path:
    """Save a data set as a Part 10 file."""
    path.write_bytes(to_bytes(ds))
    return path


def assert_same_instance(stored: Dataset, original: Dataset) -> None:
    """Same data set (every element) and the same pixel data bytes."""
    assert stored.SOPInstanceUID == original.SOPInstanceUID
    assert stored.file_meta.MediaStorageSOPInstanceUID == original.SOPInstanceUID
    assert stored.PixelData == original.PixelData
    differing = [elem.tag for elem in original
                 if _meaningful(elem.tag) and stored.get(elem.tag) != elem]
    differing += [elem.tag for elem in stored
                  if _meaningful(elem.tag) and elem.tag not in original]
    assert differing == []


def _meaningful(tag: BaseTag) -> bool:
    # Group lengths are optional and trailing padding carries nothing; DCMTK drops or
    # recomputes both when it re-encodes a data set for the wire.
    return tag.element != 0 and tag != TRAILING_PADDING


@pytest.fixture
def association(scp: Scp) -> Iterator[Association]:
    """A pynetdicom SCU association as STORESCU, for sending hand-made data sets."""
    ae = AE(ae_title="STORESCU")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", scp.port, ae_title=CALLED)
    assert assoc.is_established, "the SCP refused STORESCU@127.0.0.1"
    try:
        yield assoc
    finally:
        if assoc.is_established:
            assoc.release()


def c_store(assoc: Association, ds: Dataset) -> int:
    """Send one data set and return the C-STORE response status."""
    response = assoc.send_c_store(ds)
    # An empty response means the association was aborted or timed out: no status at all.
    assert "Status" in response, "no C-STORE response: the SCP dropped the association"
    status: int = response.Status
    return status


# -- C-ECHO ----------------------------------------------------------------------------------

def test_echoscu_verifies(scp: Scp) -> None:
    """A configured peer's C-ECHO succeeds."""
    done = subprocess.run([ECHOSCU, "-v", "-aet", "ECHOSCU", "-aec", CALLED, *TIMEOUTS,
                           "127.0.0.1", str(scp.port)],
                          capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == 0, output(done)


# -- plain transfer syntaxes -----------------------------------------------------------------

def test_storescu_stores_uncompressed_files(scp: Scp, tmp_path: Path) -> None:
    """Explicit and implicit little endian files arrive as the same data sets, unconverted."""
    explicit = make_dataset(patient_name="Explicit^Ella", value=3)
    implicit = make_dataset(patient_name="Implicit^Ivan", value=9)
    implicit.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    files = [write(explicit, tmp_path / "explicit.dcm"),
             write(implicit, tmp_path / "implicit.dcm"),
             sample("CT_small.dcm"),  # explicit VR little endian
             sample("MR_small.dcm"),  # explicit VR little endian
             sample("rtdose_1frame.dcm")]  # implicit VR little endian, 32-bit pixels
    done = storescu(scp.port, files)
    assert done.returncode == 0, output(done)
    assert stored_count(scp.app) == len(files)
    for path in files:
        original = pydicom.dcmread(path)
        stored = read_stored(scp.archive, original.SOPInstanceUID)
        # storescu uses a context with the file's own syntax when one was accepted.
        assert stored.file_meta.TransferSyntaxUID == original.file_meta.TransferSyntaxUID
        assert_same_instance(stored, original)


# -- compressed transfer syntaxes ------------------------------------------------------------

@dataclass(frozen=True)
class Compressed:
    """One compressed input and the storescu option that proposes its transfer syntax."""

    syntax: str
    propose: str
    sample: str = ""  # a shipped sample file, or
    encoder: tuple[str, ...] = ()  # a DCMTK encoder run on a generated 12-bit CT image


COMPRESSED = {
    "jpeg-baseline": Compressed(JPEGBaseline8Bit, "-xy", sample="SC_rgb_jpeg_dcmtk.dcm"),
    "jpeg-extended": Compressed(JPEGExtended12Bit, "-xx", sample="JPGExtended.dcm"),
    "jpeg-lossless": Compressed(JPEGLosslessSV1, "-xs", sample="JPEG-LL.dcm"),
    "jpeg-lossless-dcmcjpeg": Compressed(JPEGLosslessSV1, "-xs", encoder=(DCMCJPEG, "+e1")),
    "jpeg-ls-lossless": Compressed(JPEGLSLossless, "-xt",
                                   sample="MR_small_jpeg_ls_lossless.dcm"),
    "jpeg-ls-near-lossless-dcmcjpls": Compressed(JPEGLSNearLossless, "-xu",
                                                 encoder=(DCMCJPLS, "+en")),
    "jpeg2000-lossless": Compressed(JPEG2000Lossless, "-xv",
                                    sample="MR_small_jp2klossless.dcm"),
    "jpeg2000": Compressed(JPEG2000, "-xw", sample="693_J2KI.dcm"),
    "rle": Compressed(RLELossless, "-xr", sample="MR_small_RLE.dcm"),
    "rle-dcmcrle": Compressed(RLELossless, "-xr", encoder=(DCMCRLE,)),
}


def compressed_file(case: Compressed, tmp_path: Path) -> Path:
    """The file to send: a sample, or a fresh CT image encoded by a DCMTK tool."""
    if case.sample:
        return sample(case.sample)
    source = write(make_dataset(rows=64, columns=64, value=100), tmp_path / "source.dcm")
    target = tmp_path / "compressed.dcm"
    done = subprocess.run([*case.encoder, str(source), str(target)],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, output(done)
    return target


@pytest.mark.parametrize("case", COMPRESSED.values(), ids=COMPRESSED.keys())
def test_storescu_keeps_compressed_transfer_syntax(scp: Scp, tmp_path: Path,
                                                   case: Compressed) -> None:
    """Compressed pixel data is stored as sent: same syntax, same decoded pixels."""
    path = compressed_file(case, tmp_path)
    original = pydicom.dcmread(path)
    assert original.file_meta.TransferSyntaxUID == case.syntax  # the input is what we think
    # -R: only the file's SOP class; the -x option adds its syntax (default is uncompressed
    # only, and storescu would then try to decompress and fail or send converted data).
    done = storescu(scp.port, [path], "-R", case.propose)
    assert done.returncode == 0, output(done)
    assert stored_count(scp.app) == 1
    stored = read_stored(scp.archive, original.SOPInstanceUID)
    assert stored.file_meta.TransferSyntaxUID == case.syntax
    assert stored.SOPInstanceUID == original.SOPInstanceUID
    assert np.array_equal(stored.pixel_array, original.pixel_array)
    # The compressed bitstream itself is passed through, not re-encoded.
    assert stored.PixelData == original.PixelData


# -- who may associate -----------------------------------------------------------------------

def test_unknown_calling_ae_title_is_rejected(scp: Scp) -> None:
    """An AE title that is not configured gets A-ASSOCIATE-RJ and stores nothing."""
    done = storescu(scp.port, [sample("CT_small.dcm")], aet="INTRUDER")
    assert done.returncode != 0
    text = output(done)
    assert "Association Rejected" in text, text
    assert "Calling AE Title Not Recognized" in text, text
    assert stored_count(scp.app) == 0
    assert files_on_disk(scp.archive) == []


def test_configured_title_from_another_address_is_rejected(scp: Scp) -> None:
    """STORESCU is allowed from 127.0.0.1 only: the same title from 127.0.0.2 is refused."""
    ae = AE(ae_title="STORESCU")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", scp.port, ae_title=CALLED,
                         bind_address=("127.0.0.2", 0))
    try:
        assert not assoc.is_established
        assert assoc.is_rejected
    finally:
        if assoc.is_established:
            assoc.release()
    assert stored_count(scp.app) == 0


# -- refused instances -----------------------------------------------------------------------

def _without_study() -> Dataset:
    ds = make_dataset()
    del ds.StudyInstanceUID
    return ds


def _pixel_bomb() -> Dataset:
    # Declared 65535 x 65535 x 16 bits (8 GiB) but only 10 bytes sent: must be refused
    # from the header alone, before anything is allocated.
    ds = make_dataset()
    ds.Rows = ds.Columns = 65535
    ds.PixelData = bytes(10)
    return ds


def _short_pixels() -> Dataset:
    ds = make_dataset()
    ds.Rows = ds.Columns = 100
    ds.PixelData = bytes(10)
    return ds


BAD = {
    "no-study-uid": (_without_study, DATA_SET_DOES_NOT_MATCH),
    "65535x65535-with-10-bytes": (_pixel_bomb, DATA_SET_DOES_NOT_MATCH),
    "100x100-with-10-bytes": (_short_pixels, DATA_SET_DOES_NOT_MATCH),
}


@pytest.mark.parametrize("bad", BAD.values(), ids=BAD.keys())
def test_bad_instance_is_refused_and_the_association_keeps_working(
        scp: Scp, association: Association,
        bad: tuple[Callable[[], Dataset], int]) -> None:
    """A refused instance gets a failure status, leaves nothing behind, and the SCP goes on."""
    build, expected = bad
    status = c_store(association, build())
    assert code_to_category(status) == "Failure", hex(status)
    assert status == expected, hex(status)
    assert stored_count(scp.app) == 0
    assert files_on_disk(scp.archive) == []
    good = make_dataset()
    assert c_store(association, good) == 0x0000
    assert stored_count(scp.app) == 1
    assert_same_instance(read_stored(scp.archive, good.SOPInstanceUID), good)


# -- the same SOP Instance UID again ---------------------------------------------------------

def test_identical_resend_succeeds_once_stored(scp: Scp, association: Association) -> None:
    """A modality retrying an instance it already sent is told success; one copy is kept."""
    ds = make_dataset()
    assert c_store(association, ds) == 0x0000
    first = scp.archive.read(ds.SOPInstanceUID)
    assert c_store(association, ds) == 0x0000
    assert stored_count(scp.app) == 1
    assert len(files_on_disk(scp.archive)) == 1
    assert scp.archive.read(ds.SOPInstanceUID) == first


def test_same_uid_with_other_pixels_is_a_conflict(scp: Scp, association: Association) -> None:
    """Different content under a stored SOP Instance UID is refused; the original stays."""
    study, series, sop = generate_uid(), generate_uid(), generate_uid()
    original = make_dataset(study=study, series=series, sop=sop, value=0)
    assert c_store(association, original) == 0x0000
    before = scp.archive.read(sop)
    changed = make_dataset(study=study, series=series, sop=sop, value=1)
    assert changed.PixelData != original.PixelData
    assert c_store(association, changed) == CSTORE_CONFLICT
    assert stored_count(scp.app) == 1
    assert len(files_on_disk(scp.archive)) == 1
    assert scp.archive.read(sop) == before
    assert read_stored(scp.archive, sop).PixelData == original.PixelData
    # The SCP still serves this association after the conflict.
    assert c_store(association, make_dataset(study=study, series=series)) == 0x0000


# -- transport -------------------------------------------------------------------------------

def test_the_scp_turns_nagle_off_on_each_association(scp: Scp) -> None:
    """Issue 17: TCP_NODELAY on every accepted association's socket, so a C-STORE-RSP (one
    small PDU) is never held back for the peer's delayed ACK, up to 40 ms an instance with a
    synchronous SCU such as storescu."""
    import socket

    ae = AE(ae_title="STORESCU")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", scp.port, ae_title=CALLED)
    assert assoc.is_established
    try:
        [accepted] = scp.server.active_associations
        assert accepted.dul.socket is not None and accepted.dul.socket.socket is not None
        assert accepted.dul.socket.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        assert c_store(assoc, make_dataset()) == 0x0000
    finally:
        assoc.release()
