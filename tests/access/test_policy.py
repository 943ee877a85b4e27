"""One access policy, obeyed by every route, for every kind of principal (docs/security.md B)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import timedelta

import pytest
from flask import Flask
from flask.testing import FlaskClient
from pydicom.uid import generate_uid
from sqlalchemy import update

from portal.access.grants import create_grant, link_identifier, link_patient, revoke_grants
from portal.access.models import Delegation, Grant
from portal.access.principal import Principal
from portal.archive import current_archive
from portal.db import utcnow
from tests.conftest import IdentityProvider, add_person, signed_in
from tests.factories import make_dataset, to_bytes

ADMIN = Principal("user", 0, "test", roles=frozenset({"office_manager"}), issuer="test",
                  subject="setup")


@dataclass
class World:
    app: Flask
    idp: IdentityProvider
    studies: dict[str, tuple[str, str, str]]  # name -> (study, series, sop)
    users: dict[str, int]


def _store(app: Flask, name: str, patient: str, referrer: str, npi: str | None = None) -> tuple:
    study, series, sop = generate_uid(), generate_uid(), generate_uid()
    ds = make_dataset(study=study, series=series, sop=sop, patient_id=patient,
                      patient_name=f"{patient}^Test", ReferringPhysicianName=referrer,
                      StudyDescription=name)
    if npi:
        from pydicom.dataset import Dataset
        from pydicom.sequence import Sequence

        code = Dataset()
        code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = npi, "NPI", "NPI"
        person = Dataset()
        person.PersonIdentificationCodeSequence = Sequence([code])
        ds.ReferringPhysicianIdentificationSequence = Sequence([person])
    with app.app_context():
        current_archive().ingest(to_bytes(ds), who="test")
    return study, series, sop


@pytest.fixture
def world(oidc_app: Flask, idp: IdentityProvider) -> World:
    app = oidc_app
    studies = {"s1": _store(app, "s1", "P-A", "House^Gregory^^Dr", npi="1111111111"),
               "s2": _store(app, "s2", "P-A", "Wilson^James"),
               "s3": _store(app, "s3", "P-B", "Cuddy^Lisa")}
    prefix = generate_uid()[-8:]
    users = {
        "house": add_person(app, idp, f"house-{prefix}", ["physician"], "Princeton"),
        "wilson": add_person(app, idp, f"wilson-{prefix}", ["physician"], "Other"),
        "manager": add_person(app, idp, f"manager-{prefix}", ["office_manager"], "Princeton"),
        "patient": add_person(app, idp, f"patient-{prefix}", ["patient"]),
        "nobody": add_person(app, idp, f"nobody-{prefix}", []),
    }
    with app.extensions["db"].write_transaction() as session:
        link_identifier(session, ADMIN, users["house"], "npi:1111111111")
        link_identifier(session, ADMIN, users["wilson"], "Wilson^James")
        link_patient(session, ADMIN, users["patient"], "P-B")
    return World(app, idp, studies, users)


def browser(world: World, who: str) -> FlaskClient:
    from portal.access.models import User

    with world.app.extensions["db"].new_session() as session:
        subject = session.get(User, world.users[who]).subject
    return signed_in(world.app, world.idp, subject)


def visible(client: FlaskClient) -> set[str]:
    response = client.get("/dicomweb/studies")
    if response.status_code == 204:
        return set()
    assert response.status_code == 200
    return {item["00081030"]["Value"][0] for item in response.get_json()}


def test_each_person_sees_exactly_their_studies(world: World) -> None:
    assert visible(browser(world, "house")) == {"s1"}  # by NPI
    assert visible(browser(world, "wilson")) == {"s2"}  # by normalised name
    assert visible(browser(world, "manager")) == {"s1"}  # the practice's physicians
    assert visible(browser(world, "patient")) == {"s3"}  # linked patient record
    assert visible(browser(world, "nobody")) == set()


def test_grants_add_and_revocation_expiry_remove(world: World) -> None:
    wilson = browser(world, "wilson")
    with world.app.extensions["db"].write_transaction() as session:
        grant = create_grant(session, ADMIN, user_id=world.users["wilson"],
                             study_uid=world.studies["s3"][0])
        grant_id = grant.id
    assert visible(wilson) == {"s2", "s3"}
    with world.app.extensions["db"].write_transaction() as session:
        session.execute(update(Grant).where(Grant.id == grant_id)
                        .values(expires_at=utcnow() - timedelta(seconds=1)))
    assert visible(wilson) == {"s2"}
    with world.app.extensions["db"].write_transaction() as session:
        create_grant(session, ADMIN, user_id=world.users["wilson"], patient_id="P-A",
                     expires_at=utcnow() + timedelta(hours=1))
    assert visible(wilson) == {"s1", "s2"}
    with world.app.extensions["db"].write_transaction() as session:
        ids = [g.id for g in session.query(Grant).all()]
        revoke_grants(session, ADMIN, ids)
    assert visible(wilson) == {"s2"}


def test_delegation_lets_a_colleague_see(world: World) -> None:
    with world.app.extensions["db"].write_transaction() as session:
        session.add(Delegation(from_user_fk=world.users["wilson"],
                               to_user_fk=world.users["house"]))
    assert visible(browser(world, "house")) == {"s1", "s2"}


def _routes(study: str, series: str, sop: str) -> list[str]:
    base = f"/dicomweb/studies/{study}"
    instance = f"{base}/series/{series}/instances/{sop}"
    return [f"/studies/{study}", base, f"{base}/metadata", f"{base}/series",
            f"{base}/instances", f"{base}/series/{series}", f"{base}/series/{series}/metadata",
            f"{base}/series/{series}/instances", instance, f"{instance}/metadata",
            f"{instance}/frames/1"]


def _without_nonces(body: bytes) -> bytes:
    return re.sub(rb'nonce="[^"]*"', b'nonce=""', body)


@pytest.mark.parametrize("who", ["house", "wilson", "manager", "patient", "nobody"])
def test_every_route_denies_foreign_objects_like_missing_ones(world: World, who: str) -> None:
    client = browser(world, who)
    mine = visible(client)
    for name, uids in world.studies.items():
        if name in mine:
            continue
        missing = (generate_uid(), generate_uid(), generate_uid())
        for foreign_url, missing_url in zip(_routes(*uids), _routes(*missing), strict=True):
            denied, absent = client.get(foreign_url), client.get(missing_url)
            assert denied.status_code == absent.status_code == 404, foreign_url
            # Each page carries its own CSP nonce; everything else must be byte-identical.
            assert _without_nonces(denied.data) == _without_nonces(absent.data), foreign_url
            assert b"P-A" not in denied.data and b"P-B" not in denied.data


def test_hierarchy_must_match_the_study_in_the_url(world: World) -> None:
    client = browser(world, "house")
    s1 = world.studies["s1"]
    s2 = world.studies["s2"]
    # house may see s1, but s2's series named under s1 is not found.
    assert client.get(f"/dicomweb/studies/{s1[0]}/series/{s2[1]}").status_code == 404
    url = f"/dicomweb/studies/{s1[0]}/series/{s1[1]}/instances/{s2[2]}"
    assert client.get(url).status_code == 404
    assert client.get(f"/dicomweb/studies/{s1[0]}/series/{s1[1]}/instances/{s1[2]}"
                      ).status_code == 200


def test_wildcard_searches_return_only_what_is_visible(world: World) -> None:
    client = browser(world, "house")
    for query in ("PatientName=*", "PatientID=*", "PatientID=P-B", "StudyDescription=s*"):
        response = client.get(f"/dicomweb/studies?{query}")
        found = set() if response.status_code == 204 else {
            item["00081030"]["Value"][0] for item in response.get_json()}
        assert found <= {"s1"}, query
    assert client.get("/dicomweb/series?PatientID=P-B").status_code == 204
    assert client.get("/dicomweb/instances?PatientID=P-B").status_code == 204


def test_the_study_list_page_and_the_empty_portal(world: World) -> None:
    house = browser(world, "house")
    page = house.get("/studies")
    assert page.status_code == 200
    assert b"Test P-A" in page.data and b"P-B" not in page.data
    empty = browser(world, "nobody").get("/studies")
    assert empty.status_code == 200 and b"Nothing to show yet" in empty.data


def test_authorization_fails_closed(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    client = browser(world, "house")
    from portal.access import policy

    def broken(*_args: object, **_kwargs: object) -> object:
        raise RuntimeError("grant lookup failed")

    monkeypatch.setattr(policy, "study_filter", broken)
    world.app.config["PROPAGATE_EXCEPTIONS"] = False
    response = client.get("/dicomweb/studies")
    assert response.status_code >= 500
    assert b"P-A" not in response.data
