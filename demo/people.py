"""The demo's people and its local identity provider (``make demo``; never for production).

The provider is the PyPI ``oidc-provider-mock`` on ``localhost:5001``: its sign-in page lists
the demo users to pick from. Anyone who can reach it can sign in as anyone, so it binds
loopback only and exists only for the demo.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from demo.studies import DEMO_PATIENTS, DEMO_PHYSICIANS
from portal.access.models import PatientLink, ReferrerIdentifier, User
from portal.access.users import get_or_create_practice
from portal.index.models import Patient
from portal.index.referrers import identifier_key, name_key

DEMO_IDP_PORT = 5001
DEMO_ISSUER = f"http://localhost:{DEMO_IDP_PORT}"
DEMO_CLIENT_ID = "portal-demo"
DEMO_CLIENT_SECRET = "demo-only-secret"  # noqa: S105 - the demo provider accepts any client
DEMO_PRACTICE = "Princeton Plainsboro Referrers"


@dataclass(frozen=True)
class DemoPerson:
    """One demo account: provider subject, profile, portal roles and links."""

    subject: str
    name: str
    email: str
    roles: tuple[str, ...]
    npi: str = ""
    dicom_name: str = ""
    patient_id: str = ""


def demo_people() -> list[DemoPerson]:
    """Physicians from the demo studies, an office manager, a newcomer and a patient."""
    people = []
    for physician in DEMO_PHYSICIANS:
        family, given = [*physician.name.split("^"), ""][:2]
        people.append(DemoPerson(subject=physician.email.split("@")[0],
                                 name=f"Dr {given} {family}", email=physician.email,
                                 roles=("physician",), npi=physician.npi,
                                 dicom_name=physician.name))
    people.append(DemoPerson("cuddy", "Lisa Cuddy (office manager)", "cuddy@demo.example",
                             ("office_manager",)))
    people.append(DemoPerson("newcomer", "Dr Nadia Newcomer (no access yet)",
                             "newcomer@demo.example", ("physician",)))
    patient = DEMO_PATIENTS[0]
    people.append(DemoPerson("patient", f"{patient.name.replace('^', ' ')} (patient)",
                             "patient@demo.example", ("patient",), patient_id=patient.patient_id))
    return people


def demo_config(instance: Path) -> bool:
    """Write instance/config.toml pointing at the demo provider and listing the demo's RIS as
    an HL7 sender, unless one exists (a demo-written one lacking the sender gets it added)."""
    from demo.reports import DEMO_SENDER

    path = instance / "config.toml"
    # The HL7 listener refuses everyone until senders are listed: the demo lists its own.
    hl7 = f'\n[hl7]\nallowed_senders = ["{DEMO_SENDER}"]\n'
    if path.exists():
        text = path.read_text()
        if text.startswith("# Written by `flask --app app demo`") and "[hl7]" not in text:
            path.write_text(text + hl7)
        return False
    path.write_text(
        "# Written by `flask --app app demo`: sign-in through the local demo provider.\n"
        "[oidc]\n"
        f'issuer = "{DEMO_ISSUER}"\n'
        f'client_id = "{DEMO_CLIENT_ID}"\n'
        f'client_secret = "{DEMO_CLIENT_SECRET}"\n'
        'roles_claim = "portal_roles"\n' + hl7)
    return True


def register_demo_people(session: Session, issuer: str = DEMO_ISSUER) -> int:
    """Create the demo accounts with roles, practice, identifiers and patient link (once)."""
    practice = get_or_create_practice(session, DEMO_PRACTICE)
    created = 0
    for person in demo_people():
        user = session.scalars(select(User).where(User.issuer == issuer,
                                                  User.subject == person.subject)).first()
        if user is not None:
            continue
        user = User(issuer=issuer, subject=person.subject, email=person.email,
                    display_name=person.name, roles=list(person.roles), active=True,
                    security_epoch=0,
                    practice_fk=None if "patient" in person.roles else practice.id)
        session.add(user)
        session.flush()
        created += 1
        if person.npi and person.subject != "newcomer":
            for key in (identifier_key("NPI", person.npi), name_key(person.dicom_name)):
                if key and not session.scalars(select(ReferrerIdentifier).where(
                        ReferrerIdentifier.key == key)).first():
                    session.add(ReferrerIdentifier(user_fk=user.id, key=key,
                                                   created_by="demo"))
        if person.patient_id:
            for patient in session.scalars(select(Patient).where(
                    Patient.patient_id == person.patient_id)):
                session.add(PatientLink(user_fk=user.id, patient_fk=patient.id))
    return created


def run_identity_provider(port: int = DEMO_IDP_PORT) -> None:
    """Serve the demo provider on localhost until interrupted."""
    import threading
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from oidc_provider_mock import User as MockUser
        from oidc_provider_mock import run_server_in_thread

    users = [MockUser(sub=p.subject, claims={"email": p.email, "name": p.name,
                                             "portal_roles": list(p.roles)})
             for p in demo_people()]
    with run_server_in_thread(port=port, require_nonce=True, user_claims=users):
        threading.Event().wait()
