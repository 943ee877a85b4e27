"""A person's study list straight off ordered indexes: each referrer key keeps its studies'
(date, time) beside it (``StudyReferrer``, ``OrderStudy``), and the list merges the first
rows of each key with the person's other studies (grants). The pages must be exactly those
of the access rules as a filter (``study_filter``) sorted by (date, time, id): here a
physician with two keys (his name and an order's NPI; some studies under both, one study
named by two of his orders), a delegating colleague, grants, and the practice's office
manager, walked page by page by keyset and by offset, newest and oldest first, with a
modality and a date range. A study whose date is corrected moves in the list: its keys'
copies follow. On SQLite and PostgreSQL."""

from __future__ import annotations

from dataclasses import replace

import pytest
from flask import Flask
from pydicom.uid import generate_uid
from sqlalchemy import select

from portal.access.grants import create_grant, link_identifier
from portal.access.models import Delegation, User
from portal.access.policy import study_filter
from portal.access.principal import Principal
from portal.access.users import get_or_create_practice
from portal.archive import current_archive
from portal.index.models import Order, OrderStudy, Series, Study, StudyReferrer
from portal.index.service import resolve_order
from portal.reports.service import IncomingOrder, receive_order
from portal.studies import service
from portal.studies.service import StudySearch
from tests.factories import make_instance

ADMIN = Principal("user", 0, "t", roles=frozenset({"office_manager"}), issuer="t", subject="t")
NPI = "npi:1234567893"
PAGE = 4
REFERRERS = ("Alpha^Ada", "Beta^Ben", "Other^Olga", "Alpha^Ada", "Gamma^Gus")


def _people(app: Flask) -> dict[str, Principal]:
    """Ada (name and NPI keys) and Ben in one practice, its office manager, and Gus outside
    it, who lets Ada see his studies."""
    made: dict[str, Principal] = {}
    with app.extensions["db"].write_transaction() as session:
        practice = get_or_create_practice(session, "Keys Practice").id
        for sub, role, in_practice in (("ada", "physician", True), ("ben", "physician", True),
                                       ("om", "office_manager", True),
                                       ("gus", "physician", False)):
            user = User(issuer="t", subject=sub, display_name=sub, roles=[role], active=True,
                        practice_fk=practice if in_practice else None)
            session.add(user)
            session.flush()
            made[sub] = Principal("user", user.id, sub, roles=frozenset({role}), issuer="t",
                                  subject=sub, practice_id=user.practice_fk)
        link_identifier(session, ADMIN, made["ada"].id, "Alpha^Ada")
        link_identifier(session, ADMIN, made["ada"].id, "1234567893")
        link_identifier(session, ADMIN, made["ben"].id, "Beta^Ben")
        link_identifier(session, ADMIN, made["gus"].id, "Gamma^Gus")
        session.add(Delegation(from_user_fk=made["gus"].id, to_user_fk=made["ada"].id))
    return made


def _ingest(app: Flask, n: int, date: str, time: str, referrer: str) -> str:
    uid = generate_uid()
    with app.app_context():
        current_archive().ingest(make_instance(
            study=uid, patient_id=f"K{n % 7}", patient_name=f"Key^{n % 7}", StudyDate=date,
            StudyTime=time, AccessionNumber=f"ACC{n}", ReferringPhysicianName=referrer,
            modality="MR" if n % 3 else "CT"), who="test")
    return uid


def _fill(app: Flask, people: dict[str, Principal]) -> None:
    """33 studies: dates and times shared in groups (the id breaks ties), referrers in turn,
    orders with Ada's NPI for every fourth (one study twice), grants of others to Ada."""
    uids = []
    for n in range(33):
        uids.append(_ingest(app, n, f"202501{n // 5 + 1:02d}", f"1{n % 4 // 2}0000",
                            REFERRERS[n % len(REFERRERS)]))
    with app.extensions["db"].write_transaction() as session:
        for n in range(0, 33, 4):
            receive_order(session, IncomingOrder(
                filler_order_number=f"F{n}", accession_number=f"ACC{n}",
                patient_id=f"K{n % 7}", ordering_provider_key=NPI, status="ordered"))
        # A second order of Ada's for the same study (the RIS would merge it into the first
        # by accession number; kept here as an index may hold it): one study twice, one key.
        again = Order(filler_order_number="F0-again", accession_number="ACC0",
                      patient_id="K0", ordering_provider_key=NPI, status="ordered")
        session.add(again)
        session.flush()
        resolve_order(session, again)
        for n in (2, 7, 12):  # Olga's studies, granted to Ada
            create_grant(session, ADMIN, user_id=people["ada"].id, study_uid=uids[n])


def _expected(app: Flask, principal: Principal, search: StudySearch) -> list[int]:
    """The visible studies through the access rules as a filter, sorted in Python."""
    with app.extensions["db"].new_session() as session:
        rows = session.execute(select(Study.id, Study.study_date, Study.study_time)
                               .where(study_filter(principal))).all()
        modality = {study for (study,) in session.execute(
            select(Series.study_fk).where(Series.modality == search.modality))}
    kept = [r for r in rows
            if (not search.modality or r.id in modality)
            and (not search.date_from or r.study_date >= search.date_from.replace("-", ""))
            and (not search.date_to or r.study_date <= search.date_to.replace("-", ""))]
    kept.sort(key=lambda r: (r.study_date, r.study_time, r.id), reverse=not search.oldest_first)
    return [r.id for r in kept]


def _walk(app: Flask, principal: Principal, search: StudySearch) -> tuple[list[int], list[int]]:
    """Every page of the list: by keyset to the end and back again, and by offset."""
    keyset: list[int] = []
    offset: list[int] = []
    with app.extensions["db"].new_session() as session:
        assert service._keyed_page(session, principal, search, ascending=search.oldest_first,
                                   edge=None, offset=0) is not None  # the ordered path
        step = search
        pages = []
        while True:
            rows, older, _newer = service.list_page(session, principal, step)
            pages.append([study.id for study, _patient in rows])
            keyset += pages[-1]
            if not older:
                break
            last = rows[-1][0]
            step = replace(search, after=(last.study_date, last.study_time, last.id))
        # Back from the last page by "before" links: the same pages in reverse.
        for expected_page in reversed(pages[:-1]):
            first = session.get(Study, pages[pages.index(expected_page) + 1][0])
            assert first is not None
            rows, _older, _newer = service.list_page(session, principal, replace(
                search, before=(first.study_date, first.study_time, first.id)))
            assert [study.id for study, _patient in rows] == expected_page
        page = 1
        while True:
            rows, older, _newer = service.list_page(session, principal,
                                                    replace(search, page=page))
            offset += [study.id for study, _patient in rows]
            if not older:
                break
            page += 1
    return keyset, offset


def test_a_persons_list_off_the_key_indexes_is_the_access_rules_list(
        any_db_app: Flask, monkeypatch: pytest.MonkeyPatch) -> None:
    app = any_db_app
    monkeypatch.setattr(service, "PAGE_SIZE", PAGE)  # pages of 4: many pages, ties across
    people = _people(app)
    _fill(app, people)
    searches = [StudySearch(), StudySearch(oldest_first=True), StudySearch(modality="MR"),
                StudySearch(date_from="2025-01-02", date_to="2025-01-05"),
                StudySearch(modality="CT", date_from="2025-01-03", oldest_first=True)]
    with app.extensions["db"].new_session() as session:
        by_key = session.scalars(select(OrderStudy.study_fk).where(OrderStudy.key == NPI)).all()
    assert len(by_key) > len(set(by_key))  # one study twice under Ada's NPI
    for who in ("ada", "om", "ben"):
        for search in searches:
            expected = _expected(app, people[who], search)
            assert expected, (who, search)
            keyset, offset = _walk(app, people[who], search)
            assert keyset == expected, (who, search)
            assert offset == expected, (who, search)
    # Ada sees her two keys, Gus's (delegated) and her grants: 22 studies, 6 pages.
    assert len(_expected(app, people["ada"], StudySearch())) > 5 * PAGE


def test_a_study_whose_date_is_corrected_moves_in_the_list(
        any_db_app: Flask, monkeypatch: pytest.MonkeyPatch) -> None:
    app = any_db_app
    monkeypatch.setattr(service, "PAGE_SIZE", 2)  # the page is chosen off the key indexes
    people = _people(app)
    older = _ingest(app, 1, "20240101", "080000", "Alpha^Ada")
    newer = [_ingest(app, n, "20250301", f"0{n}0000", "Alpha^Ada") for n in range(2, 5)]
    with app.extensions["db"].write_transaction() as session:
        receive_order(session, IncomingOrder(filler_order_number="F1", accession_number="ACC1",
                                             patient_id="K1", ordering_provider_key=NPI))

    def first_rows() -> list[str]:
        with app.extensions["db"].new_session() as session:
            rows, _older, _newer = service.list_page(session, people["ada"], StudySearch())
            return [study.study_instance_uid for study, _patient in rows]

    assert first_rows() == [newer[2], newer[1]]
    # The study's date is corrected (a later date than all the others).
    with app.extensions["db"].write_transaction() as session:
        study = session.scalars(select(Study).where(Study.study_instance_uid == older)).one()
        study.study_date, study.study_time = "20260101", "090000"
    assert first_rows() == [older, newer[2]]
    with app.extensions["db"].new_session() as session:
        study_id = session.scalars(select(Study.id).where(
            Study.study_instance_uid == older)).one()
        for keys in (StudyReferrer, OrderStudy):
            copies = session.execute(select(keys.study_date, keys.study_time)
                                     .where(keys.study_fk == study_id)).all()
            assert copies and set(copies) == {("20260101", "090000")}, keys
    # And the keyset pages agree with the new place: nothing after the newest study.
    with app.extensions["db"].new_session() as session:
        rows, more, _newer = service.list_page(session, people["ada"], StudySearch(
            before=("20260101", "090000", study_id)))
        assert rows == [] and more


def test_a_text_that_matches_many_is_tested_on_each_key_walked(
        any_db_app: Flask, monkeypatch: pytest.MonkeyPatch) -> None:
    """A search text that matches many studies is tested row by row while each key is
    walked: the same pages as the access rules' filter with the text tested on the person's
    visible ids, and as a walk of the whole study index."""
    app = any_db_app
    people = _people(app)
    _fill(app, people)
    monkeypatch.setattr(service, "PAGE_SIZE", PAGE)
    monkeypatch.setattr(service, "FEW_MATCHES", 0)  # every text "matches many"

    def pages(principal: Principal, search: StudySearch) -> list[int]:
        found: list[int] = []
        with app.extensions["db"].new_session() as session:
            for page in range(1, 30):
                rows, more = service.search_studies(session, principal,
                                                    replace(search, page=page))
                found += [study.id for study, _patient in rows]
                if not more:
                    return found
        raise AssertionError("more than 29 pages")

    for who in ("ada", "om"):
        for search in (StudySearch(text="key"), StudySearch(text="key 3", modality="MR"),
                       StudySearch(text="acc1", oldest_first=True), StudySearch(text="zz")):
            keyed = pages(people[who], search)
            with monkeypatch.context() as m:  # no keys: the access rules as a filter
                m.setattr("portal.access.policy.MAX_LIST_KEYS", -1)
                on_visible_ids = pages(people[who], search)
                m.setattr(service, "FEW_VISIBLE", 0)
                walked = pages(people[who], search)
            assert keyed == on_visible_ids == walked, (who, search)
            assert bool(keyed) == (search.text != "zz"), (who, search)
    assert len(pages(people["ada"], StudySearch(text="key"))) > 4 * PAGE
