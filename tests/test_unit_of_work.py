"""One unit of work per request (portal/db.py, issue 14 item 2): a request uses one session,
committed in one place; the transactions that commit on their own are named and listed here;
reading a page writes nothing but what its handler decides."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from flask import Flask, abort
from pydicom.uid import generate_uid
from sqlalchemy import event, func, insert, select
from sqlalchemy.orm import Session

from portal.access.grants import create_grant
from portal.access.models import Practice
from portal.access.principal import Principal
from portal.archive import current_archive
from portal.db import db
from portal.reports.models import ReportRead
from portal.reports.service import IncomingReport, receive_report
from tests.conftest import IdentityProvider, add_person, signed_in
from tests.factories import make_dataset, to_bytes

ROOT = Path(__file__).resolve().parents[1]
ADMIN = Principal("user", 0, "t", roles=frozenset({"office_manager"}), issuer="t", subject="t")

# Who may commit on their own (a session or transaction outside the request's unit of work),
# and why. A new caller of write_transaction / new_session / audit_transaction / commit in
# portal/ fails test_own_transactions_are_the_named_few until it is added here with a reason
# that the request's outcome must not decide it (portal/db.py).
INGEST = "ingest: each instance durable before it is acknowledged; refusals and alerts kept"
EXTERNAL = "external archive: copies, sync and DIMSE work outside any request's outcome"
AUDIT = "audit: a read is recorded before any byte leaves, even if the request fails"
SESSIONS = "browser sessions: saved after the response is made, ended at once"
SHARE = "share exchange: PIN and attempt counters count although the answer is a 4xx"
OUTSIDE = "outside any request: listener, background thread, CLI, probe"
ALLOWED: dict[tuple[str, str], str] = {
    **{("portal.archive.ingest", f"Archive.{name}"): INGEST for name in (
        "_commit_batch", "_commit_one", "_alert", "record_rejections", "_identical",
        "_identical_many", "_forget", "reap", "verify")},
    ("portal.archive.after", "header_step.warm"):
        "background: the new series' middle headers, a second after the arrival, outside "
        "any request",
    ("portal.archive.ingest", "Archive.header"):
        "header cache: made from the file once, kept whatever the request answers",
    **{("portal.archive.copies", f"RemoteCopies.{name}"): EXTERNAL for name in (
        "_fetch", "_local", "evict", "restore", "touch", "usage")},
    **{("portal.archive.sync", name): EXTERNAL for name in (
        "_save", "_state", "_sync_listed", "index_study", "sync_index")},
    **{("portal.dicomweb.dimse_qr", f"QueryRetrieve.{name}"): EXTERNAL for name in (
        "_retrieve", "committed", "on_find")},
    ("portal.audit", "record"): AUDIT,
    ("portal.audit", "checkpoint_now"): AUDIT + " (CLI checkpoint)",
    ("portal.audit_forward", "forward"): AUDIT + " (forwarding, a background job)",
    ("portal.auth.sessions", "DatabaseSessionInterface._save"): SESSIONS,
    ("portal.auth.sessions", "end_user_sessions"): SESSIONS,
    ("portal.auth.bearer", "user_for_token"):
        "bearer sign-in: the account exists once its token is accepted, whatever the answer",
    **{("portal.sharing.service", name): SHARE for name in (
        "_count_wrong_pin", "_reserve_attempt", "end_share_session", "exchange", "find_link")},
    ("portal.sharing.sessions", "_end"): SHARE,
    ("portal.sharing.sessions", "_touch"): SHARE,
    ("portal.sharing.limits", "RateLimiter._in_database"): SHARE,
    ("portal.inbox.links", "exchange"):
        "upload-link exchange: as the share exchange, wrong PINs count although the answer "
        "is a 4xx",
    **{("portal.inbox.reconcile", name): OUTSIDE + " (inbox-accept job: each batch's "
       "files leave the inbox once the archive committed them, so a stopped move resumes; "
       "the 110107 record and the grants in one last transaction)"
       for name in ("_run_accept", "_finish_accept")},
    **{("portal.inbox.reconcile", name): "inbox accept in the request: the study is claimed "
       "(\"accepting\") before the ingest's own transactions, so a second accept or a reject "
       "meanwhile is refused; let go again if the accept fails"
       for name in ("_claim_inline", "_release")},
    ("portal.reports.inbound", "handle"): OUTSIDE + " (HL7 listener)",
    ("portal.reports.dicom", "after_ingest"): OUTSIDE + " (after-ingest step)",
    ("portal.reports.notify", "notifier.notify"): OUTSIDE + " (notices, after commit)",
    ("portal.reports.notify", "send_notices"): OUTSIDE + " (notices, after commit)",
    ("portal.jobs", "once_per_cluster"): OUTSIDE + " (a background job's cluster lock)",
    ("portal.reports.notify", "send_digest"): OUTSIDE + " (CLI digest)",
    ("portal.reports.cli", "release_rule_command"): OUTSIDE,
    **{("portal.retention.service", name): OUTSIDE + " (retention job and CLI: each study's "
       "deletion is its own all-or-nothing transaction, files removed after its commit)"
       for name in ("apply_approved", "_delete_if_due", "run_daily")},
    ("portal.retention.cli", "_list_due"): OUTSIDE + " (CLI: the daily list of studies due)",
    **{("portal.archive.compress", name): OUTSIDE + " (compress job and CLI: one instance's "
       "swap per transaction, after its new file is written and verified)"
       for name in ("compress_one", "compress_stored")},
    ("portal.access.cli", "create_command"): OUTSIDE,
    ("portal.access.cli", "deactivate_command"): OUTSIDE,
    ("portal.access.cli", "grant_role_command"): OUTSIDE,
    ("portal.imaging.prerender", "_build_volumes"): OUTSIDE + " (pre-render thread)",
    ("portal.imaging.prerender", "_warm"): OUTSIDE + " (pre-render thread)",
    ("portal.health", "readyz"): OUTSIDE + " (readiness probe)",
    ("portal.monitoring", "_ReadWhenScraped._audit"): OUTSIDE + " (a metrics scrape)",
    ("portal.db", "Database._transaction"): "the named transactions themselves",
    ("portal.db", "Database._fresh_snapshot"):
        "ends the request's read-only snapshot on SQLite; commits nothing",
    ("portal.db", "Database.install_unit_of_work._unit_of_work"): "the request's one commit",
}
OWN = {"write_transaction", "new_session", "audit_transaction", "commit"}


class _Calls(ast.NodeVisitor):
    """(module, enclosing function) of each call of an own-transaction method."""

    def __init__(self, module: str, found: set[tuple[str, str]]) -> None:
        self.module, self.found, self.scope = module, found, list[str]()

    def visit_FunctionDef(self, node: ast.FunctionDef | ast.AsyncFunctionDef
                          | ast.ClassDef) -> None:
        self.scope.append(node.name)
        self.generic_visit(node)
        self.scope.pop()

    visit_AsyncFunctionDef = visit_ClassDef = visit_FunctionDef

    def visit_Call(self, node: ast.Call) -> None:
        if isinstance(node.func, ast.Attribute) and node.func.attr in OWN:
            self.found.add((self.module, ".".join(self.scope)))
        self.generic_visit(node)


def own_transaction_sites() -> set[tuple[str, str]]:
    """(module, function) of every call of an own-transaction method in portal/."""
    found: set[tuple[str, str]] = set()
    for path in sorted((ROOT / "portal").rglob("*.py")):
        if "migrations" not in path.parts:
            module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            _Calls(module, found).visit(ast.parse(path.read_text(encoding="utf-8")))
    return found


def test_own_transactions_are_the_named_few() -> None:
    unlisted = own_transaction_sites() - set(ALLOWED)
    assert unlisted == set(), "commits outside the request's unit of work: list them with a " \
                              "reason above, or use the request's db.session"


@contextmanager
def sessions_opened(app: Flask) -> Iterator[list[str]]:
    """The purpose of every session that began a transaction on this app's engine: "request"
    for the request's own, else its named purpose (portal/db.py)."""
    engine = app.extensions["db"].engine
    seen: dict[int, tuple[Session, str]] = {}

    def begun(session: Session, _transaction: Any, connection: Any) -> None:
        if connection.engine is engine and id(session) not in seen:
            seen[id(session)] = (session, session.info.get("purpose", "request"))

    event.listen(Session, "after_begin", begun)
    purposes: list[str] = []
    try:
        yield purposes
    finally:
        event.remove(Session, "after_begin", begun)
        purposes.extend(sorted(purpose for _session, purpose in seen.values()))


def ingest_series(app: Flask, count: int = 3) -> tuple[str, str, list[str]]:
    study, series = generate_uid(), generate_uid()
    images = [make_dataset(study=study, series=series, InstanceNumber=n, value=n * 100)
              for n in range(1, count + 1)]
    with app.app_context():
        for ds in images:
            current_archive().ingest(to_bytes(ds), who="test")
    return study, series, [str(ds.SOPInstanceUID) for ds in images]


def test_a_rendered_image_uses_the_request_session_only(app: Flask,
                                                        auth: dict[str, str]) -> None:
    study, series, sops = ingest_series(app)
    client = app.test_client()
    base = f"/dicomweb/studies/{study}/series/{series}/instances"
    with sessions_opened(app) as first:
        answer = client.get(f"{base}/{sops[0]}/rendered", headers={**auth,
                                                                   "Accept": "image/png"})
    assert answer.status_code == 200, answer.data[:200]
    # The read's audit record is the one named transaction beside the request's session.
    assert first == ["audit", "request"]
    with sessions_opened(app) as again:  # the study's read is recorded already
        answer = client.get(f"{base}/{sops[1]}/rendered?viewport=32,32",
                            headers={**auth, "Accept": "image/png"})
    assert answer.status_code == 200
    assert again == ["request"]


def final_report(app: Flask, study: str) -> None:
    with app.extensions["db"].write_transaction() as session:
        receive_report(session, IncomingReport(
            source="hl7", source_id=f"R-{study[-8:]}", status="final",
            study_instance_uid=study, accession_number="ACC1", patient_id="PAT-1",
            patient_name="Doe^Jane", title="CT chest", impression="No finding.",
            author="Rad^Ria"))


def reads_of(app: Flask) -> int:
    with app.extensions["db"].new_session() as session:
        return int(session.scalar(select(func.count(ReportRead.id))) or 0)


def test_a_study_page_uses_one_session_and_marks_its_report_read_in_it(
        oidc_app: Flask, idp: IdentityProvider) -> None:
    study, _series, _sops = ingest_series(oidc_app)
    final_report(oidc_app, study)
    user = add_person(oidc_app, idp, "uow-doc", ["physician"])
    with oidc_app.extensions["db"].write_transaction() as session:
        create_grant(session, ADMIN, user_id=user, study_uid=study)
    browser = signed_in(oidc_app, idp, "uow-doc")
    assert browser.get(f"/studies/{study}").status_code == 200  # the view is now recorded
    with sessions_opened(oidc_app) as opened:
        page = browser.get(f"/studies/{study}")
    assert page.status_code == 200 and "No finding." in page.get_data(as_text=True)
    assert opened.count("request") == 1
    assert set(opened) <= {"request", "audit"}, opened  # the page view's record
    assert reads_of(oidc_app) == 1


def test_the_reports_template_global_only_reads(oidc_app: Flask,
                                                idp: IdentityProvider) -> None:
    study, _series, _sops = ingest_series(oidc_app)
    final_report(oidc_app, study)
    add_person(oidc_app, idp, "uow-reader", ["physician"])
    browser = signed_in(oidc_app, idp, "uow-reader")
    cookie = browser.get_cookie("portal")
    assert cookie is not None
    with oidc_app.test_request_context(headers={"Cookie": f"portal={cookie.value}"}):
        from portal.index.models import Study

        found = db.session.scalars(select(Study).where(
            Study.study_instance_uid == study)).one()
        with sessions_opened(oidc_app) as opened:
            views = oidc_app.jinja_env.globals["reports_of"](found)  # type: ignore[operator]
            assert not (db.session.new or db.session.dirty or db.session.deleted)
        assert opened == []  # nothing but the request's session, already open
        assert [v.report.impression for v in views] == ["No finding."]
    assert reads_of(oidc_app) == 0


def test_a_request_that_fails_after_a_write_leaves_nothing(app: Flask) -> None:
    from portal.access.policy import public

    names = iter(["kept", "dropped-on-409", "dropped-on-raise"])

    def add_practice() -> None:
        db.session.add(Practice(name=next(names)))
        db.session.flush()

    @public
    def ok() -> tuple[str, int]:
        add_practice()
        db.after_commit(lambda: committed.append("ok"))
        return "", 201

    @public
    def refused() -> str:
        add_practice()
        db.after_commit(lambda: committed.append("refused"))
        abort(409, "changed meanwhile")

    @public
    def broken() -> str:
        add_practice()
        raise RuntimeError("after the write")

    committed: list[str] = []
    app.add_url_rule("/_uow/ok", view_func=ok, methods=["POST"])
    app.add_url_rule("/_uow/refused", view_func=refused, methods=["POST"])
    app.add_url_rule("/_uow/broken", view_func=broken, methods=["POST"])
    client = app.test_client()
    assert client.post("/_uow/ok").status_code == 201
    assert client.post("/_uow/refused").status_code == 409
    app.testing, app.config["PROPAGATE_EXCEPTIONS"] = False, False
    assert client.post("/_uow/broken").status_code == 500
    with app.extensions["db"].new_session() as session:
        assert list(session.scalars(select(Practice.name))) == ["kept"]
    assert committed == ["ok"]


@pytest.mark.parametrize("status", [200, 302])
def test_answers_below_400_commit(app: Flask, status: int) -> None:
    from portal.access.policy import public

    @public
    def answer() -> tuple[str, int, dict[str, str]]:
        db.session.add(Practice(name=f"p{status}"))
        return "", status, {"Location": "/"}

    app.add_url_rule("/_uow/answer", view_func=answer, methods=["POST"])
    assert app.test_client().post("/_uow/answer").status_code == status
    with app.extensions["db"].new_session() as session:
        assert list(session.scalars(select(Practice.name))) == [f"p{status}"]


def test_a_core_write_after_a_stale_read_takes_the_write_lock_first(app: Flask) -> None:
    """``audit.append`` writes with Core, not the ORM (ingest's hot path): on SQLite it must
    still end the request's read snapshot and take the write lock first
    (``write_connection``), or a snapshot older than another writer's commit fails with
    "database is locked" instead of recording."""
    from portal import audit
    from portal.access.models import AuditEvent
    from portal.access.policy import public

    @public
    def read_then_record() -> tuple[str, int]:
        # The request reads (its snapshot begins), then another writer (a background
        # thread's, say) commits on a connection of its own.
        db.session.scalars(select(Practice.id)).all()
        with app.extensions["db"].engine.begin() as other:
            other.execute(insert(Practice), {"name": "committed meanwhile"})
        audit.append(db.session, audit.SECURITY_ALERT, action="U",
                     outcome=audit.OUTCOME_SUCCESS, who="stale-read-test",
                     details={"reason": "written after a stale read"})
        return "", 201

    app.add_url_rule("/_uow/stale", view_func=read_then_record, methods=["POST"])
    assert app.test_client().post("/_uow/stale").status_code == 201
    with app.extensions["db"].new_session() as session:
        kept = session.scalars(select(AuditEvent).where(AuditEvent.who == "stale-read-test")).all()
        assert len(kept) == 1 and kept[0].record_hash  # committed and sealed into the chain
        assert session.scalar(select(func.count()).select_from(Practice)) == 1


def test_a_savepoints_end_keeps_the_sessions_write_lock(app: Flask) -> None:
    """A SAVEPOINT released or rolled back inside a write must not make the next Core write
    start over (``write_connection`` would COMMIT the outer transaction's rows half-way)."""
    from portal.db import write_connection

    database = app.extensions["db"]
    with database.new_session() as session:
        session.add(Practice(name="outer"))
        session.flush()  # the write lock is taken here (BEGIN IMMEDIATE)
        with session.begin_nested():
            session.add(Practice(name="kept savepoint"))
        try:
            with session.begin_nested():
                session.add(Practice(name="rolled back savepoint"))
                session.flush()
                raise ValueError
        except ValueError:
            pass
        assert session.info.get("wrote")
        write_connection(session).execute(insert(Practice), {"name": "core"})
        session.rollback()  # all of it: nothing was committed half-way
    with database.new_session() as session:
        assert session.scalar(select(func.count()).select_from(Practice)) == 0
