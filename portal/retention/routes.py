"""The console's retention page: the practice's rules, legal holds, and the studies due for
deletion with their approval. Office managers only, changes with a recent sign-in
(docs/security.md 8), like the rest of the console (``portal/admin/routes.py``)."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, abort, flash, redirect, render_template, request, url_for
from flask_babel import gettext as _
from flask_babel import ngettext
from sqlalchemy import delete, select
from werkzeug.wrappers import Response as BaseResponse

from portal import audit, jobs
from portal.access.policy import require_role, study_filter
from portal.access.principal import Principal, current_principal
from portal.auth.recent import require_recent_sign_in
from portal.db import db, utcnow
from portal.index.models import Patient, Study
from portal.numbers import bounded_int
from portal.retention.models import BASES, LegalHold, RetentionDue, RetentionRule

bp = Blueprint("retention", __name__, url_prefix="/admin/retention")
MODALITY_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_")


def _manager() -> Principal:
    return require_role(current_principal(), "office_manager")


@bp.before_request
def _guard() -> BaseResponse | None:
    _manager()
    if request.method == "POST":
        return require_recent_sign_in("retention.index")
    return None


SOFTWARE_CONFIGURATION = "110131"  # DCM event type: a retention rule changed


def _record(principal: Principal, kind: str, details: dict[str, object],
            patient_id: str = "") -> None:
    """The change's audit record, in the request's unit of work (kept only if it commits)."""
    audit.append(db.session, audit.SECURITY_ALERT, action="U", outcome=audit.OUTCOME_SUCCESS,
                 who=principal.audit_name, patient_id=patient_id,
                 details={"type": kind, **details})


def _practice(principal: Principal) -> int:
    if principal.practice_id is None:
        abort(409, "you belong to no practice: retention rules are set per practice")
    return principal.practice_id


def _rule_of(principal: Principal, rule_id: int) -> RetentionRule:
    rule = db.session.get(RetentionRule, rule_id)
    if rule is None or rule.practice_fk != principal.practice_id:
        abort(404)
    return rule


def _visible_patient(principal: Principal, patient_id: str) -> Patient:
    """The patient with this Patient ID among those with a study the practice sees."""
    rows = list(db.session.scalars(
        select(Patient).distinct().join(Study, Study.patient_fk == Patient.id)
        .where(Patient.patient_id == patient_id, study_filter(principal))))
    if not rows:
        abort(404, "no patient with this ID among your practice's studies")
    if len(rows) > 1:
        abort(400, "several patients have this ID (different issuers); ask the archive team")
    return rows[0]


@bp.get("/")
def index() -> str:
    """Rules, holds, and what is due (the studies this office manager sees)."""
    principal = _manager()
    rules = list(db.session.scalars(
        select(RetentionRule).where(RetentionRule.practice_fk == principal.practice_id)
        .order_by(RetentionRule.modality, RetentionRule.id))) \
        if principal.practice_id is not None else []
    holds = db.session.execute(
        select(LegalHold, Patient).join(Patient, Patient.id == LegalHold.patient_fk)
        .join(Study, Study.patient_fk == Patient.id)
        .where(LegalHold.released_at.is_(None), study_filter(principal))
        .distinct().order_by(LegalHold.placed_at.desc())).all()
    due = db.session.execute(
        select(RetentionDue, Study, Patient)
        .join(Study, Study.study_instance_uid == RetentionDue.study_instance_uid)
        .join(Patient, Patient.id == Study.patient_fk)
        .where(study_filter(principal))
        .order_by(RetentionDue.kept_until, Study.id).limit(500)).all()
    return render_template("retention/index.html", rules=rules, holds=holds, due=due,
                           bases=BASES, has_practice=principal.practice_id is not None)


@bp.get("/rules/new")
def new_rule() -> str:
    """The form of a new rule."""
    _practice(_manager())
    return render_template("retention/rule.html", rule=None, bases=BASES)


@bp.get("/rules/<int:rule_id>")
def edit_rule(rule_id: int) -> str:
    """The form of an existing rule."""
    rule = _rule_of(_manager(), rule_id)
    return render_template("retention/rule.html", rule=rule, bases=BASES)


def _rule_fields() -> dict[str, Any]:
    form = request.form
    modality = form.get("modality", "").strip().upper()
    if len(modality) > 16 or not set(modality) <= MODALITY_CHARS:
        abort(400, "modality: a DICOM modality code such as CT or MR, or empty for every one")
    years = bounded_int(form.get("keep_years", ""), "years to keep", low=1, high=200)
    basis = form.get("basis", "last_study")
    if basis not in BASES:
        abort(400, "count the years from the patient's last study or from the study")
    minors = form.get("minors_until_age", "").strip()
    return {"modality": modality, "keep_years": years, "basis": basis,
            "minors_until_age": bounded_int(minors, "minors kept until age", low=18,
                                            high=120) if minors else None}


@bp.post("/rules")
def create_rule() -> BaseResponse:
    """Add a rule to the practice."""
    principal = _manager()
    rule = RetentionRule(practice_fk=_practice(principal), changed_by=principal.audit_name,
                         **_rule_fields())
    db.session.add(rule)
    db.session.flush()
    _record(principal, SOFTWARE_CONFIGURATION, {"retention_rule": rule.id, "made": True,
                                                **_rule_fields()})
    flash(_("Rule added. Studies it no longer keeps are listed at the next daily run."))
    return redirect(url_for("retention.index"))


@bp.post("/rules/<int:rule_id>")
def change_rule(rule_id: int) -> BaseResponse:
    """Change a rule of the practice."""
    principal = _manager()
    rule = _rule_of(principal, rule_id)
    for name, value in _rule_fields().items():
        setattr(rule, name, value)
    rule.changed_by, rule.changed_at = principal.audit_name, utcnow()
    _record(principal, SOFTWARE_CONFIGURATION, {"retention_rule": rule.id, **_rule_fields()})
    flash(_("Rule saved."))
    return redirect(url_for("retention.index"))


@bp.post("/rules/<int:rule_id>/delete")
def delete_rule(rule_id: int) -> BaseResponse:
    """Remove a rule (the studies it covered are kept unless another rule lets them go)."""
    principal = _manager()
    db.session.delete(_rule_of(principal, rule_id))
    _record(principal, SOFTWARE_CONFIGURATION, {"retention_rule": rule_id, "removed": True})
    flash(_("Rule removed."))
    return redirect(url_for("retention.index"))


@bp.post("/holds")
def place_hold() -> BaseResponse:
    """Put a patient's studies on legal hold: nothing of them is deleted until released."""
    principal = _manager()
    patient_id = request.form.get("patient_id", "").strip()
    reason = request.form.get("reason", "").strip()
    if not patient_id or not reason:
        abort(400, "a legal hold needs the Patient ID and a reason")
    patient = _visible_patient(principal, patient_id[:64])
    db.session.add(LegalHold(patient_fk=patient.id, reason=reason[:500],
                             placed_by=principal.audit_name))
    _record(principal, audit.OBJECT_SECURITY_CHANGED, {"legal_hold": "placed",
                                                       "reason": reason[:500]},
            patient_id=patient.patient_id)
    # The hold overrides at once: the patient's studies leave the list, approved or not.
    db.session.execute(delete(RetentionDue).where(
        RetentionDue.study_instance_uid.in_(
            select(Study.study_instance_uid).where(Study.patient_fk == patient.id))))
    flash(_("Legal hold placed: none of this patient's studies will be deleted."))
    return redirect(url_for("retention.index"))


@bp.post("/holds/<int:hold_id>/release")
def release_hold(hold_id: int) -> BaseResponse:
    """End a legal hold; the rules apply again from the next daily run."""
    principal = _manager()
    hold = db.session.get(LegalHold, hold_id)
    if hold is None or hold.released_at is not None:
        abort(404)
    patient = db.session.get(Patient, hold.patient_fk)
    if patient is None:
        abort(404)
    # This hold's own patient (not another with the same ID under another issuer) must have a
    # study the practice sees.
    if db.session.scalar(select(Study.id).where(Study.patient_fk == patient.id,
                                                study_filter(principal)).limit(1)) is None:
        abort(404)
    hold.released_at, hold.released_by = utcnow(), principal.audit_name
    _record(principal, audit.OBJECT_SECURITY_CHANGED, {"legal_hold": "released"},
            patient_id=patient.patient_id)
    flash(_("Legal hold released."))
    return redirect(url_for("retention.index"))


def _apply_soon() -> None:
    jobs.enqueue("retention-apply")


@bp.post("/approve")
def approve() -> BaseResponse:
    """Approve the deletion of the ticked studies, or of every listed one."""
    from portal.retention.service import approve as approve_due

    principal = _manager()
    chosen = None if request.form.get("all") else request.form.getlist("study")[:500]
    if chosen is not None and not chosen:
        abort(400, "tick the studies to delete, or approve them all")
    count = approve_due(db.session, principal, principal.audit_name, chosen)
    if count:
        _record(principal, audit.OBJECT_SECURITY_CHANGED,
                {"retention_approved": count, "studies": "all listed" if chosen is None
                 else chosen})
        db.after_commit(_apply_soon)
    flash(ngettext("Deletion approved for %(num)d study; it is deleted now unless it stopped "
                   "being due.", "Deletion approved for %(num)d studies; they are deleted now "
                   "unless they stopped being due.", count))
    return redirect(url_for("retention.index"))
