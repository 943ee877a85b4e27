"""Pull from a DIMSE archive without DICOMweb: C-FIND (PS3.4 C.4.1) at study, series and image
level, and C-MOVE (C.4.2) of studies or series to our own C-STORE SCP, through pynetdicom.

The peer is ``ARCHIVE_DIMSE_PEER`` (``AETITLE@host:port``). It must know our SCP
(``DIMSE_AE_TITLE`` at our address) as a move destination, and our SCP must accept it as a
caller (``DIMSE_ALLOWED_PEERS``). Instances arrive through the SCP, so they pass the same
validation and durability as any C-STORE, and are stored like ingested ones (not evicted).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelMove,
)

from portal.archive.store import ArchiveUnavailable

log = logging.getLogger(__name__)

Level = Literal["STUDY", "SERIES", "IMAGE"]

# Return keys asked for at each level (empty values: "send me this attribute").
RETURN_KEYS: dict[str, tuple[str, ...]] = {
    "STUDY": ("StudyInstanceUID", "PatientID", "PatientName", "StudyDate", "AccessionNumber",
              "StudyDescription", "ModalitiesInStudy", "NumberOfStudyRelatedInstances"),
    "SERIES": ("StudyInstanceUID", "SeriesInstanceUID", "Modality", "SeriesNumber",
               "SeriesDescription", "NumberOfSeriesRelatedInstances"),
    "IMAGE": ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID",
              "InstanceNumber"),
}
_PENDING = frozenset({0xFF00, 0xFF01})


@dataclass(frozen=True)
class DimsePeer:
    """The archive's application entity."""

    ae_title: str
    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> DimsePeer:
        """``AETITLE@host:port`` (validated at start-up by the configuration)."""
        aet, _, address = text.partition("@")
        host, _, port = address.rpartition(":")
        return cls(aet.strip(), host.strip(), int(port))


@dataclass(frozen=True)
class MoveResult:
    """The final counts of a C-MOVE (PS3.4 C.4.2.1.4)."""

    status: int
    completed: int
    failed: int
    warning: int

    @property
    def ok(self) -> bool:
        """Every sub-operation succeeded."""
        return self.status == 0x0000 and self.failed == 0


def _peer(settings: Mapping[str, Any]) -> DimsePeer:
    if not settings["ARCHIVE_DIMSE_PEER"]:
        raise ArchiveUnavailable("no DIMSE archive is configured (ARCHIVE_DIMSE_PEER)")
    return DimsePeer.parse(settings["ARCHIVE_DIMSE_PEER"])


@contextmanager
def _association(settings: Mapping[str, Any], context: str) -> Iterator[Association]:
    """An association with the peer for one service, released afterwards."""
    peer = _peer(settings)
    timeout = settings["ARCHIVE_DIMSE_TIMEOUT_SECONDS"]
    ae = AE(ae_title=settings["DIMSE_AE_TITLE"])
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.connection_timeout = min(timeout, 10)
    ae.add_requested_context(context)
    assoc = ae.associate(peer.host, peer.port, ae_title=peer.ae_title)
    if not assoc.is_established:
        raise ArchiveUnavailable(f"the DIMSE archive {peer.ae_title} refused or did not answer")
    try:
        yield assoc
    finally:
        if assoc.is_established:
            assoc.release()


def find(settings: Mapping[str, Any], level: Level,
         query: Mapping[str, str] | None = None) -> list[Dataset]:
    """C-FIND at ``level`` with matching keys ``query`` (DICOM keywords); the matches."""
    identifier = Dataset()
    identifier.QueryRetrieveLevel = level
    for keyword in RETURN_KEYS[level]:
        setattr(identifier, keyword, "")
    for keyword, value in (query or {}).items():
        setattr(identifier, keyword, value)
    matches: list[Dataset] = []
    with _association(settings, StudyRootQueryRetrieveInformationModelFind) as assoc:
        for status, found in assoc.send_c_find(identifier,
                                               StudyRootQueryRetrieveInformationModelFind):
            code = getattr(status, "Status", None)
            if code is None:
                raise ArchiveUnavailable("the DIMSE archive stopped answering the query")
            if code in _PENDING and found is not None:
                matches.append(found)
            elif code != 0x0000:
                raise ArchiveUnavailable(f"the DIMSE archive failed the query (0x{code:04X})")
    return matches


def move(settings: Mapping[str, Any], study_uid: str,
         series_uid: str | None = None) -> MoveResult:
    """C-MOVE a study (or one series) to our SCP; the final status and counts."""
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "SERIES" if series_uid else "STUDY"
    identifier.StudyInstanceUID = study_uid
    if series_uid:
        identifier.SeriesInstanceUID = series_uid
    final: Dataset | None = None
    with _association(settings, StudyRootQueryRetrieveInformationModelMove) as assoc:
        for status, _identifier in assoc.send_c_move(
                identifier, settings["DIMSE_AE_TITLE"],
                StudyRootQueryRetrieveInformationModelMove):
            if getattr(status, "Status", None) is None:
                raise ArchiveUnavailable("the DIMSE archive stopped answering the move")
            final = status
    assert final is not None
    result = MoveResult(status=int(final.Status),
                        completed=int(final.get("NumberOfCompletedSuboperations", 0) or 0),
                        failed=int(final.get("NumberOfFailedSuboperations", 0) or 0),
                        warning=int(final.get("NumberOfWarningSuboperations", 0) or 0))
    log.info("C-MOVE of a %s: status 0x%04X, %d completed, %d failed",
             identifier.QueryRetrieveLevel.lower(), result.status, result.completed,
             result.failed)
    return result
