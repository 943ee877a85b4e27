"""DICOM wildcard matching without backtracking (portal/wildcard.py): the same answers as a
regular expression, on small inputs where the expression is cheap to run, and pathological
queries answered at once on SQLite and PostgreSQL through QIDO-RS's own conditions (a query
of nine ``*?`` pairs took 6.5 s on one patient row with Python's REGEXP, each pair three
times the last)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from flask import Flask
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import select

from portal.dicomweb.qido import _group_match, _text_match
from portal.index.models import Patient
from portal.wildcard import pn_groups_match, pn_regex, wildcard_match, wildcard_regex
from tests.conftest import close_app, make_app

TEXT = st.text(alphabet="ab=^", max_size=9)
QUERY = st.text(alphabet="ab*?^", max_size=7)


@settings(max_examples=600, deadline=None)
@given(TEXT, QUERY)
def test_the_same_answers_as_a_regular_expression(text: str, query: str) -> None:
    assert wildcard_match(text, query) == bool(re.fullmatch(wildcard_regex(query), text,
                                                            re.DOTALL))


@settings(max_examples=600, deadline=None)
@given(st.lists(st.text(alphabet="ab^", max_size=4), min_size=1, max_size=3),
       st.lists(QUERY, min_size=1, max_size=3))
def test_person_names_by_group_as_a_regular_expression(groups: list[str],
                                                        query: list[str]) -> None:
    stored, asked, grouped = f"={'='.join(groups)}=", "=".join(query), len(query) > 1
    assert pn_groups_match(stored, asked, grouped) == \
        bool(re.search(pn_regex(asked, grouped), stored))


@pytest.fixture
def names(tmp_path: Path, database_url: str) -> Iterator[Flask]:
    app = make_app(tmp_path / "instance", database_url)
    with app.extensions["db"].write_transaction() as session:
        session.add(Patient(patient_id="R1", issuer_of_patient_id="",
                            patient_name="Montgomery-Smithson^Alexandra^Elizabeth=Z"))
    yield app
    close_app(app)


@pytest.mark.timeout(60)
def test_pathological_queries_are_answered(names: Flask) -> None:
    """Fourteen ``*?`` pairs that cannot match (about 30 minutes for one row before), and a
    run of stars between repeated letters, on both databases; real matches still found."""
    slow = "*?" * 14 + "*z"
    stars = "*a" * 12 + "*q"
    with names.extensions["db"].new_session() as session:
        def found(condition: object) -> list[int]:
            return list(session.scalars(select(Patient.id).where(condition)))  # type: ignore[arg-type]
        assert found(_group_match(slow)) == []
        assert found(_group_match(stars)) == []
        assert found(_text_match(Patient.patient_name, "M" + stars, False)) == []
        assert len(found(_group_match("mont*smith*"))) == 1
        assert len(found(_group_match("*?lex*"))) == 1
        assert len(found(_group_match("=z"))) == 1  # any alphabetic group, "z" the second
        assert len(found(_group_match("=y"))) == 0
        assert len(found(_group_match("mont*=?"))) == 1  # one letter in the second group
        assert len(found(_group_match("=z=*"))) == 0  # it has no third group
        assert len(found(_text_match(Patient.patient_name, "Mont*Z", False))) == 1
        assert found(_text_match(Patient.patient_name, "mont*Z", False)) == []  # case kept
