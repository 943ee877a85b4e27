"""The audit trail: one record per security-relevant event (DICOM PS3.15 A.5 semantics)."""

from __future__ import annotations

import logging
from typing import Any

from sqlalchemy.orm import Session

from portal.access.models import AuditEvent

log = logging.getLogger(__name__)

# DICOM DCM event ids (PS3.16 CID 400) used so far.
INSTANCES_STORED = ("110104", "DICOM Instances Transferred")
SECURITY_ALERT = ("110113", "Security Alert")
QUERY = ("110112", "Query")

OUTCOME_SUCCESS = 0
OUTCOME_MINOR_FAILURE = 4
OUTCOME_SERIOUS_FAILURE = 8


def record_event(session: Session, event: tuple[str, str], *, action: str, outcome: int,
                 who: str, source_address: str = "", study_instance_uid: str = "",
                 patient_id: str = "", details: dict[str, Any] | None = None) -> AuditEvent:
    """Add one audit record to the session (the caller's transaction commits it)."""
    row = AuditEvent(event_id=event[0], event_name=event[1], action=action, outcome=outcome,
                     who=who[:256], source_address=source_address[:64],
                     study_instance_uid=study_instance_uid, patient_id=patient_id[:64],
                     details=details or {})
    session.add(row)
    if event is SECURITY_ALERT:
        # Logs name no patient: the UID and the reason are enough to find the record.
        log.warning("security alert: %s (who=%s, study=%s)",
                    (details or {}).get("reason", ""), who, study_instance_uid)
    return row
