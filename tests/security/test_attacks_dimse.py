"""DIMSE SCP attacks (issue 12 item 4, docs/security.md 47): a peer that is allowed to call the
portal names another AE title as the one it calls. The SCP must answer A-ASSOCIATE-RJ
(rejected-permanent, service-user, reason 7 "called AE title not recognized") and store
nothing, over DCMTK's echoscu and storescu and a pynetdicom SCU."""

from __future__ import annotations

import subprocess
from pathlib import Path

from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
from pynetdicom import AE, evt

from tests.archive.test_dimse import (  # noqa: F401 (the fixture)
    CALLED,
    ECHOSCU,
    STORESCU,
    TIMEOUTS,
    Scp,
    files_on_disk,
    output,
    scp,
    stored_count,
)
from tests.factories import make_dataset, to_bytes

WRONG = "NOTPORTAL"


def _run(tool: str, aet: str, called: str, port: int, *files: Path
         ) -> subprocess.CompletedProcess[str]:
    """Run a DCMTK tool as ``aet`` calling ``called``."""
    return subprocess.run([tool, "-v", "-aet", aet, "-aec", called, *TIMEOUTS, "127.0.0.1",
                           str(port), *map(str, files)],
                          capture_output=True, text=True, timeout=60, check=False)


def test_echoscu_calling_another_title_is_rejected(scp: Scp) -> None:  # noqa: F811
    """An allowed caller (ECHOSCU from 127.0.0.1) that calls NOTPORTAL: reason 7."""
    done = _run(ECHOSCU, "ECHOSCU", WRONG, scp.port)
    text = output(done)
    assert done.returncode != 0, text
    assert "Association Rejected" in text, text
    assert "Result: Rejected Permanent" in text, text
    assert "Source: Service User" in text, text
    assert "Called AE Title Not Recognized" in text, text
    # The same caller with the right called title still works.
    assert _run(ECHOSCU, "ECHOSCU", CALLED, scp.port).returncode == 0


def test_storescu_calling_another_title_stores_nothing(scp: Scp, tmp_path: Path) -> None:  # noqa: F811
    """C-STORE through an association to NOTPORTAL: refused before any data set arrives."""
    file = tmp_path / "ct.dcm"
    file.write_bytes(to_bytes(make_dataset()))
    done = _run(STORESCU, "STORESCU", WRONG, scp.port, file)
    text = output(done)
    assert done.returncode != 0, text
    assert "Called AE Title Not Recognized" in text, text
    assert stored_count(scp.app) == 0
    assert files_on_disk(scp.archive) == []


def test_pynetdicom_sees_the_standard_rejection(scp: Scp) -> None:  # noqa: F811
    """The A-ASSOCIATE-RJ fields themselves: result 1, source 1, reason 7."""
    ae = AE(ae_title="STORESCU")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    rejections: list[tuple[int, int, int]] = []

    def on_rejected(event: object) -> None:
        primitive = event.assoc.acceptor.primitive  # type: ignore[attr-defined]
        rejections.append((primitive.result, primitive.result_source, primitive.diagnostic))

    assoc = ae.associate("127.0.0.1", scp.port, ae_title=WRONG,
                         evt_handlers=[(evt.EVT_REJECTED, on_rejected)])
    try:
        assert assoc.is_rejected and not assoc.is_established
    finally:
        if assoc.is_established:
            assoc.release()
    assert rejections == [(0x01, 0x01, 0x07)]
    assert stored_count(scp.app) == 0
