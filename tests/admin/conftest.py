"""A practice with an office manager, a physician whose studies it sees, a newcomer, and a
referrer nobody is linked to yet."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from flask import Flask
from pydicom.uid import generate_uid

from portal.access.grants import link_identifier
from portal.access.principal import Principal
from portal.archive import current_archive
from tests.conftest import IdentityProvider, add_person
from tests.factories import make_instance

SYSTEM = Principal("user", 0, "t", roles=frozenset({"office_manager"}), issuer="t",
                   subject="t")


@dataclass
class Practice:
    """Who and what the console works with."""

    app: Flask
    manager: str
    house: int
    newcomer: int
    doe_studies: list[str]
    roe_study: str


def build_practice(app: Flask, idp: IdentityProvider, tag: str = "") -> Practice:
    """Two studies of Jane Doe and one of Richard Roe referred by Dr House (linked, in the
    practice); one study referred by Dr Wilson, whom nobody is linked to."""
    manager = f"om{tag}"
    add_person(app, idp, manager, ["office_manager"], "Clinic", name="Olivia Manager")
    house = add_person(app, idp, f"house{tag}", ["physician"], "Clinic", name="Gregory House")
    newcomer = add_person(app, idp, f"newcomer{tag}", ["physician"], "Clinic",
                          name="Nina Newcomer")
    doe = [generate_uid(), generate_uid()]
    roe = generate_uid()
    with app.app_context():
        archive = current_archive()
        for n, (uid, date, what) in enumerate(((doe[0], "20260105", "CT chest"),
                                               (doe[1], "20260301", "MR knee"))):
            archive.ingest(make_instance(study=uid, patient_id="DOE-1", patient_name="Doe^Jane",
                                         StudyDate=date, StudyDescription=what,
                                         AccessionNumber=f"ACC-D{n}"), who="test")
        archive.ingest(make_instance(study=roe, patient_id="ROE-1", patient_name="Roe^Richard",
                                     AccessionNumber="ACC-R"), who="test")
        archive.ingest(make_instance(patient_id="OTHER-1", patient_name="Other^Olga",
                                     ReferringPhysicianName="Wilson^James",
                                     AccessionNumber="ACC-W"), who="test")
    with app.extensions["db"].write_transaction() as session:
        link_identifier(session, SYSTEM, house, "House^Gregory")
    return Practice(app, manager, house, newcomer, doe, roe)


@pytest.fixture
def practice(oidc_app: Flask, idp: IdentityProvider) -> Iterator[Practice]:
    """The practice on the OIDC-enabled app."""
    yield build_practice(oidc_app, idp, generate_uid()[-6:])
