"""Errors are mapped once (issue 14 item 5): every domain exception is a PortalError that says
its HTTP status and a public reason (portal/failures.py), one handler in portal/errors.py
answers it in the format of the face that asked, and route modules keep no local
``except X: abort(...)`` (or ``error_response``) that only repeats what the handler does."""

from __future__ import annotations

import ast
import importlib
import inspect
import json
import pkgutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from flask import Flask
from flask.testing import FlaskClient
from werkzeug.exceptions import HTTPException

import portal
from portal import audit_forward, failures, notify
from portal.access.clients import ClientError
from portal.access.policy import public
from portal.access.users import UserError
from portal.archive.external import ExternalNotFound, ExternalUnavailable
from portal.archive.importer import UnsafeZip
from portal.archive.store import ArchiveUnavailable, CorruptObject, StorageFull
from portal.dicomweb.frames import NotAcceptable
from portal.dicomweb.qido import QueryError
from portal.imaging.render import FrameNotFound, RenderRefused
from portal.imaging.rendition import InvalidRendition
from portal.imaging.volume import NotAVolume
from portal.index.service import IndexConflict
from portal.reports.hl7 import MessageRejected
from portal.reports.service import IdentityMismatch, ReportError
from portal.sharing.service import LinkUnavailable, NoSuchLink, ShareError
from portal.studies.export import ExportTooLarge
from tests.conftest import basic_auth, make_client

PORTAL = Path(portal.__file__).parent
FHIR_JSON = "application/fhir+json"


def _portal_modules() -> Iterator[str]:
    """Every module of the package but the migration scripts (Alembic loads those itself)
    and gunicorn's settings file (importing it sets the metrics' multiprocess folder in the
    environment, which is gunicorn's to do, not this test process's; it defines no
    exception)."""
    for info in pkgutil.walk_packages([str(PORTAL)], "portal."):
        if not info.name.startswith("portal.migrations") \
                and info.name != "portal.gunicorn_config":
            yield info.name


def _exception_classes() -> dict[str, type[BaseException]]:
    """Every exception class defined in the portal, by ``module.Name``."""
    found: dict[str, type[BaseException]] = {}
    for name in _portal_modules():
        module = importlib.import_module(name)
        for value in vars(module).values():
            if (inspect.isclass(value) and issubclass(value, BaseException)
                    and value.__module__ == name):
                found[f"{name}.{value.__qualname__}"] = value
    return found


# Exceptions that are deliberately no PortalError, each with why.
NOT_PORTAL_ERRORS = {
    "portal.config.ConfigError": "refuses to start the app; never raised by a request",
    "portal.numbers.NumberError": "a werkzeug BadRequest already (a 400 with its reason)",
    "portal.multipart.MultipartError": "the codec imports nothing of the portal; STOW-RS answers "
                                       "it with its own prefix, the external client retries",
    "portal.archive.validate.Rejected": "its status is a DICOM status for peers; STOW-RS, "
                                        "C-STORE and import answer it per instance",
    "portal.archive.validate._Malformed": "private to validation, becomes Rejected",
    "portal.archive.ingest._Fallback": "private control flow of ingest",
    "portal.archive.ingest._AlreadyStored": "private control flow of ingest",
    "portal.archive.same_instance._Different": "private to the comparison, becomes Rejected",
    "portal.archive.sync._Refused": "private to sync, logged and counted",
    "portal.archive.compress.NotLossless": "private to the compress job: the file is kept "
                                           "as it is, logged and counted",
    "portal.archive.external._Timeout": "private to the client, becomes ExternalUnavailable",
    "portal.archive.backup.BackupRefused": "a click error of the backup and restore commands "
                                           "(a message and exit status 1); no request raises it",
    "portal.redis_link.RedisDown": "internal: the caller falls back to the database or memory",
    "portal.imaging.signed.BadToken": "answered (403 with its reason) by the WSGI front door "
                                      "of signed frame URLs, before Flask (dicomweb/signed.py)",
}


def test_every_portal_error_has_an_http_status_and_a_reason() -> None:
    classes = [c for c in _exception_classes().values() if issubclass(c, failures.PortalError)]
    assert len(classes) >= 30
    for cls in classes:
        assert isinstance(cls.status, int) and 400 <= cls.status <= 599, cls
        assert isinstance(cls.default_reason, str) and cls.default_reason.strip(), cls
        assert cls.__doc__ and cls.__doc__.strip(), cls


def test_every_exception_class_is_a_portal_error_or_says_why_not() -> None:
    others = {name for name, cls in _exception_classes().items()
              if not issubclass(cls, failures.PortalError | HTTPException)
              or name in NOT_PORTAL_ERRORS}
    unexplained = others - set(NOT_PORTAL_ERRORS)
    assert not unexplained, f"make these PortalErrors or say why not: {sorted(unexplained)}"
    stale = set(NOT_PORTAL_ERRORS) - set(_exception_classes())
    assert not stale, f"no longer exist: {sorted(stale)}"


@pytest.mark.parametrize(("cls", "status"), [
    (QueryError, 400), (InvalidRendition, 400), (UserError, 400), (ClientError, 400),
    (ShareError, 400), (UnsafeZip, 400), (MessageRejected, 400), (notify.DeliveryFailed, 400),
    (NoSuchLink, 404), (LinkUnavailable, 404), (FrameNotFound, 404), (ExternalNotFound, 404),
    (NotAcceptable, 406), (IndexConflict, 409), (ExportTooLarge, 413),
    (RenderRefused, 422), (NotAVolume, 422), (ReportError, 422), (IdentityMismatch, 422),
    (CorruptObject, 500), (ArchiveUnavailable, 503), (ExternalUnavailable, 503),
    (audit_forward.ForwardFailed, 503), (StorageFull, 507),
])
def test_each_domain_exception_declares_its_status_once(cls: type[failures.PortalError],
                                                        status: int) -> None:
    assert issubclass(cls, failures.PortalError) and cls.status == status


def test_they_stay_what_callers_already_catch() -> None:
    """Callers catch ValueError or LookupError around parsing and rendering: still caught."""
    for cls in (QueryError, InvalidRendition, RenderRefused, NotAVolume, ExportTooLarge,
                UserError, ClientError, ReportError, MessageRejected):
        assert issubclass(cls, ValueError), cls
    assert issubclass(FrameNotFound, LookupError)
    assert issubclass(NoSuchLink, ShareError) and issubclass(ExternalUnavailable,
                                                              ArchiveUnavailable)


def test_a_reason_is_the_message_unless_the_message_is_not_for_the_public() -> None:
    assert QueryError("unknown attribute 'X'").reason == "unknown attribute 'X'"
    assert IndexConflict().reason == IndexConflict.default_reason
    leaky = CorruptObject("3f2a9c0d1e.dcm")
    assert "3f2a" not in leaky.reason and str(leaky) == "3f2a9c0d1e.dcm"
    assert ExternalUnavailable("down", retry_after=0.2).headers() == {"Retry-After": "1"}
    assert ExternalUnavailable("down", retry_after=61).headers() == {"Retry-After": "61"}


# -- one handler, the format of each face ----------------------------------------------------

SAMPLES = [
    QueryError("unknown attribute 'Foo'"),
    NoSuchLink("no such link"),
    ExportTooLarge("the study is larger than a ZIP file can hold"),
    RenderRefused("the frame is larger than 100 megapixels"),
    ExternalUnavailable("the image archive did not answer in time", retry_after=30),
    CorruptObject("0a1b2c.dcm"),
]
FACES = {"machine": "/dicomweb/_probe", "api": "/api/_probe", "fhir": "/fhir/_probe",
         "page": "/_probe"}


@pytest.fixture
def probed(app: Flask) -> FlaskClient:
    """The real app with one extra public view per face that raises the sample it is told to
    (the domain code paths that raise them are exercised by the tests of each room)."""
    for face, path in FACES.items():
        def raise_sample(number: int) -> str:
            raise SAMPLES[number]
        app.add_url_rule(f"{path}/<int:number>", f"probe_{face}", public(raise_sample))
    return app.test_client()


@pytest.mark.parametrize("number", range(len(SAMPLES)))
def test_the_handler_answers_each_face_in_its_own_format(probed: FlaskClient,
                                                         number: int) -> None:
    sample = SAMPLES[number]
    retry = {"Retry-After": "30"} if isinstance(sample, failures.Unavailable) else {}

    for path in (FACES["machine"], FACES["api"]):
        answer = probed.get(f"{path}/{number}")
        assert answer.status_code == sample.status
        assert answer.mimetype == "application/json"
        assert answer.get_json() == {"error": sample.reason, "status": sample.status}
        assert {k: answer.headers[k] for k in retry} == retry

    answer = probed.get(f"{FACES['fhir']}/{number}")
    assert answer.status_code == sample.status and answer.mimetype == FHIR_JSON
    body = json.loads(answer.get_data(as_text=True))
    assert body["resourceType"] == "OperationOutcome"
    assert body["issue"][0]["diagnostics"] == sample.reason
    assert {k: answer.headers[k] for k in retry} == retry

    answer = probed.get(f"{FACES['page']}/{number}", headers={"Accept": "text/html"})
    assert answer.status_code == sample.status and answer.mimetype == "text/html"
    page = answer.get_data(as_text=True)
    assert sample.reason.replace("'", "&#39;") in page
    assert "Traceback" not in page and "0a1b2c" not in page
    assert {k: answer.headers[k] for k in retry} == retry


def test_real_requests_reach_the_handler(app: Flask) -> None:
    """Without any probe: a QIDO-RS query on an unknown attribute (QueryError, no local
    mapping left) and a share link that does not exist (NoSuchLink) through the JSON API."""
    client = app.test_client()
    headers = basic_auth(*make_client(app, "errors"))
    answer = client.get("/dicomweb/studies?NoSuchKeyword=1", headers=headers)
    assert answer.status_code == 400
    assert answer.get_json()["status"] == 400
    assert "NoSuchKeyword" in answer.get_json()["error"]


# -- no local mapping left in route modules --------------------------------------------------

ROUTE_MODULES = sorted([*PORTAL.glob("*/routes.py"), PORTAL / "studies" / "patients.py",
                        PORTAL / "health.py", PORTAL / "dicomweb" / "stow.py"])

# (module, function, caught) -> why this mapping stays local.
ALLOWED = {
    ("dicomweb/routes.py", "_retrieve", "StopIteration"):
        "no instance at all: not an exception of the portal's",
    ("dicomweb/routes.py", "_retrieve", "RuntimeError"):
        "a corrupt file found while the multipart answer is assembled",
    ("dicomweb/routes.py", "retrieve_frames", "ValueError"):
        "parsing the frame list of the URL",
    ("dicomweb/routes.py", "retrieve_frames", "RenderRefused"):
        "406 and 'ask as stored' here, not the 422 of a rendered image",
    ("dicomweb/routes.py", "retrieve_bulkdata", "ValueError"):
        "parsing the bulk data path of the URL (404)",
    ("dicomweb/routes.py", "retrieve_bulkdata", "KeyError"):
        "no such attribute in the data set (404)",
    ("dicomweb/routes.py", "retrieve_bulkdata", "RenderRefused"):
        "406 and 'ask as stored' here, not the 422 of a rendered image",
    ("dicomweb/routes.py", "volume_view", "ValueError"):
        "parsing position and angle of the URL",
    ("dicomweb/routes.py", "volume_state", "RenderRefused"):
        "the reason says 'the 3D view could not be built' first",
    ("dicomweb/stow.py", "store_request", "MultipartError"):
        "the codec stays free of portal imports; the answer adds 'malformed multipart body'",
    ("studies/routes.py", "study_list", "ValueError"):
        "parsing the page number",
}


ANSWERS = {"abort", "error_response"}  # what a route calls to answer an error itself


def _local_mappings(path: Path) -> Iterator[tuple[str, str]]:
    """(function, caught exception) of every ``except`` whose body answers an error itself
    (``abort(...)`` or ``error_response(...)``)."""
    tree = ast.parse(path.read_text())
    for function in ast.walk(tree):
        if not isinstance(function, ast.FunctionDef):
            continue
        for node in ast.walk(function):
            if not isinstance(node, ast.ExceptHandler):
                continue
            aborts = any(isinstance(n, ast.Call) and isinstance(n.func, ast.Name)
                         and n.func.id in ANSWERS for b in node.body for n in ast.walk(b))
            if aborts and node.type is not None:
                caught = node.type.elts if isinstance(node.type, ast.Tuple) else [node.type]
                for name in caught:
                    yield function.name, ast.unparse(name).rsplit(".", 1)[-1]


def test_route_modules_map_no_domain_exception_themselves() -> None:
    found = {(str(path.relative_to(PORTAL)), function, caught)
             for path in ROUTE_MODULES for function, caught in _local_mappings(path)}
    unexplained = found - set(ALLOWED)
    assert not unexplained, f"let portal/errors.py answer these: {sorted(unexplained)}"
    stale = set(ALLOWED) - found
    assert not stale, f"no longer in the code; drop them from ALLOWED: {sorted(stale)}"
    assert all(ALLOWED.values())
