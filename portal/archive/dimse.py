"""DIMSE C-STORE and C-ECHO SCP (pynetdicom), accepting only configured (AE title, address) pairs.

Services of the rooms above the archive (C-FIND, C-MOVE, C-GET and Storage Commitment:
``dicomweb/dimse_qr.py``) are registered by ``create_app`` in ``app.extensions["dimse_services"]``
and offered by the same AE.

Every received instance goes through the same ``Archive.ingest`` as STOW-RS and the CLI, and
the C-STORE response is sent only after the file is durable and its index row committed; the
after-ingest steps run when the association ends.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import time
from collections.abc import Callable, Sequence
from typing import Any

from pynetdicom import AE, evt
from pynetdicom.presentation import AllStoragePresentationContexts
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer

from portal.archive.after import Stored
from portal.archive.ingest import Archive
from portal.archive.store import ArchiveUnavailable
from portal.archive.validate import (
    ACCEPTED_TRANSFER_SYNTAXES,
    DUPLICATE_CONFLICT,
    OUT_OF_RESOURCES,
    Rejected,
)
from portal.audit import INSTANCES_TRANSFERRED
from portal.config import name_at_address
from portal.tls import server_context

log = logging.getLogger(__name__)

SUCCESS = 0x0000
# C-STORE has no "duplicate" status; report it in the "Cannot understand" range (PS3.4 B.2.3).
_CSTORE_CONFLICT = 0xC111
# Preferred order when a peer proposes several transfer syntaxes: keep compressed data as sent.
_SYNTAXES = sorted(ACCEPTED_TRANSFER_SYNTAXES,
                   key=lambda uid: (uid.startswith("1.2.840.10008.1.2.1"), uid))


def _requested_title(event: evt.Event, field: str) -> str:
    """The calling or called AE title of the A-ASSOCIATE-RQ being answered."""
    # EVT_REQUESTED fires before pynetdicom copies the titles onto the association:
    # read them from the A-ASSOCIATE-RQ primitive itself.
    primitive = event.assoc.requestor.primitive
    title = getattr(primitive, field, None) if primitive is not None else None
    if isinstance(title, bytes):
        title = title.decode("ascii", "replace")
    return str(title or "").strip()


def _on_requested(event: evt.Event, allowed: set[tuple[str, str]], own_title: str) -> None:
    """Refuse an association unless its caller is configured and it calls this AE title."""
    requestor = event.assoc.requestor
    calling = _requested_title(event, "calling_ae_title") or str(
        requestor.ae_title or "").strip()
    if (calling, requestor.address) not in allowed:
        log.warning("association refused: calling AE title %r from %s is not configured",
                    calling, requestor.address)
        # A-ASSOCIATE-RJ: rejected-permanent, service-user, calling AE title not recognised
        event.assoc.acse.send_reject(0x01, 0x01, 0x03)
        _wait_until_sent(event)
        return
    called = _requested_title(event, "called_ae_title")
    if called != own_title:
        # A peer that may send to us but addresses another AE (a misrouted modality, or one
        # probing which titles a host answers to) is refused as PS3.8 9.3.4 says.
        log.warning("association refused: %r from %s called AE title %r, not %r",
                    calling, requestor.address, called, own_title)
        # A-ASSOCIATE-RJ: rejected-permanent, service-user, called AE title not recognised
        event.assoc.acse.send_reject(0x01, 0x01, 0x07)
        _wait_until_sent(event)


def _wait_until_sent(event: evt.Event, timeout: float = 2.0) -> None:
    # send_reject only queues the A-ASSOCIATE-RJ for the DUL thread, and pynetdicom closes
    # the socket as soon as this handler returns: without waiting, the peer sees the
    # connection drop instead of the rejection and its reason. The DUL reaches Sta13 right
    # after the PDU is written to the socket.
    deadline = time.monotonic() + timeout
    while (event.assoc.dul.state_machine.current_state != "Sta13"
           and time.monotonic() < deadline):
        time.sleep(0.005)


def _on_open(event: evt.Event) -> None:
    """TCP_NODELAY on every association's socket: a C-STORE-RSP is one small PDU that
    Nagle's algorithm would hold back until the peer's (delayed) ACK, up to 40 ms an
    instance with a synchronous SCU."""
    sock = event.assoc.dul.socket.socket if event.assoc.dul.socket is not None else None
    if sock is not None:
        with contextlib.suppress(OSError):  # the peer is gone: the association ends anyway
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _on_store(event: evt.Event, archive: Archive, received: dict[int, list[Stored]]) -> int:
    requestor = event.assoc.requestor
    try:
        data = event.encoded_dataset(include_meta=True)
        # Its 110104 record is committed with its index row (docs/security.md 40).
        result = archive.ingest(data, who=f"dimse:{str(requestor.ae_title).strip()}",
                                source_address=requestor.address,
                                recorded_as=INSTANCES_TRANSFERRED)
    except Rejected as exc:
        log.info("C-STORE refused (0x%04X): %s", exc.status, exc.reason)
        return _CSTORE_CONFLICT if exc.status == DUPLICATE_CONFLICT else exc.status
    except ArchiveUnavailable as exc:
        log.error("C-STORE could not be stored now: %s", exc)
        return OUT_OF_RESOURCES
    except Exception:  # a failure status is always better than a dropped association
        log.exception("C-STORE failed")
        archive.record_rejections([(Rejected("the instance could not be processed"), None)],
                                  who=f"dimse:{str(requestor.ae_title).strip()}",
                                  source_address=requestor.address)
        return 0xC000
    log.debug("C-STORE %s", result.outcome)
    if result.outcome == "stored":
        received.setdefault(id(event.assoc), []).append(result)
    return SUCCESS


def _on_end(event: evt.Event, archive: Archive, received: dict[int, list[Stored]]) -> None:
    """When an association ends: the after-ingest steps for the instances it delivered
    (pre-rendering, reports from SR and PDF objects; each instance's 110104 record was
    committed with it)."""
    stored = received.pop(id(event.assoc), [])
    if not stored:
        return
    try:
        archive.after_ingest(stored, via="dimse", source_address=event.assoc.requestor.address,
                             who=f"dimse:{str(event.assoc.requestor.ae_title).strip()}")
    except Exception:  # the instances are stored and acknowledged; the gap is logged
        log.exception("the after-ingest steps of a C-STORE association failed")


def make_ae(settings: dict[str, Any]) -> AE:
    """The application entity with every storage SOP class and our transfer syntaxes."""
    ae = AE(ae_title=settings["DIMSE_AE_TITLE"])
    ae.maximum_pdu_size = settings["DIMSE_MAX_PDU"]
    ae.network_timeout = 60
    # Also checked (with a log line) in EVT_REQUESTED; this keeps the SCP closed should a
    # handler ever be left out.
    ae.require_called_aet = True
    ae.acse_timeout = 30
    ae.dimse_timeout = 60
    for context in AllStoragePresentationContexts:
        if context.abstract_syntax is not None:  # always set in pynetdicom's own list
            # scp_role: a C-GET SCU may take the storage SCP role (SCP/SCU role selection,
            # PS3.7 D.3.3.4) to receive the instances on its own association.
            ae.add_supported_context(context.abstract_syntax, _SYNTAXES,
                                     scu_role=False, scp_role=True)
    ae.add_supported_context(Verification)
    return ae


# A service another room adds to the SCP: it adds its presentation contexts to the AE and
# returns its event handlers.
DimseService = Callable[[AE, Archive, dict[str, Any]], list[evt.EventHandlerType]]


def serve(archive: Archive, settings: dict[str, Any], block: bool = True,
          services: Sequence[DimseService] = ()) -> ThreadedAssociationServer | None:
    """Start the SCP on the configured address with the given extra ``services``; block until
    interrupted unless told not to."""
    ae = make_ae(settings)
    allowed = name_at_address(settings["DIMSE_ALLOWED_PEERS"])
    received: dict[int, list[Stored]] = {}
    handlers: list[evt.EventHandlerType] = [
        (evt.EVT_CONN_OPEN, _on_open),
        (evt.EVT_REQUESTED, _on_requested, [allowed, ae.ae_title.strip()]),
        (evt.EVT_C_STORE, _on_store, [archive, received]),
        (evt.EVT_RELEASED, _on_end, [archive, received]),
        (evt.EVT_ABORTED, _on_end, [archive, received])]
    for service in services:
        handlers += service(ae, archive, settings)
    address = (settings["DIMSE_HOST"], settings["DIMSE_PORT"])
    server: ThreadedAssociationServer | None = ae.start_server(
        address, block=block, evt_handlers=handlers, ssl_context=server_context(
            settings["DIMSE_TLS_CERT"], settings["DIMSE_TLS_KEY"], settings["DIMSE_TLS_CA"]))
    return server
