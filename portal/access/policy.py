"""③ The one place that decides who may see what. Everything else asks it.

A denied object answers 404, exactly like a missing one, so nobody learns what exists.
Routes are default-deny: a view is reachable without a principal only when marked ``@public``,
and by a share-link visitor only when marked ``@share_visible`` (or its blueprint
``share_reads``); a view marked ``@download`` needs a link with the download permission.
Templates and services ask ``allowed`` / ``may`` by action name, never roles.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, NoReturn, TypeVar

from flask import Blueprint, Flask, abort, current_app, redirect, request, url_for
from sqlalchemy import (
    CompoundSelect,
    Select,
    and_,
    false,
    func,
    literal,
    or_,
    select,
    true,
    union_all,
)
from sqlalchemy.orm import Session, aliased, contains_eager, joinedload
from sqlalchemy.sql.elements import ColumnElement
from werkzeug.datastructures import WWWAuthenticate
from werkzeug.exceptions import Unauthorized
from werkzeug.wrappers import Response as BaseResponse

from portal import audit
from portal.access.models import (
    AuditEvent,
    Delegation,
    Grant,
    PatientLink,
    ReferrerIdentifier,
    User,
)
from portal.access.principal import Principal, current_principal, loaders
from portal.access.users import managed_practice
from portal.db import db, utcnow
from portal.dicom_classes import REPORT_CLASSES
from portal.index.models import (
    Instance,
    Order,
    OrderStudy,
    Patient,
    Series,
    Study,
    StudyReferrer,
)

F = TypeVar("F", bound=Callable[..., Any])


def public(view: F) -> F:
    """Mark a view as reachable without signing in (an explicit allow-list)."""
    view.portal_public = True  # type: ignore[attr-defined]
    return view


def share_visible(view: F) -> F:
    """Mark a view as reachable by a share-link visitor (another explicit allow-list)."""
    view.portal_share_visible = True  # type: ignore[attr-defined]
    return view


def download(view: F) -> F:
    """Mark a view that hands out whole files (original instances, frames, bulk data, the
    ZIP, the report as a PDF): a share-link visitor needs a link made with the download
    permission, else 403 (docs/security.md 14). It does not make the view share-visible."""
    view.portal_download = True  # type: ignore[attr-defined]
    return view


def share_reads(blueprint: Blueprint) -> Blueprint:
    """Mark every GET and HEAD of a blueprint as share-visible (DICOMweb: the study a link
    opens, read through the standard's resources); its writes stay closed to visitors."""
    blueprint.portal_share_reads = True  # type: ignore[attr-defined]
    return blueprint


def allows(view: Callable[..., Any] | None) -> tuple[bool, bool]:
    """What a view's marks allow a share-link visitor: (reach it, it is a download)."""
    return (bool(getattr(view, "portal_share_visible", False)),
            bool(getattr(view, "portal_download", False)))


def _share_may_reach(principal: Principal, endpoint: str) -> None:
    """A share visitor reaches only marked views; other pages do not exist for him."""
    view = current_app.view_functions.get(endpoint)
    visible, is_download = allows(view)
    blueprint = current_app.blueprints.get(request.blueprint or "")
    if request.method in ("GET", "HEAD") and getattr(blueprint, "portal_share_reads", False):
        visible = True
    study_uid = str((request.view_args or {}).get("study_uid")
                    or (request.view_args or {}).get("study") or "")
    if is_download and not principal.can_download:
        deny(principal, "download", study_uid, status=403,
             reason="this link allows viewing only, not downloading")
    if visible:
        return
    deny(principal, "page", study_uid)


def is_public(endpoint: str | None) -> bool:
    """True when the endpoint's view is on the public allow-list."""
    if endpoint is None:
        return True  # no route matched: let the 404/405 handlers answer
    if endpoint == "static":
        return True
    view = current_app.view_functions.get(endpoint)
    return bool(getattr(view, "portal_public", False))


# The access rules' own FROMs: never correlated with the query whose studies they filter.
_ACCESS_STUDY = aliased(Study, name="access_study")


def _granted(user_ids: Any, *, personal: bool) -> list[Select[int]]:
    """Ids of the studies live grants (not revoked, not expired) of these users cover: one
    study by its UID, or every study of one patient; a patient's grant given by a practice's
    manager (``Grant.practice_fk``), only the studies of the patient that practice's own
    physicians referred or ordered, not those other practices hold."""
    study = _ACCESS_STUDY
    live = [Grant.user_fk.in_(user_ids), Grant.revoked_at.is_(None),
            or_(Grant.expires_at.is_(None), Grant.expires_at > utcnow())]
    if not personal:
        live.append(Grant.break_glass.is_(False))  # emergency access is personal
    members = select(User.id).where(User.practice_fk == Grant.practice_fk,
                                    User.active.is_(True)).correlate(Grant)
    practices = union_all(*_referred(members))
    return [select(study.id).join(Grant, Grant.study_instance_uid == study.study_instance_uid)
            .where(*live),
            select(study.id).join(Grant, Grant.patient_fk == study.patient_fk).where(
                *live, or_(Grant.practice_fk.is_(None), study.id.in_(practices)))]


def _referred(user_ids: Any) -> list[Select[int]]:
    """Ids of the studies that name one of these users as referrer (linked identifiers), or
    whose RIS order (same accession number and patient; not cancelled) names one as ordering
    provider. The order's studies were found when the order or the study arrived
    (``OrderStudy``, kept by the index): both parts are index-only scans by key."""
    named = (select(StudyReferrer.study_fk)
             .join(ReferrerIdentifier, ReferrerIdentifier.key == StudyReferrer.key)
             .where(ReferrerIdentifier.user_fk.in_(user_ids)))
    ordered = (select(OrderStudy.study_fk)
               .join(ReferrerIdentifier, ReferrerIdentifier.key == OrderStudy.key)
               .where(ReferrerIdentifier.user_fk.in_(user_ids)))
    return [named, ordered]


def study_filter(principal: Principal) -> ColumnElement[bool]:
    """A SQL condition on ``Study`` that keeps only what the principal may see.

    Machines: everything with the read right, else nothing. People: (a) studies that name
    them as referrer, (b) their grants, (c) what colleagues who delegated to them see,
    office managers and staff their practice's, patients their linked patient records.

    The rules are one set of study ids, a UNION ALL of index-driven lookups (the referrer
    keys, grants, orders and patient links of these people), never an OR of correlated
    EXISTS tests: the database finds the few thousand studies a person may see through the
    indexes instead of testing every study of the archive against four subqueries (at
    1,000,000 studies the ORed form took 3-5 s for a physician; benchmarks/index_scale.py).
    """
    if principal.kind == "machine":
        return true() if principal.can_read_all else false()
    if principal.kind == "share":  # exactly the link's studies, fixed when it was made
        return Study.study_instance_uid.in_(sorted(principal.share_studies)) \
            if principal.share_studies else false()
    referrers, parts = _person_parts(principal)
    for users in referrers:
        parts += _referred(users)
    return Study.id.in_(union_all(*parts))


def _person_parts(principal: Principal) -> tuple[list[Select[int]], list[Select[int]]]:
    """A person's access rules in two parts: the people whose referrer keys (and orders)
    open studies to him, and the ids of the other studies he may see (grants, delegated
    grants, his patient records)."""
    me = principal.id
    referrers: list[Select[int]] = []
    parts = _granted([me], personal=True)
    if principal.has_role("physician"):
        delegators = select(Delegation.from_user_fk).where(Delegation.to_user_fk == me)
        referrers.append(select(User.id).where(
            or_(User.id == me, User.id.in_(delegators)), User.active.is_(True)))
        parts += _granted(delegators, personal=False)
    if (principal.has_role("office_manager") or principal.has_role("staff")) \
            and principal.practice_id is not None:
        members = select(User.id).where(User.practice_fk == principal.practice_id,
                                        User.active.is_(True))
        referrers.append(members)
        parts += _granted(members, personal=False)
    if principal.has_role("patient"):
        study = _ACCESS_STUDY
        parts.append(select(study.id).join(PatientLink, PatientLink.patient_fk == study.patient_fk)
                     .where(PatientLink.user_fk == me))
    return referrers, parts


# A person with more referrer keys than this has his list sorted the general way.
MAX_LIST_KEYS = 200


def keyed_access(session: Session,
                 principal: Principal) -> tuple[list[str], CompoundSelect[tuple[int]]] | None:
    """The same rules as ``study_filter`` for a person's study list, split so its pages come
    off ordered indexes: the referrer keys under which studies are open to him (each key's
    studies are kept in (date, time, id) order beside the key, in ``StudyReferrer`` and
    ``OrderStudy``), and the ids of the other studies he may see (grants, patient records:
    few). None for a machine or a share visitor, or a person with more than MAX_LIST_KEYS
    keys: their lists filter the studies with ``study_filter``."""
    if principal.kind != "user":
        return None
    referrers, parts = _person_parts(principal)
    keys: list[str] = []
    if referrers:
        keys = sorted(set(session.scalars(select(ReferrerIdentifier.key).where(
            ReferrerIdentifier.user_fk.in_(union_all(*referrers)))
            .limit(MAX_LIST_KEYS + 1))))
        if len(keys) > MAX_LIST_KEYS:
            return None
    return keys, union_all(*parts)


def series_filter(principal: Principal) -> ColumnElement[bool]:
    """A SQL condition on ``Series`` within a visible study: a share link made for selected
    series opens only those."""
    if principal.kind == "share" and principal.share_series:
        return Series.series_instance_uid.in_(sorted(principal.share_series))
    return true()


def instance_filter(principal: Principal) -> ColumnElement[bool]:
    """A SQL condition on ``Instance`` within a visible study: report objects (SR, encapsulated
    PDF) reach patients and share-link visitors only as reports, under the release rules, and
    a link made for selected series opens only their instances."""
    conditions: list[ColumnElement[bool]] = []
    if is_patient(principal):
        conditions.append(Instance.sop_class_uid.not_in(sorted(REPORT_CLASSES)))
    if principal.kind == "share" and principal.share_series:
        conditions.append(Instance.series_fk.in_(select(Series.id).where(
            series_filter(principal))))
    return and_(*conditions) if conditions else true()


def visible_studies(principal: Principal) -> Select[Study]:
    """The studies this principal may see, as a query to refine."""
    return select(Study).where(study_filter(principal))


# -- patients: their own records, and sharing them ------------------------------------------

CLINICAL_SHARERS = ("physician", "office_manager")
CLINICAL_ROLES = ("physician", "office_manager", "staff")


def is_patient(principal: Principal) -> bool:
    """Patients (signed in as such, or any share-link visitor not known as a physician)
    read under the release rules; everyone else who may see the study reads at once."""
    clinical = any(principal.has_role(r) for r in CLINICAL_ROLES)
    if principal.kind == "user":
        return principal.has_role("patient") and not clinical
    return principal.kind == "share" and not clinical


def is_patient_user(principal: Principal | None) -> bool:
    """A signed-in patient (no clinical role): he gets the patient pages, in plain words."""
    return principal is not None and principal.kind == "user" and is_patient(principal)


def reads_plain_words(principal: Principal | None) -> bool:
    """A patient, signed in or opening a link made for a patient: pages speak plainly to
    him (no modality codes, accession numbers or other DICOM terms)."""
    return is_patient_user(principal) or (
        principal is not None and principal.kind == "share"
        and principal.share_audience == "patient")


def own_studies_condition(principal: Principal) -> ColumnElement[bool]:
    """SQL on ``Study``: studies of the patient records linked to this patient's account
    (grants and referrals are not "his own")."""
    if not is_patient_user(principal):
        return false()
    return Study.patient_fk.in_(select(PatientLink.patient_fk)
                                .where(PatientLink.user_fk == principal.id))


def share_audiences(principal: Principal | None) -> tuple[str, ...]:
    """Whom this principal may share studies with: physicians and office managers with a
    patient or a colleague; a patient only with a doctor (a second opinion); others nobody."""
    if principal is None or principal.kind != "user":
        return ()
    if any(principal.has_role(r) for r in CLINICAL_SHARERS):
        return ("patient", "physician")
    if is_patient_user(principal):
        return ("physician",)
    return ()


def order_placers(principal: Principal) -> Select[int] | None:
    """The people whose orders this person may list: a physician his own; office managers
    and staff their practice's (and their own); None for everyone else."""
    if principal.kind != "user":
        return None
    if (principal.has_role("office_manager") or principal.has_role("staff")) \
            and principal.practice_id is not None:
        return select(User.id).where(or_(User.id == principal.id,
                                         User.practice_fk == principal.practice_id))
    if principal.has_role("physician"):
        return select(User.id).where(User.id == principal.id)
    return None


# What a page may offer, by name: the one question templates (``may``) and services ask
# instead of reading roles and kinds themselves.
ACTIONS: dict[str, Callable[[Principal | None], bool]] = {
    # A signed-in person: his own pages, sign-out, links he made, reads remembered.
    "account": lambda p: p is not None and p.kind == "user",
    # A share-link visitor: the shared pages and closing the visit.
    "shared_visit": lambda p: p is not None and p.kind == "share",
    # Whole files (ZIP, original instances, the report as a PDF): a share visitor only with
    # a link made with the download permission (docs/security.md 14).
    "download": lambda p: p is None or p.can_download,
    "orders": lambda p: p is not None and p.kind == "user"
    and any(p.has_role(r) for r in CLINICAL_ROLES),
    "console": lambda p: p is not None and p.kind == "user" and p.has_role("office_manager"),
    # Every share link of the practice, not only one's own.
    "all_links": lambda p: p is not None and p.kind == "user" and p.has_role("office_manager"),
    # "New report" badges: clinicians; patients read under release rules and get none.
    "unread_badges": lambda p: p is not None and p.kind == "user" and not is_patient(p),
}


def allowed(principal: Principal | None, action: str) -> bool:
    """Whether ``principal`` may do ``action`` (a name in ``ACTIONS``); an unknown name is a
    programming error, not a refusal."""
    return ACTIONS[action](principal)


def may(action: str) -> bool:
    """The template global: may this request's principal do ``action``?"""
    return allowed(current_principal(), action)


def shareable_studies(principal: Principal) -> Select[Study]:
    """The studies this principal may put in a share link: what a clinical sharer sees; a
    patient's own studies only."""
    if not share_audiences(principal):
        return select(Study).where(false())
    stmt = visible_studies(principal)
    if is_patient_user(principal):
        stmt = stmt.where(own_studies_condition(principal))
    return stmt


def readable_audit_condition(principal: Principal) -> ColumnElement[bool]:
    """SQL on ``AuditEvent``: the records a patient may read on "Who opened my images",
    those about his own studies; nothing for anyone else (staff read the console)."""
    if not is_patient_user(principal):
        return false()
    own = select(Study.study_instance_uid).where(own_studies_condition(principal))
    return and_(AuditEvent.study_instance_uid != "", AuditEvent.study_instance_uid.in_(own))


def manager_audit_condition(principal: Principal) -> ColumnElement[bool]:
    """SQL on ``AuditEvent``: the records an office manager reads in the console. A manager
    of a practice reads those about a study his practice may see and those of what his
    practice's people did (their sign-ins, grants, changes); the installation's manager (of
    no practice) reads every record."""
    if managed_practice(principal) is None:
        return true()
    seen = select(Study.study_instance_uid).where(study_filter(principal))
    people = select(literal("user:") + User.issuer + literal("|") + User.subject).where(
        User.practice_fk == principal.practice_id)
    return or_(AuditEvent.study_instance_uid.in_(seen), AuditEvent.who.in_(people))


def own_orders_condition(principal: Principal) -> ColumnElement[bool]:
    """SQL on ``Order``: a patient's appointments and orders. Orders keep no issuer, so a
    Patient ID alone may be another hospital's patient: the order must also name him as his
    record does (case aside) or belong to one of his own studies."""
    if not is_patient_user(principal):
        return false()
    mine = select(Patient.id).join(PatientLink, PatientLink.patient_fk == Patient.id).where(
        PatientLink.user_fk == principal.id)
    same_person = select(Patient.id).join(PatientLink, PatientLink.patient_fk == Patient.id) \
        .where(PatientLink.user_fk == principal.id, Patient.patient_id != "",
               Patient.patient_id == Order.patient_id,
               func.lower(Patient.patient_name) == func.lower(Order.patient_name))
    own_study = select(Study.id).where(
        Study.patient_fk.in_(mine),
        or_(and_(Order.study_instance_uid != "",
                 Study.study_instance_uid == Order.study_instance_uid),
            and_(Order.accession_number != "",
                 Study.accession_number == Order.accession_number)))
    return or_(same_person.exists(), own_study.exists())


_UID = re.compile(r"[0-9.]{1,64}")


def record_refusal(principal: Principal | None, what: str, study_uid: str = "") -> None:
    """Record a refused access in the audit trail (docs/security.md 40).

    A missing object is recorded like a forbidden one, so neither the answer nor its timing
    tells them apart. The requested UID is kept only when it has the form of a UID; the rest
    of what the caller sent stays out of the trail.
    """
    audit.record(db, audit.INSTANCES_ACCESSED, action="R",
                 outcome=audit.OUTCOME_MINOR_FAILURE,
                 who=principal.audit_name if principal is not None else "unknown",
                 source_address=request.remote_addr or "",
                 study_instance_uid=study_uid if _UID.fullmatch(study_uid or "") else "",
                 details={"refused": what, "endpoint": str(request.endpoint or "")[:64]})


def deny(principal: Principal | None, what: str, study_uid: str = "", *, status: int = 404,
         reason: str | None = None) -> NoReturn:
    """Record the refusal, then answer ``status`` (404 unless said otherwise)."""
    record_refusal(principal, what, study_uid)
    if reason is None:
        abort(status)
    abort(status, reason)


def require_study(session: Session, principal: Principal, study_uid: str) -> Study:
    """Load a study the principal may see, or answer 404."""
    study = session.scalars(visible_studies(principal)
                            .options(joinedload(Study.patient))
                            .where(Study.study_instance_uid == study_uid)).first()
    if study is None:
        deny(principal, "study", study_uid, reason="no such study")
    return study


def require_series(session: Session, principal: Principal, study_uid: str,
                   series_uid: str) -> Series:
    """Load a series that belongs to the named, visible study, or answer 404.

    One query: the series, its study and patient, and the access condition together.
    """
    series = session.scalars(
        select(Series).join(Series.study).join(Study.patient)
        .options(contains_eager(Series.study).contains_eager(Study.patient))
        .where(Series.series_instance_uid == series_uid,
               Study.study_instance_uid == study_uid, study_filter(principal),
               series_filter(principal))).first()
    if series is None:
        deny(principal, "series", study_uid, reason="no such series")
    return series


def require_instance(session: Session, principal: Principal, study_uid: str, series_uid: str,
                     sop_uid: str) -> Instance:
    """Load an instance of the named series and study, or answer 404 (one query)."""
    instance = session.scalars(
        select(Instance).join(Instance.series).join(Series.study).join(Study.patient)
        .options(contains_eager(Instance.series).contains_eager(Series.study)
                 .contains_eager(Study.patient))
        .where(Instance.sop_instance_uid == sop_uid,
               Series.series_instance_uid == series_uid,
               Study.study_instance_uid == study_uid, study_filter(principal),
               series_filter(principal), instance_filter(principal))).first()
    if instance is None:
        deny(principal, "instance", study_uid, reason="no such instance")
    return instance


def require_store(principal: Principal) -> None:
    """Only callers given the right to store may send instances."""
    if not principal.can_store:
        abort(403, "this caller may not store instances")


def require_role(principal: Principal | None, role: str) -> Principal:
    """The principal if it holds ``role``; 403 otherwise (401 when nobody is signed in)."""
    if principal is None:
        abort(401)
    if not principal.has_role(role):
        abort(403, f"this needs the {role.replace('_', ' ')} role")
    return principal


def init_app(app: Flask) -> None:
    """Install the default-deny hook: every non-public route needs a principal."""

    @app.context_processor
    def _principal_for_templates() -> dict[str, Any]:
        return {"viewer": current_principal()}

    app.add_template_global(may)  # templates ask this, never roles (allowed, ACTIONS)

    @app.before_request
    def _default_deny() -> BaseResponse | None:
        if is_public(request.endpoint):
            return None
        principal = current_principal()
        if principal is not None:
            if principal.kind == "share":
                _share_may_reach(principal, str(request.endpoint))
            return None
        if request.headers.get("Authorization"):
            # Credentials were sent and refused: a failed authentication (docs/security.md 2, 40).
            scheme = request.headers["Authorization"].partition(" ")[0].lower()[:16]
            audit.record(db, audit.USER_AUTHENTICATION, action="E",
                         outcome=audit.OUTCOME_MINOR_FAILURE, who="unknown",
                         source_address=request.remote_addr or "",
                         details={"type": audit.LOGIN, "reason": "credentials refused",
                                  "scheme": scheme if scheme in ("basic", "bearer") else "other"})
        if request.path.startswith(("/dicomweb", "/api", "/fhir")) or \
                request.headers.get("Authorization"):
            challenge = loaders().challenge
            # Says why a bearer token was refused (RFC 6750); registered by auth.bearer.
            bearer = challenge() if challenge is not None else WWWAuthenticate(
                "bearer", {"realm": "portal"})
            challenges = [WWWAuthenticate("basic", {"realm": "portal"}), bearer]
            if request.headers.get("Sec-Fetch-Site") == "same-origin" \
                    and not request.headers.get("Authorization"):
                # The portal's own pages (the viewer's images after a session ended) get no
                # Basic challenge: a browser would answer it with a password dialog; the
                # page itself offers to sign in again.
                challenges = [bearer]
            raise Unauthorized(
                bearer.get("error_description")
                or "sign in, or send a bearer token or a registered client's credentials",
                www_authenticate=challenges)
        if request.method == "GET":
            return redirect(url_for("auth.login", next=request.full_path.rstrip("?")))
        raise Unauthorized("please sign in again")
