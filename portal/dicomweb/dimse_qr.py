"""DIMSE Query/Retrieve SCP (C-FIND, C-MOVE, C-GET) and Storage Commitment Push Model SCP.

The DIMSE face of the same search as QIDO-RS, so it lives beside ``qido.py`` (the archive
never imports dicomweb): ``create_app`` registers ``offer`` with the archive's SCP
(``archive/dimse.py``), as it registers the after-ingest steps of the rooms above the archive.
Same AE title, same association policy: only ``DIMSE_ALLOWED_PEERS`` may associate. What a
query or retrieve sees is decided exactly as for QIDO-RS: the identifier becomes QIDO query
parameters for ``qido.parse_query`` and ``qido.build_select`` (one matcher for both faces)
and the rows are limited by ``access.policy`` for the principal the calling AE title maps to
in ``DIMSE_QUERY_CLIENTS`` (a machine client, or ``user:<e-mail>`` for a person's desktop
viewer). A calling AE title that is not mapped, or maps to a client without
the read right, may still store but gets failure 0xC000 with an error comment for C-FIND,
C-MOVE and C-GET (closed by default, docs/security.md 9: a denied object is like a missing
one). C-MOVE sends only to ``DIMSE_MOVE_DESTINATIONS``. Conformance: docs/conformance/dimse.md.
"""

from __future__ import annotations

import io
import logging
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pydicom
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, build_context, build_role, evt
from pynetdicom.association import Association
from pynetdicom.presentation import PresentationContext
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    PatientRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove,
    StorageCommitmentPushModel,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)
from sqlalchemy import select
from sqlalchemy.orm import Session
from sqlalchemy.sql.elements import ColumnElement

from portal import audit
from portal.access import policy
from portal.access.models import MachineClient, User
from portal.access.principal import Principal, user_principal
from portal.archive.ingest import Archive
from portal.archive.models import StoredObject
from portal.dicomweb import qido
from portal.index.models import Instance, Patient, Study

log = logging.getLogger(__name__)

# The well-known SOP Instance of the Storage Commitment Push Model (PS3.4 J.3.5).
COMMITMENT_INSTANCE = UID("1.2.840.10008.1.20.1.1")
FIND_MODELS: dict[str, str] = {
    PatientRootQueryRetrieveInformationModelFind: "PATIENT",
    StudyRootQueryRetrieveInformationModelFind: "STUDY",
}
MOVE_MODELS: dict[str, str] = {
    PatientRootQueryRetrieveInformationModelMove: "PATIENT",
    StudyRootQueryRetrieveInformationModelMove: "STUDY",
}
GET_MODELS: dict[str, str] = {
    PatientRootQueryRetrieveInformationModelGet: "PATIENT",
    StudyRootQueryRetrieveInformationModelGet: "STUDY",
}
SOP_CLASSES: tuple[str, ...] = (*FIND_MODELS, *MOVE_MODELS, *GET_MODELS,
                                StorageCommitmentPushModel)

# Query/Retrieve levels (PS3.4 C.6) -> the QIDO level whose matching they use.
_QIDO_LEVEL: dict[str, qido.Level] = {
    "PATIENT": "study", "STUDY": "study", "SERIES": "series", "IMAGE": "instance"}
_LEVELS = {"PATIENT": ("PATIENT", "STUDY", "SERIES", "IMAGE"),
           "STUDY": ("STUDY", "SERIES", "IMAGE")}
# The unique key a retrieve at each level must name (PS3.4 C.4.2.2.1).
_UNIQUE = {"PATIENT": "00100020", "STUDY": "0020000D", "SERIES": "0020000E",
           "IMAGE": "00080018"}
# Attributes of the identifier that are not matching keys.
_NOT_KEYS = frozenset({0x00080005, 0x00080052, 0x00080054, 0x00080056})
_PATIENT_COUNTS = ("00201200", "00201202", "00201204")  # Number of Patient Related ...
# C-FIND matching keys per level: the patient attributes at PATIENT, QIDO's keys below it.
MATCHING_KEYS: dict[str, tuple[str, ...]] = {
    "PATIENT": tuple(k.tag for k in qido.STUDY_KEYS if k.tag.startswith("0010")),
    "STUDY": tuple(k.tag for k in qido.LEVEL_KEYS["study"]),
    "SERIES": tuple(k.tag for k in qido.LEVEL_KEYS["series"]),
    "IMAGE": tuple(k.tag for k in qido.LEVEL_KEYS["instance"]),
}

SUCCESS = 0x0000
PENDING = 0xFF00
CANCELLED = 0xFE00
UNABLE_TO_PROCESS = 0xC000
IDENTIFIER_DOES_NOT_MATCH = 0xA900
TOO_MANY_MATCHES = 0xA701  # Out of resources: unable to calculate number of matches
UNKNOWN_DESTINATION = 0xA801
# N-EVENT-REPORT failure reasons (PS3.4 J.3.3.1.2)
NO_SUCH_OBJECT = 0x0112
PROCESSING_FAILURE = 0x0110
CLASS_INSTANCE_CONFLICT = 0x0119
MAX_SUBOPERATIONS = 65535  # the counts are US (PS3.7 C.4.2.1.6)


@dataclass(frozen=True)
class QrSettings:
    """Who may query and retrieve, and where C-MOVE may send."""

    readers: Mapping[str, str]  # calling AE title -> client name, or "user:<e-mail>"
    destinations: Mapping[str, tuple[str, int]]  # move destination AE -> (host, port)
    own_title: str

    @classmethod
    def from_config(cls, settings: Mapping[str, Any]) -> QrSettings:
        """Parse ``DIMSE_QUERY_CLIENTS`` and ``DIMSE_MOVE_DESTINATIONS`` (checked by config)."""
        readers = {}
        for entry in settings["DIMSE_QUERY_CLIENTS"]:
            title, _, client = entry.partition("=")
            readers[title.strip()] = client.strip()
        destinations = {}
        for entry in settings["DIMSE_MOVE_DESTINATIONS"]:
            title, _, address = entry.rpartition("@")
            host, _, port = address.rpartition(":")
            destinations[title.strip()] = (host.strip(), int(port))
        return cls(readers, destinations, str(settings["DIMSE_AE_TITLE"]).strip())


def _failure(status: int, comment: str) -> Dataset:
    ds = Dataset()
    ds.Status = status
    ds.ErrorComment = comment[:64]  # LO
    return ds


def _calling(event: evt.Event) -> str:
    return str(event.assoc.requestor.ae_title or "").strip()


def _value(value: Any) -> str:
    """An identifier element's value as QIDO writes it (multiple values ``\\``-separated)."""
    if value is None:
        return ""
    if isinstance(value, MultiValue | list | tuple):
        return "\\".join(str(v) for v in value)
    return str(value)


class QueryRetrieve:
    """The C-FIND, C-MOVE, C-GET and N-ACTION handlers of one SCP."""

    def __init__(self, archive: Archive, settings: QrSettings) -> None:
        self.archive = archive
        self.settings = settings

    def handlers(self) -> list[evt.EventHandlerType]:
        """The pynetdicom event handlers to bind to the SCP."""
        return [(evt.EVT_C_FIND, self.on_find), (evt.EVT_C_MOVE, self.on_move),
                (evt.EVT_C_GET, self.on_get), (evt.EVT_N_ACTION, self.on_commit)]

    # -- who asks ----------------------------------------------------------------------------

    def principal(self, session: Session, calling: str) -> Principal | None:
        """The principal a calling AE title maps to, when it may read; else None."""
        target = self.settings.readers.get(calling)
        if not target:
            return None
        if target.startswith("user:"):
            users = session.scalars(select(User).where(
                User.email == target[5:], User.active.is_(True))).all()
            # An e-mail two accounts share names nobody in particular: closed.
            return user_principal(users[0], "session") if len(users) == 1 else None
        client = session.scalars(select(MachineClient).where(
            MachineClient.name == target)).first()
        if client is None or not client.active or not client.can_read:
            return None
        return Principal("machine", client.id, client.name, can_read_all=client.can_read,
                         can_store=client.can_store, via="basic")

    def _who(self, event: evt.Event, principal: Principal | None) -> str:
        return f"dimse:{_calling(event)}" + (f" as {principal.audit_name}" if principal else "")

    def _audit(self, event: evt.Event, kind: tuple[str, str], principal: Principal | None,
               outcome: int, details: dict[str, Any]) -> None:
        try:
            audit.record(self.archive.database, kind, action="E" if kind == audit.QUERY
                         else "R", outcome=outcome, who=self._who(event, principal),
                         source_address=event.assoc.requestor.address, details=details)
        except Exception:  # the answer is given; the gap is logged
            log.exception("could not record the audit of a DIMSE %s", kind[1])

    # -- the identifier as a QIDO query ------------------------------------------------------

    @staticmethod
    def _args(identifier: Dataset, level: str) -> dict[str, list[str]]:
        args: dict[str, list[str]] = {}
        for elem in identifier:
            if (elem.tag in _NOT_KEYS or elem.tag.is_private or elem.tag.element == 0
                    or elem.VR == "SQ"):
                continue
            tag = f"{int(elem.tag):08X}"
            if level == "PATIENT" and tag not in MATCHING_KEYS["PATIENT"]:
                continue  # only patient attributes exist at the PATIENT level
            args[tag] = [_value(elem.value)]
        return args

    @staticmethod
    def _scope(principal: Principal, level: qido.Level) -> list[ColumnElement[bool]]:
        # The same restrictions as QIDO-RS (dicomweb/routes.py:_search).
        scope: list[ColumnElement[bool]] = []
        if level != "study":
            scope.append(policy.series_filter(principal))
        if level == "instance":
            scope.append(policy.instance_filter(principal))
        return scope

    def _level(self, identifier: Dataset, model: str) -> str:
        level = str(identifier.get("QueryRetrieveLevel", "")).strip().upper()
        if level not in _LEVELS[model]:
            raise qido.QueryError(f"QueryRetrieveLevel {level!r} is not one of "
                                  f"{', '.join(_LEVELS[model])} for this model")
        return level

    # -- C-FIND ------------------------------------------------------------------------------

    def on_find(self, event: evt.Event) -> Iterator[tuple[int | Dataset, Dataset | None]]:
        """C-FIND: pending matches, then success (or a failure with an error comment)."""
        model = FIND_MODELS.get(str(event.request.AffectedSOPClassUID), "STUDY")
        with self.archive.database.new_session() as session:
            principal = self.principal(session, _calling(event))
            if principal is None:
                self._audit(event, audit.QUERY, None, audit.OUTCOME_MINOR_FAILURE,
                            {"reason": "no query rights"})
                yield _failure(UNABLE_TO_PROCESS, "this calling AE title may not query"), None
                return
            try:
                identifier = event.identifier
                level = self._level(identifier, model)
                matches = self._find(session, principal, identifier, level)
            except qido.QueryError as exc:
                yield _failure(IDENTIFIER_DOES_NOT_MATCH, str(exc)), None
                return
            except Exception:  # a failure status is always better than a dropped association
                log.exception("C-FIND failed")
                yield _failure(UNABLE_TO_PROCESS, "the query could not be processed"), None
                return
        self._audit(event, audit.QUERY, principal, audit.OUTCOME_SUCCESS,
                    {"level": level, "results": len(matches), "via": "C-FIND",
                     "keys": sorted(self._args(identifier, level))[:20]})
        for match in matches:
            if event.is_cancelled:
                yield CANCELLED, None
                return
            yield PENDING, match
        yield SUCCESS, None

    def _find(self, session: Session, principal: Principal, identifier: Dataset,
              level: str) -> list[Dataset]:
        qido_level = _QIDO_LEVEL[level]
        query = qido.parse_query(self._args(identifier, level), qido_level)
        stmt = qido.build_select(qido_level, query, policy.study_filter(principal),
                                 self._scope(principal, qido_level))
        rows = query.trim(session.execute(stmt).all())

        def representative(row: Any) -> dict[str, Any]:
            uid = qido.first_instance_uid(session, qido_level, row,
                                          policy.instance_filter(principal))
            return self.archive.header(uid) if uid else {}

        items = qido.to_json(qido_level, rows, query, lambda _row: "", representative)
        if level == "PATIENT":
            items = self._patients(rows, items)
        return [self._answer(identifier, level, item) for item in items]

    @staticmethod
    def _patients(rows: Sequence[Any], items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Study rows grouped by patient, with the patient-related counts."""
        patients: dict[int, dict[str, Any]] = {}
        totals: dict[int, list[int]] = {}
        for row, item in zip(rows, items, strict=True):
            study: Study = row[0]
            patient: Patient = row[1]
            patients.setdefault(patient.id, {t: v for t, v in item.items()
                                             if t.startswith("0010")})
            count = totals.setdefault(patient.id, [0, 0, 0])
            count[0] += 1
            count[1] += study.number_of_series or 0
            count[2] += study.number_of_instances or 0
        for key, item in patients.items():
            for tag, number in zip(_PATIENT_COUNTS, totals[key], strict=True):
                item[tag] = {"vr": "IS", "Value": [number]}
        return list(patients.values())

    def _answer(self, identifier: Dataset, level: str, item: Mapping[str, Any]) -> Dataset:
        """The response identifier: exactly the requested attributes (PS3.4 C.4.1.1.3.1)."""
        wanted: dict[str, Any] = {}
        for elem in identifier:
            if elem.tag in _NOT_KEYS or elem.tag.element == 0 or elem.tag.is_private:
                continue
            tag = f"{int(elem.tag):08X}"
            found = item.get(tag)
            wanted[tag] = found if found is not None and elem.VR != "SQ" else {"vr": elem.VR}
        answer = Dataset.from_json(wanted)
        answer.SpecificCharacterSet = "ISO_IR 192"  # JSON values are Unicode
        answer.QueryRetrieveLevel = level
        answer.RetrieveAETitle = self.settings.own_title
        return answer

    # -- C-MOVE and C-GET --------------------------------------------------------------------

    def _retrieve(self, event: evt.Event, models: Mapping[str, str]
                  ) -> tuple[Principal | None, list[Any] | Dataset]:
        """The instances a C-MOVE or C-GET names, or the failure to answer."""
        model = models.get(str(event.request.AffectedSOPClassUID), "STUDY")
        with self.archive.database.new_session() as session:
            principal = self.principal(session, _calling(event))
            if principal is None:
                return None, _failure(UNABLE_TO_PROCESS,
                                      "this calling AE title may not retrieve")
            try:
                identifier = event.identifier
                level = self._level(identifier, model)
                args = {t: v for t, v in self._args(identifier, level).items() if v != [""]}
                unique = _UNIQUE[level]
                if unique not in args:
                    keyword = pydicom.datadict.keyword_for_tag(int(unique, 16))
                    raise qido.QueryError(f"a {level} retrieve names its {keyword}")
                query = qido.parse_query(args, "instance")
                stmt = qido.build_select("instance", query, policy.study_filter(principal),
                                         self._scope(principal, "instance"))
                rows = session.execute(stmt).all()
            except qido.QueryError as exc:
                return principal, _failure(IDENTIFIER_DOES_NOT_MATCH, str(exc))
            except Exception:
                log.exception("retrieve query failed")
                return principal, _failure(UNABLE_TO_PROCESS,
                                           "the retrieve could not be processed")
            if len(rows) > min(query.limit, MAX_SUBOPERATIONS):
                return principal, _failure(TOO_MANY_MATCHES, "too many instances: narrow "
                                           "the retrieve to a study or series")
            return principal, [(r[0].sop_instance_uid, r[0].sop_class_uid,
                                r[0].transfer_syntax_uid, r[2].study_instance_uid)
                               for r in rows]

    def _datasets(self, event: evt.Event, found: list[Any]
                  ) -> Iterator[tuple[int | Dataset, Any]]:
        """Each instance read back (hash-checked) for a C-STORE sub-operation."""
        for uid, *_rest in found:
            if event.is_cancelled:
                yield CANCELLED, None
                return
            try:
                ds = pydicom.dcmread(io.BytesIO(self.archive.read(uid)))
            except Exception:  # counted as a failed sub-operation, the others go on
                log.exception("instance %s could not be read for a retrieve", uid)
                yield PENDING, "unreadable"
                continue
            yield PENDING, ds

    def _retrieved(self, event: evt.Event, principal: Principal | None, found: list[Any],
                   via: str, destination: str = "") -> None:
        studies = sorted({row[3] for row in found})
        self._audit(event, audit.INSTANCES_TRANSFERRED, principal, audit.OUTCOME_SUCCESS,
                    {"via": via, "destination": destination, "instances": len(found),
                     "studies": studies[:20]})

    def on_move(self, event: evt.Event) -> Iterator[Any]:
        """C-MOVE: the destination, the number of sub-operations, then the data sets."""
        destination = str(event.move_destination or "").strip()
        address = self.settings.destinations.get(destination)
        if address is None:
            log.warning("C-MOVE from %r to unknown destination %r", _calling(event),
                        destination)
            yield None, None  # pynetdicom answers 0xA801 (Move destination unknown)
            return
        principal, found = self._retrieve(event, MOVE_MODELS)
        if isinstance(found, Dataset):
            yield address[0], address[1]
            yield 1  # a failure answer needs the count first (pynetdicom's handler protocol)
            yield found, None
            return
        yield address[0], address[1], {"contexts": self._contexts(found)}
        yield len(found)
        if found:
            self._retrieved(event, principal, found, "C-MOVE", destination)
        yield from self._datasets(event, found)

    def on_get(self, event: evt.Event) -> Iterator[Any]:
        """C-GET: the number of sub-operations, then the data sets (sent on this
        association, under the storage contexts the SCU offered with the SCP role)."""
        principal, found = self._retrieve(event, GET_MODELS)
        if isinstance(found, Dataset):
            yield 1
            yield found, None
            return
        yield len(found)
        if found:
            self._retrieved(event, principal, found, "C-GET")
        yield from self._datasets(event, found)

    @staticmethod
    def _contexts(found: list[Any]) -> list[PresentationContext]:
        """Storage contexts for the C-MOVE sub-association: each instance's SOP class in its
        stored transfer syntax (uncompressed ones also in the little endian syntaxes)."""
        plain = {ExplicitVRLittleEndian, ImplicitVRLittleEndian}
        wanted: dict[tuple[str, str], None] = {}
        for _uid, sop_class, syntax, _study in found:
            wanted[(sop_class, syntax)] = None
        contexts = []
        for sop_class, syntax in list(wanted)[:127]:  # PS3.8: at most 128 contexts
            syntaxes = [syntax] + [s for s in (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
                                   if syntax in plain and s != syntax]
            contexts.append(build_context(sop_class, syntaxes))
        # And Verification, which every storage SCP takes: a destination that accepts none
        # of the instances' contexts still accepts the association, and each sub-operation
        # fails and is counted (0xA702 with the failed list), instead of the whole move
        # answering 0xA801 "Move destination unknown" for a destination that is known.
        contexts.append(build_context(Verification, [ImplicitVRLittleEndian]))
        return contexts

    # -- Storage Commitment Push Model -------------------------------------------------------

    def on_commit(self, event: evt.Event) -> tuple[int, Dataset | None]:
        """N-ACTION Request Storage Commitment: accepted at once; the N-EVENT-REPORT saying
        which instances are safely stored follows from another thread (PS3.4 J.3.3)."""
        # Only Storage Commitment's context offers N-ACTION here; its one action is 1.
        if event.action_type != 1:
            return 0x0123, None  # No such action
        try:
            request = event.action_information
            transaction = str(request.TransactionUID)
            items = [(str(i.ReferencedSOPClassUID), str(i.ReferencedSOPInstanceUID))
                     for i in request.ReferencedSOPSequence]
        except Exception:
            return 0x0115, None  # Invalid argument value
        calling = _calling(event)
        assoc: Association = event.assoc
        threading.Thread(target=self._report, args=(assoc, calling, transaction, items),
                         name="storage-commitment", daemon=True).start()
        return SUCCESS, None

    def committed(self, items: Sequence[tuple[str, str]]) -> tuple[list[tuple[str, str]],
                                                                    list[tuple[str, str, int]]]:
        """Which (SOP class, SOP instance) pairs are safely stored: an index row of that class
        and a stored file whose SHA-256 still matches; the others with a failure reason."""
        uids = [uid for _cls, uid in items]
        with self.archive.database.new_session() as session:
            classes = dict(session.execute(
                select(Instance.sop_instance_uid, Instance.sop_class_uid)
                .join(StoredObject, StoredObject.sop_instance_uid == Instance.sop_instance_uid)
                .where(Instance.sop_instance_uid.in_(uids))).all())
        done: list[tuple[str, str]] = []
        failed: list[tuple[str, str, int]] = []
        for sop_class, uid in items:
            if uid not in classes:
                failed.append((sop_class, uid, NO_SUCH_OBJECT))
            elif classes[uid] != sop_class:
                failed.append((sop_class, uid, CLASS_INSTANCE_CONFLICT))
            else:
                try:
                    self.archive.locate(uid).read()  # present and hash-verified
                    done.append((sop_class, uid))
                except Exception:
                    log.exception("storage commitment: %s is not readable", uid)
                    failed.append((sop_class, uid, PROCESSING_FAILURE))
        return done, failed

    def _report(self, assoc: Association, calling: str, transaction: str,
                items: list[tuple[str, str]]) -> None:
        done, failed = self.committed(items)
        info = Dataset()
        info.TransactionUID = transaction
        info.RetrieveAETitle = self.settings.own_title
        info.ReferencedSOPSequence = [_ref(c, u) for c, u in done]
        if failed:
            info.FailedSOPSequence = []
            for sop_class, uid, reason in failed:
                item = _ref(sop_class, uid)
                item.FailureReason = reason
                info.FailedSOPSequence.append(item)
        event_type = 2 if failed else 1
        log.info("storage commitment %s for %s: %d stored, %d failed", transaction, calling,
                 len(done), len(failed))
        if assoc.is_established and _send_report(assoc, info, event_type):
            return
        # The SCU released the association: report on one we open (PS3.4 J.3.3.1.2),
        # to the address configured for its AE title, taking the SCP role.
        address = self.settings.destinations.get(calling)
        if address is None:
            log.warning("storage commitment %s: %r left and has no configured address",
                        transaction, calling)
            return
        ae = AE(ae_title=self.settings.own_title)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
        ae.add_requested_context(StorageCommitmentPushModel)
        report_assoc = ae.associate(
            address[0], address[1], ae_title=calling,
            ext_neg=[build_role(StorageCommitmentPushModel, scp_role=True)])
        if not report_assoc.is_established:
            log.warning("storage commitment %s: could not reach %r", transaction, calling)
            return
        try:
            _send_report(report_assoc, info, event_type)
        finally:
            report_assoc.release()


def _ref(sop_class: str, uid: str) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = sop_class
    item.ReferencedSOPInstanceUID = uid
    return item


def _send_report(assoc: Association, info: Dataset, event_type: int) -> bool:
    try:
        status, _reply = assoc.send_n_event_report(info, event_type, StorageCommitmentPushModel,
                                                   COMMITMENT_INSTANCE)
    except Exception:
        log.exception("could not send the storage commitment report")
        return False
    return bool(status) and int(status.get("Status", 0xFFFF)) == SUCCESS


def offer(ae: AE, archive: Archive, settings: Mapping[str, Any]) -> list[evt.EventHandlerType]:
    """Add the Q/R and Storage Commitment contexts to the SCP; return their handlers."""
    for uid in SOP_CLASSES:
        ae.add_supported_context(uid)
    return QueryRetrieve(archive, QrSettings.from_config(settings)).handlers()
