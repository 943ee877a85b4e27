"""A property-based walk over every route (issue 12, item 5): each rule of the URL map and
each of its methods is called with generated path values, query strings, headers and bodies
(form, JSON, multipart, junk), as each kind of caller: nobody, a physician, an office manager,
a patient, a share-link visitor and a machine client. No answer may be a server error, and no
response header may hold what gunicorn refuses to send (it would turn the answer into a 500).

Bounded (a few examples per route and caller) and seeded per route (the same examples on every
run, so CI repeats what failed) so that it stays well within CI's time (about a minute)."""

from __future__ import annotations

import base64
import json
import re
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from flask import Flask
from flask.testing import FlaskClient
from hypothesis import HealthCheck, Phase, example, given, seed, settings
from hypothesis import strategies as st
from pydicom.uid import generate_uid
from sqlalchemy import select
from werkzeug.routing import Rule

from portal.access.grants import create_grant, grant_state, link_identifier, link_patient
from portal.access.models import Grant, User
from portal.access.principal import Principal
from portal.archive import current_archive
from tests.conftest import (
    OIDC_SETTINGS,
    IdentityProvider,
    add_person,
    basic_auth,
    close_app,
    csrf_of,
    make_app,
    make_client,
    sign_in,
)
from tests.factories import make_instance

# 86 rules and methods x 6 callers x (6 generated + 1 to 4 edge examples): about 4,000 requests
EXAMPLES_PER_CALLER = 6
# In this order: what one caller's examples may end (a session, a share link, a role) is
# only someone's who came before; the world is restored after each rule.
ROLES = ("anonymous", "machine", "visitor", "patient", "physician", "manager")
# What gunicorn accepts in a response header value (gunicorn.http.wsgi.HEADER_VALUE_RE).
GUNICORN_HEADER_VALUE = re.compile(r"[ \t\x21-\x7e\x80-\xff]*")
_VARIABLE = re.compile(r"<(?:(?P<converter>\w+)(?:\([^)]*\))?:)?(?P<name>\w+)>")
SETUP = Principal("user", 0, "setup", roles=frozenset({"office_manager"}))


@dataclass
class World:
    """The app, one study, people signed in, a share link opened, known ids and uids."""

    app: Flask
    idp: IdentityProvider
    clients: dict[str, FlaskClient] = field(default_factory=dict)
    subjects: dict[str, str] = field(default_factory=dict)
    roles: dict[str, list[str]] = field(default_factory=dict)
    known_text: list[str] = field(default_factory=list)
    known_ints: list[int] = field(default_factory=list)
    slots: dict[str, list[str]] = field(default_factory=dict)  # right values per path name
    share: dict[str, str] = field(default_factory=dict)
    basic: dict[str, str] = field(default_factory=dict)
    study: str = ""
    grant_id: int = 0

    def client(self, role: str) -> FlaskClient:
        """The client acting as ``role``."""
        return self.clients[role]


@pytest.fixture
def world(tmp_path: Path, idp: IdentityProvider) -> Iterator[World]:
    """One app (SQLite) with everything the walk needs to reach past the first checks."""
    app = make_app(tmp_path / "instance", OIDC_ISSUER=idp.issuer, SHARE_CREATE_PER_HOUR=100_000,
                   SHARE_ATTEMPTS_PER_ADDRESS=100_000, **OIDC_SETTINGS)
    try:
        yield _build(app, idp)
    finally:
        close_app(app)


def _build(app: Flask, idp: IdentityProvider) -> World:
    """A study (with a report), a physician granted it, a patient linked to it, an office
    manager, a machine client, and a share link of it opened by a visitor."""
    world = World(app, idp)
    suffix = generate_uid()[-6:]
    study, series, sop = generate_uid(), generate_uid(), generate_uid()
    with app.app_context():
        current_archive().ingest(make_instance(study=study, series=series, sop=sop,
                                               patient_id="PAT-WALK", AccessionNumber="W1",
                                               rows=8, columns=8,
                                               ReferringPhysicianName="Walk^Doc"),
                                 who="test")
    people = {"physician": ["physician"], "manager": ["office_manager"],
              "patient": ["patient"]}
    ids = {}
    for role, roles in people.items():
        world.subjects[role] = f"walk-{role}-{suffix}"
        world.roles[role] = roles
        ids[role] = add_person(app, idp, world.subjects[role], roles, "Clinic")
    with app.extensions["db"].write_transaction() as session:
        grant = create_grant(session, SETUP, user_id=ids["physician"], study_uid=study)
        identifier = link_identifier(session, SETUP, ids["physician"], "npi:1234567893")
        link_patient(session, SETUP, ids["patient"], "PAT-WALK")
        session.flush()
        world.grant_id, identifier_id = grant.id, identifier.id
    world.study = study
    name, secret = make_client(app, "walker")
    world.basic = basic_auth(name, secret)
    report = app.test_client().post("/fhir/DiagnosticReport", headers=world.basic, json={
        "resourceType": "DiagnosticReport", "status": "final", "code": {"text": "CT"},
        "identifier": [{"system": "urn:ris:report", "value": "R-W1"}],
        "subject": {"identifier": {"value": "PAT-WALK"}},
        "imagingStudy": [{"reference": f"ImagingStudy/{study}"}], "conclusion": "normal",
        "presentedForm": [{"contentType": "text/plain",
                           "data": base64.b64encode(b"Normal.").decode()}]})
    assert report.status_code == 201, report.data
    report_id = int(report.headers["Location"].rsplit("/", 1)[1])
    for role in people:
        _sign_in(world, role)
    assert _new_share(world)
    # Without cookies: a cookie one answer sets (the sign-in's state) would make the next
    # request a browser's, which needs the CSRF token, instead of a stranger's or a script's.
    world.clients["anonymous"] = app.test_client(use_cookies=False)
    world.clients["machine"] = app.test_client(use_cookies=False)
    world.known_text = [study, series, sop, world.share["id"], "PAT-WALK", "W1", "1", "1,2",
                        "7FE00010", "00540016/0/00181072", "axial", "mip", "css/portal.css",
                        "npi:1234567893", "physician", "patient", "ImagingStudy/" + study]
    world.known_ints = [*ids.values(), world.grant_id, identifier_id, report_id, 0, 1, 2]
    users = [str(i) for i in ids.values()]
    world.slots = {"study": [study], "study_uid": [study], "series": [series],
                   "series_uid": [series], "instance": [sop], "public_id": [world.share["id"]],
                   "frame_list": ["1", "1,1"], "frame": ["1"], "tag_path": ["7FE00010"],
                   "kind": ["axial", "mip"], "filename": ["css/portal.css", "js/viewer.js"],
                   "user_id": users, "grant_id": [str(world.grant_id)],
                   "identifier_id": [str(identifier_id)], "report_id": [str(report_id)]}
    return world


def _sign_in(world: World, role: str) -> None:
    """Sign ``role`` in again (after the walk logged him out or changed his roles)."""
    with world.app.extensions["db"].write_transaction() as session:
        user = session.scalars(select(User).where(
            User.subject == world.subjects[role])).one()
        user.roles, user.active = world.roles[role], True
    client = world.app.test_client()
    assert sign_in(client, world.idp, world.subjects[role]).status_code == 302
    assert csrf_of(client)  # the session's token exists: changes can carry it
    world.clients[role] = client


def _new_share(world: World) -> bool:
    """The physician shares the study (again: the walk may have revoked the link), and the
    visitor opens it; False when the physician cannot (then the visitor stays as he is)."""
    made = world.client("physician").post(f"/studies/{world.study}/share", data={
        "csrf_token": csrf_of(world.client("physician")), "days": "5", "pin": "on"})
    html = made.get_data(as_text=True)
    token = re.search(r'id="share-url"[^>]*value="[^"#]*#([^"]+)"', html)
    pin = re.search(r'id="share-pin">(\d+)<', html)
    public_id = re.search(r'/shares/([0-9a-f-]{36})"', html)
    if made.status_code != 201 or not (token and pin and public_id):
        return False
    world.share = {"token": token.group(1), "pin": pin.group(1), "id": public_id.group(1)}
    world.slots["public_id"] = [public_id.group(1)]
    return _open_share(world)


def _open_share(world: World) -> bool:
    """Open the link as the visitor does (its form); False when it no longer opens."""
    client = world.app.test_client()
    answer = client.post("/s/exchange", data={"token": world.share["token"],
                                              "pin": world.share["pin"]})
    if answer.status_code not in (302, 303):
        return False
    world.clients["visitor"] = client
    return True


_CHECKS = {"physician": "/shares", "manager": "/api/grants", "patient": "/studies",
           "visitor": "/shared"}


def _restore(world: World) -> None:
    """Put back what the last rule's examples took away (a session, a role, the physician's
    grant, the share link), so that every rule is walked as every kind of caller."""
    with world.app.extensions["db"].write_transaction() as session:
        grant = session.get(Grant, world.grant_id)
        if grant is None or grant_state(grant) != "active":
            physician = session.scalars(select(User.id).where(
                User.subject == world.subjects["physician"])).one()
            made = create_grant(session, SETUP, user_id=physician, study_uid=world.study)
            session.flush()
            world.grant_id = made.id
    for role, path in _CHECKS.items():  # the visitor last: his link is the physician's
        answer = world.client(role).get(path, headers={"Accept": "application/json"})
        answer.close()
        if answer.status_code != 200:
            if role != "visitor":
                _sign_in(world, role)
            elif not _open_share(world):
                _new_share(world)


# -- strategies ------------------------------------------------------------------------------

_ODD_TEXT = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=40)
_CONTROL = st.text(st.sampled_from("\x00\x01\x08\x1b\x7f\r\n\t\"'\\<>%&;=,/*?-.^ "),
                   min_size=1, max_size=8)
# Where integers break: the 32-bit INTEGER of PostgreSQL, SQLite's 64 bits, signs, zero.
_EDGE_INTS = st.sampled_from([2**31 - 1, 2**31, 2**63 - 1, 2**63, -(2**31) - 1, 10**30, -1, 0])
_INTS = st.one_of(_EDGE_INTS, st.integers(-(2**70), 2**70))
_ODD_WORDS = st.sampled_from(["", " ", "true", "false", "null", "*", "2026-01-02",
                              "20260102-20260103", "1.2.840.10008.1.2.1", "auto", "%00", "٣",
                              "²", "1e9", "0x10", "9" * 5000, "a" * 300, "../../etc/passwd"])


def _text(world: World) -> st.SearchStrategy[str]:
    """A text value: a known uid or id, an edge integer, an odd word, control characters or
    anything at all."""
    return st.one_of(st.sampled_from(world.known_text), _EDGE_INTS.map(str), _ODD_WORDS,
                     _CONTROL, _INTS.map(str), _ODD_TEXT)


def _path_value(world: World, name: str, converter: str) -> st.SearchStrategy[str]:
    """Half the time the right value for this name (to reach past the lookup), else an edge
    value or anything."""
    if converter == "int":
        other = st.one_of(_EDGE_INTS.map(str), st.sampled_from(world.known_ints).map(str),
                          _INTS.map(str), st.sampled_from(["00001", "9" * 5000, "٣"]))
    else:
        other = _text(world).filter(lambda v: v != "")
        if converter != "path":
            other = other.filter(lambda v: "/" not in v)
    right = st.sampled_from(world.slots.get(name) or world.known_text[:1])
    return st.booleans().flatmap(lambda use: right if use else other)


_QUERY_KEYS = ["offset", "limit", "page", "_count", "q", "from", "to", "who", "study", "event",
               "includefield", "fuzzymatching", "PatientID", "PatientName", "StudyDate",
               "StudyInstanceUID", "ModalitiesInStudy", "SeriesNumber", "InstanceNumber",
               "NumberOfStudyRelatedSeries", "00100020", "width", "quality", "viewport",
               "window", "preset", "annotation", "next", "t", "code", "state", "patient",
               "subject", "_id", "accept", "charset", "error", "scope", "frame"]
_JSON_KEYS = ["user_id", "ids", "study_uid", "patient_id", "key", "roles", "active",
              "practice", "phone_number", "notify_by_sms", "email", "expires_at", "reason",
              "break_glass", "days", "audience", "requires_sign_in", "download", "pin",
              "note", "notify_sender", "series", "whole_patient", "not_before", "scope",
              "resourceType", "status", "subject", "identifier", "imagingStudy",
              "presentedForm", "conclusion"]
_FORM_KEYS = [*_JSON_KEYS, "role_physician", "role_office_manager", "role_patient", "token",
              "channel", "to", "what", "csrf_token", "q", "from", "to", "expires_in"]
_ACCEPTS = ["*/*", "application/json", "application/dicom+json", "text/html", "image/png",
            "image/jpeg", "application/zip", "multipart/related; type=\"application/dicom\"",
            "multipart/related; type=\"application/octet-stream\"; transfer-syntax=*",
            "multipart/related; type=\"image/jpeg\"", "application/fhir+json",
            "multipart/related; type=\"application/dicom\"; transfer-syntax=1.2.3"]
_CONTENT_TYPES = ["application/json", "application/x-www-form-urlencoded", "text/plain",
                  "multipart/related; type=\"application/dicom\"; boundary=b",
                  "multipart/related; boundary=b", "application/fhir+json",
                  "application/dicom", "multipart/form-data; boundary=b", ""]


def _json_value(world: World) -> st.SearchStrategy[Any]:
    """Any JSON value, its leaves mostly ids, edge integers and the texts above."""
    leaf = st.one_of(_EDGE_INTS, st.sampled_from(world.known_ints), _text(world), st.none(),
                     st.booleans(), _INTS, st.floats(allow_nan=False))
    return st.recursive(leaf, lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.sampled_from(_JSON_KEYS), inner,
                                                     max_size=3)), max_leaves=6)


def _multipart(parts: list[tuple[bytes, bytes]]) -> bytes:
    """A multipart body (boundary ``b``) of (Content-Type, payload) parts."""
    body = b"".join(b"--b\r\nContent-Type: " + kind + b"\r\n\r\n" + payload + b"\r\n"
                    for kind, payload in parts)
    return body + b"--b--\r\n"


def _body(world: World, method: str) -> st.SearchStrategy[tuple[str, Any, str | None]]:
    """(kind, payload, content type): no body, a form, JSON, multipart or junk; changes get
    mostly forms and JSON objects with the names the routes read."""
    form = st.tuples(st.just("form"), st.dictionaries(st.sampled_from(_FORM_KEYS),
                                                      _text(world), max_size=6),
                     st.just("application/x-www-form-urlencoded"))
    json_types = st.sampled_from(["application/json", "application/fhir+json"])
    json_object = st.tuples(st.just("json"), st.dictionaries(
        st.sampled_from(_JSON_KEYS), _json_value(world), max_size=6), json_types)
    json_any = st.tuples(st.just("json"), _json_value(world), json_types)
    parts = st.lists(st.tuples(
        st.one_of(st.sampled_from([b"application/dicom", b"text/plain", b""]),
                  st.binary(max_size=12)),
        st.one_of(st.just(make_instance(rows=4, columns=4)), st.binary(max_size=64))),
        min_size=1, max_size=3)
    multipart = st.tuples(st.just("raw"), parts.map(_multipart),
                          st.sampled_from(_CONTENT_TYPES))
    junk = st.tuples(st.just("raw"), st.binary(max_size=200), st.sampled_from(_CONTENT_TYPES))
    nothing = st.just(("none", None, None))
    if method in ("GET", "HEAD"):
        return st.one_of(nothing, nothing, form, json_any, junk)
    return st.one_of(json_object, form, json_object, form, multipart, junk, json_any, nothing)


_HEADER_TEXT = st.text(st.characters(min_codepoint=0x20, max_codepoint=0xFF,
                                     exclude_characters="\x7f"), max_size=40)


_USUAL_HEADERS = {
    "Accept": st.sampled_from(_ACCEPTS),
    "Accept-Language": st.sampled_from(["en", "de-DE,de;q=0.9", "*", ""]),
    "User-Agent": st.sampled_from(["Mozilla/5.0 (iPhone; CPU iPhone OS 17_0 like Mac OS X)",
                                   "curl/8.5", "Slackbot-LinkExpanding 1.0"]),
    "If-None-Match": _HEADER_TEXT, "Range": st.sampled_from(["bytes=0-10", "bytes=x-", ""])}
_HOSTILE_HEADERS = {
    "Accept": _HEADER_TEXT, "User-Agent": _HEADER_TEXT, "X-Forwarded-For": _HEADER_TEXT,
    "Origin": st.sampled_from(["http://localhost", "https://evil.example", "null"]),
    "Sec-Fetch-Site": st.sampled_from(["same-origin", "cross-site", "none"]),
    "Content-Encoding": st.sampled_from(["gzip", "x"]),
    "Authorization": st.one_of(st.sampled_from(["Basic", "Bearer", "Bearer x.y.z",
                                                "Basic !!!", "Negotiate abc"]), _HEADER_TEXT)}


def _headers() -> st.SearchStrategy[dict[str, str]]:
    """Mostly none or usual ones (so the request reaches the route), sometimes hostile."""
    usual = st.fixed_dictionaries({}, optional=_USUAL_HEADERS)
    hostile = st.fixed_dictionaries({}, optional={**_USUAL_HEADERS, **_HOSTILE_HEADERS})
    return st.one_of(st.just({}), usual, usual, hostile)


@dataclass(frozen=True)
class Call:
    """One generated request."""

    role: str
    method: str
    path: str
    query: list[tuple[str, str]]
    headers: dict[str, str]
    body: tuple[str, Any, str | None]
    csrf: bool


def _path(rule: Rule, values: dict[str, str]) -> str:
    """The rule's path with these values, quoted as a client would."""
    def one(match: re.Match[str]) -> str:
        """One variable's value, quoted (slashes kept for a ``path`` converter)."""
        safe = "/" if match.group("converter") == "path" else ""
        return quote(values[match.group("name")], safe=safe)
    return _VARIABLE.sub(one, rule.rule)


def _calls(world: World, rule: Rule, method: str, role: str) -> st.SearchStrategy[Call]:
    """Requests to ``rule`` by ``role``: path values, query, headers, body, CSRF token."""
    values = {m.group("name"): _path_value(world, m.group("name"),
                                           m.group("converter") or "default")
              for m in _VARIABLE.finditer(rule.rule)}

    def build(drawn: dict[str, str]) -> str:
        """The path with the drawn values."""
        return _path(rule, drawn)

    query = st.one_of(st.just([]), st.lists(st.tuples(
        st.one_of(st.sampled_from(_QUERY_KEYS), _ODD_TEXT), _text(world)),
        min_size=1, max_size=4))
    methods = [method, "HEAD"] if method == "GET" else [method]
    return st.builds(Call, role=st.just(role), method=st.sampled_from(methods),
                     path=st.fixed_dictionaries(values).map(build), query=query,
                     headers=_headers(), body=_body(world, method),
                     csrf=st.sampled_from([True, True, True, False]))


_HUGE = 10**30  # past 64 bits
_INT_NAMES = ("user_id", "ids", "days", "offset", "limit", "page", "_count", "width",
              "quality", "frame", "SeriesNumber", "InstanceNumber", "NumberOfStudyRelatedSeries")


def _edge_calls(world: World, rule: Rule, method: str, role: str) -> list[Call]:
    """Explicit examples besides the generated ones: a number past 64 bits in each place a
    route reads one (path, query, form, JSON), the rest right, so the number is what is
    tried; and a multipart body whose part headers hold control characters."""
    names = [(m.group("name"), m.group("converter")) for m in _VARIABLE.finditer(rule.rule)]
    right = {name: (world.slots.get(name) or world.known_text[:1])[0] for name, _ in names}
    calls = []
    if any(converter == "int" for _, converter in names):
        huge = {name: str(_HUGE) if converter == "int" else right[name]
                for name, converter in names}
        body = ("none", None, None) if method == "GET" else ("json", {}, "application/json")
        calls.append(Call(role, method, _path(rule, huge), [], {}, body, True))
    path = _path(rule, right)
    if method == "GET":
        calls.append(Call(role, method, path, [("offset", str(_HUGE))], {},
                          ("none", None, None), True))
    else:
        as_json = {n: [_HUGE] if n == "ids" else _HUGE for n in _INT_NAMES}
        calls.append(Call(role, method, path, [], {}, ("json", as_json, "application/json"),
                          True))
        calls.append(Call(role, method, path, [], {}, (
            "form", {n: str(_HUGE) for n in _INT_NAMES},
            "application/x-www-form-urlencoded"), True))
        # Part headers with control characters (a reason that quotes them goes into a
        # response header).
        parts = _multipart([(kind, b"x") for kind in (b"text/a\x00b", b"text/\x1b[31m",
                                                     b"text/a\rb", b"text/a\x7fb")])
        calls.append(Call(role, method, path, [], {}, (
            "raw", parts, 'multipart/related; type="application/dicom"; boundary=b'), True))
    return calls


def _send(world: World, call: Call) -> tuple[int, list[tuple[str, str]]]:
    """Make the request; (status, headers), or an exception that escaped the app."""
    client = world.client(call.role)
    headers = dict(call.headers)
    if call.role == "machine":
        headers.setdefault("Authorization", world.basic["Authorization"])
    kind, payload, content_type = call.body
    data: Any = None
    if kind == "form":
        data = dict(payload)
    elif kind == "json":
        data = json.dumps(payload)
    elif kind == "raw":
        data = payload
    if call.csrf and call.role in ("physician", "manager", "patient", "visitor"):
        with client.session_transaction() as session:
            token = str(session.get("csrf") or "")
        headers["X-CSRF-Token"] = token
        if kind == "form":
            data.setdefault("csrf_token", token)
    response = client.open(call.path, method=call.method, query_string=call.query,
                           headers=headers, data=data, content_type=content_type)
    try:
        response.get_data()  # streamed answers run to the end (and leave no context pushed)
        return response.status_code, list(response.headers.items())
    finally:
        response.close()


def _walk_rule(world: World, rule: Rule, method: str, role: str, *, shrink: bool = True,
               examples_per_caller: int = EXAMPLES_PER_CALLER) -> str | None:
    """Run the examples of one rule, method and caller; the failure found, if any."""
    phases = [Phase.explicit, Phase.generate, *([Phase.shrink] if shrink else [])]

    def examples(call: Call) -> None:
        """No 5xx, and only headers gunicorn sends."""
        try:
            status, headers = _send(world, call)
        except Exception as exc:  # the test client re-raises what the app did not handle
            raise AssertionError(f"{call!r} raised {exc!r}") from exc
        assert status < 500, f"{call!r} answered {status}"
        for name, value in headers:
            assert GUNICORN_HEADER_VALUE.fullmatch(value), \
                f"{call!r} sent header {name}: {value!r}, which gunicorn refuses"

    test = given(call=_calls(world, rule, method, role))(examples)
    for call in _edge_calls(world, rule, method, role):
        test = example(call=call)(test)
    test = settings(max_examples=examples_per_caller, deadline=None, database=None,
                    suppress_health_check=list(HealthCheck), print_blob=False,
                    phases=phases)(test)
    # A fixed seed per rule, method and caller: the same examples on every run (CI repeats
    # what failed), but different ones for each route.
    test = seed(zlib.crc32(f"{method} {rule.rule} {role}".encode()))(test)
    try:
        test()
    except Exception as exc:  # one failure, or a group of distinct ones
        return f"{method} {rule.rule} as {role}: {str(exc)[:3000]}"
    return None


def _rules(app: Flask) -> list[tuple[Rule, str]]:
    """Every rule with each of its methods (HEAD goes with GET; OPTIONS is Flask's)."""
    pairs = [(rule, method) for rule in app.url_map.iter_rules()
             for method in sorted((rule.methods or set()) - {"HEAD", "OPTIONS"})]
    return sorted(pairs, key=lambda pair: (pair[0].rule, pair[1]))


def test_no_route_answers_a_server_error_to_anything(world: World) -> None:
    pairs = _rules(world.app)
    assert len(pairs) > 80  # every blueprint is registered: the walk covers them all
    failures = []
    for rule, method in pairs:
        failures += [f for role in ROLES if (f := _walk_rule(world, rule, method, role))]
        _restore(world)
    if failures:
        pytest.fail("\n\n".join(failures), pytrace=False)


def test_the_walk_sees_a_server_error_when_there_is_one(world: World) -> None:
    """The walk is not blind: a route that fails on some input, or that echoes it into a
    header gunicorn would refuse, is reported."""
    from flask import Response, request

    from portal.access.policy import public

    def failing() -> str:
        """Fails when the query holds anything."""
        if request.args:
            raise RuntimeError("boom")
        return "ok"

    def echoing() -> Response:
        """Echoes the query into a header, as the STOW warnings did."""
        text = "".join(f"{k}{v}" for k, v in request.args.items())
        return Response("ok", headers={"X-Echo": "".join(
            c for c in text if c not in "\r\n" and ord(c) < 256)})

    app = world.app
    for endpoint, view, symptom in (("studies.home", failing, "boom"),
                                    ("health.healthz", echoing, "gunicorn refuses")):
        app.view_functions[endpoint] = public(view)
        rule = next(r for r in app.url_map.iter_rules() if r.endpoint == endpoint)
        failure = _walk_rule(world, rule, "GET", "anonymous", shrink=False,
                             examples_per_caller=30)
        assert failure and symptom in failure, (endpoint, failure)
